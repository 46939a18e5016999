"""Time the report reader: compiling rules/reports.toml, each corpus sentence, and each workload report.

Usage: .venv/bin/python bench/reader.py
Times are CPU time (p50, p99 in ms): on a shared machine, wall time mostly measures the neighbours.
"""

from __future__ import annotations

import resource
import time
import tomllib
from pathlib import Path

import workload
from rules import knowledge as knowledge_module
from service.facts import biopsy, context, imaging
from service.fhir import Resource, naming_once

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "reports" / "corpus.toml"


def reports(k, seeds: int = 200) -> None:
    """Print p50/p99 of telling and reading each workload report as the service does (biopsy, MRI, CT)."""
    now = workload.AS_OF
    times: dict[str, list[float]] = {}
    for seed in range(seeds):
        for entry in workload.request(100, seed)["prefetch"]["reports"]["entry"]:
            report = Resource(entry["resource"])
            started = time.process_time()
            with naming_once():
                if biopsy.relevant(k, report):
                    biopsy.biopsy_fact(k, [(report, biopsy.features(k, report.data))], now, True)
                if imaging.relevant(k, report):
                    imaging.mri_facts(k, [report], now, True)
            times.setdefault(report.data["code"]["text"], []).append(time.process_time() - started)
    for name, values in times.items():
        values.sort()
        print(
            f"{name}: p50 {values[len(values) // 2] * 1000:.2f} ms, "
            f"p99 {values[int(len(values) * 0.99)] * 1000:.2f} ms ({len(values)} reports)"
        )


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
    reports(k)


if __name__ == "__main__":
    main()
