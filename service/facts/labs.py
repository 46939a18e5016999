"""Map laboratory Observations to facts: the total-CK summary and one result per myositis antibody."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from service.fhir import (
    Resource,
    as_dict,
    as_list,
    as_number,
    as_str,
    codings,
    day,
    days_before,
    effective_time,
    is_final,
    matches,
    names,
    texts,
)

ANTIBODIES = (
    "anti-hmgcr",
    "anti-srp",
    "anti-jo1",
    "anti-pl7",
    "anti-pl12",
    "anti-ej",
    "anti-oj",
    "anti-tif1g",
    "anti-nxp2",
    "anti-mda5",
    "anti-mi2",
    "anti-sae1",
    "anti-pmscl",
    "anti-u1rnp",
)
ANTIBODY_SETS = frozenset(ANTIBODIES)
RESULTS = ("positive", "negative", "indeterminate")
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
COUNTING_UNITS = frozenset({"u", "units", "unit", "cu"})


@dataclass(frozen=True)
class CkResult:
    resource: Resource
    time: datetime
    value: float  # U/L
    uln: float  # U/L
    uln_assumed: bool

    @property
    def x_uln(self) -> float:
        return self.value / self.uln


@dataclass(frozen=True)
class AntibodyResult:
    resource: Resource
    time: datetime | None
    state: str
    shown: str  # the result as the lab gave it, for the card


def is_ck(k, data: dict) -> bool:
    """Tell whether an Observation is a total CK (never CK-MB)."""
    code = data.get("code")
    named = names(k, code)
    return "ck-total" in named and "ck-mb" not in named


def antibody_names(k, concept) -> list[str]:
    """Name the antibodies a code names: by code if any matches, else by unambiguous text."""
    if not names(k, concept) & ANTIBODY_SETS:  # by code or text, once per concept: most name none
        return []
    coded = k.coded_as(codings(concept))
    by_code = [n for n in ANTIBODIES if n in coded]
    if by_code:
        return by_code
    texted = k.texted_as(texts(concept))
    return [n for n in ANTIBODIES if n in texted]


def ck_results(k, observations: list[Resource], notes: list[str], sex: str | None = None) -> list[CkResult]:
    """Read every final total-CK value in U/L with its upper limit of normal (the lab's, else by sex)."""
    factors = {unit.casefold(): factor for unit, factor in k.value("labs.ck.unit-factors").items()}
    default_uln = k.value(f"labs.ck.default-uln.{'female' if sex == 'female' else 'male'}")
    results = []
    for resource in observations:
        data = resource.data
        quantity = as_dict(data.get("valueQuantity"))
        value, time = as_number(quantity.get("value")), effective_time(data)
        if value is None:
            if quantity.get("value") is not None:  # e.g. "3000": FHIR JSON has numbers for decimals
                notes.append(
                    f"CK result {resource.reference} has a value that is not a number and was not used."
                )
            continue
        unit = as_str(quantity.get("code")) or as_str(quantity.get("unit")) or ""
        factor = factors.get(unit.casefold())
        if factor is None:
            notes.append(
                f"CK result {resource.reference} is in an unknown unit ({unit or 'none'}) and was not used."
            )
            continue
        if time is None:
            notes.append(f"CK result {resource.reference} has no date and was not used.")
            continue
        uln = _reference_high(data, unit, factors)
        result = CkResult(resource, time, value * factor, uln or default_uln, uln_assumed=uln is None)
        # A value or range past the float range in U/L (e.g. 1e307 µkat/L) is no possible activity either.
        if not (result.value >= 0 and math.isfinite(result.uln) and math.isfinite(result.x_uln)):
            notes.append(f"CK result {resource.reference} is not a possible activity and was not used.")
            continue
        results.append(result)
    return sorted(results, key=lambda r: (r.time, r.resource.reference))


def _reference_high(data: dict, unit: str, factors: dict) -> float | None:
    for ref in map(as_dict, as_list(data.get("referenceRange"))):
        high = as_dict(ref.get("high"))
        value = as_number(high.get("value"))
        factor = factors.get((as_str(high.get("code")) or as_str(high.get("unit")) or unit).casefold())
        if value is not None and value > 0 and factor is not None:
            return value * factor
    return None


def highest(results: list[CkResult]) -> CkResult:
    """Return the CK result highest above its ULN; of equal highs, the first."""
    return max(results, key=lambda r: (r.x_uln, -r.time.timestamp()))


def observed_half_life(results: list[CkResult]) -> float | None:
    """Fit log(CK) against time (least squares) from three or more results; the half-life if falling."""
    if len(results) < 3:
        return None
    xs = [days_before(results[0].time, r.time) for r in results]
    ys = [math.log(r.value) for r in results if r.value > 0]
    if len(ys) != len(xs) or max(xs) == 0:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return math.log(2) / -slope if slope < 0 else None


def ck_fact(k, results: list[CkResult], now: datetime) -> tuple[dict, str, tuple[str, ...]]:
    """Return the CK summary fact, its description and the references behind it."""
    if not results:
        return {"id": "ck", "t": "ck", "tested": False, "count": 0, "trend": "none"}, "CK: no result", ()
    peak = highest(results)
    latest = results[-1]
    trend = "single"
    if len(results) > 1:
        trend_days = days_before(results[-2].time, latest.time)
        before = results[-2].x_uln
        ratio = latest.x_uln / before if before else math.inf if latest.x_uln else 1.0  # from a CK of 0
        change = k.value("labs.ck.trend-change")
        trend = "rising" if ratio >= 1 + change else "falling" if ratio <= 1 - change else "stable"
    fact = {
        "id": "ck",
        "t": "ck",
        "tested": True,
        "count": len(results),
        "peak": peak.value,
        "peak_x_uln": peak.x_uln,
        "peak_days_ago": days_before(peak.time, now),
        "latest": latest.value,
        "latest_x_uln": latest.x_uln,
        "latest_days_ago": days_before(latest.time, now),
        "latest_after_peak_days": days_before(peak.time, latest.time),
        "uln": peak.uln,
        "uln_assumed": peak.uln_assumed,
        "trend": trend,
    }
    if len(results) > 1:
        fact["trend_days"] = trend_days
    decay = observed_half_life([r for r in results if r.time >= peak.time])
    if decay is not None:
        fact["decay_half_life"] = decay
    text = f"CK peak {peak.value:,.0f} U/L ({peak.x_uln:.1f}× ULN) on {day(peak.time)}"
    if peak.uln_assumed:
        text += f" (ULN {peak.uln:,.0f} U/L assumed: the lab sent no range)"
    if latest is not peak:
        text += f"; latest {latest.value:,.0f} U/L on {day(latest.time)} ({trend})"
    references = tuple(dict.fromkeys([peak.resource.reference, latest.resource.reference]))
    return fact, text, references


def antibody_results(k, observations: list[Resource], notes: list[str]) -> dict[str, list[AntibodyResult]]:
    """Read every final antibody result, from whole Observations and from panel components."""
    found: dict[str, list[AntibodyResult]] = {name: [] for name in ANTIBODIES}
    for resource in observations:
        data = resource.data
        time = effective_time(data)
        for part in [data, *map(as_dict, as_list(data.get("component")))]:
            names = antibody_names(k, part.get("code"))
            if len(names) > 1:
                if part is not data or not as_list(data.get("component")):
                    notes.append(
                        f"{resource.reference} names several antibodies in one result and was not used."
                    )
                continue
            if names:
                state, shown = read_result(k, names[0], part)
                if state is None:
                    notes.append(f"{resource.reference}: the {names[0]} result could not be read.")
                    state, shown = "indeterminate", "unreadable result"
                found[names[0]].append(AntibodyResult(resource, time, state, shown))
    return found


def read_result(k, name: str, part: dict) -> tuple[str | None, str]:
    """Read one antibody result: interpretation, coded value, text, boolean, then quantity against a range."""
    for concept in map(as_dict, as_list(part.get("interpretation"))):
        for system, code in codings(concept):
            state = k.value("labs.interpretation").get(code or "")
            if state and system in (None, INTERPRETATION_SYSTEM):
                return state, _shown(part)
    if "valueCodeableConcept" in part:
        for state in RESULTS:
            if matches(k, f"result-{state}", part["valueCodeableConcept"]):
                return state, ""
    text = as_str(part.get("valueString"))
    if text:
        for state in RESULTS:
            if f"result-{state}" in k.texted_as([text]):
                return state, text[:40]
    if isinstance(part.get("valueBoolean"), bool):
        return ("positive" if part["valueBoolean"] else "negative"), ""
    return _read_quantity(k, name, part)


def _read_quantity(k, name: str, part: dict) -> tuple[str | None, str]:
    quantity = as_dict(part.get("valueQuantity"))
    value = as_number(quantity.get("value"))
    if value is None:
        return None, ""
    unit = as_str(quantity.get("unit")) or as_str(quantity.get("code")) or ""
    comparator = as_str(quantity.get("comparator")) or ""
    shown = f"{comparator}{value:g} {unit}".strip()
    high = next(
        (
            as_number(as_dict(r.get("high")).get("value"))
            for r in map(as_dict, as_list(part.get("referenceRange")))
        ),
        None,
    )
    if high is None and f"labs.antibody-cutoffs.{name}" in k.parameters and unit.casefold() in COUNTING_UNITS:
        # The published cut-off is "negative below": a value at the cut-off is positive.
        cutoff = k.value(f"labs.antibody-cutoffs.{name}")
        return ("positive" if value >= cutoff and comparator not in ("<", "<=") else "negative"), shown
    if high is None:
        return None, shown
    if comparator in ("<", "<="):  # below the value: negative only if the value is within the range
        return ("negative" if value <= high else None), shown
    if comparator in (">", ">="):
        return ("positive" if value >= high else None), shown
    return ("positive" if value > high else "negative"), shown


def _shown(part: dict) -> str:
    """Show the lab's own value beside an interpretation, when it gave one."""
    quantity = as_dict(part.get("valueQuantity"))
    value = as_number(quantity.get("value"))
    return "" if value is None else f"{value:g} {as_str(quantity.get('unit')) or ''}".strip()


def antibody_fact(
    k, name: str, results: list[AntibodyResult], now: datetime
) -> tuple[dict, str, tuple[str, ...]]:
    """Return one antibody's fact from its latest result(s): discordant same-day results are indeterminate."""
    label = k.text(f"labels.concepts.{name}")
    fact = {"id": f"antibody:{name}", "t": "antibody", "name": name, "state": "not-tested"}
    if not results:
        return fact, f"{label}: not tested", ()
    dated = sorted(results, key=lambda r: (r.time is not None, r.time or datetime.min, r.resource.reference))
    last_time = dated[-1].time
    latest = [r for r in dated if r.time == last_time]
    states = {r.state for r in latest}
    fact["state"] = states.pop() if len(states) == 1 else "indeterminate"
    if last_time is not None:
        fact["days_ago"] = days_before(last_time, now)
    shown = "; ".join(dict.fromkeys(r.shown for r in latest if r.shown))
    text = f"{label} {fact['state']} ({shown + ', ' if shown else ''}{day(last_time)})"
    return fact, text, tuple(dict.fromkeys(r.resource.reference for r in latest))


def relevant(k, data: dict) -> bool:
    """Tell whether a laboratory Observation can matter to a rule (cheap, before validation)."""
    if not is_final(data):
        return False
    if is_ck(k, data) or is_tsh(k, data) or antibody_names(k, data.get("code")):
        return True
    return any(antibody_names(k, as_dict(part).get("code")) for part in as_list(data.get("component")))


def is_tsh(k, data: dict) -> bool:
    """Tell whether an Observation is a TSH."""
    return matches(k, "tsh", data.get("code"))


def tsh_fact(
    k, observations: list[Resource], now: datetime, notes: list[str]
) -> tuple[dict, str, tuple[str, ...]]:
    """Return the latest final TSH: when, and whether it was high (hypothyroidism mimics myopathy)."""
    found = [(effective_time(r.data), r) for r in observations if is_tsh(k, r.data)]
    undated = [r for time, r in found if time is None]
    notes += [f"TSH result {r.reference} has no date and was not used." for r in undated]
    dated = sorted(((t, r) for t, r in found if t), key=lambda pair: (pair[0], pair[1].reference))
    fact = {"id": "tsh", "t": "tsh", "tested": bool(found)}
    if not dated:
        # Taken, but when is unknown: neither "not tested" nor recent, and its value is not read.
        text = "TSH: undated, not used" if undated else "TSH: not tested"
        return fact, text, tuple(r.reference for r in undated)
    time, latest = dated[-1]
    state, shown = read_result(k, "tsh", latest.data)
    fact.update(days_ago=days_before(time, now), high=state == "positive")
    reading = "high" if fact["high"] else "not high" if state == "negative" else "not interpreted"
    return fact, f"TSH {reading} ({shown + ', ' if shown else ''}{day(time)})", (latest.reference,)


def profile_fact(k, antibody_facts: list[dict]) -> tuple[dict, str, tuple[str, ...]]:
    """Count the positive antibodies in each syndrome group (labs.antibody-groups)."""
    positive = {f["name"] for f in antibody_facts if f["state"] == "positive"}
    fact = {"id": "antibody-profile", "t": "antibody-profile"}
    for group in k.children("labs.antibody-groups"):
        fact[f"positive_{group}"] = len(positive & set(k.value(f"labs.antibody-groups.{group}")))
    names = ", ".join(k.text(f"labels.concepts.{n}") for n in sorted(positive)) or "none"
    return fact, f"positive myositis antibodies: {names}", ()
