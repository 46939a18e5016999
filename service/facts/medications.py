"""Map medication records to statin exposure: current or past, start, last exposure and intensity."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rules.knowledge import RXNORM, normalise_system
from service.fhir import (
    Resource,
    as_dict,
    as_list,
    as_number,
    as_str,
    codings,
    day,
    days_before,
    matches,
    parse_time,
    texts,
)

MEDICATION_TYPES = (
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "MedicationDispense",
)
INTENSITIES = ("high", "moderate", "low")  # strongest first
SUPPLY_UNITS = {"d": 1, "wk": 7, "mo": 30, "a": 365}  # UCUM units of expectedSupplyDuration, in days
# Which statuses mean the patient is on the drug now, and which mean they were on it before.
CURRENT = {
    "MedicationRequest": {"active", "on-hold"},
    "MedicationStatement": {"active", "on-hold"},
}
PAST = {
    "MedicationRequest": {"completed", "stopped"},
    "MedicationStatement": {"completed", "stopped"},
    "MedicationAdministration": {"completed", "in-progress"},
    "MedicationDispense": {"completed"},
}


@dataclass(frozen=True)
class Exposure:
    resource: Resource
    current: bool
    start: datetime | None
    last: datetime | None  # the last day known or inferred to be on the drug
    last_known: bool  # an explicit end or dose date, not an inference
    intensity: str | None


class Medications:
    """Resolve a medication record's drug (inline, contained or referenced): what it holds, its route."""

    def __init__(self, k, medications: list[Resource]):
        self._k = k
        self._by_reference = {}
        for resource in medications:
            self._by_reference[resource.reference] = resource.data
            if resource.full_url:
                self._by_reference[resource.full_url] = resource.data
        # Orders and records carry products (SCD, SBD, BN); the value sets list ingredients.
        self._ingredients = {
            code: k.param(f"products.{group}.{name}").attributes["ingredient"]
            for group in k.children("products")
            for name in k.children(f"products.{group}")
            for code in k.value(f"products.{group}.{name}")
        }

    def _medication(self, data: dict) -> dict:
        reference = as_str(as_dict(data.get("medicationReference")).get("reference")) or ""
        if reference.startswith("#"):
            contained = [as_dict(r) for r in as_list(data.get("contained"))]
            return next((r for r in contained if r.get("id") == reference[1:]), {})
        return as_dict(self._by_reference.get(reference))

    def concepts(self, data: dict) -> list:
        """Return the drug's CodeableConcepts: code, a Medication's ingredients, a product's ingredient."""
        if "medicationCodeableConcept" in data:
            found = [data["medicationCodeableConcept"]]
        else:
            medication = self._medication(data)
            ingredients = [
                as_dict(i).get("itemCodeableConcept") for i in as_list(medication.get("ingredient"))
            ]
            found = [medication.get("code"), *ingredients]
        return found + self.product_ingredients(found)

    def product_ingredients(self, concepts: list) -> list[dict]:
        """Return the ingredient, as a CodeableConcept, of each RxNorm product code among the concepts."""
        codes = [
            self._ingredients.get(code or "")
            for concept in concepts
            for system, code in codings(concept)
            if normalise_system(system) == RXNORM
        ]
        return [{"coding": [{"system": RXNORM, "code": code}]} for code in dict.fromkeys(codes) if code]

    def identified(self, data: dict) -> bool:
        """Tell whether a medication record names its drug: a code or text, inline or on its Medication."""
        return any(texts(c) or any(code for _, code in codings(c)) for c in self.concepts(data))

    def matches(self, data: dict, valueset: str) -> bool:
        """Tell whether a medication record's drug is in a value set."""
        return any(matches(self._k, valueset, concept) for concept in self.concepts(data))

    def is_statin(self, data: dict) -> bool:
        """Tell whether a medication record is for a statin (ingredient, product, brand, ATC class, name)."""
        return any(is_statin(self._k, concept) for concept in self.concepts(data))

    def intensity(self, data: dict) -> str | None:
        """Return the statin intensity where the product tells it."""
        return next((level for level in INTENSITIES if self.matches(data, f"statin-{level}-intensity")), None)

    def systemic(self, data: dict) -> bool:
        """Tell whether a record's drug acts on the whole body: no local route, dose form or wording."""
        dosages = [
            as_dict(d) for d in [*as_list(data.get("dosageInstruction")), *as_list(data.get("dosage"))]
        ]
        if isinstance(data.get("dosage"), dict):  # MedicationAdministration: one dosage
            dosages.append(data["dosage"])
        routes = [d.get("route") for d in dosages]
        if any(matches(self._k, "local-route", r) for r in routes):
            return False
        if any(matches(self._k, "systemic-route", r) for r in routes):
            return True
        forms = [self._medication(data).get("form"), *self.concepts(data)]
        wording = [as_str(d.get("text")) for d in dosages]
        return not (
            any(matches(self._k, "local-route", f) for f in forms)
            or "local-route" in self._k.texted_as(w for w in wording if w)
        )


def is_statin(k, concept) -> bool:
    """Tell whether a CodeableConcept names a statin: ingredient, brand, ATC class or a statin product."""
    sets = ("statin-ingredients", *(f"statin-{i}-intensity" for i in INTENSITIES))
    return any(matches(k, s, concept) for s in sets)


def taken(resource: Resource) -> bool:
    """Tell whether a medication record's status means the drug was taken, now or before."""
    status = as_str(resource.data.get("status"))
    return status in CURRENT.get(resource.type, ()) or status in PAST.get(resource.type, ())


def exposure(medications: Medications, resource: Resource, now: datetime) -> Exposure | None:
    """Read one statin record as an exposure, or None when its status means it was never taken."""
    data, kind = resource.data, resource.type
    if not taken(resource):
        return None
    current = as_str(data.get("status")) in CURRENT.get(kind, ())
    period = as_dict(data.get("effectivePeriod"))
    if kind == "MedicationStatement":
        start = parse_time(period.get("start")) or parse_time(data.get("effectiveDateTime"))
        end, known = parse_time(period.get("end")), True
    elif kind == "MedicationRequest":
        start = parse_time(data.get("authoredOn"))
        end, known = _supply_end(data, start), False
    else:  # a dose given or handed over: that day is known exposure
        start = parse_time(data.get("effectiveDateTime") or data.get("whenHandedOver")) or parse_time(
            period.get("end")
        )
        end, known = start, start is not None
    if end is None:
        end, known = start, False
    if current and end is not None and known and end < now:
        current = False  # "active" with an end date already past: the record was not closed
    return Exposure(resource, current, start, end, known and end is not None, medications.intensity(data))


def _supply_end(data: dict, start: datetime | None) -> datetime | None:
    """Infer when a prescription's supply ran out: its validity end, else its start plus supply x fills."""
    dispense = as_dict(data.get("dispenseRequest"))
    end = parse_time(as_dict(dispense.get("validityPeriod")).get("end"))
    duration = as_dict(dispense.get("expectedSupplyDuration"))
    days = (as_number(duration.get("value")) or 0) * SUPPLY_UNITS.get(as_str(duration.get("code")) or "", 0)
    if end is None and start is not None and days > 0:
        repeats = dispense.get("numberOfRepeatsAllowed")
        fills = 1 + (
            repeats if isinstance(repeats, int) and not isinstance(repeats, bool) and repeats > 0 else 0
        )
        try:
            end = start + timedelta(days=days * fills)
        except OverflowError:  # a supply outlasting the calendar: its end is unknown
            return None
    return end


@dataclass(frozen=True)
class History:
    """One patient's statin exposure, summarised across all records."""

    records: tuple[Exposure, ...]
    available: bool  # medication requests or statements were sent (or fetched), even if none
    unidentified: int = 0  # records taken whose drug cannot be told: any of them may be a statin

    @property
    def current(self) -> bool:
        return any(e.current for e in self.records)

    @property
    def last(self) -> Exposure | None:
        """The record with the last day on the drug, when no statin is current."""
        if self.current:
            return None
        return max((e for e in self.records if e.last), key=lambda e: e.last, default=None)


def statin_fact(history: History, now: datetime) -> tuple[dict, str, tuple[str, ...]]:
    """Return the statin-exposure fact; unknown without requests or statements, or with unidentified drugs."""
    fact: dict = {"id": "statin", "t": "statin"}
    found = history.records
    if not found:
        fact["exposure"] = "unknown"
        if not history.available:
            return fact, "statin exposure: unknown (no medication requests or statements available)", ()
        if history.unidentified:
            count = f"{history.unidentified} medication record{'s' if history.unidentified > 1 else ''}"
            return fact, f"statin exposure: unknown ({count} could not be identified)", ()
        fact["exposure"] = "none-recorded"
        return fact, "statin: none recorded", ()
    fact["exposure"] = "current" if history.current else "past"
    starts = [e.start for e in found if e.start]
    if starts:
        fact["start_days_ago"] = days_before(min(starts), now)
    text = f"statin: {fact['exposure']}" + (
        f" since {day(min(starts))}" if starts and history.current else ""
    )
    last = history.last
    if last:
        fact["last_days_ago"] = days_before(last.last, now)
        fact["stop_known"] = last.last_known
        text += (
            f", last dose {day(last.last)} ({'recorded' if last.last_known else 'inferred from the orders'})"
        )
    current = [e for e in found if e.current]
    levels = [e.intensity for e in (current or found) if e.intensity]
    fact["intensity"] = min(levels, key=INTENSITIES.index) if levels else "unknown"
    if levels:
        text += f", {fact['intensity']} intensity"
    return fact, text, tuple(dict.fromkeys(e.resource.reference for e in found))
