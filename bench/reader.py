"""Time the report reader: compiling rules/reports.toml, then each corpus sentence (p50, p99)."""

from __future__ import annotations

import resource
import time
import tomllib
from pathlib import Path

from rules import knowledge as knowledge_module
from service.facts import context

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "reports" / "corpus.toml"


def main() -> None:
    """Print compile time, per-sentence CPU p50/p99 over the corpus (5 passes), and peak memory."""
    k = knowledge_module.load()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    context.reader(k)
    compiled = time.perf_counter() - started
    sentences = tomllib.loads(CORPUS.read_text())["sentence"]
    times = []
    for _ in range(5):
        for entry in sentences:
            # CPU time: on a shared machine, wall time mostly measures the neighbours.
            started = time.process_time()
            context.read(k, entry["kind"], entry["text"])
            times.append(time.process_time() - started)
    times.sort()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"compile {compiled * 1000:.1f} ms; peak RSS {before / 1024:.0f} -> {after / 1024:.0f} MB")
    print(
        f"per sentence p50 {times[len(times) // 2] * 1000:.3f} ms, "
        f"p99 {times[int(len(times) * 0.99)] * 1000:.3f} ms ({len(times)} reads)"
    )


if __name__ == "__main__":
    main()
