"""Map FVC results (% predicted) to one fact: the latest value and its fall within the decline window."""

from __future__ import annotations

from datetime import datetime, timedelta

from service.fhir import (
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

PERCENT = frozenset({"%", "% predicted", "%{predicted}"})


def is_fvc(k, data: dict) -> bool:
    """Tell whether an Observation is a final FVC in % predicted."""
    return is_final(data) and matches(k, "fvc-percent-predicted", data.get("code"))


def fvc_fact(
    k, observations: list[Resource], now: datetime, notes: list[str]
) -> tuple[dict, str, tuple[str, ...]]:
    """Return the latest FVC % predicted and the largest fall to it from a result within the window."""
    rows = []
    for resource in observations:
        quantity = as_dict(resource.data.get("valueQuantity"))
        value, time = as_number(quantity.get("value")), effective_time(resource.data)
        unit = (as_str(quantity.get("code")) or as_str(quantity.get("unit")) or "").strip()
        if value is None:
            if quantity.get("value") is not None:
                notes.append(
                    f"FVC result {resource.reference} has a value that is not a number and was not used."
                )
            continue
        if unit not in PERCENT:  # litres, or no unit: a % predicted is never assumed
            notes.append(
                f"FVC result {resource.reference} is not in % predicted ({unit or 'no unit'}) "
                "and was not used."
            )
            continue
        if time is None:
            notes.append(f"FVC result {resource.reference} has no date and was not used.")
            continue
        if value < 0:  # impossible; and between values of 0 or more, a fall stays within the float range
            notes.append(f"FVC result {resource.reference} is not a possible value and was not used.")
            continue
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
