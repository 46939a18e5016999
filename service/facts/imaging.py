"""Map muscle-MRI reports to one fact per study (STIR oedema, T1 fatty replacement) and one for the latest."""

from __future__ import annotations

from datetime import datetime

from service.facts import context
from service.fhir import Resource, as_list, codings, day, days_before, effective_time, is_final, matches


def is_muscle_mri(k, data: dict) -> bool:
    """Tell whether a final report is an MRI of muscle: coded as one, or a radiology report named one."""
    if not (is_final(data) and matches(k, "mri-muscle", data.get("code"))):
        return False
    coded = "mri-muscle" in k.coded_as(codings(data.get("code")))
    return coded or any(matches(k, "report-radiology", c) for c in as_list(data.get("category")))


def study_fact(k, report: Resource, index: int, now: datetime) -> tuple[dict, str, tuple[str, ...]]:
    """Return one MRI study's findings as the report states them, with its date."""
    time = effective_time(report.data)
    found = context.read(k, "mri", context.report_text(report.data))
    fact = {"id": f"mri-study:{index}", "t": "mri-study", "reported": True, **found}
    if time:
        fact["days_ago"] = days_before(time, now)
        fact["date"] = day(time)
    labels = {n: k.text(f"reports.mri.{n.replace('_', '-')}.label") for n in found}
    said = ", ".join(f"{labels[n]} {state}" for n, state in found.items())
    return fact, f"muscle MRI {day(time)}: {said}", (report.reference,)


def mri_facts(
    k, reports: list[Resource], now: datetime, available: bool
) -> list[tuple[dict, str, tuple[str, ...]]]:
    """Return a fact per muscle-MRI study, newest first, and an 'mri' fact that is the latest study."""
    oldest = datetime.min.replace(tzinfo=now.tzinfo)
    ordered = sorted(reports, key=lambda r: (effective_time(r.data) or oldest, r.reference), reverse=True)
    studies = [study_fact(k, report, i, now) for i, report in enumerate(ordered)]
    names = [f.name for f in context.reader(k).features["mri"]]
    if studies:
        fact, text, references = studies[0]
        latest = {**fact, "id": "mri", "t": "mri", "studies": len(studies)}
        return [(latest, text, references), *studies]
    # Without diagnostic reports at all (not sent, not fetched), whether an MRI was done is unknown.
    latest = {"id": "mri", "t": "mri", "reported": False if available else "unknown", "studies": 0}
    latest.update(dict.fromkeys(names, "unknown"))
    text = "none reported" if available else "unknown (no diagnostic reports available)"
    return [(latest, f"muscle MRI: {text}", ())]


def relevant(k, resource: Resource) -> bool:
    """Tell whether a DiagnosticReport is a final muscle-MRI report (before validation)."""
    return is_muscle_mri(k, resource.data)
