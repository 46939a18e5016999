"""Logs carry what operators need and never patient data, bodies, tokens or JWTs."""

from __future__ import annotations

import json
import logging
import time

import faulty_rules
import pytest
from test_faults import FAULTS, request_for
from test_hostile import ENDPOINTS, HOSTILE

import signing
from conftest import FHIR_TOKEN, FIXTURES, authorised, load, resources_of, scenarios, store
from service import hooks
from service.cli import scenario_target
from service.logs import JsonFormatter
from service.web.app import create_app

SECRET = "eyJhbGciOiJSUzM4NCJ9.eyJpc3MiOiJodHRwczovL2VociJ9.c2lnbmF0dXJl"


FAMILY, GIVEN = "Quixote-Zamorano", "Dulcinea"


def patient_values(request: dict) -> set[str]:
    """The identifiers, references and birth dates in a request: none may reach the logs."""
    return {
        value
        for value in json.dumps(request).split('"')
        if value.startswith(("fx-", "Patient/", "Observation/", "Condition/", "urn:uuid:"))
        or value in ("1960-03-14", "1958-11-02", FAMILY, GIVEN)
    }


def named(document) -> None:
    """Give every Patient in a request a name, so that a leak of it would show."""
    if isinstance(document, dict):
        if document.get("resourceType") == "Patient":
            document["name"] = [{"family": FAMILY, "given": [GIVEN]}]
        for value in document.values():
            named(value)
    elif isinstance(document, list):
        for value in document:
            named(value)


def logged(caplog) -> str:
    lines = [JsonFormatter().format(record) for record in caplog.records]
    assert lines
    return "\n".join(lines)


def test_a_full_request_logs_no_patient_data_or_tokens(client, caplog):
    caplog.set_level(logging.DEBUG)
    seen = set()
    for scenario in scenarios():
        request = load(scenario / "request.json")
        named(request)
        if "context" in request:
            request["fhirAuthorization"] = {
                "access_token": SECRET,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "client",
            }
            request["fhirServer"] = "https://ehr.example.org/fhir"
            # Every key sent (null where the scenario has none), so nothing is fetched from that server.
            for key in hooks.service_for(request["hook"]).prefetch:
                request["prefetch"].setdefault(key.key, None)
        response = client.post(
            scenario_target(request, ""), json=request, headers={"Authorization": f"Bearer {SECRET}"}
        )
        for card in (response.get_json() or {}).get("cards", []):
            comment = f"Jane Roe, born 1950-01-01, said no ({card['uuid'][:8]})"
            feedback = {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": card["overrideReasons"][0], "userComment": comment},
                "outcomeTimestamp": "2024-06-01T12:00:00Z",
            }
            client.post(
                "/cds-services/imnm-patient-view/feedback",
                json={"feedback": [feedback]},
                headers={"Authorization": f"Bearer {SECRET}"},
            )
            seen.update({card["uuid"], comment})
        seen |= patient_values(request)
    text = logged(caplog)
    assert "evaluated" in text and "hookInstance" in text and '"event": "feedback"' in text
    assert SECRET not in text and "Bearer" not in text
    assert [value for value in seen if value in text] == []


def test_requests_with_valid_and_invalid_jwts_log_no_patient_data_or_tokens(auth_app, client_keys, caplog):
    caplog.set_level(logging.DEBUG)
    client = auth_app.test_client()
    seen, tokens = set(), []
    for scenario in scenarios():
        request = load(scenario / "request.json")
        named(request)
        path = scenario_target(request, "")
        aud = "http://localhost" + path
        valid = signing.sign(client_keys["rsa"], signing.claims(aud))
        attempts = [
            valid,
            valid,  # replayed
            signing.sign(client_keys["ec"], signing.claims(aud, exp=int(time.time()) - 600)),
            signing.sign(client_keys["ec"], signing.claims(aud + "/other")),
            signing.sign(client_keys["rsa"], signing.claims(aud, iss="https://stranger.example.org")),
            signing.tamper(signing.sign(client_keys["ec"], signing.claims(aud)), sub=FAMILY),
            signing.unsigned(signing.claims(aud), client_keys["rsa"].kid),
        ]
        for token in attempts:
            client.post(path, json=request, headers={"Authorization": f"Bearer {token}"})
        tokens += attempts
        seen |= patient_values(request)
    text = logged(caplog)
    for reason in ("replayed", "expired", "audience", "unknown-issuer", "signature", "algorithm"):
        assert f'"reason": "{reason}"' in text
    assert "evaluated" in text and signing.ISSUER in text
    assert [token for token in tokens if token in text] == []
    assert "eyJ" not in text and "Bearer" not in text
    assert [value for value in seen if value in text] == []


@pytest.fixture(scope="module")
def debug_fetching(fhir_server):
    settings = {"fhir_servers": fhir_server, "fhir_allow_http": True, "log_level": "DEBUG"}
    return create_app({**settings, "deadline_ms": 30_000, "fetch_budget_ms": 20_000}).test_client()


def test_fetching_logs_counts_and_times_never_urls_ids_or_tokens(debug_fetching, fhir_server, caplog):
    caplog.set_level(logging.DEBUG)
    request = load(FIXTURES / "seropositive-hmgcr" / "request.json")
    named(request)
    store(fhir_server, [r for value in request["prefetch"].values() for r in resources_of(value)])
    seen = patient_values(request)
    request["prefetch"] = {}
    authorised(request, fhir_server)
    assert debug_fetching.post("/cds-services/imnm-patient-view", json=request).status_code == 200
    text = logged(caplog)
    assert '"fetched"' in text and '"pages": 1' in text
    assert FHIR_TOKEN not in text and "Bearer" not in text
    assert fhir_server.split("//")[1] not in text and "patient=" not in text
    assert [value for value in seen if value in text] == []


def test_an_exception_is_logged_by_type_and_place_not_message():
    try:
        raise ValueError("Jane Doe, born 1960-03-14")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, exc_info=True)
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["error"] == "ValueError" and line["where"]
    assert "Jane" not in json.dumps(line)


@pytest.fixture(scope="module")
def faulty_client():
    # Made before the test: building an app sets up logging afresh, which would unhook caplog.
    return faulty_rules.install(create_app(), sessions=4).test_client()


def test_hostile_inputs_and_engine_faults_log_no_patient_data(faulty_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = faulty_client
    seen = {"Jane Doe", "2017-01-01"}  # what the faulty rule's exception says
    for path in sorted(HOSTILE.glob("*.json")):
        body = path.read_bytes()
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if isinstance(document, dict):
            named(document)
            seen |= patient_values(document)
            body = json.dumps(document).encode()
        for target, headers in ENDPOINTS.values():
            client.post(target, data=body, content_type="application/json", headers=headers)
    for patient, _ in FAULTS.values():
        request = request_for(patient)
        named(request)
        client.post("/cds-services/imnm-patient-view", json=request)
        seen |= patient_values(request)
    text = logged(caplog)
    assert "rule engine failed" in text
    assert [value for value in seen if value in text] == []
