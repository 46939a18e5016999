"""Logs carry what operators need and never patient data, bodies, tokens or JWTs."""

from __future__ import annotations

import json
import logging

from conftest import load, scenarios
from service.cli import scenario_target
from service.logs import JsonFormatter

SECRET = "eyJhbGciOiJSUzM4NCJ9.eyJpc3MiOiJodHRwczovL2VociJ9.c2lnbmF0dXJl"


def test_a_full_request_logs_no_patient_data_or_tokens(client, caplog):
    caplog.set_level(logging.DEBUG)
    seen = set()
    for scenario in scenarios():
        request = load(scenario / "request.json")
        if "context" in request:
            request["fhirAuthorization"] = {
                "access_token": SECRET,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "client",
            }
            request["fhirServer"] = "https://ehr.example.org/fhir"
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
        for value in json.dumps(request).split('"'):
            if value.startswith(("fx-", "Patient/", "Observation/", "Condition/", "urn:uuid:")) or value in (
                "1960-03-14",
                "1958-11-02",
            ):
                seen.add(value)
    lines = [JsonFormatter().format(record) for record in caplog.records]
    text = "\n".join(lines)
    assert lines and "evaluated" in text and "hookInstance" in text and '"event": "feedback"' in text
    assert SECRET not in text and "Bearer" not in text
    leaked = [value for value in seen if value in text]
    assert leaked == []


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
