"""The imnm-cds command: offline evaluation, and replay against the service served by gunicorn."""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives import serialization

import signing
from conftest import CLI, FIXTURES, ROOT, free_port, gunicorn_url, load, ready, serve
from service.cli import main
from service.store.feedback import FeedbackStore, IssuedCard
from service.store.feedback_request import Coding, Feedback


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_evaluate_prints_the_expected_cards_for_a_fixture():
    scenario = FIXTURES / "worked-example-hmgcr-positive"
    path = str(scenario / "request.json")
    result = run("evaluate", path)
    assert result.returncode == 0, result.stderr[-1000:]
    assert json.loads(result.stdout) == {path: load(scenario / "expected.json")}
    assert result.stderr == ""


def test_evaluate_several_files_keys_them_by_path_and_names_the_refused_one(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    good = FIXTURES / "bundle-worked-example" / "request.json"
    result = run("evaluate", str(good), str(bad))
    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert output[str(good)] == load(FIXTURES / "bundle-worked-example" / "expected.json")
    # The refusal is the OperationOutcome /cds-services would answer, with nothing added to it.
    assert output[str(bad)] == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "not-supported",
                "diagnostics": "no service here answers this hook",
                "expression": ["hook"],
            }
        ],
    }
    assert result.stderr == f"imnm-cds: {bad}: refused (400): no service here answers this hook\n"


def test_evaluate_says_where_a_file_is_not_json_or_cannot_be_read(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"resourceType": "Bundle",\n  "type": }')
    missing = tmp_path / "missing.json"
    result = run("evaluate", str(broken), str(missing))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"imnm-cds: {broken}: not JSON: Expecting value at line 2, column 11",
        f"imnm-cds: {missing}: cannot read it: No such file or directory",
    ]
    output = json.loads(result.stdout)
    assert output[str(broken)]["issue"][0]["diagnostics"] == "not JSON: Expecting value at line 2, column 11"


def test_evaluate_reads_standard_input_as_of_a_time_for_a_hook_and_answers_fhir():
    scenario = FIXTURES / "bundle-worked-example"
    bundle = (scenario / "request.json").read_text()
    result = run("evaluate", "-", "--as-of", "2024-06-01T12:00:00Z", input=bundle)
    assert result.returncode == 0, result.stderr[-1000:]
    assert json.loads(result.stdout) == {"-": load(scenario / "expected.json")}
    later = run("evaluate", "-", "--as-of", "2035-06-01T12:00:00Z", input=bundle)
    assert json.loads(later.stdout)["-"] != load(scenario / "expected.json")  # the time is used
    ordering = run("evaluate", "-", "--hook", "order-sign", input=bundle)
    assert ordering.returncode == 0 and json.loads(ordering.stdout)["-"] == {"cards": []}
    fhir = json.loads(run("evaluate", "-", "--fhir", "--as-of", "2024-06-01T12:00:00Z", input=bundle).stdout)[
        "-"
    ]
    assert fhir["resourceType"] == "Bundle" and fhir["type"] == "transaction"
    kinds = {entry["resource"]["resourceType"] for entry in fhir["entry"]}
    assert "GuidanceResponse" in kinds
    refused = run("evaluate", "-", "--as-of", "yesterday", input=bundle)
    assert refused.returncode == 2 and "must be a FHIR dateTime" in refused.stderr


def test_every_flag_has_help_that_shows_its_default():
    wide = {**os.environ, "COLUMNS": "1000"}  # one line per flag
    helps = {}
    for command in ("serve", "evaluate", "replay", "feedback-report", "screen"):
        result = run(command, "--help", env=wide)
        assert result.returncode == 0
        flags = [line.strip() for line in result.stdout.splitlines() if line.startswith("  --")]
        assert flags, command
        for line in flags:
            assert len(re.split(r"\s{2,}", line)) == 2, (command, line)  # the flag, then its help
        helps[command] = "\n".join(flags)
    for default in ("127.0.0.1", "30", "5"):
        assert f"(default: {default})" in helps["serve"]
    for setting, default in (("PORT", "8080"), ("WORKERS", "2"), ("THREADS", "4")):
        assert f"(default: IMNM_CDS_{setting}, else {default})" in helps["serve"]
    assert "(default: 10.0)" in helps["replay"] and "(default: patient-view)" in helps["evaluate"]
    assert "(default: one per CPU)" in helps["screen"]
    assert "(default: None)" not in "".join(helps.values())


def test_replay_explains_a_url_without_scheme_and_a_refused_connection(tmp_path):
    result = run("replay", str(FIXTURES), "--url", "127.0.0.1:8080")
    assert result.returncode == 2
    assert result.stderr == "imnm-cds: --url 127.0.0.1:8080 needs a scheme, e.g. http://127.0.0.1:8080\n"
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = run("replay", str(FIXTURES), "--url", nowhere)
    assert result.returncode == 2
    assert result.stderr == (
        f"imnm-cds: nothing answers at {nowhere}: is the service running there (imnm-cds serve)?\n"
    )


def test_served_discovery_and_replay_of_every_fixture(server):
    services = requests.get(f"{server}/cds-services", timeout=5).json()["services"]
    assert services[0]["id"] == "imnm-patient-view"
    result = run("replay", str(FIXTURES), "--url", server)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(list(FIXTURES.glob('*/request.json')))} same, 0 different" in result.stderr


def test_served_calls_keep_their_connection_alive(server):
    address = urlsplit(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    scenario = FIXTURES / "worked-example-hmgcr-positive"
    sockets = []
    try:
        for method, path, body in (
            ("GET", "/cds-services", None),
            ("POST", "/cds-services/imnm-patient-view", (scenario / "request.json").read_bytes()),
        ):
            connection.request(method, path, body, {"Content-Type": "application/json"})
            answer = connection.getresponse()
            assert answer.status == 200 and json.loads(answer.read())
            assert answer.getheader("Connection", "").lower() != "close"
            sockets.append(connection.sock)  # None once the server closed it
    finally:
        connection.close()
    assert sockets[0] is not None and sockets[0] is sockets[1]


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
        key = client_keys["rsa"]
        pem = tmp_path / "client.pem"
        pem.write_bytes(
            key.private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        one = tmp_path / "fixtures"
        shutil.copytree(scenario, one / scenario.name)
        signed = ["--jwt-key", str(pem), "--issuer", signing.ISSUER, "--kid", key.kid]
        replayed = run("replay", str(one), "--url", url, *signed)
        unsigned = run("replay", str(one), "--url", url)
    finally:
        process.terminate()
        process.wait(30)
    assert answer.status_code == 200 and answer.json() == load(scenario / "expected.json")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert replayed.returncode == 0 and "1 same, 0 different" in replayed.stderr, replayed.stderr[-2000:]
    assert unsigned.returncode == 1 and "(HTTP 401)" in unsigned.stdout
    log = (tmp_path / "stderr.log").read_text()
    assert '"authentication on"' in log and token not in log


def test_serve_takes_port_workers_and_threads_from_settings(tmp_path):
    port, log = free_port(), tmp_path / "stderr.log"
    settings = {"IMNM_CDS_PORT": str(port), "IMNM_CDS_WORKERS": "1", "IMNM_CDS_THREADS": "3"}
    with log.open("w") as stderr:
        environ = {**os.environ, **settings}
        process = subprocess.Popen(
            [*CLI, "serve"], cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        assert gunicorn_url(log, 0, process) == f"http://127.0.0.1:{port}", log.read_text()[-2000:]
        assert ready(f"http://127.0.0.1:{port}/health/ready", process)
        workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    finally:
        process.terminate()
        process.wait(30)
    assert len(workers) == 1
    assert "No keepalived connections" not in log.read_text()
    refused = run("serve", env={**os.environ, "IMNM_CDS_WORKERS": "0"})
    assert refused.returncode == 2 and "IMNM_CDS_WORKERS" in refused.stderr


def test_serve_refuses_development_mode_in_production():
    result = run("serve", env={**os.environ, "IMNM_CDS_PRODUCTION": "true"})
    assert result.returncode == 2
    assert "IMNM_CDS_PRODUCTION=true refuses to start until these are set:" in result.stderr
    assert "IMNM_CDS_AUTH=jwt (IMNM_CDS_AUTH=off is development mode)" in result.stderr


def test_feedback_report_shows_per_rule_counts_and_reasons_per_knowledge_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    store = FeedbackStore(url)
    now = datetime(2024, 6, 1, tzinfo=UTC)
    rules = ("imnm.ck_raised", "imnm.seropositive_hmgcr")
    before, after = "0.1.0+0123456789ab", "0.1.0+ba9876543210"
    card = functools.partial(IssuedCard, "imnm-patient-view", topic="imnm-suspected", indicator="warning")
    store.write_cards([card(uuid="a", rules=rules, at=now, knowledge=before)] * 3)
    store.write_cards([card(uuid="b", rules=rules, at=now, knowledge=after)] * 2)
    reason = Coding(
        "urn:imnm-cds:CodeSystem:override-reason", "not-relevant", "Not relevant for this patient"
    )
    store.save("imnm-patient-view", [Feedback("a", "overridden", now, reason=reason)], now)
    store.save("imnm-patient-view", [Feedback("b", "accepted", now)], now)
    summary = store.summary()
    store.close()
    env = {**os.environ, "IMNM_CDS_DATABASE_URL": url}
    table = run("feedback-report", env=env)
    assert table.returncode == 0, table.stderr[-2000:]
    assert table.stderr == f"feedback from {url}\n"
    lines = [line.split() for line in table.stdout.splitlines()]
    # The override rate before the knowledge changed is not pooled with the one after.
    assert [before, "imnm.ck_raised", "imnm-suspected", "3", "1", "0", "1", "not-relevant", "(1)"] in lines
    assert [after, "imnm.ck_raised", "imnm-suspected", "2", "1", "1", "0"] in lines
    assert json.loads(run("feedback-report", "--json", env=env).stdout) == summary


def test_serve_names_a_database_it_cannot_open_in_one_line(tmp_path):
    missing = tmp_path / "gone" / "feedback.sqlite"
    result = run("serve", env={**os.environ, "IMNM_CDS_DATABASE_URL": f"sqlite:///{missing}"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"imnm-cds: cannot open the feedback database sqlite:///{missing}: No such file or directory"
    )


def test_feedback_report_names_its_database_and_never_creates_one(tmp_path):
    result = subprocess.run(
        [*CLI, "feedback-report"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "IMNM_CDS_DATABASE_URL"},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        f"imnm-cds: no feedback database at sqlite:///{tmp_path / 'imnm-cds.sqlite'} "
        "(set IMNM_CDS_DATABASE_URL to the service's)"
    )
    assert list(tmp_path.iterdir()) == []


def test_knowledge_report_lists_the_engineering_defaults(capsys):
    assert main(["knowledge-report"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("severity.srp-rising-within = 30 ") for line in listed)
    assert not any(line.startswith("severity.fvc.critical") for line in listed)  # cited, not a default
