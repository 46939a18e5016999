"""GET /openapi.json: a valid OpenAPI 3.1 document of exactly the routes served, fixtures valid against it."""

from __future__ import annotations

import jsonschema
import pytest
from openapi_spec_validator import validate
from werkzeug.exceptions import MethodNotAllowed, NotFound

import signing
from conftest import load, scenarios
from service.cli import scenario_target
from service.config import Settings
from service.web import openapi

AUTOMATIC = {"HEAD", "OPTIONS"}  # Flask answers these for every rule itself


def operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item}


def schema_at(document: dict, *pointer: str) -> jsonschema.Draft202012Validator:
    """A validator for the schema at a place in the document, resolving its references in the document."""
    escaped = "/".join(part.replace("~", "~0").replace("/", "~1") for part in pointer)
    return jsonschema.Draft202012Validator({**document, "$ref": f"#/{escaped}"})


def test_the_served_document_is_valid_openapi_31(client, app):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    validate(document)
    assert document == openapi.document(app.extensions["imnm_cds"].settings)
    assert document["openapi"] == "3.1.0"


def test_every_route_is_documented_and_every_documented_operation_is_routed(app, client):
    document = client.get("/openapi.json").get_json()
    adapter = app.url_map.bind("localhost")
    routed = set()
    for path, method in operations(document):
        try:
            endpoint, _ = adapter.match(path, method)
        except (NotFound, MethodNotAllowed):
            pytest.fail(f"{method} {path} is documented but not served")
        routed.add((endpoint, method))
    served = {
        (rule.endpoint, method) for rule in app.url_map.iter_rules() for method in rule.methods - AUTOMATIC
    }
    assert routed == served


def test_every_operation_documents_its_errors_as_operation_outcomes(client):
    document = client.get("/openapi.json").get_json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["operationId"] and operation["summary"], (method, path)
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    media = response["content"]["application/fhir+json"]["schema"]
                    assert media == {"$ref": "#/components/schemas/OperationOutcome"}, (method, path, status)
            if method == "post":
                assert {"400", "413", "415"} <= set(operation["responses"]), path


def test_with_jwt_every_operation_but_health_needs_a_token_and_may_answer_401(auth_app, client_keys):
    token = signing.sign(client_keys["rsa"], signing.claims("http://localhost/openapi.json"))
    document = (
        auth_app.test_client().get("/openapi.json", headers={"Authorization": f"Bearer {token}"}).get_json()
    )
    validate(document)
    assert document["servers"] == [{"url": "http://localhost"}]
    metrics = document["paths"].pop("/metrics")["get"]
    for path, item in document["paths"].items():
        for operation in item.values():
            protected = path not in ("/health", "/health/ready", "/explain.css")
            assert ("security" in operation) == protected == ("401" in operation["responses"]), path
    assert auth_app.test_client().get("/openapi.json").status_code == 401
    # /metrics wants no JWT: an allowed address, or the secret as a bearer token; else 403.
    assert metrics["security"] == [{}, {"metricsSecret": []}]
    assert "403" in metrics["responses"] and "401" not in metrics["responses"]
    assert auth_app.test_client().get("/explain.css").status_code == 200  # a browser sends no JWT for it


def test_without_auth_nothing_asks_for_a_token():
    document = openapi.document(Settings())
    assert not any(
        "security" in op or "401" in op["responses"]
        for item in document["paths"].values()
        for op in item.values()
    )


@pytest.mark.parametrize("scenario", scenarios(), ids=lambda p: p.name)
def test_every_fixture_and_its_answer_validate_against_the_document(client, scenario):
    document = client.get("/openapi.json").get_json()
    request = load(scenario / "request.json")
    path = scenario_target(request, "")
    operation = ("paths", path, "post")
    schema_at(document, *operation, "requestBody", "content", "application/json", "schema").validate(request)
    answer = client.post(path, json=request)  # its status and media type must be documented too
    responses = (*operation, "responses", str(answer.status_code), "content", answer.mimetype, "schema")
    schema_at(document, *responses).validate(answer.get_json())


def test_a_fhir_answer_from_evaluate_validates_against_the_document(client):
    document = client.get("/openapi.json").get_json()
    request = load(next(p for p in scenarios() if p.name == "bundle-worked-example") / "request.json")
    answer = client.post("/evaluate", json=request, headers={"Accept": "application/fhir+json"})
    assert answer.mimetype == "application/fhir+json"
    schema = ("paths", "/evaluate", "post", "responses", "200", "content", "application/fhir+json", "schema")
    schema_at(document, *schema).validate(answer.get_json())
    assert answer.get_json()["entry"]


def test_feedback_and_its_summary_validate_against_the_document(app, client):
    document = client.get("/openapi.json").get_json()
    request = load(next(p for p in scenarios() if p.name == "worked-example-hmgcr-positive") / "request.json")
    card = client.post("/cds-services/imnm-patient-view", json=request).get_json()["cards"][0]
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "outcomeTimestamp": "2024-06-01T12:00:00Z",
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
            }
        ]
    }
    path = "/cds-services/imnm-patient-view/feedback"
    schema_at(
        document, "paths", path, "post", "requestBody", "content", "application/json", "schema"
    ).validate(feedback)
    receipt = client.post(path, json=feedback).get_json()
    schema_at(
        document, "paths", path, "post", "responses", "200", "content", "application/json", "schema"
    ).validate(receipt)
    assert app.extensions["imnm_cds_feedback"].flush()  # issued cards are recorded in the background
    summary = client.get("/feedback/summary").get_json()
    schema = (
        "paths",
        "/feedback/summary",
        "get",
        "responses",
        "200",
        "content",
        "application/json",
        "schema",
    )
    schema_at(document, *schema).validate(summary)
    assert summary["rules"]


@pytest.mark.parametrize(
    ("as_of", "status"),
    [
        ("2024-06-01", 200),
        ("2024-06-01T12:00:00+02:00", 200),
        ("20240601", 400),  # Python reads these, FHIR has none of them
        ("2024-06-01 12:00:00", 400),
        ("2024-06-01T12:00:00", 400),
        ("0001-01-01T00:00:00+14:00", 400),  # once a 500: the offset carried it before year 1
    ],
)
def test_as_of_is_a_fhir_datetime_as_documented(client, as_of, status):
    bundle = load(next(p for p in scenarios() if p.name == "bundle-worked-example") / "request.json")
    assert client.post("/evaluate", json=bundle, query_string={"asOf": as_of}).status_code == status
    request = load(next(p for p in scenarios() if p.name == "worked-example-hmgcr-positive") / "request.json")
    request["extension"]["imnm-cds.asOf"] = as_of
    assert client.post("/cds-services/imnm-patient-view", json=request).status_code == status
