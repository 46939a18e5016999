"""Engine faults stay in their request: a 500 or 503 OperationOutcome for it, and the next one is served.

The real rule base runs with rules that fail on purpose (tests/faulty_rules.py): an action that
raises, an action asserting a fact the engine would choke on, a card finisher that raises, and an
action that holds its session so that the only one is taken. In process, and under gunicorn, where the
worker must stay the same process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faulty_rules
import pytest
import requests
from test_app import assert_outcome

from conftest import ROOT, WEAKNESS, ck, condition, gunicorn_url, hook_request, ready
from service.logs import JsonFormatter

SERVICE = "/cds-services/imnm-patient-view"
# Each fault: the patient that triggers it, and the error logged (rule and exception type, no values).
FAULTS = {
    "action-raises": ({"gender": "other"}, "rule faulty_rules.action_raises raised RuntimeError"),
    "engine-refuses-a-fact": (
        {"birthDate": "2017-01-01"},
        "rule faulty_rules.asserts_a_nested_fact raised EngineError",
    ),
    "finisher-raises": ({"birthDate": "2019-01-01"}, "finishing card faulty-card raised KeyError"),
}
HELD = {"birthDate": "2021-01-01"}


def request_for(patient: dict | None = None) -> dict:
    """A patient-view request with raised CK and weakness; the patient changed to trigger a fault."""
    request = hook_request(resources=[ck("ck1", 3000), condition("w1", WEAKNESS)])
    request["prefetch"]["patient"] = {"resourceType": "Patient", "id": "p1", **(patient or {})}
    return request


def as_bundle(request: dict) -> dict:
    entries = [{"resource": request["prefetch"]["patient"]}]
    for key in ("labs", "conditions"):
        entries += request["prefetch"][key]["entry"]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": "2024-06-01T12:00:00Z",
        "entry": entries,
    }


@pytest.fixture(scope="module")
def faulty():
    return faulty_rules.create()


@pytest.fixture(scope="module")
def expected(app):
    """What the service answers for the normal request, without faulty rules."""
    return app.test_client().post(SERVICE, json=request_for()).get_json()


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
@pytest.mark.parametrize("path", [SERVICE, "/evaluate"])
def test_a_fault_fails_its_request_only(faulty, expected, fault, path, caplog):
    client = faulty.test_client()
    patient, error = FAULTS[fault]
    request = request_for(patient)
    body = as_bundle(request) if path == "/evaluate" else request
    failed = assert_outcome(client.post(path, json=body), 500)
    assert failed["issue"][0]["code"] == "exception"
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert f'"event": "rule engine failed", "error": "{error}"' in logged
    assert "Jane" not in json.dumps(failed) and "Jane" not in logged
    assert client.post(SERVICE, json=request_for()).get_json() == expected
    assert faulty.extensions["imnm_cds"].engine.live_sessions == 0
    assert client.get("/health/ready").status_code == 200


def test_an_exhausted_session_pool_answers_503_and_recovers(faulty, expected):
    client = faulty.test_client()
    faulty_rules.HOLD.clear()
    faulty_rules.HELD.clear()
    answers = []
    holder = threading.Thread(target=lambda: answers.append(client.post(SERVICE, json=request_for(HELD))))
    holder.start()
    try:
        assert faulty_rules.HELD.wait(10)
        busy = assert_outcome(client.post(SERVICE, json=request_for()), 503)
        assert busy["issue"][0]["code"] == "transient"
    finally:
        faulty_rules.HOLD.set()
        holder.join(10)
    assert not holder.is_alive()
    assert answers[0].status_code == 200
    assert client.post(SERVICE, json=request_for()).get_json() == expected


def worker_pids(master: int) -> set[int]:
    """The pids of a gunicorn master's workers (its child processes)."""
    return {int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()}


def wait_for(path: Path) -> bool:
    """Wait up to a minute for a file to exist; False if it never does."""
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_under_gunicorn_the_worker_survives_every_fault(tmp_path, expected):
    log, holds, release = tmp_path / "gunicorn.log", tmp_path / "holds", tmp_path / "release"
    with log.open("w") as stderr:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "gthread"),
                *("--threads", "4", "--bind", "127.0.0.1:0", "--no-control-socket", "--pythonpath", "tests"),
                "faulty_rules:create()",
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "FAULTY_RULES_HELD_FILE": str(holds),
                "FAULTY_RULES_RELEASE_FILE": str(release),
            },
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        url = gunicorn_url(log, 0, server)
        assert url is not None and ready(f"{url}/health/ready", server), log.read_text()[-2000:]
        workers = worker_pids(server.pid)
        assert len(workers) == 1
        for patient, _ in FAULTS.values():
            answer = requests.post(url + SERVICE, json=request_for(patient), timeout=10)
            assert answer.status_code == 500 and answer.json()["resourceType"] == "OperationOutcome"
            assert requests.post(url + SERVICE, json=request_for(), timeout=10).json() == expected
        # One request holds the only session: a request arriving meanwhile gets 503, then all is normal.
        held = []
        holding = threading.Thread(
            target=lambda: held.append(requests.post(url + SERVICE, json=request_for(HELD), timeout=60))
        )
        holding.start()
        try:
            assert wait_for(holds), log.read_text()[-2000:]
            busy = requests.post(url + SERVICE, json=request_for(), timeout=10)
            assert busy.status_code == 503 and busy.json()["issue"][0]["code"] == "transient"
        finally:
            release.touch()
            holding.join(60)
        assert not holding.is_alive()
        assert held[0].status_code == 200
        assert requests.post(url + SERVICE, json=request_for(), timeout=10).json() == expected
        assert worker_pids(server.pid) == workers
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    text = log.read_text()
    assert text.count("Booting worker") == 1 and "Worker exited" not in text
    assert "Jane" not in text and "Traceback" not in text
