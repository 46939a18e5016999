"""The CDS services we offer (discovery) and the checked form of a CDS Hooks 2.0 request."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from service.facts.fhir import parse_time
from service.outcome import error

SPEC_VERSION = "2.0.1"
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
    context: tuple[str, ...]  # context fields the hook requires

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
PATIENT_VIEW = Service(
    id="imnm-patient-view",
    hook="patient-view",
    title="IMNM suspicion, statin advice and cancer-screening triggers",
    description=(
        "Looks for immune-mediated necrotizing myopathy (IMNM) from CK, myositis antibodies, weakness and "
        "biopsy, with a Bayesian post-test probability; points to dermatomyositis or polymyositis when the "
        "evidence does; names the evidence behind every card."
    ),
    usage=(
        "Needs Patient, laboratory Observations and Conditions (send null when there are none). Exam "
        "Observations, medication and DiagnosticReport keys are optional: when omitted, the findings, statin "
        "exposure and biopsy they would show are reported as unknown."
    ),
    prefetch=(
        PrefetchKey("patient", f"Patient/{PATIENT}", "Patient", required=True),
        PrefetchKey(
            "labs", f"Observation?patient={PATIENT}&category=laboratory", "Observation", required=True
        ),
        PrefetchKey("conditions", f"Condition?patient={PATIENT}", "Condition", required=True),
        PrefetchKey("exams", f"Observation?patient={PATIENT}&category=exam", "Observation", required=False),
        PrefetchKey(
            "medicationRequests", f"MedicationRequest?patient={PATIENT}", "MedicationRequest", required=False
        ),
        PrefetchKey(
            "medicationStatements",
            f"MedicationStatement?patient={PATIENT}",
            "MedicationStatement",
            required=False,
        ),
        PrefetchKey("reports", f"DiagnosticReport?patient={PATIENT}", "DiagnosticReport", required=False),
    ),
    context=("userId", "patientId"),
)
SERVICES: Mapping[str, Service] = MappingProxyType({s.id: s for s in (PATIENT_VIEW,)})


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
    if body.get("hook") != service.hook:
        raise error(400, "value", f"service {service.id} answers the {service.hook} hook", "hook")
    instance = body.get("hookInstance")
    if not isinstance(instance, str) or not _is_uuid(instance):
        raise error(400, "value", "hookInstance must be a UUID", "hookInstance")
    context = body.get("context")
    if not isinstance(context, dict):
        raise error(400, "required", "context must be a JSON object", "context")
    for name in service.context:
        if not isinstance(context.get(name), str) or not context[name].strip():
            raise error(
                400, "required", f"context.{name} is required (a non-empty string)", f"context.{name}"
            )
    server, authorization = body.get("fhirServer"), body.get("fhirAuthorization")
    if server is not None and (not isinstance(server, str) or not re.match(r"^https?://\S+$", server)):
        raise error(400, "value", "fhirServer must be an absolute http(s) URL", "fhirServer")
    if authorization is not None:
        _check_authorization(authorization, server)
    prefetch = body.get("prefetch", {})
    if not isinstance(prefetch, dict):
        raise error(400, "structure", "prefetch must be a JSON object", "prefetch")
    for key, value in prefetch.items():
        if value is not None and not (isinstance(value, dict) and isinstance(value.get("resourceType"), str)):
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


def _is_uuid(value: str) -> bool:
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
    for name, kind in (
        ("access_token", str),
        ("token_type", str),
        ("expires_in", int),
        ("scope", str),
        ("subject", str),
    ):
        value = authorization.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise error(400, "required", f"fhirAuthorization.{name} is required", f"fhirAuthorization.{name}")
    if authorization["token_type"] != "Bearer":  # noqa: S105 (the token type, not a secret)
        raise error(
            400, "value", "fhirAuthorization.token_type must be Bearer", "fhirAuthorization.token_type"
        )


def _as_of(extension, now: datetime) -> datetime:
    if extension is None:
        return now
    if not isinstance(extension, dict):
        raise error(400, "structure", "extension must be a JSON object", "extension")
    if AS_OF not in extension:
        return now
    moment = parse_time(extension[AS_OF])
    if moment is None:
        raise error(400, "value", f"extension.{AS_OF} must be a FHIR dateTime", f"extension.{AS_OF}")
    return moment
