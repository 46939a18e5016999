"""The imnm-cds command: offline evaluation, and replay against the service served by gunicorn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime

import requests

import signing
from conftest import CLI, FIXTURES, ROOT, free_port, load, serve
from service.cli import main
from service.store.feedback import FeedbackStore, IssuedCard
from service.store.feedback_request import Coding, Feedback


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_evaluate_prints_the_expected_cards_for_a_fixture():
    scenario = FIXTURES / "worked-example-hmgcr-positive"
    result = run("evaluate", str(scenario / "request.json"))
    assert result.returncode == 0, result.stderr[-1000:]
    assert json.loads(result.stdout) == load(scenario / "expected.json")


def test_evaluate_several_files_keys_them_by_path_and_fails_on_a_refused_one(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    good = FIXTURES / "bundle-worked-example" / "request.json"
    result = run("evaluate", str(good), str(bad))
    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert output[str(good)] == load(FIXTURES / "bundle-worked-example" / "expected.json")
    assert output[str(bad)]["resourceType"] == "OperationOutcome"


def test_served_discovery_and_replay_of_every_fixture(server):
    services = requests.get(f"{server}/cds-services", timeout=5).json()["services"]
    assert services[0]["id"] == "imnm-patient-view"
    result = run("replay", str(FIXTURES), "--url", server)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(list(FIXTURES.glob('*/request.json')))} same, 0 different" in result.stderr


def test_replay_shows_a_diff_and_fails_when_a_response_differs(server, tmp_path):
    copy = tmp_path / "fixtures"
    shutil.copytree(FIXTURES / "worked-example-hmgcr-positive", copy / "changed")
    expected = load(copy / "changed" / "expected.json")
    expected["cards"][0]["indicator"] = "critical"
    (copy / "changed" / "expected.json").write_text(json.dumps(expected))
    result = run("replay", str(copy), "--url", server)
    assert result.returncode == 1
    assert (
        '-      "indicator": "critical"' in result.stdout and '+      "indicator": "warning"' in result.stdout
    )


def test_replay_of_an_empty_directory_fails(server, tmp_path):
    assert run("replay", str(tmp_path), "--url", server).returncode == 2


def test_served_with_jwt_verification(jwks_server, client_keys, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    issuers = tmp_path / "issuers.json"
    jku = jwks_server.publish("/served/jwks.json", signing.jwks(*client_keys.values()))
    issuers.write_text(json.dumps({signing.ISSUER: {"jku": [jku]}}))
    settings = {"IMNM_CDS_AUTH": "jwt", "IMNM_CDS_TRUSTED_ISSUERS": str(issuers), "IMNM_CDS_PUBLIC_URL": url}
    scenario = FIXTURES / "worked-example-hmgcr-positive"
    process, _ = serve(tmp_path / "stderr.log", port, **settings)
    try:
        token = signing.sign(client_keys["ec"], signing.claims(f"{url}/cds-services"))
        headers = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{url}/cds-services", headers=headers, timeout=5).status_code == 200
        target = f"{url}/cds-services/imnm-patient-view"
        token = signing.sign(client_keys["rsa"], signing.claims(target))
        answer = requests.post(
            target,
            json=load(scenario / "request.json"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        refused = requests.post(target, json=load(scenario / "request.json"), timeout=5)
    finally:
        process.terminate()
        process.wait(30)
    assert answer.status_code == 200 and answer.json() == load(scenario / "expected.json")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    log = (tmp_path / "stderr.log").read_text()
    assert '"authentication on"' in log and token not in log


def test_serve_refuses_development_mode_in_production():
    result = run("serve", env={**os.environ, "IMNM_CDS_PRODUCTION": "true"})
    assert result.returncode == 2
    assert "IMNM_CDS_PRODUCTION=true refuses IMNM_CDS_AUTH=off" in result.stderr


def test_feedback_report_shows_per_rule_counts_and_reasons(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    store = FeedbackStore(url)
    now = datetime(2024, 6, 1, tzinfo=UTC)
    rules = ("imnm.ck_raised", "imnm.seropositive_hmgcr")
    store.write_cards([IssuedCard("imnm-patient-view", "a", "imnm-suspected", "warning", rules, now)] * 3)
    reason = Coding(
        "urn:imnm-cds:CodeSystem:override-reason", "not-relevant", "Not relevant for this patient"
    )
    store.save("imnm-patient-view", [Feedback("a", "overridden", now, reason=reason)], now)
    summary = store.summary()
    store.close()
    env = {**os.environ, "IMNM_CDS_DATABASE_URL": url}
    table = run("feedback-report", env=env)
    assert table.returncode == 0, table.stderr[-2000:]
    lines = [line.split() for line in table.stdout.splitlines()]
    assert ["imnm.ck_raised", "imnm-suspected", "3", "1", "0", "1", "not-relevant", "(1)"] in lines
    assert json.loads(run("feedback-report", "--json", env=env).stdout) == summary


def test_knowledge_report_lists_the_engineering_defaults(capsys):
    assert main(["knowledge-report"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("severity.srp-rising-within = 30 ") for line in listed)
    assert not any(line.startswith("severity.fvc.critical") for line in listed)  # cited, not a default
