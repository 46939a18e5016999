"""Map FVC results (% predicted) to one fact: the latest value and its fall within the decline window."""

from __future__ import annotations

from datetime import datetime, timedelta

from service.facts.fhir import (
    Resource,
    as_dict,
    as_number,
    as_str,
    day,
    days_before,
    effective_time,
    is_final,
    matches,
)


def is_fvc(k, data: dict) -> bool:
    """Tell whether an Observation is a final FVC in % predicted."""
    return is_final(data) and matches(k, "fvc-percent-predicted", data.get("code"))


def fvc_fact(k, observations: list[Resource], now: datetime) -> tuple[dict, str, tuple[str, ...]]:
    """Return the latest FVC % predicted and the largest fall to it from a result within the window."""
    rows = []
    for resource in observations:
        quantity = as_dict(resource.data.get("valueQuantity"))
        value, time = as_number(quantity.get("value")), effective_time(resource.data)
        unit = (as_str(quantity.get("code")) or as_str(quantity.get("unit")) or "%").strip()
        if value is not None and time is not None and unit in ("%", "% predicted", "%{predicted}"):
            rows.append((time, value, resource))
    fact: dict = {"id": "fvc", "t": "fvc", "tested": False}
    if not rows:
        return fact, "FVC % predicted: not measured", ()
    rows.sort(key=lambda row: (row[0], row[2].reference))
    time, latest, resource = rows[-1]
    window = timedelta(days=k.value("severity.fvc.decline-window"))
    earlier = [row for row in rows[:-1] if row[0] >= time - window]
    best = max(earlier, key=lambda row: row[1], default=None)
    fact.update(tested=True, latest_pct=latest, latest_days_ago=days_before(time, now))
    fact["decline"] = max(0.0, best[1] - latest) if best else 0.0
    text = f"FVC {latest:g}% predicted on {day(time)}"
    if best and best[1] > latest:
        text += f", down from {best[1]:g}% on {day(best[0])}"
    references = (resource.reference, *((best[2].reference,) if best and best[1] > latest else ()))
    return fact, text, references
