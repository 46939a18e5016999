"""What an operator sees: a JSON line per error answer and per request, metrics, the knowledge version."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from importlib.metadata import version

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from test_faults import worker_pids

from conftest import FIXTURES, hook_request, load, serve
from rules import knowledge
from service.config import ConfigError
from service.logs import JsonFormatter
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"
HMGCR = FIXTURES / "worked-example-hmgcr-positive" / "request.json"
SECRET = "oauth-code-Zq81x"  # what a query or path might carry: never logged


def lines(caplog, event: str | None = None) -> list[dict]:
    """The captured records as the JSON lines they become, those of one event if named."""
    found = [json.loads(JsonFormatter().format(record)) for record in caplog.records]
    return [line for line in found if event is None or line["event"] == event]


def without_patient(request: dict) -> dict:
    del request["prefetch"]["patient"]  # required, and no fhirServer to fetch it from
    return request


ROUTE = "/cds-services/<service_id>"
JSON = "application/json"
NO_UUID = {**hook_request(), "hookInstance": SECRET}
IMAGE = {"Accept": "image/png"}  # no answer is an image
TOO_LARGE = "request-entity-too-large"
CSV = "text/csv"
BIG = b" " * (5 << 20 | 1)  # one byte over IMNM_CDS_MAX_BODY_BYTES
UNOBTAINABLE = without_patient(hook_request())
# (method, path, keyword arguments, status, route template, OperationOutcome code, reason)
ERRORS = [
    ("POST", SERVICE, {"data": "{", "content_type": JSON}, 400, ROUTE, "structure", "json"),
    ("POST", SERVICE, {"json": NO_UUID}, 400, ROUTE, "value", "hookInstance"),
    ("GET", f"/nowhere/{SECRET}?code={SECRET}", {}, 404, "unmatched", "not-found", "not-found"),
    ("POST", f"/cds-services/{SECRET}", {"json": {}}, 404, ROUTE, "not-found", "unknown-service"),
    ("GET", f"/evaluate?code={SECRET}", {}, 405, "unmatched", "not-supported", "method-not-allowed"),
    ("POST", "/evaluate", {"json": {}, "headers": IMAGE}, 406, "/evaluate", "not-supported", "accept"),
    ("POST", SERVICE, {"json": UNOBTAINABLE}, 412, ROUTE, "processing", "prefetch.patient"),
    ("POST", SERVICE, {"data": BIG, "content_type": JSON}, 413, ROUTE, "too-long", TOO_LARGE),
    ("POST", SERVICE, {"data": "{}", "content_type": CSV}, 415, ROUTE, "not-supported", "content-type"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "arguments", "status", "route", "code", "reason"),
    ERRORS,
    ids=[str(e[3]) + "-" + e[6] for e in ERRORS],
)
def test_every_error_answer_logs_one_line_with_route_code_and_reason(
    client, caplog, method, path, arguments, status, route, code, reason
):
    caplog.set_level(logging.INFO)
    response = client.open(path, method=method, **arguments)
    assert response.status_code == status
    assert response.get_json()["issue"][0]["code"] == code
    [error] = lines(caplog, "error")
    sent = arguments.get("json") or {}
    instance = sent.get("hookInstance") if sent.get("hookInstance") != SECRET else None
    assert {k: v for k, v in error.items() if k not in ("time", "logger")} == {
        "level": "WARNING",
        "event": "error",
        "status": status,
        "route": route,
        "code": code,
        "reason": reason,
        "service": "imnm-patient-view" if path == SERVICE else None,
        "hookInstance": instance,
    }
    [access] = lines(caplog, "request")
    assert access.keys() == {"time", "level", "logger", "event", "method", "route", "status", "ms"}
    assert (access["method"], access["route"], access["status"]) == (method, route, status)
    assert SECRET not in caplog.text and SECRET not in json.dumps(lines(caplog))


def test_a_refused_jwt_is_logged_and_counted_by_reason(auth_app, caplog):
    caplog.set_level(logging.INFO)
    before = REGISTRY.get_sample_value("imnm_cds_jwt_refusals_total", {"reason": "malformed"}) or 0
    response = auth_app.test_client().get("/cds-services", headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 401
    [error] = lines(caplog, "error")
    assert (error["status"], error["route"], error["code"], error["reason"]) == (
        401,
        "/cds-services",
        "login",
        "jwt-malformed",
    )
    assert REGISTRY.get_sample_value("imnm_cds_jwt_refusals_total", {"reason": "malformed"}) == before + 1
    assert SECRET not in json.dumps(lines(caplog))


def test_metrics_count_answers_stages_and_cards_by_rule(client):
    def sample(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0

    route = {"route": "/cds-services/<service_id>", "status": "200"}
    before = [
        sample("imnm_cds_requests_total", **route),
        sample("imnm_cds_stage_seconds_count", stage="rules"),
    ]
    cards = client.post(SERVICE, json=load(HMGCR)).get_json()["cards"]
    after = [
        sample("imnm_cds_requests_total", **route),
        sample("imnm_cds_stage_seconds_count", stage="rules"),
    ]
    assert after == [before[0] + 1, before[1] + 1]
    scraped = client.get("/metrics")
    assert scraped.status_code == 200 and scraped.mimetype == "text/plain"
    samples = [s for family in text_string_to_metric_families(scraped.text) for s in family.samples]
    counted = {
        (s.labels["rule"], s.labels["topic"], s.labels["indicator"])
        for s in samples
        if s.name == "imnm_cds_cards_total"
    }
    for card in cards:
        for rule in card["extension"]["imnm-cds.rules"]:
            assert (rule, card["source"]["topic"]["code"], card["indicator"]) in counted
    assert [s.value for s in samples if s.name == "imnm_cds_engine_sessions_in_use"] == [0]
    # No label carries the patient's id or the request's hookInstance.
    request = load(HMGCR)
    assert request["context"]["patientId"] not in scraped.text
    assert request["hookInstance"] not in scraped.text


def test_with_jwt_metrics_answer_only_the_named_addresses_or_the_secret(auth_app, tmp_path):
    assert auth_app.test_client().get("/metrics").status_code == 403  # no address or secret named
    secret = tmp_path / "metrics-secret"
    secret.write_text("s3cret-for-scrapers\n")
    issuers = auth_app.extensions["imnm_cds"].settings.trusted_issuers
    settings = {"auth": "jwt", "trusted_issuers": issuers, "public_url": "http://localhost"}
    guarded = create_app({**settings, "metrics_addresses": "10.0.0.0/8", "metrics_token_file": secret})
    client = guarded.test_client()
    assert client.get("/metrics").status_code == 403  # the test client calls from 127.0.0.1
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-for-scrapers"}).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 200
    local = create_app({**settings, "metrics_addresses": "127.0.0.1"}).test_client()
    assert local.get("/metrics").status_code == 200
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="METRICS_TOKEN_FILE"):
        create_app({**settings, "metrics_token_file": empty})


def test_a_disabled_rule_issues_no_card_and_is_shown_at_start_and_when_ready(app, capsys):
    rule = "cancer.screening_due"
    enabled = app.test_client().post(SERVICE, json=load(HMGCR)).get_json()["cards"]
    kept = [card for card in enabled if rule not in card["extension"]["imnm-cds.rules"]]
    assert kept and len(kept) < len(enabled)
    capsys.readouterr()
    app = create_app({"disabled_rules": f" {rule} ,", "deadline_ms": 30_000})  # a busy machine is no matter
    started = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["rules"] for line in started if line["event"] == "rules switched off"] == [[rule]]
    client = app.test_client()
    assert client.post(SERVICE, json=load(HMGCR)).get_json()["cards"] == kept  # the others are untouched
    [evaluated] = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"evaluated"' in line]
    assert evaluated["rules"] and rule not in evaluated["rules"]
    assert client.get("/health/ready").get_json()["disabledRules"] == [rule]
    with pytest.raises(ConfigError, match=r"IMNM_CDS_DISABLED_RULES: no such rules: imnm\.no_such_rule$"):
        create_app({"disabled_rules": f"{rule},imnm.no_such_rule"})


def test_the_knowledge_version_is_the_package_and_a_hash_of_rules_after_overrides(tmp_path, app, caplog):
    caplog.set_level(logging.INFO)
    shipped = app.extensions["imnm_cds"].knowledge_version
    assert shipped == f"{version('imnm-cds')}+{knowledge.fingerprint()[:12]}"
    client = app.test_client()
    assert client.get("/health/ready").get_json()["knowledge"] == shipped
    client.post(SERVICE, json=load(HMGCR))
    assert lines(caplog, "evaluated")[-1]["knowledge"] == shipped
    # Any change to a file of rules/, or a local override, is another version.
    copy = tmp_path / "rules"
    shutil.copytree(knowledge.resources.files("rules"), copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert knowledge.fingerprint(root=copy) == knowledge.fingerprint()
    (copy / "labs.toml").write_text((copy / "labs.toml").read_text() + "\n# a comment\n")
    assert knowledge.fingerprint(root=copy) != knowledge.fingerprint()
    overrides = tmp_path / "local.toml"
    overrides.write_text('[statin.persistence-window]\nvalue = 21\nsource = "Lipid clinic 2026-03"\n')
    local = create_app({"knowledge_overrides": overrides}).extensions["imnm_cds"].knowledge_version
    assert local.startswith(f"{version('imnm-cds')}+") and local != shipped


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample /metrics answers, keyed by name and labels."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_under_gunicorn_metrics_count_every_call_once_and_survive_a_killed_worker(tmp_path):
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"an earlier run's file, unreadable")  # must be emptied
    log = tmp_path / "stderr.log"
    process, url = serve(log, PROMETHEUS_MULTIPROC_DIR=str(shared))
    calls = ("imnm_cds_requests_total", (("route", "/cds-services/<service_id>"), ("status", "200")))
    workers = ("imnm_cds_workers", ())
    try:
        request = load(HMGCR)
        for _ in range(12):  # a new connection each time, so both workers take calls
            response = requests.post(
                f"{url}{SERVICE}", json=request, timeout=30, headers={"Connection": "close"}
            )
            assert response.status_code == 200
        requests.get(f"{url}/cds-services?code={SECRET}", timeout=10)
        for _ in range(6):
            metrics = scrape(url)
            assert metrics[calls] == 12
            assert metrics[workers] == 2
        killed = min(worker_pids(process.pid))
        os.kill(killed, signal.SIGKILL)
        # Each worker's app warns that authentication is off once it has made its metrics: a third warning
        # means the replacement is up, and a gauge still holding the dead worker would now read 3.
        deadline = time.monotonic() + 90
        while log.read_text().count("AUTHENTICATION OFF") < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        alive = worker_pids(process.pid)
        assert killed not in alive and len(alive) == 2
        for _ in range(6):
            metrics = scrape(url)
            assert metrics[calls] == 12  # the dead worker's counts stay
            assert metrics[workers] == 2  # and it is no longer counted as serving
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line is JSON, gunicorn's too
    assert any(r["logger"] == "gunicorn.error" and r["event"].startswith("Booting worker") for r in records)
    assert sum(r["event"] == "request" and r["route"] == "/cds-services/<service_id>" for r in records) == 12
    assert SECRET not in text
