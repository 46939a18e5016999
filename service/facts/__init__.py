"""Map gathered FHIR R4 resources to the flat facts the rules match, and what each fact rests on.

Every evaluation asserts the same fact ids: one patient, one CK summary, one result per antibody,
one state per clinical concept, one biopsy, one latest muscle MRI (and one fact per MRI study)
and one statin exposure. A concept with no data is
asserted as unknown or not-tested, so rules join on facts that always exist and never rely on the
engine's order-dependent negation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from service.facts import (
    allergies,
    biopsy,
    clinical,
    imaging,
    kinetics,
    labs,
    medications,
    respiratory,
    screening,
    treatments,
)
from service.fhir import (
    DRAFT_ORDER,
    InvalidResource,
    Resource,
    completed_years,
    day,
    naming_once,
    parse_time,
    validate,
)

__all__ = ["Basis", "FactSet", "InvalidData", "Resource", "Selected", "build", "from_selected", "select"]


@dataclass(frozen=True)
class Basis:
    """What a fact rests on, for the card: a sentence and the resources it came from."""

    text: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class Marker:
    """A dated report to show on the timeline: what it is and what it reads."""

    time: datetime | None
    kind: str  # "biopsy" or "screening"
    reading: str
    reference: str


@dataclass(frozen=True)
class Timeline:
    """The dated values behind the facts, as read for them, for the explanation page to draw."""

    ck: tuple[labs.CkResult, ...] = ()
    statins: tuple[medications.Exposure, ...] = ()
    last_statin: medications.Exposure | None = None  # the record with the last dose, once stopped
    treatments: tuple[tuple[str, medications.Exposure], ...] = ()  # (class, course)
    fvc: tuple[respiratory.FvcResult, ...] = ()
    markers: tuple[Marker, ...] = ()


@dataclass(frozen=True)
class FactSet:
    facts: tuple[dict, ...]
    basis: Mapping[str, Basis]
    notes: tuple[str, ...]  # data that was sent but could not be used, in words
    timeline: Timeline = field(default_factory=Timeline)


class InvalidData(ValueError):
    """Resources that matter to the rules are not valid FHIR R4 in an element we read."""

    def __init__(self, problems: list[InvalidResource]):
        super().__init__(f"{len(problems)} resource(s) are not valid FHIR R4")
        self.problems = problems


@dataclass(frozen=True)
class Selected:
    """The resources that can matter to a rule, by what they are, each with the elements we read valid."""

    patients: list[Resource]
    lab_results: list[Resource]
    spirometry: list[Resource]
    findings: list[Resource]
    conditions: list[Resource]
    allergies: list[Resource]  # current statin allergies and intolerances
    reports: list[Resource]
    imaging: list[Resource]
    studies: list[Resource]
    drugs: medications.Medications
    statins: list[Resource]
    unidentified: list[Resource]  # medication records taken whose drug cannot be told
    draft_statins: list[Resource]
    draft_unidentified: list[Resource]  # orders being placed whose drug cannot be told: any may be a statin
    therapy: list[Resource]
    left_out: tuple[str, ...] = ()  # invalid resources left out, in words, for the card
    ignored: tuple[str, ...] = ()  # elements we do not read that are malformed or missing: where, and why


@naming_once()
def select(k, resources: Iterable[Resource], drafts: Iterable[Resource] = ()) -> Selected:
    """Pick what can matter to a rule and validate what we read of it; the rest is never parsed as FHIR.

    An invalid resource is refused (InvalidData), except when a statin is, or may be, being ordered: then
    it is left out and the cards say so, as a refusal would show the clinician nothing at all.
    """
    by_type: dict[str, list[Resource]] = {}
    for resource in resources:
        by_type.setdefault(resource.type, []).append(resource)
    drafts = list(drafts)
    ignored: list[str] = []
    # A draft is never refused: one whose drug cannot be read is an order of a drug that cannot be told.
    orders, unreadable = [], set()
    for order in (r for r in drafts if r.type == "MedicationRequest"):
        try:
            ignored += _located(order, validate(order, DRAFT_ORDER))
        except InvalidResource as exc:
            ignored += _located(order, exc.problems)
            unreadable.add(id(order))
        # With no medication[x] yet (an order screen just opened), there is nothing to tell.
        if any(name.startswith("medication") for name in order.data):
            orders.append(order)
    observations = by_type.get("Observation", [])
    lab_results = [r for r in observations if labs.relevant(k, r.data)]
    taken = {id(r) for r in lab_results}
    # A draft order may name a Medication sent beside it among the draft orders.
    drugs = medications.Medications(
        k, [*by_type.get("Medication", []), *(r for r in drafts if r.type == "Medication")]
    )
    records = [r for kind in medications.MEDICATION_TYPES for r in by_type.get(kind, [])]
    chosen = {
        "patients": by_type.get("Patient", []),
        "lab_results": lab_results,
        "spirometry": [r for r in observations if respiratory.is_fvc(k, r.data)],
        "findings": [r for r in observations if id(r) not in taken and clinical.relevant(k, r)],
        "conditions": [r for r in by_type.get("Condition", []) if clinical.relevant(k, r)],
        "allergies": [
            r for r in by_type.get("AllergyIntolerance", []) if allergies.is_statin_allergy(k, drugs, r.data)
        ],
        "reports": [r for r in by_type.get("DiagnosticReport", []) if biopsy.relevant(k, r)],
        "imaging": [r for r in by_type.get("DiagnosticReport", []) if imaging.relevant(k, r)],
        "studies": [
            r for kind in screening.RECORDS for r in by_type.get(kind, []) if screening.parts(k, r.data)
        ],
        "statins": [r for r in records if drugs.is_statin(r.data)],
        "therapy": [r for r in records if treatments.treatment_classes(k, drugs, r.data)],
    }
    draft_statins = [r for r in orders if id(r) not in unreadable and drugs.is_statin(r.data)]
    draft_unidentified = [r for r in orders if id(r) in unreadable or not drugs.identified(r.data)]
    invalid = []
    for resource in {id(r): r for listed in chosen.values() for r in listed}.values():
        try:
            ignored += _located(resource, validate(resource))
        except InvalidResource as exc:
            invalid.append(exc)
    if invalid and not (draft_statins or draft_unidentified):
        raise InvalidData(invalid)
    out = {id(exc.resource) for exc in invalid}
    chosen = {name: [r for r in listed if id(r) not in out] for name, listed in chosen.items()}
    return Selected(
        **chosen,
        drugs=drugs,
        unidentified=[r for r in records if medications.taken(r) and not drugs.identified(r.data)],
        draft_statins=draft_statins,
        draft_unidentified=draft_unidentified,
        left_out=tuple(_left_out(exc) for exc in invalid),
        ignored=tuple(dict.fromkeys(ignored)),
    )


def _located(resource: Resource, problems: list[tuple[str, str]]) -> list[str]:
    """Say where each problem is in the request and what it is: the path, never the value."""
    return [
        f"{'.'.join(p for p in (resource.location or resource.type, path) if p)}: {problem}"
        for path, problem in problems
    ]


def _left_out(exc: InvalidResource) -> str:
    paths = ", ".join(dict.fromkeys(path or "the resource" for path, _ in exc.problems))
    where = f" ({exc.resource.location})" if exc.resource.location else ""
    return (
        f"{exc.resource.reference}{where} could not be read (not valid FHIR R4 at {paths}) and was left out."
    )


def build(
    k,
    resources: Iterable[Resource],
    *,
    now: datetime,
    available: frozenset[str],
    drafts: Iterable[Resource] = (),
) -> FactSet:
    """Select what can matter, validate it, and map it to facts; drafts are the orders being placed."""
    with naming_once():
        return from_selected(k, select(k, resources, drafts), now=now, available=available)


@naming_once()
def from_selected(k, selected: Selected, *, now: datetime, available: frozenset[str]) -> FactSet:
    """Map the selected resources to facts, each with what it rests on."""
    patients, lab_results, drugs = selected.patients, selected.lab_results, selected.drugs
    notes: list[str] = list(selected.left_out)
    entries = [patient_fact(patients[0] if patients else None, now)]
    sex = entries[0][0]["sex"]
    ck_results = labs.ck_results(k, [r for r in lab_results if labs.is_ck(k, r.data)], notes, sex)
    entries.append(labs.ck_fact(k, ck_results, now))
    entries.append(labs.tsh_fact(k, lab_results, now, notes))
    antibody_results = labs.antibody_results(k, lab_results, notes)
    antibodies = [labs.antibody_fact(k, name, antibody_results[name], now) for name in labs.ANTIBODIES]
    entries += [*antibodies, labs.profile_fact(k, [fact for fact, _, _ in antibodies])]
    concepts = [
        clinical.clinical_fact(
            k, name, clinical.mentions(k, name, selected.conditions, selected.findings), now
        )
        for name in clinical.CONCEPTS
    ]
    entries += concepts
    birth = parse_time(patients[0].data.get("birthDate")) if patients else None
    onset = screening.onset_fact(k, ck_results, {f["name"]: (f, t, r) for f, t, r in concepts}, birth, now)
    reported = "DiagnosticReport" in available
    recorded = bool(available.intersection(screening.RECORDS))
    studies = screening.readings(k, selected.studies)  # each record read once, for the fact and the page
    entries += [onset, screening.screening_fact(k, studies, onset[0], now, recorded)]
    biopsies = [(r, biopsy.features(k, r.data)) for r in selected.reports]  # each report read once
    entries.append(biopsy.biopsy_fact(k, biopsies, now, reported))
    entries += imaging.mri_facts(k, selected.imaging, now, reported)
    unidentified = len(selected.unidentified)
    if unidentified:
        notes.append(
            f"{unidentified} medication record{'s' if unidentified > 1 else ''} could not be identified "
            "(no drug code, or a Medication that was not sent) and "
            f"{'were' if unidentified > 1 else 'was'} not used."
        )
    history = medications.History(
        records=tuple(e for e in (medications.exposure(drugs, r, now) for r in selected.statins) if e),
        # Administrations alone cannot show that no statin was prescribed or taken.
        available=bool({"MedicationRequest", "MedicationStatement"} & available),
        unidentified=unidentified,
    )
    entries.append(medications.statin_fact(history, now))
    entries.append(allergies.allergy_fact(k, selected.allergies, "AllergyIntolerance" in available))
    entries.append(kinetics.kinetics_fact(k, history, ck_results, now))
    entries.append(draft_fact(selected.draft_statins, selected.draft_unidentified))
    fvc = respiratory.fvc_results(selected.spirometry, notes)
    entries.append(respiratory.fvc_fact(k, fvc, now))
    courses = treatments.courses(k, drugs, selected.therapy, now)
    entries.append(treatments.immunosuppression_fact(k, courses, now))
    timeline = Timeline(
        ck=tuple(ck_results),
        statins=history.records,
        last_statin=history.last,
        treatments=tuple(courses),
        fvc=tuple(fvc),
        markers=tuple(
            [Marker(*biopsy.reading(k, r, found), r.reference) for r, found in biopsies]
            + [
                Marker(*screening.reading(found, state, time), r.reference)
                for r, state, time, found in studies
            ]
        ),
    )
    return FactSet(
        facts=tuple(fact for fact, _, _ in entries),
        basis=MappingProxyType({fact["id"]: Basis(text, refs) for fact, text, refs in entries}),
        notes=tuple(dict.fromkeys(notes)),
        timeline=timeline,
    )


def draft_fact(
    draft_statins: list[Resource], unidentified: list[Resource]
) -> tuple[dict, str, tuple[str, ...]]:
    """Return how many statins, and orders of a drug that cannot be told, are being placed now."""
    fact = {
        "id": "draft-statin",
        "t": "draft-statin",
        "count": len(draft_statins),
        "unidentified": len(unidentified),
    }
    if draft_statins or not unidentified:
        return (
            fact,
            f"statin orders being placed: {len(draft_statins)}",
            tuple(r.reference for r in draft_statins),
        )
    # Only with no statin among them: a card suggests deleting the orders this fact names.
    return (
        fact,
        f"orders whose drug cannot be told: {len(unidentified)}",
        tuple(r.reference for r in unidentified),
    )


def patient_fact(resource: Resource | None, now: datetime) -> tuple[dict, str, tuple[str, ...]]:
    """Return the patient's age at now (years) and sex; either may be unknown."""
    fact: dict = {"id": "patient", "t": "patient", "sex": "unknown", "adult": "unknown"}
    if resource is None:
        return fact, "patient: no demographics", ()
    data = resource.data
    if data.get("gender") in ("female", "male", "other"):
        fact["sex"] = data["gender"]
    birth = parse_time(data.get("birthDate"))
    text = f"patient: {fact['sex']}"
    if birth:
        fact["age"] = completed_years(birth, now)
        fact["adult"] = "yes" if fact["age"] >= 18 else "no"
        text += f", born {day(birth)[:4]}"
    return fact, text, (resource.reference,)
