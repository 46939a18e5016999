"""The imnm-cds command: offline evaluation, and replay against the service served by gunicorn."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import FIXTURES, ROOT, load

CLI = [sys.executable, "-m", "service.cli"]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*CLI, "serve", "--port", str(port), "--workers", "2", "--threads", "4"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health/ready", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"imnm-cds serve did not become ready: {log.read_text()[-2000:]}")
    yield url
    process.terminate()
    process.wait(30)


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
