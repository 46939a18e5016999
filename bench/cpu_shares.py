"""Where the CPU goes: py-spy on every served worker under wrk, each sample put in the stage it is in.

Usage: PYTHONPATH=.:bench .venv/bin/python bench/cpu_shares.py [--size 100] [--layout 2x4] [--seconds 15]

Starts `imnm-cds serve` in the layout, lets wrk post one generated request over 8 connections, records
each worker with `py-spy record --gil` (the thread holding the GIL: the CPU that counts in Python) and
prints the share of the samples per stage. Needs wrk and py-spy (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import serving, wrk

import workload
from common import save, worker_pids

CONNECTIONS = 8
SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
# The first part a sample's stack passes through names it: (function name or "", file the frame is in).
PARTS = [
    ("request body: reading it (werkzeug get_data)", [("get_data", "")]),
    ("validate: pydantic / fhir.resources", [("validate", "service/fhir.py")]),
    ("validate: relevance filters in select", [("select", "service/facts/__init__.py")]),
    ("request body: parse + nesting check", [("_body", "service/web/app.py")]),
    ("rules (durable-rules)", [("evaluate", "service/evaluate/engine.py")]),
    ("facts", [("from_selected", "service/facts/__init__.py")]),
    ("gather", [("from_prefetch", "service/gather/prefetch.py"), ("parse", "service/hooks.py")]),
    ("cards", [("build", "service/evaluate/cards.py")]),
    (
        "pool thread outside the stages",
        [("_by", "service/evaluate/pipeline.py"), ("", "concurrent/futures/thread.py")],
    ),
]
OTHER = "Flask / werkzeug / gunicorn / other"


def part_of(stack: str) -> str:
    """Name the part of the service a py-spy raw stack is in."""
    frames = [
        (name.strip(), where.rsplit(":", 1)[0])
        for name, _, where in (f.partition(" (") for f in stack.split(";"))
    ]
    for part, keys in PARTS:
        if any(
            (not function or name == function or name.endswith(f".{function}")) and where.endswith(path)
            for function, path in keys
            for name, where in frames
        ):
            return part
    return OTHER


def shares(size: int, layout: str, seconds: float, directory: Path) -> dict[str, float]:
    """Serve, load and sample; return each part's share of the samples, in per cent."""
    body = directory / "request.json"
    body.write_text(json.dumps(workload.request(size, 1)))
    workers, threads = (int(n) for n in layout.split("x"))
    with serving(workers, threads, directory) as (url, master):
        wrk(url, body, CONNECTIONS, 3, directory)  # warm-up
        spies = [
            subprocess.Popen(
                [
                    SPY,
                    "record",
                    "--gil",
                    "--format",
                    "raw",
                    "-r",
                    "200",
                    "-d",
                    str(int(seconds)),
                    "-o",
                    str(directory / f"{pid}.txt"),
                    "-p",
                    str(pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid in worker_pids(master)
        ]
        time.sleep(1)
        wrk(url, body, CONNECTIONS, seconds + 1, directory)
        for spy in spies:
            spy.wait(60)
    counted: collections.Counter = collections.Counter()
    for record in directory.glob("*.txt"):
        for line in record.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            counted[part_of(stack)] += int(count)
    total = sum(counted.values()) or 1
    return {part: round(100 * n / total, 1) for part, n in counted.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100, help="resources per request")
    parser.add_argument("--layout", default="2x4", help="workers x threads")
    parser.add_argument("--seconds", type=float, default=15.0, help="sampled seconds")
    args = parser.parse_args()
    for tool in ("wrk", SPY):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (wrk: apt-get install wrk; py-spy: pip install py-spy)")
    with tempfile.TemporaryDirectory() as temporary:
        found = shares(args.size, args.layout, args.seconds, Path(temporary))
    for part, share in found.items():
        print(f"{share:5.1f} %  {part}")
    print(
        f"saved {save(f'cpu-shares-{args.size}', {'size': args.size, 'layout': args.layout, 'share': found})}"
    )


if __name__ == "__main__":
    main()
