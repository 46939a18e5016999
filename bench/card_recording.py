"""What recording issued cards adds to a patient-view request, in process, warm.

Usage: .venv/bin/python bench/card_recording.py [--runs 2000] [--database-url URL]

Posts one 100-resource patient-view request (the worked example, its labs padded with earlier CK
results) through the Flask test client, alternating blocks with card recording on and off (the
store's record_cards replaced by a no-op), and prints p50/p95/p99 of each and the difference. Also
times record_cards alone, and how long the background writer takes to drain what was queued. Results
go to bench/results/card_recording-<date>.json as well as the screen.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from datetime import UTC, datetime

from common import ROOT, environment, percentiles, save, table
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"
RESOURCES = 100


def request_with(resources: int) -> dict:
    """Return the worked example with earlier CK results added until its prefetch holds this many."""
    request = json.loads((ROOT / "fhir_fixtures/worked-example-hmgcr-positive/request.json").read_text())
    labs = request["prefetch"]["labs"]["entry"]
    template = next(e for e in labs if e["resource"]["id"] == "ck-1")
    count = sum(
        len(v.get("entry", [])) if v.get("resourceType") == "Bundle" else 1
        for v in request["prefetch"].values()
        if v
    )
    for i in range(resources - count):
        entry = copy.deepcopy(template)
        entry["resource"]["id"] = entry["fullUrl"] = f"ck-old-{i}"
        entry["resource"]["effectiveDateTime"] = f"2023-{1 + i % 12:02d}-{1 + i % 28:02d}T08:00:00Z"
        entry["resource"]["valueQuantity"]["value"] = 150 + i
        labs.append(entry)
    return request


def counted(store) -> int:
    """Count the times the worked example's card has been recorded as issued."""
    return sum(row["issued"] for row in store.summary()["rules"] if row["rule"] == "imnm.seropositive_hmgcr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="requests per mode")
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary directory")
    args = parser.parse_args()
    results = {"environment": environment(), "resources": RESOURCES, "runs": args.runs}
    with tempfile.TemporaryDirectory() as directory:
        url = args.database_url or f"sqlite:///{directory}/feedback.sqlite"
        app = create_app({"database_url": url, "log_level": "WARNING"})
        store = app.extensions["imnm_cds_feedback"]
        client = app.test_client()
        request = request_with(RESOURCES)
        cards = client.post(SERVICE, json=request).get_json()["cards"]
        assert store.flush(60)
        before = counted(store)
        recording = store.record_cards
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(100):  # warm up both paths
            client.post(SERVICE, json=request)
        block = 50
        for start in range(0, args.runs, block):
            for mode in ("on", "off"):
                store.record_cards = recording if mode == "on" else (lambda *a: None)
                for _ in range(min(block, args.runs - start)):
                    began = time.perf_counter()
                    response = client.post(SERVICE, json=request)
                    times[mode].append((time.perf_counter() - began) * 1000)
                    assert response.status_code == 200
        store.record_cards = recording
        began = time.perf_counter()
        assert store.flush(60)
        drained = (time.perf_counter() - began) * 1000
        enqueue = []
        now = datetime.now(UTC)
        for _ in range(10_000):
            began = time.perf_counter()
            store.record_cards("imnm-patient-view", cards, now)
            enqueue.append((time.perf_counter() - began) * 1e6)
        assert store.flush(60)
        issued = counted(store) - before
        store.close()
    results |= {
        "cards": len(cards),
        "database": url.split(":")[0],
        "ms": {"recording off": percentiles(times["off"]), "recording on": percentiles(times["on"])},
        "recordCardsAloneMicroseconds": percentiles(enqueue),
        "drainedMs": round(drained),
        "issuesRecorded": issued,
    }
    added = results["ms"]["recording on"]["p50"] - results["ms"]["recording off"]["p50"]
    results["addedAtP50Ms"] = round(added, 3)
    heading = f"{RESOURCES}-resource patient-view, {len(cards)} card(s), {args.runs} requests a mode"
    print(f"{heading}, {results['database']} (ms)")
    print(table(results["ms"]))
    print(f"added at p50: {added:+.3f} ms")
    alone = results["recordCardsAloneMicroseconds"]
    print(f"record_cards alone: p50 {alone['p50']:.1f} µs, p99 {alone['p99']:.1f} µs")
    print(f"writer drained the backlog {drained:.0f} ms after the last request; issues recorded: {issued}")
    print(f"saved {save('card_recording', results)}")


if __name__ == "__main__":
    main()
