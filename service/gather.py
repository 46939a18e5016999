"""Gather one patient's FHIR R4 resources: from a CDS Hooks prefetch, or from a posted Bundle."""

from __future__ import annotations

from dataclasses import dataclass

from service.facts.fhir import Resource, as_dict, as_list, as_str
from service.hooks import HookRequest
from service.outcome import error

BUNDLE_TYPES = frozenset({"collection", "searchset", "transaction", "batch"})
FAILED = frozenset({"error", "fatal"})
# Where each resource type names its patient.
SUBJECT = {
    "Observation": "subject",
    "Condition": "subject",
    "DiagnosticReport": "subject",
    "MedicationRequest": "subject",
    "MedicationStatement": "subject",
    "MedicationAdministration": "subject",
    "MedicationDispense": "subject",
    "AllergyIntolerance": "patient",
    "Procedure": "subject",
    "ServiceRequest": "subject",
}


@dataclass(frozen=True)
class Gathered:
    patient_id: str
    resources: tuple[Resource, ...]
    available: frozenset[str]  # resource types whose data was sent, even if there was none
    drafts: tuple[Resource, ...] = ()  # orders being placed now (order-select: only the selected ones)


def from_prefetch(request: HookRequest) -> Gathered:
    """Collect the prefetched resources, key by key: null means no data, a missing required key is a 412."""
    resources: list[Resource] = []
    available: set[str] = set()
    for key in request.service.prefetch:
        where = f"prefetch.{key.key}"
        if key.key not in request.prefetch:
            if key.required:
                raise error(
                    412,
                    "processing",
                    f"required prefetch key {key.key!r} is missing and no FHIR server was given to fetch it",
                    where,
                )
            continue
        available.add(key.resource_type)
        value = request.prefetch[key.key]
        if value is not None:
            resources += _unpack(value, where)
    drafts = _drafts(request)
    _check_subjects([*resources, *drafts], request.patient_id)
    return Gathered(request.patient_id, tuple(resources), frozenset(available), tuple(drafts))


def _drafts(request: HookRequest) -> list[Resource]:
    """Return the draft orders in context: on order-select, only those the user selected."""
    if "draftOrders" not in request.context:
        return []
    drafts = _unpack(request.context["draftOrders"], "context.draftOrders")
    selections = request.context.get("selections")
    if selections is None:
        return drafts
    return [d for d in drafts if d.reference in selections]


def _unpack(value: dict, where: str) -> list[Resource]:
    if value.get("resourceType") == "OperationOutcome":
        _check_outcome(value, where)
        return []
    if value.get("resourceType") != "Bundle":
        return [Resource(value, location=where)]
    found = []
    for index, entry in enumerate(as_list(value.get("entry"))):
        resource = as_dict(entry).get("resource")
        if resource is None:
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise error(
                400,
                "structure",
                "a Bundle entry's resource must be a FHIR resource",
                f"{where}.entry[{index}].resource",
            )
        if resource["resourceType"] == "OperationOutcome":
            _check_outcome(resource, f"{where}.entry[{index}]")
            continue
        found.append(Resource(resource, as_str(entry.get("fullUrl")), f"{where}.entry[{index}].resource"))
    return found


def _check_outcome(outcome: dict, where: str) -> None:
    """Fail on an OperationOutcome reporting an error (the client could not prefetch); ignore warnings."""
    severities = {as_dict(issue).get("severity") for issue in as_list(outcome.get("issue"))}
    if severities & FAILED or not severities:
        raise error(
            412, "processing", "the client reported that this prefetch failed (OperationOutcome)", where
        )


def from_bundle(bundle, with_drafts: bool = False) -> Gathered:
    """Collect one patient's resources from a Bundle; with_drafts, its draft MedicationRequests are orders."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise error(400, "structure", "the body must be a FHIR Bundle", "resourceType")
    if bundle.get("type") not in BUNDLE_TYPES:
        raise error(
            400, "value", f"Bundle.type must be one of {', '.join(sorted(BUNDLE_TYPES))}", "Bundle.type"
        )
    resources = _unpack(bundle, "Bundle")
    patients = [r for r in resources if r.type == "Patient"]
    if not patients:
        raise error(400, "invalid", "the Bundle holds no Patient", "Bundle.entry")
    identities = {p.data.get("id") or p.full_url for p in patients}
    if None in identities:
        raise error(400, "invalid", "a Patient in the Bundle has neither id nor fullUrl", "Bundle.entry")
    if len(identities) > 1:
        raise error(
            400,
            "invalid",
            "the Bundle holds more than one patient; post one patient per Bundle",
            "Bundle.entry",
        )
    patient = patients[0]
    patient_id = patient.data.get("id") or patient.full_url
    _check_subjects(resources, patient_id, aliases={patient.full_url} - {None})
    drafts = [
        r
        for r in resources
        if with_drafts and r.type == "MedicationRequest" and r.data.get("status") == "draft"
    ]
    record = [r for r in resources if not any(r is d for d in drafts)]
    # A Bundle is the record as the sender holds it: what it lacks is absent, not unknown.
    return Gathered(patient_id, tuple(record), frozenset({"Patient", *SUBJECT}), tuple(drafts))


def _check_subjects(
    resources: list[Resource], patient_id: str, aliases: frozenset | set = frozenset()
) -> None:
    """Refuse data about anyone but the patient in context: it would make a wrong card."""
    for resource in resources:
        if resource.type == "Patient":
            same = resource.data.get("id") in (None, patient_id) or resource.full_url in aliases
        elif resource.type in SUBJECT:
            reference = as_str(as_dict(resource.data.get(SUBJECT[resource.type])).get("reference"))
            same = reference is None or reference in aliases or patient_id_of(reference) == patient_id
        else:
            continue
        if not same:
            raise error(
                400,
                "invalid",
                f"a {resource.type} belongs to a different patient than the one in context",
                resource.location,
            )


def patient_id_of(reference: str) -> str | None:
    """Return the id in a Patient reference (relative or absolute), else None."""
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient":
        return parts[-1]
    if len(parts) >= 4 and parts[-4] == "Patient" and parts[-2] == "_history":
        return parts[-3]
    return None
