"""Every card we return, checked against the CDS Hooks 2.0 schema and the spec's rules for cards."""

from __future__ import annotations

import jsonschema
import pytest
from fhir.resources.R4B import get_fhir_model_class

from conftest import FIXTURES, SCHEMA, WEAKNESS, ck, condition, hook_request, load, scenarios
from rules.knowledge import TOPICS
from service.cli import scenario_target

SEVERITY = ["critical", "warning", "info"]


def responses(client):
    for scenario in scenarios():
        request = load(scenario / "request.json")
        body = client.post(scenario_target(request, ""), json=request).get_json()
        if "cards" in body:
            yield scenario.name, request, body


def references_in(request: dict) -> set[str]:
    """Every way a card may cite a resource of this request: Type/id and entry fullUrl."""
    found = set()
    stack = [request]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("resourceType"), str) and isinstance(node.get("id"), str):
                found.add(f"{node['resourceType']}/{node['id']}")
            if isinstance(node.get("fullUrl"), str):
                found.add(node["fullUrl"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def no_empty_values(value, path="$"):
    """CDS Hooks: JSON elements SHALL NOT be null or empty ("", [], {}); optional ones are omitted."""
    assert value is not None and value != "" and value != [] and value != {}, path
    if isinstance(value, dict):
        for key, child in value.items():
            no_empty_values(child, f"{path}.{key}")
    elif isinstance(value, list):
        for i, child in enumerate(value):
            no_empty_values(child, f"{path}[{i}]")


def test_every_fixture_card_conforms(client, evaluator):
    checked = 0
    for name, request, body in responses(client):
        jsonschema.validate(body, {**SCHEMA, "$ref": "#/$defs/response"})
        for card in body["cards"]:
            no_empty_values(card)
            assert len(card["summary"]) < 140, name
            assert card["source"]["topic"]["code"] in TOPICS
            assert card["source"]["url"].startswith("https://")
            rules = card["extension"]["imnm-cds.rules"]
            assert rules and set(rules) <= set(evaluator.engine.rule_ids)
            evidence = card["extension"]["imnm-cds.evidence"]
            assert evidence and set(evidence) <= references_in(request), name
            for reference in evidence:  # in the extension, not in the words a clinician reads
                assert reference not in card["detail"]
            if (
                card["source"]["topic"]["code"] == "imnm-suspected"
                and "imnm-cds.probability" in card["extension"]
            ):
                assert 0 <= card["extension"]["imnm-cds.pretestProbability"] <= 1
                assert 0 <= card["extension"]["imnm-cds.probability"] <= 1
            for reason in card["overrideReasons"]:
                assert reason["display"] and reason["system"] and reason["code"]
            for link in card.get("links", []):
                assert link["type"] == "absolute" and "appContext" not in link
            if "suggestions" in card:
                assert card["selectionBehavior"] in ("any", "at-most-one")
                for suggestion in card["suggestions"]:
                    for action in suggestion["actions"]:
                        assert action["description"]
                        if action["type"] == "delete":  # cds-resp-2: resourceId, no resource
                            assert "resource" not in action and action["resourceId"] in references_in(request)
                            continue
                        assert action["type"] == "create"
                        get_fhir_model_class(action["resource"]["resourceType"]).model_validate(
                            action["resource"]
                        )
                        assert action["resource"]["subject"]["reference"] == request_patient(request)
            checked += 1
        uuids = [c["uuid"] for c in body["cards"]] + [
            s["uuid"] for c in body["cards"] for s in c.get("suggestions", [])
        ]
        assert len(uuids) == len(set(uuids))
        order = [SEVERITY.index(c["indicator"]) for c in body["cards"]]
        assert order == sorted(order)
    assert checked >= 10


def request_patient(request: dict) -> str:
    """How a suggested order must reference the patient: Patient/id, or the fullUrl of one without an id."""
    if request.get("resourceType") == "Bundle":
        entry = next(e for e in request["entry"] if e["resource"]["resourceType"] == "Patient")
        return f"Patient/{entry['resource']['id']}" if "id" in entry["resource"] else entry["fullUrl"]
    return f"Patient/{request['context']['patientId']}"


def test_card_uuid_is_stable_for_the_same_data_and_changes_with_it(client):
    base = [ck("ck1", 3000), condition("w1", WEAKNESS)]
    first = client.post("/cds-services/imnm-patient-view", json=hook_request(resources=base)).get_json()
    again = client.post("/cds-services/imnm-patient-view", json=hook_request(resources=base)).get_json()
    changed = client.post(
        "/cds-services/imnm-patient-view",
        json=hook_request(resources=[*base, ck("ck2", 3500, when="2024-05-20")]),
    ).get_json()
    other = client.post(
        "/cds-services/imnm-patient-view",
        json=hook_request(
            "p2",
            resources=[
                ck("ck1", 3000) | {"subject": {"reference": "Patient/p2"}},
                condition("w1", WEAKNESS, patient="p2"),
            ],
        ),
    ).get_json()
    assert first["cards"][0]["uuid"] == again["cards"][0]["uuid"]
    assert first["cards"][0]["uuid"] != changed["cards"][0]["uuid"]
    assert first["cards"][0]["uuid"] != other["cards"][0]["uuid"]


def test_workup_card_suggests_only_the_missing_tests(client):
    hmgcr_done = {
        "resourceType": "Observation",
        "id": "h",
        "status": "final",
        "code": {"text": "HMGCR Ab"},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-05-02",
        "valueString": "Negative",
    }
    card = client.post(
        "/cds-services/imnm-patient-view",
        json=hook_request(resources=[ck("ck1", 3000), condition("w1", WEAKNESS), hmgcr_done]),
    ).get_json()["cards"][0]
    labels = [s["label"] for s in card["suggestions"]]
    assert labels == ["Order anti-SRP antibody", "Order MRI of both thighs (STIR and T1)"]
    srp = card["suggestions"][0]["actions"][0]["resource"]
    assert srp["code"]["coding"][0]["code"] == "33921-8" and srp["intent"] == "proposal"


def test_seronegative_without_biopsy_data_suggests_one_and_never_calls_it_missing(client):
    negative = [
        {
            "resourceType": "Observation",
            "id": name,
            "status": "final",
            "code": {"text": f"{name.upper()} Ab"},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-05-02",
            "valueString": "Negative",
        }
        for name in ("hmgcr", "srp")
    ]
    resources = [ck("ck1", 3000), condition("w1", WEAKNESS), *negative]
    for prefetch, biopsy in (
        ({}, "- muscle biopsy: unknown (no diagnostic reports available)"),
        ({"reports": None}, "- muscle biopsy: none reported"),
    ):
        request = hook_request(resources=resources, **prefetch)
        card = client.post("/cds-services/imnm-patient-view", json=request).get_json()["cards"][0]
        assert card["summary"].startswith("HMGCR and SRP negative") and biopsy in card["detail"]
        assert card["suggestions"][-1]["label"] == "Request a muscle biopsy with MHC-I and C5b-9 staining"


# Each fixture's probability, worked by hand in rules/PROBABILITY.md; None: the model does not apply.
FIGURES = {
    "worked-example-hmgcr-positive": ("statin on record", 0.789),
    "bundle-worked-example": ("no statin on record, or statin exposure unknown", 0.636),
    "hmgcr-negative": ("no statin on record, or statin exposure unknown", 0.146),
    "imnm-both-negative-after-statin": ("statin on record", 0.051),
    "imnm-both-negative-statin-naive": ("no statin on record, or statin exposure unknown", 0.100),
    "anti-srp-positive": ("no statin on record, or statin exposure unknown", 0.556),
    "seronegative-biopsy": ("no statin on record, or statin exposure unknown", 0.3455),
    "juvenile-not-screened": (None, None),
    "imnm-ck-1-5x-no-probability": (None, None),
}


def imnm_card(client, scenario: str) -> dict:
    """The one IMNM card a fixture gets."""
    request = load(FIXTURES / scenario / "request.json")
    response = client.post(scenario_target(request, ""), json=request)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    [card] = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == "imnm-suspected"]
    return card


@pytest.mark.parametrize("scenario", FIGURES)
def test_each_fixture_gives_the_probability_worked_by_hand(client, scenario):
    card = imnm_card(client, scenario)
    context, probability = FIGURES[scenario]
    if probability is None:
        assert not {k for k in card["extension"] if "robability" in k}
        assert "%" not in card["summary"] and "Probability of IMNM" not in card["detail"]
        return
    assert card["extension"]["imnm-cds.probability"] == pytest.approx(probability, abs=5e-4)
    assert card["extension"]["imnm-cds.probabilityContext"] == context


def test_a_classification_card_claims_no_probability_in_its_text(client):
    card = imnm_card(client, "worked-example-hmgcr-positive")
    assert "IMNM criteria met" in card["summary"]
    assert "%" not in card["summary"] and "Probability of IMNM" not in card["detail"]
    assert card["extension"]["imnm-cds.antibodyOutcome"] == "anti-HMGCR positive"


def test_a_work_up_card_shows_a_band_and_says_negatives_do_not_exclude(client):
    card = imnm_card(client, "hmgcr-negative")
    assert card["summary"].endswith("(IMNM probability low, about 15%)")
    shares = "about 20% after a statin, 40% otherwise"
    assert f"Lowered, not excluded: IMNM is antibody-negative in {shares}." in card["detail"]
    assert "test anti-SRP" in card["summary"]
