"""Shared pytest fixtures: one app per session, the fixture scenarios, and request builders."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest

import signing
from rules import knowledge as knowledge_module
from service.app import create_app

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fhir_fixtures"
SCHEMA = json.loads((Path(__file__).parent / "data" / "cds-hooks-2.0.schema.json").read_text())
AS_OF = "2024-06-01T12:00:00Z"
SANDBOX = "https://sandbox.cds-hooks.org"
LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"


def scenarios() -> list[Path]:
    """Every fixture scenario directory, sorted."""
    return sorted(p.parent for p in FIXTURES.glob("*/request.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def app():
    return create_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def jwks_server():
    with signing.JwksServer() as server:
        yield server


@pytest.fixture(scope="session")
def client_keys() -> dict[str, signing.SigningKey]:
    """The trusted CDS client's keys, one of each type the spec recommends."""
    return {"rsa": signing.rsa_key("rsa-2024"), "ec": signing.ec_key("ec-2024")}


@pytest.fixture(scope="session")
def auth_app(jwks_server, client_keys, tmp_path_factory):
    """The service verifying JWTs from one client (its JWK Set on loopback), open to the sandbox's origin."""
    jku = jwks_server.publish("/ehr/jwks.json", signing.jwks(*client_keys.values()))
    issuers = tmp_path_factory.mktemp("trust") / "issuers.json"
    issuers.write_text(json.dumps({signing.ISSUER: {"jku": [jku]}}))
    return create_app(
        {
            "auth": "jwt",
            "trusted_issuers": issuers,
            "public_url": "http://localhost",
            "cors_origins": SANDBOX,
        }
    )


@pytest.fixture(scope="session")
def knowledge():
    return knowledge_module.load()


@pytest.fixture(scope="session")
def evaluator(app):
    return app.extensions["imnm_cds"]


def hook_request(patient_id: str = "p1", resources=(), **prefetch_overrides) -> dict:
    """A patient-view request whose prefetch holds these resources under the right keys."""
    keys = {
        "Observation": "labs",
        "Condition": "conditions",
        "DiagnosticReport": "reports",
        "MedicationRequest": "medicationRequests",
        "MedicationStatement": "medicationStatements",
    }
    prefetch = {
        "patient": {
            "resourceType": "Patient",
            "id": patient_id,
            "gender": "female",
            "birthDate": "1960-01-01",
        },
        "labs": _bundle([]),
        "conditions": _bundle([]),
    }
    for resource in resources:
        key = keys[resource["resourceType"]]
        prefetch.setdefault(key, _bundle([]))["entry"].append({"resource": copy.deepcopy(resource)})
    prefetch.update(prefetch_overrides)
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/u1", "patientId": patient_id},
        "extension": {"imnm-cds.asOf": AS_OF},
        "prefetch": prefetch,
    }


def _bundle(resources) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def observation(
    id_: str, code: dict, when: str = "2024-05-01T08:00:00Z", patient: str = "p1", **values
) -> dict:
    return {
        "resourceType": "Observation",
        "id": id_,
        "status": values.pop("status", "final"),
        "code": code,
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        **values,
    }


def ck(
    id_: str,
    value: float,
    when: str = "2024-05-01T08:00:00Z",
    unit: str = "U/L",
    high: float | None = 200,
    **extra,
) -> dict:
    values = {
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    }
    if high is not None:
        values["referenceRange"] = [{"high": {"value": high, "unit": unit}}]
    return observation(id_, {"coding": [{"system": LOINC, "code": "2157-6"}]}, when, **values, **extra)


def antibody(id_: str, text: str, when: str = "2024-05-02T08:00:00Z", **values) -> dict:
    return observation(id_, {"text": text}, when, **values)


def condition(
    id_: str, code: str | None = None, text: str | None = None, patient: str = "p1", **extra
) -> dict:
    concept = {"coding": [{"system": SNOMED, "code": code}]} if code else {}
    if text:
        concept["text"] = text
    return {
        "resourceType": "Condition",
        "id": id_,
        "code": concept,
        "subject": {"reference": f"Patient/{patient}"},
        "onsetDateTime": "2024-04-01",
        **extra,
    }


WEAKNESS = "249939004"
