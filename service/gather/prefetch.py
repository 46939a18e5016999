"""Gather one patient's FHIR R4 resources: from a CDS Hooks prefetch, or from a posted Bundle."""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from dataclasses import dataclass
from urllib.parse import quote

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource as FhirResource

from service.fhir import Resource, as_dict, as_list, as_str, is_resource
from service.gather.bindings import Caller
from service.gather.fhirclient import Answer, Bearer, FhirClient, Query, reports_failure
from service.hooks import SERVICES, HookRequest, PrefetchKey
from service.logs import ms_since
from service.outcome import ApiError, Issue, error

log = logging.getLogger(__name__)

BUNDLE_TYPES = frozenset({"collection", "searchset", "transaction", "batch"})  # those /evaluate takes
# http://hl7.org/fhir/R4/valueset-bundle-type.html
R4_BUNDLE_TYPES = BUNDLE_TYPES | {"document", "message", "transaction-response", "batch-response", "history"}
_MISSING = object()
# Any key may hold these whatever it asks for: the spec's report of a failed or partial prefetch, and
# the Medications that medication resources point to.
ALWAYS_ACCEPTED = frozenset({"OperationOutcome", "Medication"})
UNMATCHED_MODES = frozenset({"include", "outcome"})  # Bundle.entry.search.mode of what did not match
TOKEN = re.compile(r"\{\{context\.(\w+)\}\}")
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
    available: frozenset[str]  # resource types whose data was sent or fetched, even if there was none
    drafts: tuple[Resource, ...] = ()  # orders being placed now (order-select: only the selected ones)
    out_of_time: bool = False  # the fetch budget ran out before every key came in
    ignored: tuple[str, ...] = ()  # what we do not read but was malformed or missing: where, and why


def from_prefetch(
    request: HookRequest,
    fhir: FhirClient,
    *,
    until: float = math.inf,
    failed_prefetch: str = "fetch",
    caller: Caller | None = None,
) -> Gathered:
    """Take each key as sent (null means no data), else fetch it; a required key not had is a 412."""
    drafts = _drafts(request)  # a malformed draft order is refused before anything is fetched
    found, wanted = _sent(request, failed_prefetch)
    answers = _fetch(request, wanted, fhir, until, caller) if wanted and request.fhir_server else {}
    found |= {key: _fetched(key, answer) for key, answer in answers.items() if answer.failure is None}
    late = {key for key, answer in answers.items() if answer.failure and answer.failure.reason == "deadline"}
    unobtainable = [
        Issue(
            "processing",
            f"required prefetch key {key.key!r} {_why_not(request, key, answers)}",
            f"prefetch.{key.key}",
        )
        for key in wanted
        if key.required and key not in found and key not in late
    ]
    if unobtainable:
        raise ApiError(412, *unobtainable)
    resources = [r for listed in found.values() for r in listed]
    _check_subjects([*resources, *drafts], request.patient_id)
    available = frozenset(key.resource_type for key in found)
    return Gathered(
        request.patient_id,
        tuple(resources),
        available,
        tuple(drafts),
        out_of_time=bool(late),
        ignored=_untyped(request),
    )


def _untyped(request: HookRequest) -> tuple[str, ...]:
    """Name the Bundles sent without a type: R4 requires one, but we read only their entries."""
    sent = {f"prefetch.{key}": value for key, value in request.prefetch.items()}
    sent["context.draftOrders"] = request.context.get("draftOrders")
    return tuple(
        f"{where}.type: Bundle.type is required but missing or not an R4 bundle type"
        for where, value in sent.items()
        if as_dict(value).get("resourceType") == "Bundle"
        and as_str(as_dict(value).get("type")) not in R4_BUNDLE_TYPES
    )


def _sent(
    request: HookRequest, failed_prefetch: str
) -> tuple[dict[PrefetchKey, list[Resource]], list[PrefetchKey]]:
    """Sort the keys into those the client sent usable (with their resources) and those to fetch."""
    found: dict[PrefetchKey, list[Resource]] = {}
    wanted: list[PrefetchKey] = []
    for key in request.service.prefetch:
        value = request.prefetch.get(key.key, _MISSING)
        failed = _failed(value)
        if value is _MISSING or (failed and failed_prefetch == "fetch"):
            wanted.append(key)
        elif not failed:
            found[key] = [] if value is None else _unpack(_of_its_types(key, value), f"prefetch.{key.key}")
        elif failed_prefetch == "fail" or key.required:
            raise error(
                412,
                "processing",
                f"the client reported that prefetch key {key.key!r} failed (OperationOutcome)",
                f"prefetch.{key.key}",
            )
    return found, wanted


def _of_its_types(key: PrefetchKey, value: dict) -> dict:
    """Refuse what the key's query cannot return: no R4 type, or a matched resource of another type."""
    where = f"prefetch.{key.key}"
    if value.get("resourceType") != "Bundle":
        _check_type(key, value, where, matched=True)
        return value
    for index, entry in enumerate(_entries(value, where)):
        if is_resource(entry.get("resource")):  # anything else _unpack refuses
            matched = as_dict(entry.get("search")).get("mode") not in UNMATCHED_MODES
            _check_type(key, entry["resource"], f"{where}.entry[{index}].resource", matched)
    return value


def _check_type(key: PrefetchKey, resource: dict, where: str, matched: bool) -> None:
    kind = resource["resourceType"]
    if not _is_resource_type(kind):
        raise error(400, "value", f"{kind!r} is not a FHIR R4 resource type", f"{where}.resourceType")
    if matched and kind not in {key.resource_type, *ALWAYS_ACCEPTED}:
        raise error(
            400,
            "value",
            f"prefetch key {key.key!r} asks for {key.resource_type} resources, not {kind}",
            f"{where}.resourceType",
        )


@functools.lru_cache(maxsize=1024)  # bounded: the names come from clients
def _is_resource_type(name: str) -> bool:
    try:
        model = get_fhir_model_class(name)
    except ValueError:
        return False
    return issubclass(model, FhirResource) and name not in ("Resource", "DomainResource")


def _fetched(key: PrefetchKey, answer: Answer) -> list[Resource]:
    return [
        Resource(resource, full_url, f"fetched.{key.key}.entry[{index}].resource")
        for index, (resource, full_url) in enumerate(answer.entries)
    ]


def _drafts(request: HookRequest) -> list[Resource]:
    """Return the draft orders in context: on order-select, only those the user selected."""
    if "draftOrders" not in request.context:
        return []
    drafts = _unpack(request.context["draftOrders"], "context.draftOrders")
    selections = request.context.get("selections")
    if selections is None:
        return drafts
    selected = set(selections)
    return [d for d in drafts if d.reference in selected]


def _fetch(
    request: HookRequest, keys: list[PrefetchKey], fhir: FhirClient, until: float, caller: Caller | None
) -> dict[PrefetchKey, Answer]:
    """Run the keys' own query templates on the client's FHIR server, if it is one we may contact."""
    refusal = fhir.refusal(request.fhir_server)
    if refusal:
        raise error(403, "forbidden", refusal, "fhirServer")
    if request.fhir_authorization is not None:
        # The EHR's token, even one the server refuses: its refusal is the EHR's decision, never overridden.
        credentials = "ehr"
        token = as_str(request.fhir_authorization.get("access_token"))
        auth = Bearer(token) if token else None
    else:
        auth = fhir.bindings.credentials(request.fhir_server, caller)
        credentials = "backend" if auth is not None else "none"
    started = time.perf_counter()
    queries = {key.key: Query(_fill(key.query, request.context), key.resource_type) for key in keys}
    answers = fhir.fetch(request.fhir_server, auth, queries, until)
    fields = {"hookInstance": request.hook_instance, "credentials": credentials}
    log.info(
        "fetched",
        extra={
            "fields": {
                **fields,
                "ms": ms_since(started),
                "keys": {key: _summary(answer) for key, answer in answers.items()},
            }
        },
    )
    failures = {answer.failure for answer in answers.values() if answer.failure}
    refused = sorted({failure.describe() for failure in failures if failure.reason == "refused"})
    if refused:
        log.warning("fhir access refused", extra={"fields": {**fields, "reasons": refused}})
    return {key: answers[key.key] for key in keys}


def _why_not(request: HookRequest, key: PrefetchKey, answers: dict[PrefetchKey, Answer]) -> str:
    if key in answers:
        return f"could not be fetched: {answers[key].failure.describe()}"
    sent = "reported failed" if key.key in request.prefetch else "missing"
    return f"is {sent} and no FHIR server was given to fetch it"


def _fill(template: str, context) -> str:
    """Put the request's context values, URL-encoded, in place of a template's {{context.name}} tokens."""
    return TOKEN.sub(lambda token: quote(str(context[token[1]]), safe=""), template)


def _summary(answer: Answer) -> dict:
    if answer.failure:
        return {"failed": answer.failure.reason, "status": answer.failure.status, "ms": answer.ms}
    return {"resources": len(answer.entries), "pages": answer.pages, "ms": answer.ms}


def _failed(value) -> bool:
    """Say whether a sent value, or an entry of its Bundle, is an OperationOutcome reporting a failure."""
    if not isinstance(value, dict):
        return False
    candidates = [value, *(as_dict(entry).get("resource") for entry in as_list(value.get("entry")))]
    return any(
        isinstance(c, dict) and c.get("resourceType") == "OperationOutcome" and reports_failure(c)
        for c in candidates
    )


def _unpack(value: dict, where: str) -> list[Resource]:
    """Return the resources of a sent value or Bundle; OperationOutcomes (warnings by now) are skipped."""
    if value.get("resourceType") == "OperationOutcome":
        return []
    if value.get("resourceType") != "Bundle":
        return [Resource(value, location=where)]
    found = []
    for index, entry in enumerate(_entries(value, where)):
        resource = entry.get("resource")
        if resource is None:
            continue
        if not is_resource(resource):
            raise error(
                400,
                "structure",
                "a Bundle entry's resource must be a FHIR resource",
                f"{where}.entry[{index}].resource",
            )
        if resource["resourceType"] != "OperationOutcome":
            found.append(Resource(resource, as_str(entry.get("fullUrl")), f"{where}.entry[{index}].resource"))
    return found


def _entries(bundle: dict, where: str) -> list[dict]:
    """Return a Bundle's entries; a malformed one is refused, never skipped (its data would go unseen)."""
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise error(400, "structure", "Bundle.entry must be an array", f"{where}.entry")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise error(400, "structure", "a Bundle entry must be a JSON object", f"{where}.entry[{index}]")
        if not isinstance(entry.get("fullUrl", ""), str):
            raise error(
                400,
                "structure",
                "a Bundle entry's fullUrl must be a string",
                f"{where}.entry[{index}].fullUrl",
            )
    return entries


def from_bundle(bundle, with_drafts: bool = False) -> Gathered:
    """Collect one patient's resources from a Bundle; with_drafts, its draft MedicationRequests are orders."""
    if isinstance(bundle, dict) and "hook" in bundle and "resourceType" not in bundle:
        ids = [s.id for s in SERVICES.values() if s.hook == bundle["hook"]] or ["{id}"]
        raise error(
            400,
            "structure",
            f"/evaluate takes a FHIR Bundle; post a CDS Hooks request to /cds-services/{ids[0]} "
            "(GET /cds-services lists the services)",
            "resourceType",
        )
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise error(400, "structure", "the body must be a FHIR Bundle", "resourceType")
    if as_str(bundle.get("type")) not in BUNDLE_TYPES:
        raise error(
            400, "value", f"Bundle.type must be one of {', '.join(sorted(BUNDLE_TYPES))}", "Bundle.type"
        )
    if _failed(bundle):
        raise error(
            412, "processing", "the Bundle reports that gathering it failed (OperationOutcome)", "Bundle"
        )
    resources = _unpack(bundle, "Bundle")
    patients = [r for r in resources if r.type == "Patient"]
    if not patients:
        raise error(400, "invalid", "the Bundle holds no Patient", "Bundle.entry")
    for p in patients:
        if "id" in p.data and not as_str(p.data["id"]):
            raise error(400, "value", "Patient.id must be a non-empty string", f"{p.location}.id")
    identities = {as_str(p.data.get("id")) or p.full_url for p in patients}
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
    patient_id = identities.pop()
    _check_subjects(resources, patient_id, aliases={patient.full_url} - {None})
    drafts, record = [], []
    for r in resources:
        is_draft = with_drafts and r.type == "MedicationRequest" and r.data.get("status") == "draft"
        (drafts if is_draft else record).append(r)
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
