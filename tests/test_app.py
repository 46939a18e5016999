"""The HTTP surface: discovery, every error status as an OperationOutcome, health and readiness."""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from conftest import AS_OF, SCHEMA, WEAKNESS, antibody, ck, condition, hook_request
from rules import knowledge as knowledge_module
from service.evaluate.engine import Engine
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"


def assert_outcome(response, status: int, expression: str | None = None) -> dict:
    """Check a failure: the status, a valid FHIR OperationOutcome, no stack trace, the field named."""
    assert response.status_code == status
    assert response.mimetype == "application/fhir+json"
    body = response.get_json()
    OperationOutcome.model_validate(body)
    text = json.dumps(body)
    assert "Traceback" not in text and 'File "' not in text
    if expression is not None:
        assert expression in [e for issue in body["issue"] for e in issue.get("expression", [])]
    return body


def test_discovery_validates_and_lists_patient_view(client):
    body = client.get("/cds-services").get_json()
    jsonschema.validate(body, {**SCHEMA, "$ref": "#/$defs/discovery"})
    assert [s["hook"] for s in body["services"]].count("patient-view") == 1


def test_prefetch_templates_use_the_recommended_subset(client):
    allowed = re.compile(
        r"^(Patient/\{\{context\.patientId\}\}"
        r"|[A-Z][A-Za-z]+\?patient=\{\{context\.patientId\}\}(&(category|code|status|_count|_sort)=[A-Za-z0-9|:/.,-]+)*)$"
    )
    for service in client.get("/cds-services").get_json()["services"]:
        for query in service["prefetch"].values():
            assert allowed.match(query), query


def test_a_valid_request_answers_cards_that_validate(client):
    request = hook_request(resources=[ck("ck1", 3000), condition("w1", WEAKNESS)])
    response = client.post(SERVICE, json=request)
    assert response.status_code == 200
    jsonschema.validate(response.get_json(), {**SCHEMA, "$ref": "#/$defs/response"})
    assert len(response.get_json()["cards"]) == 1


@pytest.mark.parametrize(
    ("mutate", "expression"),
    [
        (lambda r: r.update(hook="order-sign"), "hook"),
        (lambda r: r.update(hookInstance="not-a-uuid"), "hookInstance"),
        (lambda r: r.pop("hookInstance"), "hookInstance"),
        (lambda r: r.update(context="p1"), "context"),
        (lambda r: r["context"].pop("patientId"), "context.patientId"),
        (lambda r: r["context"].update(patientId=""), "context.patientId"),
        (lambda r: r["context"].pop("userId"), "context.userId"),
        (lambda r: r.update(prefetch=[]), "prefetch"),
        (lambda r: r["prefetch"].update(labs="Observation/1"), "prefetch.labs"),
        (lambda r: r["prefetch"].update(labs={"entry": []}), "prefetch.labs"),
        (lambda r: r.update(fhirServer="ftp://x"), "fhirServer"),
        (lambda r: r.update(fhirAuthorization={"access_token": "t"}), "fhirServer"),
        (lambda r: r.update(extension={"imnm-cds.asOf": "yesterday"}), "extension.imnm-cds.asOf"),
    ],
    ids=[
        "wrong-hook",
        "bad-hookInstance",
        "no-hookInstance",
        "context-not-object",
        "no-patientId",
        "empty-patientId",
        "no-userId",
        "prefetch-not-object",
        "prefetch-value-string",
        "prefetch-no-resourceType",
        "fhirServer-not-url",
        "authorization-without-server",
        "bad-asOf",
    ],
)
def test_bad_requests_get_400_naming_the_field(client, mutate, expression):
    request = hook_request()
    mutate(request)
    assert_outcome(client.post(SERVICE, json=request), 400, expression)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"", "application/json"),
        (b"null", "application/fhir+json"),
    ],
    ids=["truncated", "not-utf8", "array", "empty", "null"],
)
def test_malformed_bodies_get_400(client, body, content_type):
    assert_outcome(client.post(SERVICE, data=body, content_type=content_type), 400)


def test_deep_nesting_gets_400(client):
    deep = "[" * 10_000 + "]" * 10_000
    assert_outcome(client.post(SERVICE, data=deep, content_type="application/json"), 400)
    medium = hook_request()
    medium["extension"]["nest"] = json.loads("[" * 100 + "]" * 100)
    assert_outcome(client.post(SERVICE, json=medium), 400)


def test_oversize_body_gets_413():
    small = create_app({"max_body_bytes": 2048})
    request = hook_request(resources=[ck(f"ck{i}", 100 + i) for i in range(40)])
    assert_outcome(small.test_client().post(SERVICE, json=request), 413)


def test_wrong_content_type_gets_415(client):
    assert_outcome(client.post(SERVICE, data=json.dumps(hook_request()), content_type="text/plain"), 415)


def test_unknown_service_and_path_get_404(client):
    assert_outcome(client.post("/cds-services/no-such-service", json=hook_request()), 404)
    assert_outcome(client.get("/nowhere"), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", SERVICE, {"POST", "OPTIONS"}), ("DELETE", "/cds-services", {"GET", "HEAD", "OPTIONS"})],
)
def test_wrong_method_gets_405_naming_the_allowed_ones(client, method, path, allowed):
    response = client.open(path, method=method)
    assert_outcome(response, 405)
    assert response.allow == allowed  # RFC 9110 section 15.5.6


def test_missing_required_prefetch_gets_412(client):
    request = hook_request()
    del request["prefetch"]["labs"]
    body = assert_outcome(client.post(SERVICE, json=request), 412, "prefetch.labs")
    assert body["issue"][0]["code"] == "processing"


def test_missing_optional_prefetch_is_unknown_not_an_error(client):
    request = hook_request(resources=[ck("ck1", 3000), condition("w1", WEAKNESS)])
    assert "medicationStatements" not in request["prefetch"]
    assert client.post(SERVICE, json=request).status_code == 200


@pytest.mark.parametrize("severity", ["error", "fatal"])
def test_prefetch_operation_outcome_error_gets_412(client, severity):
    failed = {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": "timeout"}]}
    request = hook_request(labs=failed)
    assert_outcome(client.post(SERVICE, json=request), 412, "prefetch.labs")


def test_prefetch_operation_outcome_warning_in_a_searchset_is_ignored(client):
    request = hook_request(resources=[ck("ck1", 3000), condition("w1", WEAKNESS)])
    warning = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "warning", "code": "not-supported"}],
    }
    request["prefetch"]["labs"]["entry"].append({"resource": warning, "search": {"mode": "outcome"}})
    response = client.post(SERVICE, json=request)
    assert response.status_code == 200
    assert len(response.get_json()["cards"]) == 1


def test_null_prefetch_means_no_data(client):
    request = hook_request()
    request["prefetch"] = dict.fromkeys(request["prefetch"])
    assert client.post(SERVICE, json=request).get_json() == {"cards": []}


def test_invalid_relevant_resource_gets_400_with_its_location(client):
    bad = ck("ck1", 3000)
    bad["valueQuantity"]["value"] = "three thousand"
    body = assert_outcome(client.post(SERVICE, json=hook_request(resources=[bad])), 400)
    assert body["issue"][0]["expression"] == ["prefetch.labs.entry[0].resource.valueQuantity.value"]
    assert "three thousand" not in json.dumps(body)


def test_invalid_irrelevant_resource_is_skipped(client):
    junk = {
        "resourceType": "Observation",
        "id": "glucose",
        "status": "final",
        "code": {"text": "glucose"},
        "valueQuantity": {"value": "high"},
    }
    request = hook_request(resources=[junk, ck("ck1", 3000), condition("w1", WEAKNESS)])
    assert client.post(SERVICE, json=request).status_code == 200


def test_data_about_another_patient_gets_400(client):
    request = hook_request(resources=[ck("ck1", 3000) | {"subject": {"reference": "Patient/someone-else"}}])
    assert_outcome(client.post(SERVICE, json=request), 400, "prefetch.labs.entry[0].resource")
    request = hook_request()
    request["prefetch"]["patient"]["id"] = "someone-else"
    assert_outcome(client.post(SERVICE, json=request), 400, "prefetch.patient")


@pytest.mark.parametrize(
    ("bundle", "fragment"),
    [
        ({"resourceType": "Patient"}, "must be a FHIR Bundle"),
        ({"resourceType": "Bundle", "type": "document", "entry": []}, "Bundle.type"),
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, "no Patient"),
        (
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {"resource": {"resourceType": "Patient", "id": "a"}},
                    {"resource": {"resourceType": "Patient", "id": "b"}},
                ],
            },
            "more than one patient",
        ),
        (
            {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": "Patient/1"}]},
            "FHIR resource",
        ),
    ],
    ids=["not-bundle", "document", "no-patient", "two-patients", "entry-not-resource"],
)
def test_evaluate_refuses_bundles_it_cannot_answer_for(client, bundle, fragment):
    body = assert_outcome(client.post("/evaluate", json=bundle), 400)
    assert fragment in json.dumps(body)


def test_evaluate_uses_bundle_timestamp_as_now(client):
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "2000-06-01"}
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "timestamp": "2010-01-01T00:00:00Z",
        "entry": [
            {"resource": patient},
            {"resource": ck("ck1", 3000)},
            {"resource": condition("w", WEAKNESS)},
        ],
    }
    cards = client.post("/evaluate", json=bundle).get_json()["cards"]
    assert cards and "CK peak 3,000 U/L" in cards[0]["detail"]
    assert_outcome(client.post("/evaluate?hook=encounter-start", json=bundle), 400, "hook")
    assert_outcome(client.post("/evaluate?asOf=never", json=bundle), 400, "asOf")


@pytest.mark.parametrize(
    "timestamp",
    ["2024-06-01 12:00", "2024-06-01T12:00:00", "yesterday", 20240601, "0001-01-01T00:00:00+01:00"],
    ids=["space", "no-offset", "word", "number", "before-year-1"],
)
def test_evaluate_refuses_a_bundle_timestamp_that_is_no_fhir_datetime(client, timestamp):
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": timestamp,
        "entry": [{"resource": {"resourceType": "Patient", "id": "p1"}}, {"resource": ck("ck1", 3000)}],
    }
    assert_outcome(client.post("/evaluate", json=bundle), 400, "Bundle.timestamp")
    # Checked even when asOf overrides it: the document allows no other timestamp.
    assert_outcome(client.post(f"/evaluate?asOf={AS_OF}", json=bundle), 400, "Bundle.timestamp")
    del bundle["timestamp"]
    assert client.post(f"/evaluate?asOf={AS_OF}", json=bundle).status_code == 200


def test_health_and_readiness(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.get_json()["rules"] > 10


def failing_rules(k, emit):
    """A rule base whose one rule raises, to prove faults surface as a 500 for that request only."""
    from durable.lang import c, m, when_all

    @when_all(c.ck << (m.t == "ck"))
    def explode(c):
        raise ZeroDivisionError


def test_engine_fault_gives_500_and_the_worker_keeps_serving(monkeypatch):
    app = create_app()
    evaluator = app.extensions["imnm_cds"]
    healthy = evaluator.engine
    module = type("failing", (), {"define": staticmethod(failing_rules)})
    monkeypatch.setattr(evaluator, "engine", Engine(knowledge_module.load(), [module]))
    client = app.test_client()
    body = assert_outcome(client.post(SERVICE, json=hook_request()), 500)
    assert body["issue"][0]["code"] == "exception"
    assert client.get("/health/ready").status_code == 503
    monkeypatch.setattr(evaluator, "engine", healthy)
    assert client.post(SERVICE, json=hook_request()).status_code == 200


def blocking_rules(gate: threading.Event, entered: threading.Event):
    def define(k, emit):
        from durable.lang import c, m, when_all

        @when_all(c.p << (m.t == "patient"))
        def hold(c):
            entered.set()
            gate.wait(10)

    return type("blocking", (), {"define": staticmethod(define)})


def test_exhausted_engine_sessions_give_503(monkeypatch):
    app = create_app()
    evaluator = app.extensions["imnm_cds"]
    gate, entered = threading.Event(), threading.Event()
    engine = Engine(
        knowledge_module.load(), [blocking_rules(gate, entered)], max_sessions=1, wait_seconds=0.05
    )
    monkeypatch.setattr(evaluator, "engine", engine)
    first = threading.Thread(target=lambda: app.test_client().post(SERVICE, json=hook_request()))
    first.start()
    assert entered.wait(5)
    try:
        body = assert_outcome(app.test_client().post(SERVICE, json=hook_request()), 503)
        assert body["issue"][0]["code"] == "transient"
    finally:
        gate.set()
        first.join(5)
    assert engine.live_sessions == 0


def test_a_busy_engine_is_ready(monkeypatch):
    app = create_app()
    evaluator = app.extensions["imnm_cds"]
    gate, entered = threading.Event(), threading.Event()
    engine = Engine(knowledge_module.load(), [blocking_rules(gate, entered)], max_sessions=1, wait_seconds=60)
    monkeypatch.setattr(evaluator, "engine", engine)
    first = threading.Thread(target=lambda: app.test_client().post(SERVICE, json=hook_request()))
    first.start()
    assert entered.wait(5)
    try:
        started = time.monotonic()
        ready = app.test_client().get("/health/ready")
        waited = time.monotonic() - started
    finally:
        gate.set()
        first.join(5)
    assert ready.status_code == 200, ready.get_json()
    assert waited < 5, "readiness waited for a session"  # the session is held for 10 s


def test_antibody_only_by_text_counts(client):
    request = hook_request(
        resources=[
            ck("ck1", 3000),
            condition("w1", WEAKNESS),
            antibody("a1", "HMG-CoA reductase antibody", valueString="Positive"),
        ]
    )
    card = client.post(SERVICE, json=request).get_json()["cards"][0]
    assert card["extension"]["imnm-cds.rules"][-1] == "imnm.seropositive_hmgcr"


def test_a_bundle_posted_to_a_hook_service_is_sent_to_evaluate(client):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": []}
    body = assert_outcome(client.post(SERVICE, json=bundle), 400, "resourceType")
    assert body["issue"][0]["diagnostics"] == (
        "this is a CDS Hooks service and takes a CDS Hooks request; post a FHIR Bundle to /evaluate"
    )


def test_a_hook_request_posted_to_evaluate_is_sent_to_its_service(client):
    body = assert_outcome(client.post("/evaluate", json=hook_request()), 400, "resourceType")
    assert body["issue"][0]["diagnostics"] == (
        "/evaluate takes a FHIR Bundle; post a CDS Hooks request to /cds-services/imnm-patient-view "
        "(GET /cds-services lists the services)"
    )
    unknown = {**hook_request(), "hook": "encounter-start"}
    body = assert_outcome(client.post("/evaluate", json=unknown), 400, "resourceType")
    assert "post a CDS Hooks request to /cds-services/{id}" in body["issue"][0]["diagnostics"]


def test_the_root_is_a_short_index_of_the_endpoints(client):
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "application/json"
    index = response.get_json()
    assert index["service"] == "imnm-cds"
    assert index["summary"] == "CDS Hooks 2.0 service for immune-mediated necrotizing myopathy"
    assert (
        index["endpoints"]["GET /cds-services"]
        == "CDS Hooks discovery: the services and their prefetch templates"
    )
    assert index["endpoints"]["POST /evaluate"].startswith("Evaluate one patient's FHIR Bundle")
    documented = client.get("/openapi.json").get_json()["paths"]
    assert len(index["endpoints"]) == sum(len(operations) for operations in documented.values())


def searchset(*entries) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "entry": list(entries)}


@pytest.mark.parametrize(
    ("prefetch", "expression", "diagnostics"),
    [
        (
            {"patient": {"resourceType": "Nonsense"}},
            "prefetch.patient.resourceType",
            "'Nonsense' is not a FHIR R4 resource type",
        ),
        (
            {
                "patient": {
                    "resourceType": "Observation",
                    "id": "o1",
                    "status": "final",
                    "code": {"text": "x"},
                }
            },
            "prefetch.patient.resourceType",
            "prefetch key 'patient' asks for Patient resources, not Observation",
        ),
        (
            {"labs": searchset({"resource": {"resourceType": "Condition", "id": "c1"}})},
            "prefetch.labs.entry[0].resource.resourceType",
            "prefetch key 'labs' asks for Observation resources, not Condition",
        ),
        (
            {
                "labs": searchset(
                    {"resource": ck("ck1", 3000), "search": {"mode": "match"}},
                    {"resource": {"resourceType": "HumanName"}},
                )
            },
            "prefetch.labs.entry[1].resource.resourceType",
            "'HumanName' is not a FHIR R4 resource type",
        ),
        (
            {"conditions": searchset({"resource": {"resourceType": "Blob"}, "search": {"mode": "include"}})},
            "prefetch.conditions.entry[0].resource.resourceType",
            "'Blob' is not a FHIR R4 resource type",
        ),
    ],
    ids=["unknown-type", "wrong-type", "wrong-entry-type", "datatype-entry", "unknown-include"],
)
def test_junk_prefetch_is_refused_naming_the_key(client, prefetch, expression, diagnostics):
    body = assert_outcome(client.post(SERVICE, json=hook_request(**prefetch)), 400, expression)
    assert body["issue"][0]["diagnostics"] == diagnostics


def test_outcomes_medications_and_unmatched_entries_are_never_refused_for_their_type(client):
    medication = {"resourceType": "Medication", "id": "m1", "code": {"text": "atorvastatin"}}
    warning = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "incomplete"}]}
    labs = searchset(
        {"resource": ck("ck1", 3000), "search": {"mode": "match"}},
        {"resource": {"resourceType": "Patient", "id": "p1"}, "search": {"mode": "include"}},
        {"resource": warning, "search": {"mode": "outcome"}},
        {"resource": warning},
        {"resource": medication},
    )
    request = hook_request(resources=[condition("w1", WEAKNESS)], labs=labs, medicationRequests=medication)
    response = client.post(SERVICE, json=request)
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["cards"]) == 1


@pytest.mark.parametrize(
    ("expires_in", "accepted"),
    [(300, True), (300.0, True), (0, True), (-1, False), (1.5, False), (True, False)],
)
def test_fhir_authorization_expires_in_is_whole_seconds(client, expires_in, accepted):
    request = hook_request()
    del request["prefetch"]["labs"]
    request["fhirServer"] = "https://ehr.example.org/fhir"
    request["fhirAuthorization"] = {
        "access_token": "t",
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": "patient/*.read",
        "subject": "cds",
    }
    # Accepted, the request goes on to need the missing key from a server it may not contact (403).
    response = client.post(SERVICE, json=request)
    assert response.status_code == (403 if accepted else 400), response.get_json()
    if not accepted:
        assert response.get_json()["issue"][0]["expression"] == ["fhirAuthorization.expires_in"]
