"""Map FVC results (% predicted) to one fact: the latest value and its fall within the decline window."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class FvcResult:
    time: datetime
    value: float  # % predicted
    resource: Resource


def fvc_results(observations: list[Resource], notes: list[str]) -> list[FvcResult]:
    """Read every dated FVC in % predicted, oldest first; say in the notes why any other was not used."""
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
        rows.append(FvcResult(time, value, resource))
    return sorted(rows, key=lambda row: (row.time, row.resource.reference))


def fvc_fact(k, rows: list[FvcResult], now: datetime) -> tuple[dict, str, tuple[str, ...]]:
    """Return the latest FVC % predicted and the largest fall to it from a result within the window."""
    fact: dict = {"id": "fvc", "t": "fvc", "tested": False}
    if not rows:
        return fact, "FVC % predicted: not measured", ()
    time, latest, resource = rows[-1].time, rows[-1].value, rows[-1].resource
    window = timedelta(days=k.value("severity.fvc.decline-window"))
    earlier = [row for row in rows[:-1] if row.time >= time - window]
    best = max(earlier, key=lambda row: row.value, default=None)
    fact.update(tested=True, latest_pct=latest, latest_days_ago=days_before(time, now))
    fact["decline"] = max(0.0, best.value - latest) if best else 0.0
    text = f"FVC {latest:g}% predicted on {day(time)}"
    if best and best.value > latest:
        text += f", down from {best.value:g}% on {day(best.time)}"
    references = (resource.reference, *((best.resource.reference,) if best and best.value > latest else ()))
    return fact, text, references
