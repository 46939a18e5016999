"""Facts for cancer screening: when the myositis began (by which evidence), and what screening was done."""

from __future__ import annotations

from datetime import datetime, timedelta

from service.facts.context import report_text
from service.facts.labs import CkResult
from service.fhir import Resource, completed_years, day, effective_time, is_final, texts

DIAGNOSES = (
    "diagnosis-imnm",
    "diagnosis-polymyositis",
    "diagnosis-dermatomyositis",
    "diagnosis-antisynthetase",
)
PANELS = {"basic_done": "chest-radiograph", "enhanced_done": "ct-chest-abdomen-pelvis"}


def onset_fact(
    k,
    ck_results: list[CkResult],
    concepts: dict[str, tuple[dict, str, tuple[str, ...]]],
    birth,
    now: datetime,
) -> tuple[dict, str, tuple[str, ...]]:
    """Date the current episode: its first raised CK, the onset of weakness or a diagnosis, if earlier."""
    first = episode_start(k, ck_results)
    candidates = [(first.time, "first raised CK", (first.resource.reference,))] if first else []
    for name, why in (
        ("proximal-weakness", "onset of weakness"),
        *((d, "diagnosis date") for d in DIAGNOSES),
    ):
        fact, _, references = concepts[name]
        if fact["state"] != "unknown" and fact.get("onset_days_ago") is not None:
            candidates.append((now - timedelta(days=fact["onset_days_ago"]), why, references))
    onset_fact: dict = {"id": "myositis-onset", "t": "myositis-onset", "known": False}
    if not candidates:
        return onset_fact, "myositis onset: no dated evidence", ()
    onset, why, references = min(candidates, key=lambda c: c[0])
    onset_fact.update(
        known=True, days_ago=(now - onset).total_seconds() / 86400.0, onset_on=day(onset), source=why
    )
    if birth is not None:
        onset_fact["age_at_onset"] = completed_years(birth, onset)
    return onset_fact, f"myositis onset {day(onset)} (from the {why})", references


def episode_start(k, ck_results: list[CkResult]) -> CkResult | None:
    """Return the first raised CK of the latest run of raised results (after the last normal one)."""
    raised = [r.x_uln > k.value("imnm.ck.raised") for r in ck_results]  # in time order
    if True not in raised:
        return None
    start = len(raised) - 1 - raised[::-1].index(True)
    while start > 0 and raised[start - 1]:
        start -= 1
    return ck_results[start]


def panels(k, data: dict) -> list[str]:
    """Name the screening panels a final report belongs to (a chest radiograph, a CT of thorax to pelvis)."""
    if not is_final(data):
        return []
    text = "\n".join([*texts(data.get("code")), report_text(data)])
    # Only the panels' own patterns: a report's text is long, and every other value set's is beside the point.
    return [name for name, valueset in PANELS.items() if k.valueset(valueset).has_text(text)]


def screening_fact(
    k, reports: list[Resource], onset: dict, now: datetime, available: bool
) -> tuple[dict, str, tuple[str, ...]]:
    """Tell which screening panels were done within the screening window around the onset."""
    # Without diagnostic reports at all (not sent, not fetched), whether any panel was done is unknown.
    fact = {
        "id": "cancer-screening",
        "t": "cancer-screening",
        **dict.fromkeys(PANELS, False if available else "unknown"),
    }
    if not onset["known"]:
        return fact, "cancer screening: onset unknown", ()
    if not available:
        return fact, "cancer screening done: unknown (no diagnostic reports available)", ()
    earliest = now - timedelta(days=onset["days_ago"] + k.value("cancer.window"))
    done = []
    for resource in reports:
        time = effective_time(resource.data)
        found = panels(k, resource.data) if time and time >= earliest else []
        fact.update(dict.fromkeys(found, True))
        done += [resource] * bool(found)
    shown = [name.removesuffix("_done") for name in PANELS if fact[name]]
    text = "cancer screening done: " + (", ".join(shown) + " panel" if shown else "none recorded")
    return fact, text, tuple(dict.fromkeys(r.reference for r in done))


def reading(k, report: Resource) -> tuple[datetime | None, str, str]:
    """Return a screening report's date, kind and which panel it belongs to."""
    shown = [name.removesuffix("_done") for name in panels(k, report.data)]
    return effective_time(report.data), "screening", ", ".join(shown) + " screening panel"
