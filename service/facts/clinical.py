"""Map Conditions and finding Observations to one fact per clinical concept: present, past or unknown."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.fhir import (
    Resource,
    as_dict,
    as_str,
    codings,
    day,
    days_before,
    effective_time,
    is_final,
    matches,
    names,
    parse_time,
)

CONCEPTS = (
    "proximal-weakness",
    "myalgia",
    "dysphagia",
    "respiratory-failure",
    "dermatomyositis-rash",
    "interstitial-lung-disease",
    "weight-loss",
    "malignancy",
    "diagnosis-imnm",
    "diagnosis-polymyositis",
    "diagnosis-dermatomyositis",
    "diagnosis-antisynthetase",
    "diagnosis-rhabdomyolysis",
    "diagnosis-inclusion-body-myositis",
    "statin-associated-muscle-symptoms",
    "statin-myopathy",
    "hypothyroidism",
    "mixed-connective-tissue-disease",
    "systemic-sclerosis",
)
CURRENT = frozenset({"active", "recurrence", "relapse"})
PAST = frozenset({"inactive", "remission", "resolved"})
CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
# Only confirmed conditions count, or those that do not say (many EHRs omit verificationStatus).
# Refuted and entered-in-error never count; unconfirmed, provisional and differential do not yet.
COUNTED_VERIFICATION = frozenset({"confirmed", None})
NAMED = frozenset(CONCEPTS)


MAX_NAMED = 80  # characters of a recorded name kept on a fact


@dataclass(frozen=True)
class Mention:
    resource: Resource
    state: str  # present | past
    onset: datetime | None
    noted: datetime | None  # when the record last said so


def status_code(concept, system: str) -> str | None:
    """Return the first code of a status CodeableConcept in its system (or with no system)."""
    for coding_system, code in codings(concept):
        if coding_system in (system, None) and code:
            return code
    return None


def condition_state(data: dict) -> str | None:
    """Return present or past for a Condition that counts, else None."""
    if status_code(data.get("verificationStatus"), VERIFICATION_STATUS) not in COUNTED_VERIFICATION:
        return None
    status = status_code(data.get("clinicalStatus"), CLINICAL_STATUS)
    if status is None or status in CURRENT:
        return "present"
    return "past" if status in PAST else None


def condition_onset(data: dict) -> datetime | None:
    """Return when a Condition began: onset[x], else when it was recorded."""
    return (
        parse_time(data.get("onsetDateTime"))
        or parse_time(as_dict(data.get("onsetPeriod")).get("start"))
        or parse_time(data.get("recordedDate"))
    )


def observation_present(k, data: dict) -> bool:
    """Tell whether a finding Observation asserts the finding (not absent, not unanswered)."""
    if isinstance(data.get("valueBoolean"), bool):
        return data["valueBoolean"]
    if "valueCodeableConcept" in data:
        value = data["valueCodeableConcept"]
        return not matches(k, "result-negative", value)
    if "valueString" in data:
        return "result-negative" not in k.texted_as([as_str(data["valueString"])])
    return "dataAbsentReason" not in data


def mentions(k, name: str, conditions: list[Resource], observations: list[Resource]) -> list[Mention]:
    """Find every counted Condition or Observation naming one concept."""
    found = []
    for resource in conditions:
        state = condition_state(resource.data)
        if state and matches(k, name, resource.data.get("code")):
            onset = condition_onset(resource.data)
            noted = max(filter(None, (onset, parse_time(resource.data.get("recordedDate")))), default=None)
            found.append(Mention(resource, state, onset, noted))
    for resource in observations:
        data = resource.data
        if not is_final(data):
            continue
        named_by_code = matches(k, name, data.get("code")) and observation_present(k, data)
        named_by_value = matches(k, name, data.get("valueCodeableConcept"))
        if named_by_code or named_by_value:
            found.append(Mention(resource, "present", effective_time(data), effective_time(data)))
    return found


def clinical_fact(k, name: str, found: list[Mention], now: datetime) -> tuple[dict, str, tuple[str, ...]]:
    """Return one concept's fact: present beats past; onset is the earliest known."""
    label = k.text(f"labels.concepts.{name}")
    fact = {"id": f"clinical:{name}", "t": "clinical", "name": name, "state": "unknown"}
    if not found:
        return fact, f"{label}: not recorded", ()
    fact["state"] = "present" if any(f.state == "present" for f in found) else "past"
    onsets = [f.onset for f in found if f.onset]
    if onsets:
        fact["onset_days_ago"] = days_before(min(onsets), now)
    noted = [f.noted for f in found if f.noted and f.state == "present"]
    if noted:
        fact["noted_days_ago"] = days_before(max(noted), now)
    # A present record's name before a past one's, the earliest onset first, then the name itself: the
    # same name whatever order the records came in.
    recorded = [
        (f.state != "present", f.onset is None, f.onset or now, name)
        for f in found
        if (name := recorded_name(f.resource.data))
    ]
    if recorded:
        fact["named"] = min(recorded)[-1][:MAX_NAMED]
    since = f" since {day(min(onsets))}" if onsets else ""
    text = f"{label} recorded ({fact['state']}{since})"
    return fact, text, tuple(dict.fromkeys(f.resource.reference for f in found))


def recorded_name(data: dict) -> str | None:
    """Return what the record calls the concept: its code's text, else its first coding's display."""
    concept = data.get("code") or {}
    if isinstance(concept, dict) and isinstance(concept.get("text"), str) and concept["text"].strip():
        return concept["text"].strip()
    for coding in concept.get("coding", []) if isinstance(concept, dict) else []:
        if isinstance(coding, dict) and isinstance(coding.get("display"), str) and coding["display"].strip():
            return coding["display"].strip()
    return None


def relevant(k, resource: Resource) -> bool:
    """Tell whether a Condition or non-laboratory Observation names any concept (before validation)."""
    data = resource.data
    if resource.type == "Condition":
        if condition_state(data) is None:
            return False
        concepts = [data.get("code")]
    elif is_final(data):
        concepts = [data.get("code"), data.get("valueCodeableConcept")]
    else:
        return False
    return any(names(k, concept) & NAMED for concept in concepts)
