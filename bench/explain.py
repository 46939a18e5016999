"""Time the explanation page: evaluation, then rendering, at 100 and 1,000 resources; its size.

Usage: .venv/bin/python bench/explain.py [--sizes 100,1000] [--runs 20]

Every request is a different generated patient (bench/workload.py). Reports p50 and p95 in
milliseconds of the evaluation (cards) and of rendering the page from it (charts drawn as SVG by
matplotlib, the Jinja2 template), and the page's size in kilobytes. Results go to
bench/results/explain-<date>.json as well as the screen.
"""

from __future__ import annotations

import argparse
import time

import workload
from common import environment, percentiles, save, table
from service import hooks
from service.config import Settings
from service.evaluate import explain
from service.evaluate.pipeline import Evaluator


def measure(evaluator: Evaluator, size: int, runs: int) -> dict:
    """Evaluate and render `runs` distinct requests of this size, after a warm-up."""
    service = hooks.service_for("patient-view")
    evaluate, render, kilobytes = [], [], []
    for seed in range(-3, runs):  # negative seeds warm up and are not counted
        request = workload.request(size, seed)
        started = time.perf_counter()
        evaluation = evaluator.hook(service, request, workload.AS_OF)
        assert evaluation.ran_out is None, "the deadline passed: set IMNM_CDS_DEADLINE_MS higher"
        evaluated = time.perf_counter()
        page = explain.render(evaluator.knowledge, evaluation)
        rendered = time.perf_counter()
        if seed >= 0:
            evaluate.append((evaluated - started) * 1000)
            render.append((rendered - evaluated) * 1000)
            kilobytes.append(len(page.encode()) / 1024)
    return {
        "evaluate_ms": percentiles(evaluate),
        "render_ms": percentiles(render),
        "page_kb": percentiles(kilobytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    evaluator = Evaluator(Settings.from_env())
    results = {size: measure(evaluator, int(size), args.runs) for size in args.sizes.split(",")}
    print(table({f"{size} resources, {name}": r for size, row in results.items() for name, r in row.items()}))
    save("explain", {"environment": environment(), "runs": args.runs, "sizes": results})


if __name__ == "__main__":
    main()
