"""Shared pytest fixtures: one app per session, databases, a served instance, a FHIR server, scenarios,
request builders."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError

import signing
from rules import knowledge as knowledge_module
from service.config import Settings
from service.evaluate.engine import Engine
from service.store import feedback as feedback_store
from service.web.app import create_app

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fhir_fixtures"
SCHEMA = json.loads((ROOT / "service" / "web" / "cds-hooks-2.0.schema.json").read_text())
CLI = [sys.executable, "-m", "service.cli"]
# A PostgreSQL database the tests may wipe; README "Feedback" says how to start one.
POSTGRES_URL = os.environ.get(
    "IMNM_CDS_TEST_POSTGRES_URL", "postgresql://imnm_cds:imnm_cds@127.0.0.1:5432/imnm_cds_test"
)
AS_OF = "2024-06-01T12:00:00Z"
SANDBOX = "https://sandbox.cds-hooks.org"
LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"


def scenarios() -> list[Path]:
    """Every fixture scenario directory, sorted."""
    return sorted(p.parent for p in FIXTURES.glob("*/request.json"))


def fixture_bundle(path: Path) -> tuple[dict, str]:
    """Return a fixture as a Bundle (a hook request's prefetched resources) and the moment it is for."""
    request = load(path / "request.json")
    if request.get("resourceType") == "Bundle":
        return request, request.get("timestamp", "2024-06-01T12:00:00Z")
    entries = []
    for value in (request.get("prefetch") or {}).values():
        if value is not None:
            inner = value.get("entry", []) if value["resourceType"] == "Bundle" else [{"resource": value}]
            entries += [{"resource": e["resource"]} for e in inner]
    as_of = (request.get("extension") or {}).get("imnm-cds.asOf", "2024-06-01T12:00:00Z")
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}, as_of


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# Hook scenarios that answer cards for a patient they send: the same data can be posted as a Bundle
# or put on a FHIR server.
HOOK_SCENARIOS = [
    s
    for s in scenarios()
    if load(s / "request.json").get("hook") == "patient-view"
    and load(s / "expected.json").get("cards")
    and (load(s / "request.json")["prefetch"].get("patient") or {}).get("resourceType") == "Patient"
]


# Every rule id that fired in this test process, findings and conclusions alike
# (tests/test_every_rule_fires.py checks that each registered rule is among them).
FIRED_RULES: set[str] = set()
EVERY_RULE_TEST = "test_every_rule_fires.py::test_every_registered_rule_fires"


@pytest.fixture(scope="session", autouse=True)
def recorded_rules():
    """Record the rules each in-process evaluation fires."""
    evaluate = Engine.evaluate

    def recording(self, facts, wait=None):
        outcome = evaluate(self, facts, wait)
        for found in (*outcome.findings, *outcome.conclusions):
            FIRED_RULES.update(found.rules)
        return outcome

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "evaluate", recording)
        yield FIRED_RULES


def pytest_collection_modifyitems(session, config, items):
    """Run the every-rule check last, once every other test has fired what it fires."""
    last = [item for item in items if item.nodeid.endswith(EVERY_RULE_TEST)]
    items[:] = [item for item in items if item not in last] + last
    modules = {item.path.name for item in items}
    every_module = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    config.stash[WHOLE_SUITE] = modules == every_module and not config.option.keyword


WHOLE_SUITE = pytest.StashKey[bool]()


@pytest.fixture
def whole_suite(request) -> bool:
    """Tell whether this run collected every test module, with no -k selection."""
    return request.config.stash.get(WHOLE_SUITE, False)


@pytest.fixture(scope="session", autouse=True)
def session_database(tmp_path_factory):
    """Apps and servers built once per module or session keep feedback in a throwaway SQLite file."""
    # Not the default ./imnm-cds.sqlite: a test run must leave the working tree as it found it. The
    # folder outlives the session, as the session's apps write their last cards when the process exits.
    path = tmp_path_factory.mktemp("session-database") / "feedback.sqlite"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMNM_CDS_DATABASE_URL", f"sqlite:///{path}")
        yield


@pytest.fixture(autouse=True)
def throwaway_database(tmp_path_factory, monkeypatch):
    """Every app and server a test starts keeps feedback in a throwaway SQLite file of that test's own."""
    # A test that kills servers or workers mid-write must not touch the file other tests' apps use.
    path = tmp_path_factory.mktemp("database") / "feedback.sqlite"
    monkeypatch.setenv("IMNM_CDS_DATABASE_URL", f"sqlite:///{path}")


@functools.cache
def postgres_url() -> str | None:
    """Return the test PostgreSQL database's URL if it answers, else None."""
    url = Settings.from_env({}, database_url=POSTGRES_URL).database_url
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return url
    except DBAPIError:
        return None
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty feedback database: a SQLite file, and PostgreSQL when one is reachable."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    url = postgres_url()
    if url is None:
        pytest.skip(
            "no PostgreSQL answers at IMNM_CDS_TEST_POSTGRES_URL; README 'Feedback' says how to start one"
        )
    engine = create_engine(url)
    feedback_store.metadata.drop_all(engine)
    engine.dispose()
    return url


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(log: Path, port: int | None = None, **environ: str) -> tuple[subprocess.Popen, str]:
    """Start `imnm-cds serve` (gunicorn) in its own process group; return it and its URL once ready."""
    start = log.stat().st_size if log.exists() else 0
    with log.open("a") as stderr:
        process = subprocess.Popen(
            # Port 0: the system picks a free port as gunicorn binds, so nothing else can take it first.
            [*CLI, "serve", "--port", str(port or 0), "--workers", "2", "--threads", "4"],
            cwd=ROOT,
            env={**os.environ, **environ},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    url = gunicorn_url(log, start, process)
    if url is not None and ready(f"{url}/health/ready", process):
        return process, url
    with contextlib.suppress(ProcessLookupError):  # it may have exited already, e.g. on a bad setting
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    pytest.fail(f"imnm-cds serve did not become ready: {log.read_text()[-2000:]}")


def gunicorn_url(log: Path, start: int, process: subprocess.Popen) -> str | None:
    """Wait up to a minute for gunicorn to log, past offset start of its log, the URL it listens at."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with log.open("rb") as text:
            text.seek(start)
            found = re.search(rb"Listening at: (http://[0-9.]+:[0-9]+)", text.read())
        if found:
            return found[1].decode()
        time.sleep(0.1)
    return None


def ready(url: str, process: subprocess.Popen) -> bool:
    """Wait up to a minute for a server the tests started to answer url with 200; False if it never does."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return True
        except (requests.ConnectionError, requests.Timeout):
            # The master accepts connections before its worker has booted and answers.
            time.sleep(0.2)
    return False


FHIR_TOKEN = "fhir-access-token-3c5e9a"  # the one bearer token the test FHIR server accepts


@contextlib.contextmanager
def sekmet(directory: Path, **overrides):
    """Run a real FHIR R4 server (sekmet) on loopback that wants FHIR_TOKEN; yield its base URL."""
    command = [str(Path(sys.executable).with_name("sekmet")), "serve", "-c", "settings.yaml"]
    log = directory / "stderr.log"
    # sekmet must be told its port (its base URL holds it), so another process may take the port first:
    # a server that exits at once is started again on another.
    for _ in range(3):
        port = free_port()
        base = f"http://127.0.0.1:{port}/fhir"
        settings = {
            "base_url": base,
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(directory / "data"),
            "simulator": {"enabled": False},
            "log_inbound": False,
            "server_auth": {"types": ["bearer"], "tokens": [FHIR_TOKEN]},
            **overrides,
        }
        (directory / "settings.yaml").write_text(json.dumps(settings))  # YAML reads JSON
        with log.open("w") as stderr:
            process = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL, stderr=stderr)
        answered = ready(f"{base}/metadata", process)
        if answered or process.poll() is None:
            break
    try:
        if not answered:
            pytest.fail(f"sekmet did not become ready: {log.read_text()[-2000:]}")
        yield base
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory):
    with sekmet(tmp_path_factory.mktemp("sekmet")) as base:
        yield base


def store(base: str, resources) -> None:
    """Put resources on a FHIR server under their own ids, in one transaction."""
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources
    ]
    response = requests.post(
        base,
        json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
        headers={"Authorization": f"Bearer {FHIR_TOKEN}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text[:2000]


def authorised(request: dict, base: str, token: str | None = FHIR_TOKEN) -> dict:
    """Name the FHIR server in a hook request and, unless token is None, the access token for it."""
    request["fhirServer"] = base
    if token is not None:
        request["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "imnm-cds",
        }
    return request


def resources_of(value) -> list[dict]:
    """The resources in a prefetch value: a Bundle's entries, a single resource, or none for null."""
    if value is None:
        return []
    return [e["resource"] for e in value.get("entry", [])] if value["resourceType"] == "Bundle" else [value]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The service under gunicorn on loopback, for the tests that need real HTTP."""
    process, url = serve(tmp_path_factory.mktemp("serve") / "stderr.log")
    yield url
    process.terminate()
    process.wait(30)


def hook_request(patient_id: str = "p1", resources=(), **prefetch_overrides) -> dict:
    """A patient-view request whose prefetch holds these resources under the right keys."""
    keys = {
        "Observation": "labs",
        "Condition": "conditions",
        "DiagnosticReport": "reports",
        "MedicationRequest": "medicationRequests",
        "MedicationStatement": "medicationStatements",
        "AllergyIntolerance": "allergies",
        "Procedure": "procedures",
        "ServiceRequest": "serviceRequests",
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
