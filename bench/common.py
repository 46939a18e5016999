"""What every benchmark shares: percentiles, memory growth, a table, the machine, saved results, processes."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def percentiles(values: list[float]) -> dict:
    """Summarise timings in milliseconds: p50, p95, p99, mean and how many."""
    ordered = sorted(values)

    def at(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))], 3)

    return {
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "mean": round(statistics.fmean(ordered), 3),
        "n": len(ordered),
    }


def second_half_growth(series: list[float]) -> float:
    """Return how far a series rose in its second half: last tenth's mean less the tenth's up to half-way."""
    # Caches, the engine's session memory (kept for reuse at its high-water mark) and SQLite's page
    # cache fill up first; a leak grows with requests. So the growth that counts is over the second half.
    tenth = max(1, len(series) // 10)
    middle = max(tenth, len(series) // 2)
    return round(statistics.fmean(series[-tenth:]) - statistics.fmean(series[middle - tenth : middle]), 1)


def table(rows: dict[str, dict]) -> str:
    """Render {name: percentiles} as aligned text."""
    width = max(map(len, rows))
    lines = [f"{'':<{width}}  {'p50':>9} {'p95':>9} {'p99':>9}"]
    lines += [
        f"{name:<{width}}  {r['p50']:>9.2f} {r['p95']:>9.2f} {r['p99']:>9.2f}" for name, r in rows.items()
    ]
    return "\n".join(lines)


def environment() -> dict:
    """Describe the run: when, which commit, which machine, how busy it was."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadAverageBefore": os.getloadavg()[0],
    }


def save(name: str, results: dict) -> Path:
    """Write results to bench/results/<name>-<date>.json for the next run to compare with."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{datetime.now(UTC):%Y%m%d-%H%M}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def free_port() -> int:
    """Return a loopback port free at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(master: int) -> list[int]:
    """List the pids of a gunicorn master's workers (its child processes)."""
    return sorted(int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split())


def rss_mib(pid: int) -> float:
    """Return a process's resident memory in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user and system) a process has used so far, in seconds."""
    # /proc/<pid>/stat: fields 14 and 15 (utime, stime) in clock ticks, counted after the ")" of the name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
