"""Time patient-view calls that fetch every key from a FHIR server, one key at a time or several at once.

A real FHIR server (sekmet) runs on loopback with one fixture patient; a proxy in front of it holds each
answer for a while, as a FHIR server across a network would. Calls go in process (Flask test client),
so the figures are the service's own time. Run from the repository root:

    .venv/bin/python bench/fetch.py [--runs 100] [--delays 25,50] [--threads 1,4,9]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from common import ROOT, environment, percentiles, save, table

sys.path.insert(0, str(ROOT / "tests"))
from conftest import FIXTURES, authorised, load, resources_of, sekmet, store
from service.hooks import PATIENT_VIEW
from service.web.app import create_app

SCENARIO = FIXTURES / "seropositive-hmgcr"


def delaying_proxy(target: str, delay: float) -> ThreadingHTTPServer:
    """Serve target's answers, each after `delay` seconds, with target's links pointing back here."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else headers and body wait on each other's ACK (40 ms a call)

        def do_GET(self):
            time.sleep(delay)
            headers = {"Authorization": self.headers.get("Authorization", "")}
            answer = upstream.get(target + self.path.removeprefix("/fhir"), headers=headers, timeout=10)
            body = answer.content.replace(target.encode(), base.encode())
            self.send_response(answer.status_code)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    upstream = requests.Session()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.daemon_threads = True
    base = f"http://127.0.0.1:{proxy.server_port}/fhir"
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


def measure(base: str, threads: int, runs: int) -> list[float]:
    """Time each call with no prefetch, every key fetched from base; return the milliseconds."""
    settings = {"fhir_servers": base, "fhir_allow_http": True, "fetch_threads": threads, "log_level": "ERROR"}
    limits = {"deadline_ms": 30_000, "fetch_budget_ms": 20_000, "fetch_read_timeout_ms": 10_000}
    client = create_app({**settings, **limits}).test_client()
    request = authorised({**load(SCENARIO / "request.json"), "prefetch": {}}, base)
    times = []
    for _ in range(runs + 5):
        started = time.perf_counter()
        response = client.post("/cds-services/imnm-patient-view", json=request)
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200 or not response.get_json()["cards"]:
            raise SystemExit(
                f"unexpected answer: {response.status_code} {response.get_data(as_text=True)[:500]}"
            )
    return times[5:]  # the first calls open connections


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--delays", default="25,50", help="milliseconds a proxy holds each answer")
    parser.add_argument("--threads", default="1,4,9", help="values of IMNM_CDS_FETCH_THREADS to compare")
    args = parser.parse_args()
    results = {"environment": environment(), "runs": args.runs, "keys": len(PATIENT_VIEW.prefetch)}
    with tempfile.TemporaryDirectory() as directory, sekmet(Path(directory)) as server:
        request = load(SCENARIO / "request.json")
        store(server, [r for value in request["prefetch"].values() for r in resources_of(value)])
        servers = {"sekmet": server}
        proxies = [delaying_proxy(server, int(delay) / 1000) for delay in args.delays.split(",")]
        for delay, proxy in zip(args.delays.split(","), proxies, strict=True):
            servers[f"+{delay} ms a call"] = f"http://127.0.0.1:{proxy.server_port}/fhir"
        for name, base in servers.items():
            for threads in args.threads.split(","):
                results[f"{name}, {threads} threads"] = percentiles(measure(base, int(threads), args.runs))
        for proxy in proxies:
            proxy.shutdown()
    print(f"{SCENARIO.name}, no prefetch: {results['keys']} keys fetched; {args.runs} calls each, in process")
    print(table({name: r for name, r in results.items() if "threads" in name}))
    print(f"saved to {save('fetch', results)}")


if __name__ == "__main__":
    main()
