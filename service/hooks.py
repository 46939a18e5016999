"""The CDS services we offer (discovery) and the checked form of a CDS Hooks 2.0 request."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from rules.knowledge import TOPICS
from service.fhir import is_http_url, is_resource, parse_datetime
from service.outcome import error

AS_OF = "imnm-cds.asOf"  # request extension: evaluate as of this instant (replays and tests)


@dataclass(frozen=True)
class PrefetchKey:
    key: str
    query: str
    resource_type: str
    required: bool


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str
    usage: str
    prefetch: tuple[PrefetchKey, ...]
    context: Mapping[str, type]  # context fields the hook requires, and their JSON type
    topics: frozenset[str]  # card topics this service answers with

    def discovery(self) -> dict:
        """Return this service's entry in the discovery response."""
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "usageRequirements": self.usage,
            "prefetch": {p.key: p.query for p in self.prefetch},
        }


PATIENT = "{{context.patientId}}"
FVC_CODES = ",".join(f"http://loinc.org|{code}" for code in ("19872-1", "19871-3", "19873-9"))
RECORD = (
    PrefetchKey("patient", f"Patient/{PATIENT}", "Patient", required=True),
    PrefetchKey("labs", f"Observation?patient={PATIENT}&category=laboratory", "Observation", required=True),
    PrefetchKey("conditions", f"Condition?patient={PATIENT}", "Condition", required=True),
    PrefetchKey(
        "medicationRequests", f"MedicationRequest?patient={PATIENT}", "MedicationRequest", required=False
    ),
    PrefetchKey(
        "medicationStatements",
        f"MedicationStatement?patient={PATIENT}",
        "MedicationStatement",
        required=False,
    ),
    PrefetchKey("allergies", f"AllergyIntolerance?patient={PATIENT}", "AllergyIntolerance", required=False),
)
ORDER_TOPICS = frozenset({"statin-rechallenge-risk"})
ORDER_USAGE = (
    "Answers when a statin is in draftOrders (only the selected ones on order-select). Needs Patient, "
    "laboratory Observations and Conditions (send null when there are none); medication keys are optional "
    "but without them a CK pattern after a past statin cannot be seen."
)
ORDER_DESCRIPTION = (
    "Warns before a statin is ordered again for a patient with anti-HMGCR antibodies, an IMNM diagnosis, "
    "or CK that stayed raised after the last statin dose, and offers to remove the draft order."
)
PATIENT_VIEW = Service(
    id="imnm-patient-view",
    hook="patient-view",
    title="IMNM suspicion, statin advice and cancer-screening triggers",
    description=(
        "Looks for immune-mediated necrotizing myopathy (IMNM) from CK, myositis antibodies, weakness and "
        "biopsy, with a Bayesian post-test probability; tells statin toxicity from an autoimmune CK pattern; "
        "points to dermatomyositis or polymyositis when the evidence does; names the evidence behind "
        "every card."
    ),
    usage=(
        "Needs Patient, laboratory Observations and Conditions (send null when there are none). Exam and "
        "spirometry Observations, medication, DiagnosticReport, Procedure and ServiceRequest keys are "
        "optional: when omitted, the findings, statin exposure, treatment, FVC, biopsy and cancer screening "
        "they would show are reported as unknown."
    ),
    prefetch=(
        *RECORD,
        PrefetchKey("exams", f"Observation?patient={PATIENT}&category=exam", "Observation", required=False),
        PrefetchKey("reports", f"DiagnosticReport?patient={PATIENT}", "DiagnosticReport", required=False),
        # Spirometry is filed under no common category, so it is asked for by the fvc-percent-predicted codes.
        PrefetchKey(
            "spirometry", f"Observation?patient={PATIENT}&code={FVC_CODES}", "Observation", required=False
        ),
        PrefetchKey(
            "medicationAdministrations",
            f"MedicationAdministration?patient={PATIENT}",
            "MedicationAdministration",
            required=False,
        ),
        # Cancer-screening tests ordered, done or declined, besides the reports of those done.
        PrefetchKey("procedures", f"Procedure?patient={PATIENT}", "Procedure", required=False),
        PrefetchKey("serviceRequests", f"ServiceRequest?patient={PATIENT}", "ServiceRequest", required=False),
    ),
    context=MappingProxyType({"userId": str, "patientId": str}),
    topics=frozenset(TOPICS) - ORDER_TOPICS,
)
ORDER_SELECT = Service(
    id="imnm-statin-order-select",
    hook="order-select",
    title="Statin re-challenge risk (order select)",
    description=ORDER_DESCRIPTION,
    usage=ORDER_USAGE,
    prefetch=RECORD,
    context=MappingProxyType({"userId": str, "patientId": str, "selections": list, "draftOrders": dict}),
    topics=ORDER_TOPICS,
)
ORDER_SIGN = Service(
    id="imnm-statin-order-sign",
    hook="order-sign",
    title="Statin re-challenge risk (order sign)",
    description=ORDER_DESCRIPTION,
    usage=ORDER_USAGE,
    prefetch=RECORD,
    context=MappingProxyType({"userId": str, "patientId": str, "draftOrders": dict}),
    topics=ORDER_TOPICS,
)
SERVICES: Mapping[str, Service] = MappingProxyType(
    {s.id: s for s in (PATIENT_VIEW, ORDER_SELECT, ORDER_SIGN)}
)


def service_for(hook: str) -> Service:
    """Return our service for a hook, for offline evaluation and replay."""
    for service in SERVICES.values():
        if service.hook == hook:
            return service
    raise error(400, "not-supported", "no service here answers this hook", "hook")


def discovery() -> dict:
    """Return the CDS Hooks discovery response."""
    return {"services": [s.discovery() for s in SERVICES.values()]}


@dataclass(frozen=True)
class HookRequest:
    service: Service
    hook_instance: str
    patient_id: str
    context: Mapping[str, object]
    prefetch: Mapping[str, object]  # only the keys the client sent; a value may be None
    fhir_server: str | None
    fhir_authorization: Mapping[str, object] | None
    now: datetime


def parse(service: Service, body, now: datetime) -> HookRequest:
    """Check a CDS Hooks request against the spec and this service; a 400 ApiError names the field."""
    if not isinstance(body, dict):
        raise error(400, "structure", "the request body must be a JSON object")
    if body.get("resourceType") == "Bundle":
        raise error(
            400,
            "structure",
            "this is a CDS Hooks service and takes a CDS Hooks request; post a FHIR Bundle to /evaluate",
            "resourceType",
        )
    if body.get("hook") != service.hook:
        raise error(400, "value", f"service {service.id} answers the {service.hook} hook", "hook")
    instance = body.get("hookInstance")
    if not isinstance(instance, str) or not is_uuid(instance):
        raise error(400, "value", "hookInstance must be a UUID", "hookInstance")
    context = body.get("context")
    if not isinstance(context, dict):
        raise error(400, "required", "context must be a JSON object", "context")
    for name, kind in service.context.items():
        _check_context(context, name, kind)
    server, authorization = body.get("fhirServer"), body.get("fhirAuthorization")
    if server is not None and not is_http_url(server):
        raise error(400, "value", "fhirServer must be an absolute http(s) URL", "fhirServer")
    if authorization is not None:
        _check_authorization(authorization, server)
    prefetch = body.get("prefetch")
    if prefetch is None:  # null, like every optional member, is as if it were absent
        prefetch = {}
    if not isinstance(prefetch, dict):
        raise error(400, "structure", "prefetch must be a JSON object", "prefetch")
    for key, value in prefetch.items():
        if value is not None and not is_resource(value):
            raise error(
                400,
                "structure",
                "a prefetch value must be a FHIR resource, a Bundle or null",
                f"prefetch.{key}",
            )
    return HookRequest(
        service=service,
        hook_instance=instance,
        patient_id=context["patientId"],
        context=MappingProxyType(context),
        prefetch=MappingProxyType(prefetch),
        fhir_server=server,
        fhir_authorization=MappingProxyType(authorization) if authorization else None,
        now=_as_of(body.get("extension"), now),
    )


def _check_context(context: dict, name: str, kind: type) -> None:
    value, where = context.get(name), f"context.{name}"
    if kind is str and (not isinstance(value, str) or not value.strip()):
        raise error(400, "required", f"{where} is required (a non-empty string)", where)
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise error(400, "required", f"{where} is required (an array of references)", where)
    if kind is dict and not (isinstance(value, dict) and value.get("resourceType") == "Bundle"):
        raise error(400, "required", f"{where} is required (a FHIR Bundle)", where)


def is_uuid(value: str) -> bool:
    """Tell whether a string is a UUID, bare or as a urn:uuid: URI."""
    try:
        uuid.UUID(value.removeprefix("urn:uuid:"))
    except ValueError:
        return False
    return True


def _check_authorization(authorization, server) -> None:
    if not isinstance(authorization, dict):
        raise error(400, "structure", "fhirAuthorization must be a JSON object", "fhirAuthorization")
    if server is None:
        raise error(400, "required", "fhirServer is required when fhirAuthorization is given", "fhirServer")
    for name in ("access_token", "token_type", "scope", "subject"):
        if not isinstance(authorization.get(name), str):
            raise error(400, "required", f"fhirAuthorization.{name} is required", f"fhirAuthorization.{name}")
    if not _seconds(authorization.get("expires_in")):
        raise error(
            400,
            "required",
            "fhirAuthorization.expires_in is required (whole seconds, 0 or more)",
            "fhirAuthorization.expires_in",
        )
    if authorization["token_type"] != "Bearer":  # noqa: S105 (the token type, not a secret)
        raise error(
            400, "value", "fhirAuthorization.token_type must be Bearer", "fhirAuthorization.token_type"
        )


def _seconds(value) -> bool:
    """Tell whether a JSON value is a whole number of seconds, 0 or more (JSON has no integer type)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _as_of(extension, now: datetime) -> datetime:
    if extension is None:
        return now
    if not isinstance(extension, dict):
        raise error(400, "structure", "extension must be a JSON object", "extension")
    if AS_OF not in extension:
        return now
    moment = parse_datetime(extension[AS_OF])
    if moment is None:
        raise error(400, "value", f"extension.{AS_OF} must be a FHIR dateTime", f"extension.{AS_OF}")
    return moment
