"""The OpenAPI 3.1 document of the HTTP surface, built from the services offered and the settings in force."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

from rules.knowledge import TOPICS
from service import hooks
from service.config import Settings
from service.evaluate.cards import CONTEXT, EVIDENCE, OUTCOME, PRETEST, PROBABILITY, RISK_TIER, RULES
from service.fhir import RESOURCE_TYPE
from service.gather import prefetch
from service.store import feedback_request
from service.web import auth, scrape

# JSON Schema (2020-12) of CDS Hooks 2.0 requests, responses and discovery, from the HL7 logical
# models and their invariants; OpenAPI 3.1 takes it as it is, under components.
CDS_HOOKS = json.loads((Path(__file__).with_name("cds-hooks-2.0.schema.json")).read_text(encoding="utf-8"))
ISSUE_TYPES = (
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
    "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
    "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict",
    "transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
)  # fmt: skip
ERRORS = {
    400: "Malformed JSON, wrong shape, a bad field, nesting deeper than the limit, invalid FHIR in a "
    "resource that matters, or data about another patient; `issue.expression` names where.",
    401: "No valid signed JWT from a trusted CDS client. Says nothing of why, as CDS Hooks asks.",
    403: "The request needs data fetched from a `fhirServer` the service may not contact; for /metrics, "
    "the caller is neither at an address nor holds the secret the settings name.",
    406: "The Accept header allows neither application/json nor application/fhir+json.",
    412: "A required prefetch key was neither sent nor could be fetched (or, as configured, the client "
    "reported that prefetching it failed); for /evaluate, the Bundle holds an OperationOutcome reporting "
    "a failure.",
    413: "The body is larger than the limit.",
    415: "The body is not application/json or application/fhir+json.",
    500: "The rule engine failed on this request; no advice was produced. The next request is served.",
    503: "Every rule-engine session is busy, the feedback database is unavailable, the token could not "
    "be checked for replay (with JWT verification), or (readiness) the engine cannot evaluate; retry.",
}
JSON = "application/json"
FHIR_JSON = "application/fhir+json"
GUIDANCE = ["GuidanceResponse", "DetectedIssue"]


def _given(member: str) -> dict:
    """Match an object that has this member, not null."""
    return {"required": [member], "properties": {member: {"not": {"type": "null"}}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _cds_hooks_schemas() -> dict:
    """Return the CDS Hooks definitions as components named CdsHooks.<name>, their references rewritten."""
    text = json.dumps(CDS_HOOKS["$defs"])
    text = re.sub(r'"#/\$defs/([A-Za-z]+)"', r'"#/components/schemas/CdsHooks.\1"', text)
    return {f"CdsHooks.{name}": schema for name, schema in json.loads(text).items()}


NON_BLANK = {"type": "string", "pattern": r"\S"}
# A FHIR dateTime (service.fhir.DATETIME) the service evaluates at: a real calendar date (format), years
# 1000-8999 as written (service.fhir.YEARS), no leap second.
YEAR = "[1-8][0-9]{3}"
OFFSET = "(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
MOMENT = {
    "type": "string",
    "anyOf": [
        {"pattern": f"^{YEAR}(-(0[1-9]|1[0-2]))?$"},
        {"format": "date", "pattern": f"^{YEAR}-[0-9]{{2}}-[0-9]{{2}}$"},
        {
            "format": "date-time",
            "pattern": f"^{YEAR}-[0-9]{{2}}-[0-9]{{2}}T[0-9]{{2}}:[0-9]{{2}}:[0-5][0-9](\\.[0-9]+)?{OFFSET}$",
        },
    ],
}
# An absolute http(s) URL naming a host (service.fhir.is_http_url), in the plainest form.
HTTP_URL = {
    "type": "string",
    "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~-]+(:[0-9]{1,4})?([/?#]\S*)?$",
}
PATIENT = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {"resourceType": {"const": "Patient"}},
}
UUID = {"type": "string", "pattern": CDS_HOOKS["$defs"]["uuid"]["pattern"]}
RESOURCE = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {"resourceType": {"type": "string", "pattern": f"^{RESOURCE_TYPE.pattern}$"}},
    "description": "A FHIR R4 resource; only the types a service reads matter, and those must be valid.",
}
SCHEMAS = {
    "OperationOutcome": {
        "type": "object",
        "required": ["resourceType", "issue"],
        "properties": {
            "resourceType": {"const": "OperationOutcome"},
            "issue": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["severity", "code"],
                    "properties": {
                        "severity": {"enum": ["fatal", "error", "warning", "information"]},
                        "code": {"enum": list(ISSUE_TYPES)},
                        "diagnostics": {"type": "string"},
                        "expression": {"type": "array", "items": {"type": "string"}},
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
    "Resource": RESOURCE,
    "Bundle": {
        "type": "object",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"const": "Bundle"},
            "entry": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "fullUrl": {"type": "string"},
                        "resource": {"anyOf": [_ref("Resource"), {"type": "null"}]},
                    },
                },
            },
        },
    },
    "EvaluateBundle": {
        "allOf": [_ref("Bundle")],
        "required": ["type", "entry"],
        "properties": {
            "type": {"enum": sorted(prefetch.BUNDLE_TYPES)},
            "timestamp": {"anyOf": [MOMENT, {"type": "null"}]},
            "entry": {
                "contains": {"required": ["resource"], "properties": {"resource": PATIENT}},
                "items": {
                    # A Patient is known by its id, else by its entry's fullUrl.
                    "if": {"required": ["resource"], "properties": {"resource": PATIENT}},
                    "then": {
                        "anyOf": [
                            {"properties": {"resource": {"required": ["id"]}}},
                            {"required": ["fullUrl"]},
                        ],
                        "properties": {
                            "resource": {"properties": {"id": {"type": "string", "minLength": 1}}}
                        },
                    },
                },
            },
        },
        "description": "One patient's record: exactly one Patient, and resources about that patient only.",
    },
    "Card": {
        "allOf": [_ref("CdsHooks.card")],
        "required": ["uuid", "detail", "extension"],
        "properties": {
            "source": {
                "required": ["label", "url", "topic"],
                "properties": {"topic": {"properties": {"code": {"enum": list(TOPICS)}}}},
            },
            "extension": {
                "type": "object",
                "required": [RULES, EVIDENCE],
                "properties": {
                    RULES: {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    EVIDENCE: {"type": "array", "items": {"type": "string"}},
                    PROBABILITY: {"type": "number", "minimum": 0, "maximum": 1},
                    PRETEST: {"type": "number", "minimum": 0, "maximum": 1},
                    CONTEXT: {"type": "string"},
                    OUTCOME: {"type": "string"},
                    RISK_TIER: {"enum": ["standard", "moderate", "high"]},
                },
                "additionalProperties": False,
            },
        },
    },
    "Cards": {
        "allOf": [_ref("CdsHooks.response")],
        "properties": {"cards": {"type": "array", "items": _ref("Card")}},
    },
    "GuidanceBundle": {
        "allOf": [_ref("Bundle")],
        "required": ["type", "timestamp", "entry"],
        "properties": {
            "type": {"const": "transaction"},
            "timestamp": {"type": "string"},
            "entry": {
                "items": {
                    "required": ["fullUrl", "resource", "request"],
                    "properties": {
                        "fullUrl": {"pattern": "^urn:uuid:"},
                        "resource": {
                            "required": ["id", "identifier", "status"],
                            "properties": {"resourceType": {"enum": GUIDANCE}},
                        },
                        "request": {
                            "type": "object",
                            "required": ["method", "url"],
                            "properties": {
                                "method": {"const": "PUT"},
                                "url": {"type": "string", "pattern": f"^({'|'.join(GUIDANCE)})/"},
                            },
                        },
                    },
                },
            },
        },
        "description": "Each card as a GuidanceResponse (suggestions in a contained RequestGroup), and each "
        "warning or critical card also as a preliminary DetectedIssue, put under ids derived from the card: "
        "posting the Bundle again adds nothing.",
    },
    "Feedback": {
        "type": "object",
        "required": ["feedback"],
        "properties": {
            "feedback": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["card", "outcome", "outcomeTimestamp"],
                    "properties": {
                        "card": UUID,
                        "outcome": {"enum": list(feedback_request.OUTCOMES)},
                        "outcomeTimestamp": {
                            "type": "string",
                            "format": "date-time",
                            "pattern": feedback_request.RFC3339.pattern,
                        },
                        # null, like every optional member, is as if it were absent.
                        "acceptedSuggestions": {
                            "type": ["array", "null"],
                            "minItems": 1,
                            "items": {"type": "object", "required": ["id"], "properties": {"id": UUID}},
                        },
                        "overrideReason": {
                            "type": ["object", "null"],
                            "properties": {
                                "reason": {
                                    "type": ["object", "null"],
                                    "required": ["system", "code"],
                                    "properties": {
                                        "system": NON_BLANK,
                                        "code": NON_BLANK,
                                        "display": NON_BLANK,
                                    },
                                },
                                "userComment": {"anyOf": [NON_BLANK, {"type": "null"}]},
                            },
                            "anyOf": [
                                {"type": "null"},
                                {"required": ["reason"], "properties": {"reason": {"type": "object"}}},
                                {
                                    "required": ["userComment"],
                                    "properties": {"userComment": {"type": "string"}},
                                },
                            ],
                        },
                    },
                    "allOf": [
                        {
                            "if": {"properties": {"outcome": {"const": "accepted"}}},
                            "then": {
                                "required": ["acceptedSuggestions"],
                                "properties": {"acceptedSuggestions": {"type": "array"}},
                                "not": _given("overrideReason"),
                            },
                        },
                        {
                            "if": {"properties": {"outcome": {"const": "overridden"}}},
                            "then": {"not": _given("acceptedSuggestions")},
                        },
                    ],
                },
            }
        },
    },
    "FeedbackReceipt": {
        "type": "object",
        "required": ["received", "stored", "duplicates"],
        "properties": {
            name: {"type": "integer", "minimum": 0} for name in ("received", "stored", "duplicates")
        },
        "additionalProperties": False,
    },
    "FeedbackSummary": {
        "type": "object",
        "required": ["rules", "unmatchedFeedback"],
        "properties": {
            "rules": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["knowledge", "rule", "topic", "issued", "cards", "accepted", "overridden"],
                    "properties": {
                        "knowledge": {
                            "type": "string",
                            "description": "Package version + hash of rules/ that issued the cards; "
                            "empty for cards recorded before it was.",
                        },
                        "rule": {"type": "string"},
                        "topic": {"type": "string"},
                        **{
                            name: {"type": "integer", "minimum": 0}
                            for name in ("issued", "cards", "accepted", "overridden")
                        },
                        "topOverrideReasons": {
                            "type": "array",
                            "maxItems": 3,
                            "items": {
                                "type": "object",
                                "required": ["system", "code", "count"],
                                "properties": {
                                    "system": {"type": "string"},
                                    "code": {"type": "string"},
                                    "display": {"type": "string"},
                                    "count": {"type": "integer", "minimum": 1},
                                },
                            },
                        },
                    },
                },
            },
            "unmatchedFeedback": {
                "type": "object",
                "required": ["accepted", "overridden"],
                "properties": {
                    "accepted": {"type": "integer", "minimum": 0},
                    "overridden": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["ok", "ready"]},
            "rules": {"type": "integer", "minimum": 1},
            "disabledRules": {"type": "array", "items": {"type": "string"}},
            "knowledge": {"type": "string", "description": "Package version + hash of rules/, overridden."},
        },
    },
}


def document(settings: Settings) -> dict:
    """Return the OpenAPI document of this service as configured (limits, and whether a JWT is needed)."""
    paths: dict[str, dict] = {"/cds-services": {"get": _discovery()}}
    for service in hooks.SERVICES.values():
        paths[f"/cds-services/{service.id}"] = {"post": _service(service)}
        paths[f"/cds-services/{service.id}/feedback"] = {"post": _feedback(service)}
    paths |= {
        "/feedback/summary": {"get": _summary()},
        "/evaluate": {"post": _evaluate()},
        "/explain.css": {"get": _stylesheet()},
        "/health": {"get": _health("Liveness: the process answers.")},
        "/health/ready": {"get": _health("Readiness: the rule engine evaluates.", ready=True)},
        "/openapi.json": {"get": _openapi()},
        scrape.PATH: {"get": _metrics(settings)},
        "/": {"get": _index()},
    }
    if settings.auth == "jwt":
        for path, operations in paths.items():
            for operation in operations.values():
                if path not in auth.NO_JWT_PATHS:
                    operation["security"] = [{"cdsClient": []}]
                    operation["responses"]["401"] = _error(401)
                    operation["responses"]["503"] = _error(503)  # the replay store did not answer
    result = {
        "openapi": "3.1.0",
        "info": {
            "title": "imnm-cds",
            "version": version("imnm-cds"),
            "summary": "CDS Hooks 2.0 service for immune-mediated necrotizing myopathy",
            "description": (
                "Every answer other than 2xx is a FHIR OperationOutcome (application/fhir+json). "
                f"Bodies are limited to {settings.max_body_bytes} bytes (413) and "
                f"{settings.max_json_depth} levels of JSON nesting (400). An unknown path answers 404, "
                "a method a path does not serve 405 with an Allow header."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {**_cds_hooks_schemas(), **SCHEMAS},
            "securitySchemes": {
                "cdsClient": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT signed by a trusted CDS client (CDS Hooks 2.0, Trusting CDS "
                    "Clients), its aud the public URL of the path called.",
                },
                "metricsSecret": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The secret in IMNM_CDS_METRICS_TOKEN_FILE (GET /metrics only).",
                },
            },
        },
    }
    if settings.public_url:
        result["servers"] = [{"url": settings.public_url}]
    return result


def _error(status: int) -> dict:
    response = {"description": ERRORS[status], "content": {FHIR_JSON: {"schema": _ref("OperationOutcome")}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"const": "Bearer"}, "required": True}}
    return response


def _errors(*statuses: int) -> dict:
    return {str(status): _error(status) for status in statuses}


def _body(schema: dict) -> dict:
    """Describe a JSON request body (application/json or application/fhir+json)."""
    return {"required": True, "content": {kind: {"schema": schema} for kind in (JSON, FHIR_JSON)}}


def _ok(description: str, schema: dict, media: str = JSON) -> dict:
    return {"200": {"description": description, "content": {media: {"schema": schema}}}}


def _discovery() -> dict:
    return {
        "operationId": "discovery",
        "summary": "CDS Hooks discovery: the services and their prefetch templates",
        "responses": _ok("The services.", _ref("CdsHooks.discovery")),
    }


def _hook_request(service: hooks.Service) -> dict:
    """Return the JSON Schema of a request to one service: its hook, its context and its prefetch keys."""
    kinds = {str: NON_BLANK, list: {"type": "array", "items": {"type": "string"}}, dict: _ref("Bundle")}
    return {
        "type": "object",
        "required": ["hook", "hookInstance", "context"],
        "properties": {
            "hook": {"const": service.hook},
            "hookInstance": UUID,
            "fhirServer": {
                "anyOf": [HTTP_URL, {"type": "null"}],
                "description": "The FHIR server's base URL, to fetch what prefetch lacks.",
            },
            "fhirAuthorization": {
                "anyOf": [_ref("CdsHooks.fhirAuthorization"), {"type": "null"}],
                "description": "An OAuth 2.0 access token for fhirServer (CDS Hooks 2.0, "
                "Passing the Access Token); never logged.",
            },
            "context": {
                "type": "object",
                "required": list(service.context),
                "properties": {name: kinds[kind] for name, kind in service.context.items()},
            },
            "prefetch": {
                "type": ["object", "null"],
                "properties": {
                    key.key: {
                        **_prefetched(key),
                        "description": f"{key.query} ({'required' if key.required else 'optional'}; "
                        "null: no data)",
                    }
                    for key in service.prefetch
                },
                "additionalProperties": {"anyOf": [_ref("Resource"), {"type": "null"}]},
            },
            "extension": {
                "type": ["object", "null"],
                "properties": {
                    hooks.AS_OF: {**MOMENT, "description": "Evaluate as of this moment (replays and tests)."}
                },
            },
        },
        "if": _given("fhirAuthorization"),
        "then": _given("fhirServer"),
    }


def _prefetched(key: hooks.PrefetchKey) -> dict:
    """Return what one prefetch key may hold: null, a resource its query returns, or a Bundle of them."""
    kinds = {"properties": {"resourceType": {"enum": [key.resource_type, *sorted(prefetch.ALWAYS_ACCEPTED)]}}}
    unmatched = {
        "required": ["search"],
        "properties": {
            "search": {
                "required": ["mode"],
                "properties": {"mode": {"enum": sorted(prefetch.UNMATCHED_MODES)}},
            }
        },
    }
    matched = {"properties": {"resource": {"anyOf": [kinds, {"type": "null"}]}}}
    return {
        "anyOf": [
            {"type": "null"},
            {"allOf": [_ref("Resource"), kinds]},
            {
                "allOf": [
                    _ref("Bundle"),
                    {"properties": {"entry": {"items": {"anyOf": [unmatched, matched]}}}},
                ]
            },
        ]
    }


def _service(service: hooks.Service) -> dict:
    return {
        "operationId": f"call-{service.id}",
        "summary": service.title,
        "description": f"{service.description}\n\n{service.usage}",
        "requestBody": _body(_hook_request(service)),
        "responses": {
            **_ok("Cards; none when nothing applies.", _ref("Cards")),
            **_errors(400, 403, 412, 413, 415, 500, 503),
        },
    }


def _feedback(service: hooks.Service) -> dict:
    return {
        "operationId": f"feedback-{service.id}",
        "summary": f"CDS Hooks feedback on the cards of {service.id}",
        "description": "Stored in one transaction, or not at all; an item sent again counts as a duplicate.",
        "requestBody": _body(_ref("Feedback")),
        "responses": {**_ok("What was stored.", _ref("FeedbackReceipt")), **_errors(400, 413, 415, 503)},
    }


def _summary() -> dict:
    return {
        "operationId": "feedback-summary",
        "summary": "Per rule and topic: cards issued, accepted, overridden, top override reasons",
        "responses": {**_ok("The summary.", _ref("FeedbackSummary")), **_errors(503)},
    }


def _evaluate() -> dict:
    return {
        "operationId": "evaluate",
        "summary": "Evaluate one patient's FHIR Bundle as the service for the hook would",
        "description": "Accept: application/fhir+json answers the cards as a FHIR transaction Bundle; "
        "Accept: text/html answers the explanation page (charts as data: SVG images, its stylesheet from "
        "GET /explain.css, no script).",
        "parameters": [
            {
                "name": "hook",
                "in": "query",
                "schema": {"enum": [s.hook for s in hooks.SERVICES.values()], "default": "patient-view"},
                "description": "order-sign or order-select: the Bundle's draft MedicationRequests are the "
                "orders being placed.",
            },
            {
                "name": "asOf",
                "in": "query",
                "schema": MOMENT,
                "description": "Evaluate as of this moment; otherwise Bundle.timestamp, otherwise now.",
            },
        ],
        "requestBody": _body(_ref("EvaluateBundle")),
        "responses": {
            "200": {
                "description": "Cards, or with Accept: application/fhir+json the same as FHIR resources, "
                "or with Accept: text/html the page explaining them.",
                "content": {
                    JSON: {"schema": _ref("Cards")},
                    FHIR_JSON: {"schema": _ref("GuidanceBundle")},
                    "text/html": {"schema": {"type": "string"}},
                },
            },
            **_errors(400, 406, 412, 413, 415, 500, 503),
        },
    }


def _stylesheet() -> dict:
    return {
        "operationId": "explanationStylesheet",
        "summary": "The explanation page's stylesheet (no patient data; no JWT needed)",
        "responses": {
            "200": {"description": "CSS.", "content": {"text/css": {"schema": {"type": "string"}}}}
        },
    }


def _health(summary: str, ready: bool = False) -> dict:
    responses = _ok("Healthy.", _ref("Health"))
    if ready:
        responses |= _errors(503)
    return {"operationId": "ready" if ready else "health", "summary": summary, "responses": responses}


def _metrics(settings: Settings) -> dict:
    operation = {
        "operationId": "metrics",
        "summary": "Prometheus metrics, summed over every worker process",
        "responses": {
            "200": {
                "description": "The Prometheus text format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    }
    if settings.auth == "jwt":
        operation["description"] = (
            "Served only to the addresses IMNM_CDS_METRICS_ADDRESSES names, or with the secret in "
            "IMNM_CDS_METRICS_TOKEN_FILE as a bearer token; no JWT."
        )
        operation["security"] = [{}, {"metricsSecret": []}]
        operation["responses"] |= _errors(403)
    return operation


def _openapi() -> dict:
    return {
        "operationId": "openapi",
        "summary": "This document",
        "responses": _ok("The OpenAPI 3.1 document.", {"type": "object", "required": ["openapi", "paths"]}),
    }


def _index() -> dict:
    return {
        "operationId": "index",
        "summary": "What this service is and its endpoints",
        "responses": _ok(
            "The index.",
            {
                "type": "object",
                "required": ["service", "summary", "endpoints"],
                "properties": {
                    "service": {"const": "imnm-cds"},
                    "summary": {"type": "string"},
                    "endpoints": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        ),
    }


def index(document: dict) -> dict:
    """Return a short index of the endpoints in a document: "METHOD path" to its summary."""
    endpoints = {
        f"{method.upper()} {path}": operation["summary"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    return {
        "service": document["info"]["title"],
        "summary": document["info"]["summary"],
        "endpoints": endpoints,
    }
