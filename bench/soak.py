"""Soak the service under gunicorn: concurrent clients on loopback, mixed requests, every answer checked.

Usage: .venv/bin/python bench/soak.py [--requests 100000] [--clients 16] [--workers 2] [--threads 8]
                                      [--seed 1] [--json]

Starts `imnm-cds serve` on a free loopback port with a throwaway database (and MALLOC_ARENA_MAX=2, as
the Docker image has it, unless MALLOC_ARENA_MAX is set), and builds a mix of requests: every fixture
(each hook, and Bundles to /evaluate, as cards and as FHIR), discovery, health, the OpenAPI document,
feedback (new items and a resent one) and bad requests (truncated JSON, NaN, wrong content type,
unknown service, wrong method, invalid FHIR, another patient's data, an unacceptable Accept). It sends
each input twice, one at a time, and keeps the second answer (a resent item is new only once); then
client processes send the requests in a seeded random order and compare every answer with it
(status, media type and body, byte for byte; new feedback items with the receipt of a new item).
Meanwhile it samples the resident memory of each gunicorn worker every second.

It fails (exit 1) on any 5xx, any answer that differs, any failed connection, a worker that is not
the one it started with or a restart in the server's log, feedback acknowledged but not in the
database, issued cards not recorded without a log line saying so, or a worker whose memory grew by
more than --rss-growth-mib over the second half of the run (the first half fills caches and the
engine's reusable session memory). `GET /feedback/summary` changes as feedback arrives: only its
status is checked. The figures go to bench/results/soak-<date>.json as well as the screen; on a
failure the server's log is kept and its path printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, environment, free_port, rss_mib, save, second_half_growth, worker_pids
from service.cli import scenario_target
from service.config import Settings

FIXTURES = ROOT / "fhir_fixtures"
JSON, FHIR_JSON = "application/json", "application/fhir+json"
NEW_FEEDBACK = b'{"received": 1, "stored": 1, "duplicates": 0}'
DEADLINE_MS = Settings().deadline_ms  # the server runs with a longer one, to check every answer in full


@dataclass(frozen=True)
class Kind:
    """One input of the mix: a request, how often it is sent, and how its answer is checked."""

    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    weight: int = 1
    # same: as the single-threaded answer; status: only the status; new-feedback: a new item's receipt
    check: str = "same"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def as_bundle(request: dict) -> dict:
    """Put a hook request's prefetched resources into one collection Bundle."""
    entries = []
    for value in request["prefetch"].values():
        if value is not None:
            inner = value.get("entry", []) if value["resourceType"] == "Bundle" else [{"resource": value}]
            entries += [{"resource": e["resource"]} for e in inner if e.get("resource")]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": "2024-06-01T12:00:00Z",
        "entry": entries,
    }


def mix() -> list[Kind]:
    """List every input of the soak, with its weight."""
    kinds = []
    posted = {"Content-Type": JSON}
    worked = load(FIXTURES / "worked-example-hmgcr-positive" / "request.json")
    for scenario in sorted(p.parent for p in FIXTURES.glob("*/request.json")):
        request = load(scenario / "request.json")
        body = json.dumps(request).encode()
        kinds.append(Kind(scenario.name, "POST", scenario_target(request, ""), body, posted, weight=3))
        if "prefetch" in request and request["prefetch"].get("patient"):
            bundle = json.dumps(as_bundle(request)).encode()
            kinds.append(Kind(f"{scenario.name} as Bundle", "POST", "/evaluate", bundle, posted))
            fhir = {**posted, "Accept": FHIR_JSON}
            kinds.append(Kind(f"{scenario.name} as FHIR", "POST", "/evaluate", bundle, fhir))
    kinds += [
        Kind("discovery", "GET", "/cds-services", weight=4),
        Kind("health", "GET", "/health"),
        Kind("ready", "GET", "/health/ready"),
        Kind("openapi", "GET", "/openapi.json"),
        Kind("summary", "GET", "/feedback/summary", check="status"),
        Kind(
            "new feedback",
            "POST",
            "/cds-services/imnm-patient-view/feedback",
            None,
            posted,
            10,
            "new-feedback",
        ),
        Kind("resent feedback", "POST", "/cds-services/imnm-patient-view/feedback", feedback(-2), posted, 2),
        Kind(
            "truncated JSON",
            "POST",
            "/cds-services/imnm-patient-view",
            json.dumps(worked).encode()[:700],
            posted,
        ),
        Kind(
            "NaN",
            "POST",
            "/evaluate",
            b'{"resourceType": "Bundle", "type": "collection", "total": NaN}',
            posted,
        ),
        Kind("text/plain", "POST", "/cds-services/imnm-patient-view", b"{}", {"Content-Type": "text/plain"}),
        Kind("unknown service", "POST", "/cds-services/nothing-here", b"{}", posted),
        Kind("wrong method", "GET", "/cds-services/imnm-patient-view"),
        Kind("not acceptable", "POST", "/evaluate", b"{}", {**posted, "Accept": "image/png"}),
        Kind("invalid FHIR", "POST", "/cds-services/imnm-patient-view", invalid_ck(worked), posted),
        Kind("another patient", "POST", "/cds-services/imnm-patient-view", another_patient(worked), posted),
    ]
    return kinds


def feedback(second: int) -> bytes:
    """Return feedback overriding the worked example's IMNM card at this second: new for each second."""
    moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_700_000_000 + second))
    item = {
        "card": "5a922250-289d-5cfd-ba14-6e988844f855",
        "outcome": "overridden",
        "outcomeTimestamp": moment,
        "overrideReason": {"userComment": "seen by neurology already"},
    }
    return json.dumps({"feedback": [item]}).encode()


def invalid_ck(request: dict) -> bytes:
    broken = json.loads(json.dumps(request))
    for entry in broken["prefetch"]["labs"]["entry"]:
        if "valueQuantity" in entry["resource"]:
            entry["resource"]["valueQuantity"]["value"] = "high"
    return json.dumps(broken).encode()


def another_patient(request: dict) -> bytes:
    other = json.loads(json.dumps(request))
    other["prefetch"]["labs"]["entry"][0]["resource"]["subject"] = {"reference": "Patient/someone-else"}
    return json.dumps(other).encode()


def body_of(kind: Kind, second: int) -> bytes | None:
    """Return what to send for an input: its body, or for new feedback, feedback of this second."""
    return feedback(second) if kind.check == "new-feedback" else kind.body


def send(connection: http.client.HTTPConnection, kind: Kind, body: bytes | None) -> tuple[int, str, bytes]:
    connection.request(kind.method, kind.path, body=body, headers=kind.headers)
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type", ""), response.read()


def client(port: int, kinds: list[Kind], expected: dict, *, count: int, seed: int, first_second: int) -> dict:
    """Send count requests drawn from the mix; return what came back, checked."""
    rng = random.Random(seed)
    weights = [k.weight for k in kinds]
    statuses: Counter = Counter()
    wrong: list[str] = []
    latencies, errors, issued, stored = [], 0, 0, 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for n in range(count):
        kind = rng.choices(kinds, weights)[0]
        body = body_of(kind, first_second + n)
        started = time.perf_counter()
        try:
            status, media, answer = send(connection, kind, body)
        except (OSError, http.client.HTTPException) as exc:
            errors += 1
            wrong.append(f"{kind.name}: {type(exc).__name__}")
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        latencies.append(time.perf_counter() - started)
        statuses[status] += 1
        if kind.check == "new-feedback":
            same = (status, answer) == (200, NEW_FEEDBACK)
            stored += same
        elif kind.check == "status":
            same = status == expected[kind.name][0]
        else:
            same = (status, media, answer) == expected[kind.name]
        if not same:
            statuses["wrong"] += 1
            if len(wrong) < 20:
                wrong.append(f"{kind.name}: {status} {answer[:200]!r}")
        issued += cards_in(kind, status, media, answer)
    connection.close()
    return {
        "statuses": dict(statuses),
        "wrong": wrong,
        "errors": errors,
        "latencies": latencies,
        "cards": issued,
        "feedbackStored": stored,
    }


def cards_in(kind: Kind, status: int, media: str, answer: bytes) -> int:
    """Count the cards an answer issued (each is recorded as issued), as cards or as GuidanceResponses."""
    if status != 200 or not kind.path.startswith(("/cds-services/imnm", "/evaluate")):
        return 0
    document = json.loads(answer)
    if media == FHIR_JSON:
        return sum(e["resource"]["resourceType"] == "GuidanceResponse" for e in document["entry"])
    return len(document.get("cards", []))  # feedback answers have none


def start(args, workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environ = {
        **os.environ,
        "IMNM_CDS_DATABASE_URL": f"sqlite:///{workdir / 'soak.sqlite'}",
        "IMNM_CDS_LOG_LEVEL": "WARNING",
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),  # as the Docker image runs it
        # Past the hook deadline an answer has no cards: answers are checked here, so it is put out of
        # reach, and the answers that would have been late by the default one are counted.
        "IMNM_CDS_DEADLINE_MS": "60000",
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    command += ["--workers", str(args.workers), "--threads", str(args.threads)]
    with (workdir / "server.log").open("w") as log:
        server = subprocess.Popen(
            command, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health/ready")
            if connection.getresponse().status == 200:
                connection.close()
                return server, port
        except OSError:
            time.sleep(0.2)
    os.killpg(server.pid, signal.SIGKILL)
    raise SystemExit(f"the server did not become ready:\n{(workdir / 'server.log').read_text()[-2000:]}")


def sample_memory(master: int, samples: dict[int, list[float]], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for pid in worker_pids(master):
            samples.setdefault(pid, []).append(rss_mib(pid))


def soak(args) -> dict:
    """Run the soak in a throwaway directory; keep the server's log if anything failed."""
    with tempfile.TemporaryDirectory(prefix="imnm-cds-soak-") as directory:
        workdir = Path(directory)
        try:
            figures = exercise(args, workdir)
        except BaseException:
            keep_log(workdir)
            raise
        if figures["failures"]:
            figures["serverLog"] = keep_log(workdir)
        return figures


def keep_log(workdir: Path) -> str | None:
    """Copy the server's log out of the throwaway directory and say where it is."""
    log = workdir / "server.log"
    if not log.exists():
        return None
    handle, kept = tempfile.mkstemp(prefix="imnm-cds-soak-", suffix=".log")
    os.close(handle)
    shutil.copyfile(log, kept)
    print(f"server log kept at {kept}", file=sys.stderr)
    return kept


def exercise(args, workdir: Path) -> dict:
    """Start the server, send the mix one at a time and then concurrently, and report on both sides."""
    kinds = mix()
    server, port = start(args, workdir)
    try:
        workers = worker_pids(server.pid)
        # Each input twice, one at a time: the second answer is the one every later copy must get (a
        # resent feedback item is new only the first time).
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        first = {kind.name: send(connection, kind, body_of(kind, -1)) for kind in kinds}
        expected = {kind.name: send(connection, kind, body_of(kind, -1)) for kind in kinds}
        connection.close()
        single = sum(cards_in(kind, *answers[kind.name]) for kind in kinds for answers in (first, expected))
        samples: dict[int, list[float]] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(server.pid, samples, stop), daemon=True)
        sampler.start()
        shares = [
            args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)
        ]
        started = time.perf_counter()
        with ProcessPoolExecutor(args.clients) as pool:
            futures = [
                pool.submit(
                    client,
                    port,
                    kinds,
                    expected,
                    count=share,
                    seed=args.seed * 1000 + i,
                    first_second=sum(shares[:i]),
                )
                for i, share in enumerate(shares)
            ]
            results = [future.result() for future in futures]
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        after = worker_pids(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    log = (workdir / "server.log").read_text()
    with sqlite3.connect(workdir / "soak.sqlite") as database:
        feedback_rows = database.execute("SELECT count(*) FROM feedback").fetchone()[0]
        recorded = database.execute("SELECT coalesce(sum(times_issued), 0) FROM issued_cards").fetchone()[0]
    server = {"workers": (workers, after), "log": log, "feedback": feedback_rows, "recorded": recorded}
    return report(
        args, {"inputs": len(kinds), "single": single, "seconds": seconds}, results, samples, server
    )


def report(args, run: dict, results: list[dict], samples: dict, server: dict) -> dict:
    """Sum up the clients' results and the server's side; name every check that failed."""
    statuses: Counter = Counter()
    for result in results:
        statuses.update(result["statuses"])
    latencies = sorted(t for r in results for t in r["latencies"])
    stored = sum(r["feedbackStored"] for r in results)
    growth = {pid: second_half_growth(series) for pid, series in samples.items()}
    wrong = statuses.pop("wrong", 0)
    figures = {
        "requests": sum(statuses.values()),
        "clients": args.clients,
        "workers": args.workers,
        "threads": args.threads,
        "inputs": run["inputs"],
        "seconds": round(run["seconds"], 1),
        "perSecond": round(sum(statuses.values()) / run["seconds"]),
        "p50ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else None,
        "p99ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else None,
        f"over{DEADLINE_MS}ms": sum(t * 1000 > DEADLINE_MS for t in latencies),  # measured by the client
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "serverErrors": sum(v for k, v in statuses.items() if k >= 500),
        "wrongAnswers": wrong,
        "connectionErrors": sum(r["errors"] for r in results),
        "examples": [w for r in results for w in r["wrong"]][:10],
        "workersUnchanged": server["workers"][0] == server["workers"][1],
        "workerBoots": server["log"].count("Booting worker"),
        "workerExits": server["log"].count("Worker exited") + server["log"].count("WORKER TIMEOUT"),
        "rssMiBByTenth": {
            str(pid): [round(s[len(s) * i // 10], 1) for i in range(10)] + [round(s[-1], 1)]
            for pid, s in samples.items()
        },
        "rssSecondHalfGrowthMiB": {str(pid): g for pid, g in growth.items()},
        "feedbackAcknowledged": stored,
        # The single-threaded pass stored two items first (the first new one and the one resent later).
        "feedbackInDatabase": server["feedback"] - 2,
        "cardsAnswered": sum(r["cards"] for r in results) + run["single"],
        "cardsRecorded": server["recorded"],
        "cardRecordsDroppedLogged": "card records" in server["log"],
    }
    failures = []
    if figures["serverErrors"]:
        failures.append("5xx answers")
    if wrong or figures["connectionErrors"]:
        failures.append("wrong answers or failed connections")
    if not figures["workersUnchanged"] or figures["workerBoots"] != args.workers or figures["workerExits"]:
        failures.append("a worker crashed or restarted")
    if figures["feedbackInDatabase"] != stored:
        failures.append("acknowledged feedback missing from the database")
    if figures["cardsRecorded"] != figures["cardsAnswered"] and not figures["cardRecordsDroppedLogged"]:
        failures.append("issued cards went unrecorded without a log line")
    if any(g > args.rss_growth_mib for g in growth.values()):
        failures.append("worker memory grew")
    figures["failures"] = failures
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=16, help="client processes, one connection each")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rss-growth-mib", type=float, default=5.0, help="most a worker may grow in the second half"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    parser.add_argument("--no-save", action="store_true", help="keep no file in bench/results (test runs)")
    args = parser.parse_args()
    machine = environment()
    figures = soak(args)
    saved = None if args.no_save else save("soak", {"environment": machine, **figures})
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:>26}: {value}")
    if saved:
        print(f"saved {saved}", file=sys.stderr if args.json else sys.stdout)
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
