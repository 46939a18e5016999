"""Replay every committed scenario and compare with its expected response, exactly."""

from __future__ import annotations

import copy
import json
import re

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest

from conftest import HOOK_SCENARIOS, load, scenarios
from service.cli import scenario_target

SCENARIOS = scenarios()


def test_there_are_enough_scenarios():
    assert len(SCENARIOS) >= 10


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_matches_expected(client, scenario):
    request, expected = load(scenario / "request.json"), load(scenario / "expected.json")
    response = client.post(scenario_target(request, ""), json=request)
    assert response.get_json() == expected
    assert (response.status_code == 200) == ("cards" in expected)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_same_request_gives_same_response(client, scenario):
    request = load(scenario / "request.json")
    first = client.post(scenario_target(request, ""), json=request).get_json()
    second = client.post(scenario_target(request, ""), json=copy.deepcopy(request)).get_json()
    assert first == second


@pytest.mark.parametrize("scenario", HOOK_SCENARIOS, ids=[s.name for s in HOOK_SCENARIOS])
def test_evaluate_bundle_answers_as_patient_view(client, scenario):
    # A Bundle is the whole record, so the hook request it is compared with sends every key
    # (null where there is no data): then both describe exactly the same resources.
    request = load(scenario / "request.json")
    for key in client.get("/cds-services").get_json()["services"][0]["prefetch"]:
        request["prefetch"].setdefault(key, None)
    entries = []
    for value in request["prefetch"].values():
        if value is None:
            continue
        resources = (
            [e["resource"] for e in value.get("entry", [])] if value["resourceType"] == "Bundle" else [value]
        )
        entries += [{"resource": r} for r in resources]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    as_of = request["extension"]["imnm-cds.asOf"]
    from_bundle = client.post(f"/evaluate?asOf={as_of}", json=bundle)
    from_hook = client.post("/cds-services/imnm-patient-view", json=request)
    assert from_bundle.status_code == from_hook.status_code == 200
    assert from_bundle.get_json() == from_hook.get_json()
    assert from_hook.get_json()["cards"]


SUGGESTED = {"ServiceRequest": ServiceRequest, "MedicationRequest": MedicationRequest}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_suggestion_is_valid_fhir_r4_and_offered_once(client, scenario):
    request = load(scenario / "request.json")
    cards = client.post(scenario_target(request, ""), json=request).get_json().get("cards", [])
    created = [
        action["resource"]
        for card in cards
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
        if action["type"] == "create"
    ]
    for resource in created:
        SUGGESTED[resource["resourceType"]].model_validate(resource)
    # Accepting two equal suggestions would place the same order twice.
    orders = [json.dumps({k: v for k, v in r.items() if k != "reasonCode"}, sort_keys=True) for r in created]
    assert len(orders) == len(set(orders))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_cards_keep_engineering_defaults_and_raw_ids_to_the_extension(client, scenario):
    request = load(scenario / "request.json")
    for card in client.post(scenario_target(request, ""), json=request).get_json().get("cards", []):
        assert "Engineering default" not in card["detail"]  # listed by `imnm-cds knowledge-report`
        assert len(card["summary"]) < 140 and not card["summary"].endswith("…")
        prose, *lists = re.split(
            r"\n\n(?=\*\*(?:Evidence|Not known|Data not used|How sure):\*\*)", card["detail"]
        )
        assert len(prose) <= 600, prose  # a clinician reads it in seconds; the rest is on the page
        assert lists[-1].startswith("**How sure:** ") and "\n" not in lists[-1]
        for reference in card["extension"]["imnm-cds.evidence"]:
            assert reference not in card["detail"]
