"""Population screening from Bulk Data NDJSON: the same cards as /evaluate, resumable, on Dask too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from conftest import load, scenarios
from service.fhir import parse_time
from service.population import screen
from service.population.distributed import screen_on_dask

AS_OF = "2024-06-01T12:00:00Z"


def fixture_patients() -> dict[str, list[dict]]:
    """Every patient-view fixture evaluated as of AS_OF with a Patient id: its resources, by patient."""
    patients = {}
    for path in scenarios():
        body = load(path / "request.json")
        if body.get("hook") != "patient-view" or body["extension"]["imnm-cds.asOf"] != AS_OF:
            continue
        resources = []
        for value in body["prefetch"].values():
            if value is not None:
                entries = (
                    value.get("entry", []) if value["resourceType"] == "Bundle" else [{"resource": value}]
                )
                resources += [entry["resource"] for entry in entries]
        if any(r["resourceType"] == "Patient" for r in resources):
            patients[body["context"]["patientId"]] = resources
    return patients


def copies(patients: dict[str, list[dict]], n: int) -> dict[str, list[dict]]:
    """Make n renamed copies of each patient, so a population is large enough to interrupt."""
    population = {}
    for copy in range(n):
        for pid, resources in patients.items():
            text = json.dumps(resources).replace(f'"Patient/{pid}"', f'"Patient/{pid}-{copy}"')
            renamed = json.loads(text)
            for r in renamed:
                if r["resourceType"] == "Patient":
                    r["id"] = f"{pid}-{copy}"
            population[f"{pid}-{copy}"] = renamed
    return population


def write_export(directory: Path, patients: dict[str, list[dict]], extra_lines: str = "") -> Path:
    """Write patients as a Bulk Data export: one NDJSON file per resource type."""
    directory.mkdir(parents=True, exist_ok=True)
    by_type = defaultdict(list)
    for resources in patients.values():
        for resource in resources:
            by_type[resource["resourceType"]].append(json.dumps(resource))
    for kind, lines in by_type.items():
        (directory / f"{kind}.ndjson").write_text("\n".join(lines) + "\n")
    if extra_lines:
        (directory / "Other.ndjson").write_text(extra_lines)
    return directory


def results(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_patient = {row["patient"]: row for row in rows}
    assert len(by_patient) == len(rows), "a patient was written twice"
    return by_patient


@pytest.fixture(scope="module")
def fixtures_only():
    return fixture_patients()


def test_every_patient_gets_the_cards_evaluate_gives(client, fixtures_only, tmp_path):
    export = write_export(tmp_path / "export", fixtures_only)
    summary = screen.screen(export, tmp_path / "out", parse_time(AS_OF), workers=2, progress=False)
    written = results(tmp_path / "out" / screen.RESULTS)
    assert set(written) == set(fixtures_only) and summary.patients == len(fixtures_only)
    for pid, resources in fixtures_only.items():
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": r} for r in resources],
        }
        expected = client.post(f"/evaluate?asOf={AS_OF}", json=bundle).get_json()
        assert "cards" in expected, (pid, expected)
        assert written[pid]["cards"] == expected["cards"], pid
    with_cards = sum(bool(row["cards"]) for row in written.values())
    assert summary.with_cards == with_cards > 0
    imnm = sum(
        any(c["source"]["topic"]["code"] == "imnm-suspected" for c in r["cards"]) for r in written.values()
    )
    assert sum(n for (topic, _), n in summary.cards.items() if topic == "imnm-suspected") == imnm
    saved = json.loads((tmp_path / "out" / screen.SUMMARY).read_text())
    assert saved["patients"] == len(fixtures_only) and saved["thisRun"]["patients"] == len(fixtures_only)


def test_what_cannot_be_used_is_counted_and_a_bad_patient_does_not_stop_the_rest(fixtures_only, tmp_path):
    broken = {"resourceType": "Patient", "id": "broken", "gender": 12}
    orphan = {"resourceType": "Observation", "status": "final", "code": {"text": "CK"}}
    extra = (
        "not json\n" + json.dumps(broken) + "\n" + json.dumps(orphan) + "\n" + '{"resourceType": "Claim"}\n'
    )
    export = write_export(tmp_path / "export", fixtures_only, extra)
    summary = screen.screen(export, tmp_path / "out", parse_time(AS_OF), workers=1, progress=False)
    written = results(tmp_path / "out" / screen.RESULTS)
    assert written["broken"]["status"] == 400
    assert written["broken"]["error"]["resourceType"] == "OperationOutcome"
    assert summary.errors == 1 and summary.patients == len(fixtures_only) + 1
    assert summary.staged["leftOut"] == {
        "not JSON": 1,
        "Observation without a patient": 1,
        "Claim (not used)": 1,
    }


def unusable_lines() -> bytes:
    """Lines no rule can use that once stopped a screen, and lines that look odd but are fine."""
    lines = [
        b'{"resourceType": "Patient", "id": "\\udc80"}',  # half of a surrogate pair, escaped
        b'{"resourceType": "Patient", "id": "bad-byte\xff"}',  # not UTF-8
        b'{"resourceType": "Condition", "subject": {"reference": "Patient/fx-pm"},'
        b' "code": {"text": "\\ud800"}}',
        b'{"resourceType": ["Patient"]}',
        b"[" * 100_000,
        b'{"resourceType": "Patient", "id": "emoji", "name": [{"text": "\\ud83d\\ude00 Zo\xc3\xab"}]}',
    ]
    return b"\n".join(lines) + b"\n"


def test_lines_that_are_not_utf8_or_not_json_are_left_out_and_the_rest_screened(fixtures_only, tmp_path):
    export = write_export(tmp_path / "export", fixtures_only)
    (export / "Other.ndjson").write_bytes(unusable_lines())
    summary = screen.screen(export, tmp_path / "out", parse_time(AS_OF), workers=1, progress=False)
    assert summary.staged["leftOut"] == {"not UTF-8": 3, "not JSON": 1, "no resourceType (not used)": 1}
    written = results(tmp_path / "out" / screen.RESULTS)
    assert set(written) == {*fixtures_only, "emoji"}
    assert (tmp_path / "out" / screen.RESULTS).read_bytes().isascii()


def test_dask_leaves_out_the_same_lines(fixtures_only, tmp_path):
    export = write_export(tmp_path / "export", fixtures_only)
    (export / "Other.ndjson").write_bytes(unusable_lines())
    screen.screen(export, tmp_path / "local", parse_time(AS_OF), workers=1, progress=False)
    screen_on_dask(export, tmp_path / "dask", parse_time(AS_OF), scheduler=None, workers=2)
    merged = {}
    for part in sorted((tmp_path / "dask").glob("results-*.ndjson")):
        merged |= results(part)
    assert merged == results(tmp_path / "local" / screen.RESULTS)


def test_a_failed_dask_run_keeps_the_results_of_the_last(fixtures_only, tmp_path):
    export = write_export(tmp_path / "export", dict(list(fixtures_only.items())[:3]))
    out = tmp_path / "dask"
    screen_on_dask(export, out, parse_time(AS_OF), scheduler=None, workers=1)
    before = {part.name: part.read_bytes() for part in out.glob("results-*.ndjson")}
    assert before
    (export / "Broken.ndjson.gz").write_bytes(b"not gzip")
    with pytest.raises(OSError, match="gzip"):
        screen_on_dask(export, out, parse_time(AS_OF), scheduler=None, workers=1)
    assert {part.name: part.read_bytes() for part in out.glob("results-*.ndjson")} == before


# Worker processes start from a fresh interpreter, so a fault is planted where every interpreter of the
# screen's process tree reads it: a sitecustomize module on PYTHONPATH.
PLANTED_FAULTS = """
import faulthandler, os, signal
if os.environ.get("SCREEN_TEST_CRASH") or os.environ.get("SCREEN_TEST_BROKEN_START"):
    from service.population import screen
    evaluate = screen.evaluate_patient

    def crashing(evaluator, patient, resources, as_of):
        if patient == os.environ.get("SCREEN_TEST_CRASH"):  # as a fault in the engine's native code would
            faulthandler.disable()
            os.kill(os.getpid(), signal.SIGSEGV)
        return evaluate(evaluator, patient, resources, as_of)

    def broken(settings):
        raise RuntimeError("no evaluator")

    screen.evaluate_patient = crashing
    if os.environ.get("SCREEN_TEST_BROKEN_START"):
        screen.Evaluator = broken
"""


def run_with_fault(export: Path, out: Path, tmp_path: Path, **fault: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(PLANTED_FAULTS)
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "service.cli", "screen", str(export), "--out", str(out)]
    command += ["--as-of", AS_OF, "--no-progress", "--workers", "2"]
    environment = {**os.environ, "PYTHONPATH": path, **fault}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)


def test_a_patient_whose_evaluation_kills_its_worker_gets_an_error_and_the_rest_go_on(
    fixtures_only, tmp_path
):
    population = copies(fixtures_only, 3)
    export = write_export(tmp_path / "export", population)
    screen.screen(export, tmp_path / "whole", parse_time(AS_OF), workers=2, progress=False)
    expected = results(tmp_path / "whole" / screen.RESULTS)
    victim = sorted(population)[50]
    done = run_with_fault(export, tmp_path / "out", tmp_path, SCREEN_TEST_CRASH=victim)
    assert done.returncode == 0, done.stderr[-3000:]
    written = results(tmp_path / "out" / screen.RESULTS)
    crashed = written.pop(victim)
    assert crashed["status"] == 500 and crashed["error"]["resourceType"] == "OperationOutcome"
    del expected[victim]
    assert written == expected
    summary = json.loads((tmp_path / "out" / screen.SUMMARY).read_text())
    assert summary["patientsWithErrors"] == 1 and summary["patients"] == len(population)


def test_workers_that_cannot_start_stop_the_screen_with_no_patient_written(fixtures_only, tmp_path):
    export = write_export(tmp_path / "export", fixtures_only)
    done = run_with_fault(export, tmp_path / "out", tmp_path, SCREEN_TEST_BROKEN_START="1")
    assert done.returncode == 2 and "cannot start" in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "out" / screen.RESULTS).read_bytes() == b""


def run_cli(export: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "screen",
        str(export),
        "--out",
        str(out),
        "--as-of",
        AS_OF,
    ]
    return subprocess.Popen(
        [*command, "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so one kill stops it and its workers
    )


def test_an_interrupted_screen_resumes_without_redoing_or_losing_a_patient(fixtures_only, tmp_path):
    # Killed once its first results are written, with one worker, the first run still has thousands of
    # patients (seconds of work) left, so it cannot finish first.
    population = copies(fixtures_only, 80)
    export = write_export(tmp_path / "export", population)
    out = tmp_path / "out"
    first = run_cli(export, out, "--workers", "1")
    written = out / screen.RESULTS
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if written.exists() and b"\n" in written.read_bytes():
            break
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    _, stderr = first.communicate()
    assert first.returncode == -signal.SIGKILL, stderr.decode()
    partial = written.read_bytes()
    assert 0 < partial.count(b"\n") < len(population), "the first run should stop part-way"
    with written.open("ab") as handle:
        handle.write(b'{"patient": "cut-sh')  # a line cut short by the kill
    second = run_cli(export, out, "--workers", "2")
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr.decode()
    resumed = results(written)
    assert set(resumed) == set(population)
    done_before = partial.count(b"\n")
    assert f"this run: {len(population) - done_before} patients".encode() in stderr
    # Every answer equals the answer of an uninterrupted screen.
    whole = tmp_path / "whole"
    screen.screen(export, whole, parse_time(AS_OF), workers=2, progress=False)
    assert resumed == results(whole / screen.RESULTS)
    assert b"imnm-suspected" in stdout


def test_a_changed_input_or_evaluation_time_refuses_to_resume(fixtures_only, tmp_path):
    export = write_export(tmp_path / "export", dict(list(fixtures_only.items())[:3]))
    out = tmp_path / "out"
    screen.screen(export, out, parse_time(AS_OF), workers=1, progress=False)
    with pytest.raises(screen.ScreenError, match="started as of"):
        screen.screen(
            export, out, datetime.fromisoformat("2025-01-01T00:00:00+00:00"), workers=1, progress=False
        )
    (export / "Patient.ndjson").write_text((export / "Patient.ndjson").read_text() + "\n")  # a new size
    with pytest.raises(screen.ScreenError, match="input files changed"):
        screen.screen(export, out, None, workers=1, progress=False)


def test_an_empty_folder_is_refused(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "service.cli", "screen", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2 and "no *.ndjson files" in completed.stderr


def test_dask_in_local_mode_gives_the_same_results(fixtures_only, tmp_path):
    export = write_export(tmp_path / "export", fixtures_only)
    local = screen.screen(export, tmp_path / "local", parse_time(AS_OF), workers=1, progress=False)
    on_dask = screen_on_dask(export, tmp_path / "dask", parse_time(AS_OF), scheduler=None, workers=2)
    parts = sorted((tmp_path / "dask").glob("results-*.ndjson"))
    assert len(parts) > 1
    merged = {}
    for part in parts:
        merged |= results(part)
    assert merged == results(tmp_path / "local" / screen.RESULTS)
    assert on_dask.cards == local.cards and on_dask.patients == local.patients
    written = json.loads((tmp_path / "dask" / screen.SUMMARY).read_text())
    assert (
        written["patientsByCard"]
        == json.loads((tmp_path / "local" / screen.SUMMARY).read_text())["patientsByCard"]
    )
