"""Facts for cancer screening: when the myositis began (by which evidence), and what screening was done."""

from __future__ import annotations

from datetime import datetime, timedelta

from service.facts.context import report_text
from service.facts.labs import CkResult
from service.fhir import (
    Resource,
    as_dict,
    as_str,
    codings,
    completed_years,
    day,
    effective_time,
    is_final,
    parse_time,
    texts,
)

DIAGNOSES = (
    "diagnosis-imnm",
    "diagnosis-polymyositis",
    "diagnosis-dermatomyositis",
    "diagnosis-antisynthetase",
)
# Each screening panel of the cancer-screening card, and the value sets whose records show it done:
# the basic panel by its chest radiograph, the enhanced by its CT, the endoscopy by both its parts.
PANELS = {
    "basic": ("chest-radiograph",),
    "enhanced": ("ct-chest-abdomen-pelvis",),
    "pet_ct": ("pet-ct",),
    "endoscopy": ("upper-gi-endoscopy", "colonoscopy"),
}
LABELS = {
    "basic": "basic panel",
    "enhanced": "enhanced panel",
    "pet_ct": "PET-CT",
    "endoscopy": "GI endoscopy",
}
PARTS = tuple(name for names in PANELS.values() for name in names)
# A report's body is read only for the first panels: elsewhere "PET" or "endoscopy" is often a recommendation.
READ_IN_BODY = frozenset({"chest-radiograph", "ct-chest-abdomen-pelvis"})
RECORDS = ("DiagnosticReport", "Procedure", "ServiceRequest")
ORDERED_INTENTS = frozenset({"order", "original-order", "reflex-order", "filler-order", "instance-order"})
PROCEDURE_STATUS = {
    "completed": "done",
    "not-done": "declined",
    "preparation": "ordered",
    "in-progress": "ordered",
    "on-hold": "ordered",
}
REPORT_STATUS = {"registered": "ordered", "partial": "ordered", "preliminary": "ordered"}  # else final
REQUEST_STATUS = {"completed": "done", "active": "ordered", "on-hold": "ordered"}
RANKED = ("done", "ordered", "declined")  # the first wins when records of one part differ


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


def parts(k, data: dict) -> list[str]:
    """Name the screening value sets a report, procedure or order is for, by its code or its words."""
    concept = data.get("code")
    title = "\n".join(texts(concept))
    body = report_text(data) if data.get("resourceType") == "DiagnosticReport" else ""
    found = []
    for name in PARTS:
        valueset = k.valueset(name)
        if (
            any(valueset.has_code(system, code) for system, code in codings(concept))
            or valueset.has_text(title)
            or (name in READ_IN_BODY and valueset.has_text(body))
        ):
            found.append(name)
    return found


def status(data: dict) -> str | None:
    """Say what a record shows of its panel: done, ordered or declined; None when it shows none of them."""
    state = as_str(data.get("status"))
    kind = data.get("resourceType")
    if kind == "DiagnosticReport":
        return "done" if is_final(data) else REPORT_STATUS.get(state or "")
    if kind == "Procedure":
        return PROCEDURE_STATUS.get(state or "")
    if state == "revoked":  # a ServiceRequest withdrawn before it was done: declined or cancelled
        return "declined"
    return REQUEST_STATUS.get(state or "") if as_str(data.get("intent")) in ORDERED_INTENTS else None


def recorded_time(data: dict) -> datetime | None:
    """Return when a report, procedure or order applies: when done, else when ordered."""
    if data.get("resourceType") == "DiagnosticReport":
        return effective_time(data)
    done = "performed" if data.get("resourceType") == "Procedure" else "occurrence"
    return (
        parse_time(data.get(f"{done}DateTime"))
        or parse_time(as_dict(data.get(f"{done}Period")).get("start"))
        or parse_time(data.get("authoredOn"))
    )


def panel_status(found: dict[str, str], names: tuple[str, ...]) -> str:
    """Combine the parts of a panel: done or declined once every part is, ordered once each is on record."""
    states = [found.get(name) for name in names]
    if all(state in ("done", "declined") for state in states):
        return "done" if all(state == "done" for state in states) else "declined"
    return "ordered" if all(states) else "none"


# A screening record as read: the resource, what it shows, when, and the value sets it is for.
Read = tuple[Resource, str, datetime | None, list[str]]


def readings(k, records: list[Resource]) -> list[Read]:
    """Read each record once: what it shows (done, ordered, declined), when, and which value sets."""
    found = []
    for resource in records:
        state = status(resource.data)
        if state is not None:  # a cancelled or mistaken record shows nothing
            found.append((resource, state, recorded_time(resource.data), parts(k, resource.data)))
    return found


def screening_fact(
    k,
    records: list[Read],
    onset: dict,
    now: datetime,
    available: bool,
) -> tuple[dict, str, tuple[str, ...]]:
    """Tell which screening panels are done, ordered or declined since the window before the onset."""
    # Without reports, procedures or orders at all (not sent, not fetched), what was done is unknown.
    fact = {
        "id": "cancer-screening",
        "t": "cancer-screening",
        **dict.fromkeys(PANELS, "none" if available else "unknown"),
    }
    if not onset["known"]:
        return fact, "cancer screening: onset unknown", ()
    if not available:
        return fact, "cancer screening: unknown (no reports, procedures or orders available)", ()
    earliest = now - timedelta(days=onset["days_ago"] + k.value("cancer.window"))
    found: dict[str, str] = {}
    used = []
    for resource, state, time, names in records:
        if time is None or time < earliest:
            continue
        for name in names:
            found[name] = min(found.get(name, state), state, key=RANKED.index)
        used.append(resource.reference)
    fact.update({panel: panel_status(found, names) for panel, names in PANELS.items()})
    shown = [f"{LABELS[panel]} {fact[panel]}" for panel in PANELS if fact[panel] != "none"]
    text = "cancer screening: " + (", ".join(shown) if shown else "none recorded")
    return fact, text, tuple(dict.fromkeys(used))


def reading(found: list[str], state: str, time: datetime | None) -> tuple[datetime | None, str, str]:
    """Return a read screening record's date, kind and what it shows: which panel, and in what state."""
    shown = [panel for panel, names in PANELS.items() if set(names) & set(found)]
    return time, "screening", f"{', '.join(LABELS[p] for p in shown)} {state}"
