"""Map immunosuppressive treatment records to one fact: what was tried, what is current, and for how long."""

from __future__ import annotations

from datetime import datetime, timedelta

from service.facts.medications import Exposure, Medications, exposure
from service.fhir import Resource, day, days_before


def treatment_classes(k, drugs: Medications, data: dict) -> list[str]:
    """Name the treatment classes (severity.classes) of a drug given systemically (not drops or creams)."""
    found = [name for name in k.value("severity.classes") if drugs.matches(data, name)]
    return found if found and drugs.systemic(data) else []


def courses(k, drugs: Medications, records: list[Resource], now: datetime) -> list[tuple[str, Exposure]]:
    """Read each treatment record taken as a course of each class it belongs to."""
    found = []
    for resource in records:
        course = exposure(drugs, resource, now)
        if course is not None:
            found += [(name, course) for name in treatment_classes(k, drugs, resource.data)]
    return found


def immunosuppression_fact(
    k, courses: list[tuple[str, Exposure]], now: datetime
) -> tuple[dict, str, tuple[str, ...]]:
    """Summarise treatment: classes tried, those current (active or given lately), days on the course."""
    recent = now - timedelta(days=k.value("severity.treatment.current-within"))
    tried: dict[str, list[Exposure]] = {}
    for name, course in courses:
        tried.setdefault(name, []).append(course)
    current = {
        name: courses
        for name, courses in tried.items()
        if any(c.current or (c.last is not None and c.last >= recent) for c in courses)
    }
    starts = [c.start or c.last for courses in current.values() for c in courses if c.start or c.last]
    fact: dict = {
        "id": "immunosuppression",
        "t": "immunosuppression",
        "on": bool(current),
        "tried": ",".join(sorted(tried)),
        "current": ",".join(sorted(current)),
    }
    if not tried:
        return fact, "immunosuppression: none recorded", ()
    text = "treatment tried: " + ", ".join(k.text(f"labels.concepts.{n}") for n in sorted(tried))
    # Refractory is judged on the non-glucocorticoid agents: how long the earliest current one has run.
    sparing = [
        c.start or c.last
        for name, courses in current.items()
        if name != "glucocorticoids"
        for c in courses
        if c.start or c.last
    ]
    fact["sparing_days"] = days_before(min(sparing), now) if sparing else 0
    if starts:
        fact["days_on"] = days_before(min(starts), now)
        text += f"; current course since {day(min(starts))}"
    # Sorted, so the same record sent in another order (a Bulk Data export, say) reads the same.
    references = sorted({c.resource.reference for courses in tried.values() for c in courses})
    return fact, text, tuple(references)
