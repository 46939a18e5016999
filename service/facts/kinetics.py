"""Measure CK kinetics around the last statin dose, for the rules to judge toxic against autoimmune."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from service.facts.labs import CkResult, highest, observed_half_life
from service.facts.medications import History
from service.fhir import day, days_before

RATIO_CAP = 1000.0  # past this the curve has long reached normal; the number means nothing more


def expected_value(peak: CkResult, at: datetime, half_life: float) -> float:
    """Return the CK expected at a moment if it decays from its peak with the given half-life."""
    return peak.value * 0.5 ** (days_before(peak.time, at) / half_life)


def episode_of(k, stop: datetime, results: list[CkResult]) -> list[CkResult]:
    """Return the CK results of the episode around a last statin dose (from shortly before it)."""
    lead = timedelta(days=k.value("statin.episode-lead"))
    return [r for r in results if r.time >= stop - lead]


def kinetics_fact(
    k, history: History, results: list[CkResult], now: datetime
) -> tuple[dict, str, tuple[str, ...]]:
    """Return the CK-kinetics fact for a stopped statin: days since the last dose, the CK since, the fit."""
    fact: dict = {"id": "ck-kinetics", "t": "ck-kinetics", "applicable": False}
    last = history.last
    if last is None:
        return fact, "CK after stopping a statin: no stopped statin", ()
    stop = last.last
    episode = episode_of(k, stop, results)
    if not episode:
        return fact, "CK after stopping a statin: no CK result around the last dose", ()
    half_life = k.value("statin.ck-half-life")
    window = k.value("statin.persistence-window")
    peak = highest(episode)
    # When toxicity would have brought CK back to the ULN, decaying from its peak.
    normal_by = peak.time + timedelta(days=half_life * math.log2(max(peak.x_uln, 1.0)))
    after = [r for r in episode if r.time >= stop]
    fact.update(
        applicable=True,
        stop_known=last.last_known,
        stop_on=day(stop),
        days_since_stop=days_before(stop, now),
        peak_x_uln=peak.x_uln,
        after_stop_count=len(after),
    )
    text = (
        f"CK around the last statin dose ({day(stop)}, {'recorded' if last.last_known else 'inferred'}): "
        f"peak {peak.value:,.0f} U/L ({peak.x_uln:.1f}× ULN) on {day(peak.time)}"
    )
    if after:
        latest = after[-1]
        fact["latest_x_uln"] = latest.x_uln
        fact["latest_days_after_stop"] = days_before(stop, latest.time)
        count = f"{len(after)} result{'s' if len(after) > 1 else ''}"
        after_days = fact["latest_days_after_stop"]
        text += f"; {count} since, latest {latest.value:,.0f} U/L {after_days:.0f} days after it"
        ratio = 1.0
        if latest.time > peak.time:
            expected = expected_value(peak, latest.time, half_life)
            # The curve is 0 from a peak of 0, or underflows long after the peak: any CK left is above it.
            ratio = latest.value / expected if expected else RATIO_CAP if latest.value else 1.0
        fact["expected_ratio"] = min(ratio, RATIO_CAP)
        if latest.time > normal_by:
            text += f" (toxicity would have brought it to normal by {day(normal_by)})"
        elif latest.time > peak.time:
            text += f" ({ratio:.1f}× the {half_life:g}-day half-life curve)"
        rise = 1 + k.value("labs.ck.trend-change")
        fact["rising_after_stop"] = len(after) >= 2 and latest.x_uln >= after[-2].x_uln * rise
    fitted = observed_half_life([r for r in episode if r.time >= peak.time])
    if fitted is not None:
        fact["observed_half_life"] = fitted
        text += f"; observed half-life {fitted:.1f} days"
    # Recheck when toxicity should have settled, and not before the persistence window has passed:
    # only then can a raised CK rule toxicity out.
    recheck = max(normal_by, stop + timedelta(days=window))
    fact["recheck_in_days"] = max(0, math.ceil(days_before(now, recheck)))
    fact["recheck_on"] = day(max(recheck, now))
    cited = [last.resource, peak.resource, *(r.resource for r in after[-2:])]
    return fact, text, tuple(dict.fromkeys(r.reference for r in cited))
