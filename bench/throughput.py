"""Throughput and latency over HTTP under gunicorn on loopback, and a worker's memory over many requests.

Usage: .venv/bin/python bench/throughput.py [--seconds 20] [--memory-requests 100000] [--quick]
       [--sizes 100,1000] [--layouts 2x1,2x4,2x8,4x2]
Needs wrk (Debian: apt-get install wrk).

For 100 and 1,000 resources, and several worker × thread layouts, it starts `imnm-cds serve`, waits
until it is ready, warms it up, and lets wrk post one generated patient-view request over concurrent
connections: requests per second, latency percentiles, non-2xx answers and socket errors, how many
answers closed their connection (none when connections are kept alive) and each worker's CPU seconds.
Then, with
the default layout, it sends --memory-requests requests and samples every worker's resident memory
each second. Results go to bench/results/throughput-<date>.json as well as the screen. It fails (exit
1, after saving) on any non-2xx answer, socket error or worker restart, or a worker whose memory grew
by more than 5 MiB over the second half of the memory run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import workload
from common import (
    ROOT,
    cpu_seconds,
    environment,
    free_port,
    rss_mib,
    save,
    second_half_growth,
    worker_pids,
)

DEFAULT_LAYOUT = (2, 4)  # what `imnm-cds serve` uses unless told otherwise
CONNECTIONS = {100: 16, 1000: 8}
RSS_GROWTH_MIB = 5.0  # most a worker may grow over the second half of the memory run
# Each wrk thread has its own Lua state: count there the answers that close their connection (wrk then
# opens a new one), and add the threads' counts up when done.
REPORT = """
threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) closed = 0 end
response = function(status, headers, body)
  if headers["Connection"] == "close" or headers["connection"] == "close" then closed = closed + 1 end
end
done = function(summary, latency, requests)
  local errors = summary.errors
  local closed = 0
  for _, thread in ipairs(threads) do closed = closed + thread:get("closed") end
  io.write(string.format(
    '{"requests": %d, "seconds": %f, "non2xx": %d, "socketErrors": %d, "closedConnections": %d, ' ..
    '"p50": %f, "p90": %f, "p99": %f, "max": %f}\\n',
    summary.requests, summary.duration / 1e6, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout, closed,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3))
end
"""


@contextmanager
def serving(workers: int, threads: int, directory: Path):
    """Run `imnm-cds serve` with this layout; yield its URL and master pid once it is ready."""
    port = free_port()
    environ = {
        "MALLOC_ARENA_MAX": "2",  # as the Docker image runs it (README, Speed)
        **os.environ,
        "IMNM_CDS_DATABASE_URL": f"sqlite:///{directory}/feedback.sqlite",
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    command += ["--workers", str(workers), "--threads", str(threads)]
    with (directory / "server.log").open("a") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, server, directory / "server.log")
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(30)


def wait_until_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll /health/ready until it answers 200; stop if the server exits or a minute passes."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    # One worker answered; the others began loading the app with it: give them a moment.
                    time.sleep(1.0)
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server never became ready:\n{log.read_text()[-2000:]}")


def wrk(url: str, body: Path, connections: int, seconds: float, directory: Path) -> dict:
    """Post the body for this long over this many connections; return wrk's summary."""
    script = directory / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.body = io.open("{body}"):read("*a")\n{REPORT}'
    )
    command = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{round(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    output = subprocess.run(
        [*command, f"{url}/cds-services/imnm-patient-view"], capture_output=True, text=True, check=True
    )
    summary = json.loads(output.stdout.strip().splitlines()[-1])
    summary["perSecond"] = round(summary["requests"] / summary["seconds"], 1)
    return summary


def cut_short(log: Path) -> int:
    """Count the calls that reached the deadline (answered with fewer cards than they would have had)."""
    if not log.exists():
        return 0
    return sum('"ranOut"' in line for line in log.read_text().splitlines())


def throughput(
    sizes: list[int],
    layouts: list[tuple[int, int]],
    seconds: float,
    directory: Path,
    connections: list[int] | None = None,
) -> list[dict]:
    """Measure every size under every layout, at each number of connections (default: by size)."""
    rows = []
    for size in sizes:
        body = directory / f"request-{size}.json"
        body.write_text(json.dumps(workload.request(size, 1)))
        for (workers, threads), clients in (
            (layout, clients) for layout in layouts for clients in connections or [CONNECTIONS[size]]
        ):
            with serving(workers, threads, directory) as (url, master):
                wrk(url, body, clients, 3, directory)  # warm-up
                pids = worker_pids(master)
                before = cut_short(directory / "server.log")
                cpu = {pid: cpu_seconds(pid) for pid in pids}
                result = wrk(url, body, clients, seconds, directory)
                cpu = {pid: cpu_seconds(pid) - used for pid, used in cpu.items()}
                result["cutShortByDeadline"] = cut_short(directory / "server.log") - before
                result["workersRestarted"] = worker_pids(master) != pids
                result["workerCpuSeconds"] = [round(used, 2) for used in sorted(cpu.values(), reverse=True)]
                # On a shared machine the CPU the server gets varies from run to run; this does not.
                result["perWorkerCpuSecond"] = round(result["requests"] / max(sum(cpu.values()), 0.01), 1)
            row = {
                "resources": size,
                "workers": workers,
                "threads": threads,
                "connections": clients,
            }
            rows.append(row | result)
            print(
                f"{size:>5} resources  {workers} workers × {threads} threads  {clients} connections  "
                f"{result['perSecond']:>7.1f} req/s  "
                f"p50 {result['p50']:.1f} ms  p90 {result['p90']:.1f} ms  p99 {result['p99']:.1f} ms  "
                f"non-2xx {result['non2xx']}  socket errors {result['socketErrors']}  "
                f"past the deadline {result['cutShortByDeadline']}  "
                f"answers closing the connection {result['closedConnections']}  "
                f"worker CPU s {result['workerCpuSeconds']}  "
                f"requests per worker CPU second {result['perWorkerCpuSecond']}  "
                f"workers restarted: {result['workersRestarted']}",
                flush=True,
            )
    return rows


def memory(requests: int, directory: Path) -> dict:
    """Send this many requests to the default layout, sampling each worker's RSS every second."""
    body = directory / "request-100.json"
    body.write_text(json.dumps(workload.request(100, 1)))
    with serving(*DEFAULT_LAYOUT, directory) as (url, master):
        wrk(url, body, CONNECTIONS[100], 3, directory)
        pids = worker_pids(master)
        samples: list[dict] = []
        stop = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not stop.is_set():
                samples.append(
                    {"second": round(time.monotonic() - started), **{str(p): rss_mib(p) for p in pids}}
                )
                stop.wait(1.0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        rate = wrk(url, body, CONNECTIONS[100], 5, directory)["perSecond"]
        result = wrk(url, body, CONNECTIONS[100], max(5.0, (requests - 5 * rate) / rate), directory)
        stop.set()
        sampler.join()
        survivors = worker_pids(master)
    per_worker = {
        pid: {
            "startMiB": round(samples[0][str(pid)], 1),
            "maxMiB": round(max(s[str(pid)] for s in samples), 1),
            "endMiB": round(samples[-1][str(pid)], 1),
            "secondHalfGrowthMiB": second_half_growth([s[str(pid)] for s in samples]),
        }
        for pid in pids
    }
    report = {
        "requests": result["requests"] + round(5 * rate),
        "perSecond": result["perSecond"],
        "non2xx": result["non2xx"],
        "socketErrors": result["socketErrors"],
        "workersRestarted": survivors != pids,
        "rss": per_worker,
        "samples": samples,
    }
    for pid, rss in per_worker.items():
        print(
            f"worker {pid}: RSS {rss['startMiB']} MiB at start, {rss['maxMiB']} max, "
            f"{rss['endMiB']} at the end, {rss['secondHalfGrowthMiB']:+} over the second half"
        )
    print(
        f"{report['requests']} requests, non-2xx {report['non2xx']}, "
        f"socket errors {report['socketErrors']}, workers restarted: {report['workersRestarted']}"
    )
    return report


def failures(results: dict) -> list[str]:
    """Name every run that had a non-2xx answer, a socket error or a restart, and every worker that grew."""
    runs = {
        f"{r['resources']} resources, {r['workers']} × {r['threads']}, {r['connections']} connections": r
        for r in results["throughput"]
    }
    if "memory" in results:
        runs["memory run"] = results["memory"]
    found = [
        f"{name}: {r['non2xx']} non-2xx, {r['socketErrors']} socket errors"
        + (", a worker restarted" if r["workersRestarted"] else "")
        for name, r in runs.items()
        if r["non2xx"] or r["socketErrors"] or r["workersRestarted"]
    ]
    found += [
        f"worker {pid} grew {rss['secondHalfGrowthMiB']} MiB over the second half of the memory run"
        for pid, rss in results.get("memory", {"rss": {}})["rss"].items()
        if rss["secondHalfGrowthMiB"] > RSS_GROWTH_MIB
    ]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per layout")
    parser.add_argument("--memory-requests", type=int, default=100_000, help="0: no memory run")
    parser.add_argument("--sizes", default="100,1000", help="resources per request, comma-separated")
    parser.add_argument("--layouts", default="2x1,2x4,2x8,4x2", help="workers x threads, comma-separated")
    parser.add_argument(
        "--connections", help="wrk connections, comma-separated (default: 16 at 100 resources, 8 at 1,000)"
    )
    parser.add_argument("--quick", action="store_true", help="short runs, to try the script")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    seconds = 3.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        results = {"environment": environment()}
        sizes = [int(size) for size in args.sizes.split(",")]
        layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
        connections = [int(n) for n in args.connections.split(",")] if args.connections else None
        results["throughput"] = throughput(sizes, layouts, seconds, directory, connections)
        if args.memory_requests:
            results["memory"] = memory(5_000 if args.quick else args.memory_requests, directory)
    results["failures"] = failures(results)
    print(f"saved {save('throughput', results)}")
    for failure in results["failures"]:
        print(f"FAILED: {failure}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
