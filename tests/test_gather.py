"""Gathering: each prefetch key as sent, fetched from a real FHIR server (sekmet), or unknown; same cards."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from conftest import (
    AS_OF,
    FIXTURES,
    HOOK_SCENARIOS,
    LOINC,
    authorised,
    hook_request,
    load,
    observation,
    resources_of,
    store,
)
from service import hooks
from service.config import Settings
from service.fhir import parse_time
from service.gather import prefetch as gather
from service.gather.fhirclient import REASONS, FhirClient
from service.hooks import SERVICES
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"
LAB = [
    {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}
        ]
    }
]
FAILED = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
# Generous limits: these tests are about what is fetched, not how fast; the deadline has its own tests.
GENEROUS = {"deadline_ms": 30_000, "fetch_budget_ms": 20_000, "fetch_read_timeout_ms": 10_000}


def fetching(base: str, **settings):
    return create_app({"fhir_servers": base, "fhir_allow_http": True, **GENEROUS, **settings}).test_client()


@pytest.fixture(scope="module")
def client(fhir_server):
    return fetching(fhir_server)


def glucose_labs(patient: str, count: int) -> list[dict]:
    """Lab results that matter to no rule, to fill pages."""
    code = {"coding": [{"system": LOINC, "code": "2345-7"}]}
    return [
        observation(f"glu-{patient}-{i}", code, patient=patient, category=LAB, valueQuantity={"value": 90})
        for i in range(count)
    ]


def stored(scenario, base: str) -> dict:
    """Put a scenario's resources on the FHIR server; return its request."""
    request = load(scenario / "request.json")
    store(base, [r for value in request["prefetch"].values() for r in resources_of(value)])
    return request


def full_prefetch_answer(client, scenario) -> dict:
    """The answer when the client sends every key itself: the fixture's expected answer where it already
    does, else the answer with null (no data) for the keys it leaves out, as the FHIR server has none."""
    request = load(scenario / "request.json")
    service = hooks.service_for(request["hook"])
    full = {key.key: request["prefetch"].get(key.key) for key in service.prefetch}
    if full == request["prefetch"]:
        return load(scenario / "expected.json")
    return client.post(f"/cds-services/{service.id}", json={**request, "prefetch": full}).get_json()


def failed_in_bundle(value: dict) -> dict:
    """A searchset that holds the client's results and an OperationOutcome saying the search failed."""
    failed = copy.deepcopy(value)
    failed.setdefault("entry", []).append({"resource": FAILED, "search": {"mode": "outcome"}})
    return failed


PREFETCH_VARIANTS = {
    "none": lambda prefetch: {},
    "partial": lambda prefetch: {k: v for k, v in prefetch.items() if k in ("patient", "conditions")},
    "operation-outcome": lambda prefetch: {
        **prefetch,
        "labs": FAILED,
        "conditions": failed_in_bundle(prefetch["conditions"]),
    },
}


@pytest.mark.parametrize("variant", PREFETCH_VARIANTS)
@pytest.mark.parametrize("scenario", HOOK_SCENARIOS, ids=[s.name for s in HOOK_SCENARIOS])
def test_fetched_data_gives_the_same_cards_as_full_prefetch(client, fhir_server, scenario, variant):
    request = stored(scenario, fhir_server)
    request["prefetch"] = PREFETCH_VARIANTS[variant](request["prefetch"])
    response = client.post(SERVICE, json=authorised(request, fhir_server))
    assert response.get_json() == full_prefetch_answer(client, scenario)


@pytest.mark.parametrize("scenario", ["order-sign-hmgcr-positive", "order-select-after-autoimmune-pattern"])
def test_order_hooks_fetch_the_record_too(client, fhir_server, scenario):
    request = stored(FIXTURES / scenario, fhir_server)
    request["prefetch"] = {}
    target = f"/cds-services/{hooks.service_for(request['hook']).id}"
    response = client.post(target, json=authorised(request, fhir_server))
    assert response.get_json() == full_prefetch_answer(client, FIXTURES / scenario)
    assert response.get_json()["cards"]


def test_pages_are_followed(client, fhir_server, caplog):
    scenario = next(s for s in HOOK_SCENARIOS if s.name == "seropositive-hmgcr")
    request = stored(scenario, fhir_server)
    patient = request["context"]["patientId"]
    store(fhir_server, glucose_labs(patient, 45))  # the server pages by 20: three pages of labs
    del request["prefetch"]["labs"]
    caplog.set_level(logging.INFO)
    response = client.post(SERVICE, json=authorised(request, fhir_server))
    assert response.get_json() == full_prefetch_answer(client, scenario)
    fetched = next(r.fields for r in caplog.records if r.getMessage() == "fetched")
    assert fetched["keys"]["labs"]["pages"] == 3
    assert (
        fetched["keys"]["labs"]["resources"]
        == len(resources_of(load(scenario / "request.json")["prefetch"]["labs"])) + 45
    )


@pytest.mark.parametrize("limit", [{"fetch_max_pages": 2}, {"fetch_max_resources": 30}])
def test_more_than_the_limits_allow_is_a_412_for_a_required_key(fhir_server, limit):
    request = hook_request("many-labs", resources=[])
    store(fhir_server, [request["prefetch"]["patient"], *glucose_labs("many-labs", 45)])
    del request["prefetch"]["labs"]
    response = fetching(fhir_server, **limit).post(SERVICE, json=authorised(request, fhir_server))
    assert response.status_code == 412
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == ["prefetch.labs"] and REASONS["too-many"] in issue["diagnostics"]


@pytest.mark.parametrize("token", ["not-the-token", None], ids=["wrong-token", "no-token"])
def test_the_access_token_reaches_the_server_which_refuses_without_it(client, fhir_server, token):
    request = hook_request("token-holder")
    store(fhir_server, [request["prefetch"].pop("patient")])
    assert client.post(SERVICE, json=authorised(copy.deepcopy(request), fhir_server)).status_code == 200
    response = client.post(SERVICE, json=authorised(request, fhir_server, token))
    assert response.status_code == 412
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == ["prefetch.patient"]
    assert "refused the access token (HTTP 401)" in issue["diagnostics"]


def test_a_missing_patient_is_a_412_naming_the_key(client, fhir_server):
    request = hook_request("nobody-here")
    del request["prefetch"]["patient"]
    response = client.post(SERVICE, json=authorised(request, fhir_server))
    assert response.status_code == 412
    assert "(HTTP 404)" in json.dumps(response.get_json())


@pytest.mark.parametrize(
    ("mode", "key", "status"),
    [
        ("fail", "reports", 412),
        ("fail", "labs", 412),
        ("omit", "reports", 200),
        ("omit", "labs", 412),
        ("fetch", "reports", 200),  # no fhirServer to fetch it from: unknown
        ("fetch", "labs", 412),
    ],
)
def test_a_failed_prefetch_is_handled_by_the_configured_mode(mode, key, status):
    request = hook_request(**{key: FAILED})
    response = create_app({"prefetch_failure": mode}).test_client().post(SERVICE, json=request)
    assert response.status_code == status
    if status == 412:
        assert response.get_json()["issue"][0]["expression"] == [f"prefetch.{key}"]


def test_a_failed_optional_key_is_unknown_not_empty():
    statin = {
        "resourceType": "MedicationStatement",
        "id": "m1",
        "status": "active",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"text": "atorvastatin 40 mg"},
    }
    searchset = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": statin}]}
    body = hook_request(medicationStatements=failed_in_bundle(searchset))
    request = hooks.parse(hooks.PATIENT_VIEW, body, parse_time(AS_OF))
    gathered = gather.from_prefetch(request, FhirClient(Settings.from_env({})), failed_prefetch="omit")
    assert "MedicationStatement" not in gathered.available
    assert "MedicationStatement" not in {r.type for r in gathered.resources}
    assert {"Patient", "Observation", "Condition"} <= gathered.available


def test_templates_use_only_context_the_hook_requires():
    for service in SERVICES.values():
        for key in service.prefetch:
            for name in gather.TOKEN.findall(key.query):
                assert service.context.get(name) is str, key.query
