"""Count and time what the service does, as Prometheus metrics, in one process or across gunicorn workers.

The client library reads PROMETHEUS_MULTIPROC_DIR once, when it is first imported, to choose between
one process's memory and files shared by every worker. `imnm-cds serve` sets it before the workers fork,
after this module is imported, so the library is imported and the metrics are made on first use.
No label carries a patient id, a token or free text: only routes, statuses, stages, rule ids and codes.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a stage takes from well under a millisecond to the whole deadline (400 ms by default).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@functools.cache
def _made() -> SimpleNamespace:
    """Make every metric once per process, in the mode the environment chose."""
    from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415 (see the module docstring)

    return SimpleNamespace(
        requests=Counter(
            "imnm_cds_requests", "HTTP answers by route template and status.", ["route", "status"]
        ),
        stage_seconds=Histogram(
            "imnm_cds_stage_seconds", "Time per evaluation stage.", ["stage"], buckets=STAGE_BUCKETS
        ),
        cards=Counter(
            "imnm_cds_cards", "Cards returned, by rule, topic and indicator.", ["rule", "topic", "indicator"]
        ),
        engine_sessions=Gauge(
            "imnm_cds_engine_sessions_in_use",
            "Rule-engine sessions evaluating now.",
            multiprocess_mode="livesum",
        ),
        engine_waits=Counter(
            "imnm_cds_engine_waits",
            "Evaluations that found every engine session busy: served after waiting, or refused (503).",
            ["result"],
        ),
        fhir_fetches=Counter(
            "imnm_cds_fhir_fetches",
            "Prefetch queries to FHIR servers, by outcome (ok or why not).",
            ["outcome"],
        ),
        ran_out=Counter(
            "imnm_cds_deadline_ran_out", "Calls whose deadline passed, by the stage under way.", ["stage"]
        ),
        feedback=Counter(
            "imnm_cds_feedback",
            "Feedback items stored, by rule of the card and outcome.",
            ["rule", "outcome"],
        ),
        jwt_refusals=Counter(
            "imnm_cds_jwt_refusals", "Calls refused for their JWT, by reason code.", ["reason"]
        ),
        workers=Gauge("imnm_cds_workers", "Worker processes serving now.", multiprocess_mode="livesum"),
        knowledge=Gauge(
            "imnm_cds_knowledge_info",
            "The knowledge the workers use: package version and hash of rules/ after local overrides.",
            ["version"],
            multiprocess_mode="livemax",
        ),
    )


def __getattr__(name: str):
    """Give the metric of this name, e.g. `metrics.requests`, making all of them on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(_made(), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no metric {name!r}") from None


def share_between_processes() -> None:
    """Keep each process's metrics as files in PROMETHEUS_MULTIPROC_DIR, emptied, or a new directory."""
    named = os.environ.get(MULTIPROCESS)
    directory = Path(named) if named else Path(tempfile.mkdtemp(prefix="imnm-cds-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # an earlier run's counts are not this one's
        stale.unlink()
    os.environ[MULTIPROCESS] = str(directory)


def process_gone(pid: int) -> None:
    """Drop a dead worker's live gauges; its counters stay, so totals survive it."""
    if os.environ.get(MULTIPROCESS):
        from prometheus_client import multiprocess  # noqa: PLC0415 (see the module docstring)

        multiprocess.mark_process_dead(pid)


def exposition() -> bytes:
    """Render every metric in the Prometheus text format, summed over all worker processes."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest  # noqa: PLC0415

    _made()
    if not os.environ.get(MULTIPROCESS):
        return generate_latest(REGISTRY)
    from prometheus_client import multiprocess  # noqa: PLC0415

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
