"""Map muscle-biopsy DiagnosticReports to one biopsy fact: each feature's state and the biopsy's level."""

from __future__ import annotations

import re
from datetime import datetime

from service.facts import context
from service.fhir import (
    Resource,
    as_dict,
    as_list,
    as_str,
    day,
    days_before,
    effective_time,
    is_final,
    matches,
    texts,
)


def is_pathology(k, data: dict) -> bool:
    """Tell whether a report is a pathology report by its code or category, never by its conclusion."""
    return matches(k, "pathology-report", data.get("code")) or any(
        matches(k, "report-pathology", category) for category in as_list(data.get("category"))
    )


def is_muscle_biopsy(k, data: dict) -> bool:
    """Tell whether a final report is a pathology report of muscle (specimen, code or conclusion)."""
    if not (is_final(data) and is_pathology(k, data)):
        return False
    muscle = re.compile(k.value("reports.kinds.muscle"), re.IGNORECASE)
    specimens = [as_str(as_dict(s).get("display")) or "" for s in as_list(data.get("specimen"))]
    return any(muscle.search(t) for t in (*specimens, *texts(data.get("code")), context.report_text(data)))


def level(fact: dict) -> str:
    """Return the biopsy's level from its features, most decisive first (rules/reports.toml [levels])."""
    if fact["dystrophic"] == "present":
        return "dystrophic"
    if "present" in (fact["endomysial_invasion"], fact["perifascicular_atrophy"], fact["rimmed_vacuoles"]):
        return "other-inflammatory"
    immune = "present" in (fact["mac_deposition"], fact["mhc1_upregulation"])
    if fact["consistent_with_imnm"] == "present" or (
        fact["necrosis"] == "present" and fact["sparse_inflammation"] == "present" and immune
    ):
        return "compatible-with-imnm"
    if fact["necrosis"] == "present":
        return "non-specific-necrosis"
    return "no-necrosis" if fact["necrosis"] == "absent" else "unknown"


def biopsy_fact(
    k, reports: list[tuple[Resource, dict]], now: datetime, available: bool
) -> tuple[dict, str, tuple[str, ...]]:
    """Return the biopsy fact from the latest of the muscle-biopsy reports, each with its features."""
    names = [f.name for f in context.reader(k).features["pathology"]]
    # Without diagnostic reports at all (not sent, not fetched), whether a biopsy was done is unknown.
    fact = {"id": "biopsy", "t": "biopsy", "reported": False if available else "unknown", "level": "unknown"}
    fact.update(dict.fromkeys(names, "unknown"))
    if not reports:
        text = "none reported" if available else "unknown (no diagnostic reports available)"
        return fact, f"muscle biopsy: {text}", ()
    latest, found = max(
        reports,
        key=lambda read: (
            effective_time(read[0].data) or datetime.min.replace(tzinfo=now.tzinfo),
            read[0].reference,
        ),
    )
    time = effective_time(latest.data)
    fact.update(found)
    fact["reported"] = True
    if time:
        fact["days_ago"] = days_before(time, now)
    return fact, f"muscle biopsy {day(time)}: {described(k, fact)}", (latest.reference,)


def features(k, data: dict) -> dict[str, str]:
    """Read a biopsy report's features and its level; a coded IMNM conclusion is compatible with IMNM."""
    found = context.read(k, "pathology", context.report_text(data))
    if any(matches(k, "diagnosis-imnm", c) for c in as_list(data.get("conclusionCode"))):
        found["necrosis"] = found["consistent_with_imnm"] = "present"
    found["level"] = level(found)
    return found


def reading(k, report: Resource, found: dict) -> tuple[datetime | None, str, str]:
    """Return a biopsy report's date, kind and reading (its features), for the explanation page."""
    return effective_time(report.data), "biopsy", described(k, found)


def described(k, found: dict) -> str:
    """Say what a biopsy shows: its level, then the features present."""
    shown = [
        k.text(f"reports.pathology.{name.replace('_', '-')}.label")
        for name in (f.name for f in context.reader(k).features["pathology"])
        if found[name] == "present"
    ]
    return k.text(f"reports.levels.{found['level']}") + (f" ({', '.join(shown)})" if shown else "")


def relevant(k, resource: Resource) -> bool:
    """Tell whether a DiagnosticReport is a final muscle-biopsy report (before validation)."""
    return is_muscle_biopsy(k, resource.data)
