"""Map AllergyIntolerance records to one fact: a statin allergy, and whether it harmed muscle."""

from __future__ import annotations

from service.facts.clinical import status_code
from service.facts.medications import Medications, is_statin
from service.fhir import Resource, as_dict, as_list, as_str, day, matches, parse_time

CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
# Inactive or resolved allergies, refuted ones and records entered in error never count; unconfirmed
# ones do (an allergy is recorded to be heeded before it is proven).
NOT_COUNTED = frozenset({"refuted", "entered-in-error"})


def counts(data: dict) -> bool:
    """Tell whether an AllergyIntolerance is current and not refuted or entered in error."""
    if status_code(data.get("verificationStatus"), VERIFICATION_STATUS) in NOT_COUNTED:
        return False
    return status_code(data.get("clinicalStatus"), CLINICAL_STATUS) in (None, "active")


def is_statin_allergy(k, drugs: Medications, data: dict) -> bool:
    """Tell whether a current AllergyIntolerance is to a statin: class, ingredient, product or brand."""
    if not counts(data):
        return False
    code = data.get("code")
    return matches(k, "statin-allergy", code) or any(
        is_statin(k, concept) for concept in [code, *drugs.product_ingredients([code])]
    )


def for_myopathy(k, data: dict) -> bool:
    """Tell whether a reaction harmed muscle: myopathy, myositis, rhabdomyolysis, raised CK, pain."""
    for reaction in map(as_dict, as_list(data.get("reaction"))):
        if any(matches(k, "muscle-reaction", m) for m in as_list(reaction.get("manifestation"))):
            return True
        if "muscle-reaction" in k.texted_as([as_str(reaction.get("description")) or ""]):
            return True
    return False


def allergy_fact(k, records: list[Resource], available: bool) -> tuple[dict, str, tuple[str, ...]]:
    """Return the statin-allergy fact: present (and whether for myopathy), none recorded, or unknown."""
    fact: dict = {"id": "statin-allergy", "t": "statin-allergy", "state": "unknown", "myopathy": False}
    if not records:
        if not available:
            return fact, "statin allergy: unknown (no allergy records available)", ()
        fact["state"] = "none-recorded"
        return fact, "statin allergy: none recorded", ()
    muscle = [r for r in records if for_myopathy(k, r.data)]
    fact.update(state="present", myopathy=bool(muscle))
    shown = muscle or records
    recorded = [parse_time(r.data.get("recordedDate")) for r in shown]
    since = max(filter(None, recorded), default=None)
    text = "statin allergy recorded" + (" with a muscle reaction" if muscle else "")
    text += f" ({day(since)})" if since else ""
    return fact, text, tuple(dict.fromkeys(r.reference for r in shown))
