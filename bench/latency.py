"""In-process latency of a patient-view request, stage by stage, at 10 to 5,000 resources; and its floors.

Usage: .venv/bin/python bench/latency.py [--sizes 10,100,1000,5000] [--quick]

Every request is a different generated patient (bench/workload.py). For each size it reports p50, p95
and p99 in milliseconds of: parse (JSON and the nesting check), gather (the hook request checked, the
prefetch unpacked), validate (what can matter picked out and validated as FHIR R4), facts, rules,
cards, serialise, their total, and the same request through the whole Flask app (WSGI). Floors for the
same payloads: a bare JSON parse and serialise, and a parse with every resource validated by
fhir.resources. And what metrics (in shared files, as under gunicorn) and the access line add to a call.
Then one caller posts the same requests over HTTP (loopback, keep-alive on) to `imnm-cds serve` in its
default layout, and the floor ratio is printed: that call's p50 over the p50 of stdlib
json.dumps(json.loads(body)) of the same requests. Results go to bench/results/latency-<date>.json as well
as the screen.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from flask import Response
from throughput import DEFAULT_LAYOUT, serving

import workload
from common import environment, percentiles, save, table
from service import hooks, metrics
from service.cli import frozen
from service.fhir import Resource, validate
from service.web import app as app_module
from service.web.app import create_app

RUNS = {10: 400, 100: 400, 1000: 100, 5000: 30}


def measure(size: int, runs: int, app) -> dict:
    """Time each stage of `runs` distinct requests of this size, after a warm-up."""
    evaluator = app.extensions["imnm_cds"]
    client = app.test_client()
    stages: dict[str, list[float]] = {}
    for seed in range(-20, runs):  # negative seeds warm up and are not counted
        raw = json.dumps(workload.request(size, seed)).encode()
        started = time.perf_counter()
        with app.test_request_context(data=raw, content_type="application/json"):
            body = app_module._body(evaluator.settings)
        parse = (time.perf_counter() - started) * 1000
        evaluation = evaluator.hook(hooks.PATIENT_VIEW, body, datetime.now(UTC))
        assert evaluation.ran_out is None and evaluation.cards, "every generated patient gets cards"
        started = time.perf_counter()
        json.dumps(evaluation.response(), ensure_ascii=False)
        serialise = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        response = client.post(
            f"/cds-services/{hooks.PATIENT_VIEW.id}", data=raw, content_type="application/json"
        )
        wsgi = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, response.get_json()
        if seed < 0:
            continue
        timings = {"parse": parse, **evaluation.timings, "serialise": serialise}
        timings["total"] = sum(timings.values())
        timings["wsgi"] = wsgi
        for stage, ms in timings.items():
            stages.setdefault(stage, []).append(ms)
    return {stage: percentiles(values) for stage, values in stages.items()}


def instrumentation(app, runs: int) -> dict:
    """Time what one call's metrics and access line add, done as a served worker does them (shared files)."""
    evaluation = app.extensions["imnm_cds"].hook(
        hooks.PATIENT_VIEW, workload.request(10, 0), datetime.now(UTC)
    )
    root = logging.getLogger()
    level, handler = root.level, root.handlers[0]
    added = []
    with open(os.devnull, "w") as nowhere, app.test_request_context(f"/cds-services/{hooks.PATIENT_VIEW.id}"):
        stream = handler.setStream(nowhere)
        root.setLevel("INFO")  # as served: the access line is written
        for _ in range(runs):
            started = time.perf_counter()
            app_module._start()
            metrics.engine_sessions.inc()
            metrics.engine_sessions.dec()
            app_module._count(evaluation)
            app_module._account(Response())
            added.append((time.perf_counter() - started) * 1000)
        root.setLevel(level)
        handler.setStream(stream)
    return {"metrics+access line": percentiles(added)}


def floors(size: int, runs: int) -> dict:
    """Time the least any service must spend on the same payloads: parse, serialise, validate all."""
    bare, validated = [], []
    for seed in range(runs):
        request = workload.request(size, seed)
        raw = json.dumps(request).encode()
        started = time.perf_counter()
        json.dumps(json.loads(raw))
        bare.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        body = json.loads(raw)
        for value in body["prefetch"].values():
            for entry in (
                value.get("entry", []) if value["resourceType"] == "Bundle" else [{"resource": value}]
            ):
                validate(Resource(entry["resource"]))
        validated.append((time.perf_counter() - started) * 1000)
    return {"parse+serialise": percentiles(bare), "parse+validate every resource": percentiles(validated)}


def over_http(url: str, size: int, runs: int) -> dict:
    """Time one caller posting distinct requests of this size over one kept-alive connection."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    path = f"/cds-services/{hooks.PATIENT_VIEW.id}"
    times = []
    for seed in range(-5, runs):
        raw = json.dumps(workload.request(size, seed)).encode()
        started = time.perf_counter()
        connection.request("POST", path, raw, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status == 200 and response.getheader("Connection") != "close", response.status
        if seed >= 0:
            times.append(elapsed)
    connection.close()
    return percentiles(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,5000")
    parser.add_argument("--quick", action="store_true", help="a tenth of the runs, to try the script")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        os.environ[metrics.MULTIPROCESS] = (
            directory  # metrics in shared files, as `imnm-cds serve` keeps them
        )
        # A deadline long enough that every stage of even the largest request is measured, not cut off.
        settings = {"log_level": "WARNING", "database_url": f"sqlite:///{directory}/feedback.sqlite"}
        app = frozen(create_app(settings | {"deadline_ms": 60_000}))  # as a served worker runs it
        results = run(app, args)
        with serving(*DEFAULT_LAYOUT, Path(directory)) as (url, _):
            for size, stages in results["sizes"].items():
                http = over_http(url, int(size), stages["runs"])
                stages["ms"]["http, one caller"] = http
                ratio = http["p50"] / stages["ms"]["parse+serialise"]["p50"]
                stages["floorRatio"] = ratio
                print(f"{size} resources over HTTP, one caller (ms): {table({'http': http})}")
                print(f"floor ratio at {size} resources: {ratio:.2f} (HTTP p50 / json.dumps(json.loads) p50)")
    print(f"\nsaved {save('latency', results)}")


def run(app, args) -> dict:
    """Measure every size asked for and print each as it finishes."""
    results = {"environment": environment(), "sizes": {}}
    for size in map(int, args.sizes.split(",")):
        runs = max(10, RUNS.get(size, 100) // (10 if args.quick else 1))
        stages = measure(size, runs, app)
        stages |= floors(size, min(runs, 50)) | instrumentation(app, runs)
        results["sizes"][str(size)] = {"runs": runs, "ms": stages}
        print(f"\n{size} resources, {runs} distinct requests (ms)")
        print(table(stages))
        per_resource = stages["total"]["p50"] / size
        print(f"p50 per resource: {per_resource * 1000:.1f} µs")
    return results


if __name__ == "__main__":
    main()
