"""Screen a population bigger than one machine on Dask: the same evaluation per patient, on a cluster."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

from service.config import Settings
from service.evaluate.pipeline import Evaluator
from service.fhir import parse_time
from service.population import report
from service.population.screen import Summary, attribute, evaluate_patient, input_files, summarise

_evaluator: list[Evaluator] = []  # one per worker process, built on its first patient


def screen_on_dask(source: Path, out: Path, as_of: datetime, scheduler: str | None, workers: int) -> Summary:
    """Evaluate every patient of a Bulk Data export on a Dask cluster (a local one when no scheduler)."""
    from dask import bag  # noqa: PLC0415 (an optional dependency: pip install '.[dask]')
    from dask.distributed import Client, LocalCluster  # noqa: PLC0415

    files = input_files(source)
    # The results are written aside and moved into place once all are in: a failed run leaves the
    # previous run's results whole.
    partial = out / "partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    as_of_text = as_of.isoformat()
    cluster = (
        nullcontext(scheduler)
        if scheduler
        else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    )
    try:
        with cluster as address, Client(address):
            # gzip cannot be split into blocks: such files are read one per partition. A byte that is
            # not UTF-8 becomes a lone surrogate, so only its line is left out.
            splittable = all(f.suffix != ".gz" for f in files)
            lines = bag.read_text(
                [str(f) for f in files],
                blocksize="32MiB" if splittable else None,
                errors="surrogateescape",
            )
            by_patient = lines.map(_attributed).filter(None).groupby(_patient)
            # ASCII, so that no text from the data can fail to be written.
            results = by_patient.map(_evaluate_group, as_of_text).map(json.dumps, ensure_ascii=True)
            results.to_textfiles(str(partial / "results-*.ndjson"), last_endline=True)
        for old in out.glob("results-*.ndjson"):
            old.unlink()
        for new in partial.glob("results-*.ndjson"):
            new.replace(out / new.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    summary = summarise(sorted(out.glob("results-*.ndjson")), as_of_text)
    summary.save(out)
    report.write(sorted(out.glob("results-*.ndjson")), summary, out)
    return summary


def _attributed(line: str) -> tuple[str, str] | None:
    """Return (patient, line) for a line a rule can use, else None."""
    patient, _ = attribute(line)
    # The shuffle carries the line, not the parsed resource: less than half the memory, fewer bytes.
    return (patient, line) if patient else None


def _evaluate_group(group: tuple[str, list[tuple[str, str]]], as_of: str) -> dict:
    patient, rows = group
    if not _evaluator:
        _evaluator.append(Evaluator(Settings.from_env()))
    resources = [json.loads(line) for _, line in rows]
    return evaluate_patient(_evaluator[0], patient, resources, parse_time(as_of))


def _patient(row: tuple[str, str]) -> str:
    return row[0]
