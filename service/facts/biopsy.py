"""Map muscle-biopsy DiagnosticReports to one biopsy fact, each feature present, absent or unknown."""

from __future__ import annotations

import re
from datetime import datetime

from service.fhir import (
    Resource,
    as_list,
    as_str,
    attachment_text,
    day,
    days_before,
    effective_time,
    is_final,
    matches,
    texts,
)

CLAUSE = re.compile(r"[.;:\n]|\bbut\b|\bhowever\b", re.IGNORECASE)


def report_text(data: dict) -> str:
    """Return everything a report says in words: code text, conclusion, coded conclusions, attachments."""
    parts = [*texts(data.get("code")), as_str(data.get("conclusion")) or ""]
    for concept in as_list(data.get("conclusionCode")):
        parts += texts(concept)
    parts += [attachment_text(a) for a in as_list(data.get("presentedForm"))]
    return "\n".join(p for p in parts if p)


def is_muscle_biopsy(k, data: dict) -> bool:
    """Tell whether a final report is a muscle biopsy (no LOINC is specific to it, so by its words)."""
    return is_final(data) and "pathology-report" in k.texted_as([report_text(data)])


def read_features(k, text: str) -> dict[str, str]:
    """Find each biopsy feature in the report text: present, absent (negated in its clause) or unknown."""
    negation = re.compile(k.value("biopsy.negation"), re.IGNORECASE)
    features = {}
    for name in k.children("biopsy.features"):
        param = k.param(f"biopsy.features.{name}")
        state = "unknown"
        for match in re.finditer(param.value, text, re.IGNORECASE):
            clause = CLAUSE.split(text[: match.start()])[-1]
            negated = param.attributes.get("negatable", True) and negation.search(clause)
            state = "absent" if negated else "present"
            if state == "present":
                break
        features[name.replace("-", "_")] = state
    return features


def biopsy_fact(
    k, reports: list[Resource], now: datetime, available: bool
) -> tuple[dict, str, tuple[str, ...]]:
    """Return the biopsy fact from the latest muscle-biopsy report; coded IMNM counts as necrotizing."""
    # Without diagnostic reports at all (not sent, not fetched), whether a biopsy was done is unknown.
    fact = {"id": "biopsy", "t": "biopsy", "reported": False if available else "unknown"}
    fact.update(dict.fromkeys((n.replace("-", "_") for n in k.children("biopsy.features")), "unknown"))
    if not reports:
        text = "none reported" if available else "unknown (no diagnostic reports available)"
        return fact, f"muscle biopsy: {text}", ()
    latest = max(
        reports,
        key=lambda r: (effective_time(r.data) or datetime.min.replace(tzinfo=now.tzinfo), r.reference),
    )
    time = effective_time(latest.data)
    fact.update(features(k, latest.data))
    fact["reported"] = True
    if time:
        fact["days_ago"] = days_before(time, now)
    return fact, f"muscle biopsy {day(time)}: {reading(k, latest)[2]}", (latest.reference,)


def features(k, data: dict) -> dict[str, str]:
    """Read a biopsy report's features; a coded IMNM conclusion counts as necrotizing."""
    found = read_features(k, report_text(data))
    if any(matches(k, "diagnosis-imnm", c) for c in as_list(data.get("conclusionCode"))):
        found["necrosis"] = "present"
    return found


def reading(k, report: Resource) -> tuple[datetime | None, str, str]:
    """Return a biopsy report's date, kind and reading: the features it shows, in words."""
    found = features(k, report.data)
    shown = [
        k.param(f"biopsy.features.{name}").attributes["label"]
        for name in k.children("biopsy.features")
        if found[name.replace("-", "_")] == "present"
    ]
    text = ", ".join(shown) if shown else "no feature recognised in the report text"
    return effective_time(report.data), "biopsy", text


def relevant(k, resource: Resource) -> bool:
    """Tell whether a DiagnosticReport is a final muscle-biopsy report (before validation)."""
    return is_muscle_biopsy(k, resource.data)
