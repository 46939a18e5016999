"""Read FHIR R4 elements from resource JSON safely, and validate resources with fhir.resources.R4B."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from urllib.parse import unquote, urlsplit

import msgspec
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

# Results that count: final, and final results corrected later. Registered and preliminary results
# may still change; cancelled, entered-in-error and unknown never count.
FINAL_RESULT = frozenset({"final", "amended", "corrected", "appended"})
TEXT_LIMIT = 100_000
PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")
# One evaluation asks what the same concept names many times (is it a CK? an antibody? a finding?).
_named: ContextVar[dict[int, tuple[object, frozenset[str]]] | None] = ContextVar("named", default=None)
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]+")
# An escaped UTF-16 surrogate: a pair is one character, but half of one is valid JSON that is no text.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# FHIR R4 dateTime (http://hl7.org/fhir/R4/datatypes.html#dateTime): a time needs its offset.
DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)
# Moments outside these years are read as undated: no clinical record has them, and date arithmetic
# (a window before now, a supply after a start) would overflow near years 1 and 9999.
YEARS = range(1000, 9000)  # as written: an offset may carry 1000-01-01 into 999 in UTC


@dataclass(frozen=True)
class Resource:
    """One resource as gathered, with the fullUrl its Bundle entry gave it."""

    data: dict
    full_url: str | None = None
    location: str = ""  # where the request carried it, e.g. prefetch.labs.entry[3].resource

    @property
    def type(self) -> str:
        return self.data.get("resourceType", "")

    @property
    def reference(self) -> str:
        """Return how cards cite it: Type/id, else the entry's fullUrl, else the bare type."""
        id_ = self.data.get("id")
        if isinstance(id_, str) and id_:
            return f"{self.type}/{id_}"
        return self.full_url or self.type


# The one table of what we read: each kind of resource and its top-level elements that any rule can use.
# Only these are checked against the R4B model: one that is present and malformed makes the resource
# invalid. Any other element, malformed or required by R4 but missing, is reported and ignored.
# "name[x]" is every choice of a choice element; "_name" (a primitive's extensions) goes with its element.
DRAFT_ORDER = "MedicationRequest (draft order)"  # an order being placed: only its drug is read
READ: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "Patient": ("id", "gender", "birthDate"),
        "Observation": (
            "id", "subject", "status", "code", "effective[x]", "issued", "value[x]", "dataAbsentReason",
            "interpretation", "referenceRange", "component",
        ),
        "Condition": (
            "id", "subject", "clinicalStatus", "verificationStatus", "code", "onset[x]", "recordedDate",
        ),
        "DiagnosticReport": (
            "id", "subject", "status", "category", "code", "specimen", "effective[x]", "issued", "conclusion",
            "conclusionCode", "presentedForm",
        ),
        "Procedure": ("id", "subject", "status", "code", "performed[x]"),
        "ServiceRequest": (
            "id", "subject", "status", "intent", "code", "occurrence[x]", "authoredOn",
        ),
        "AllergyIntolerance": (
            "id", "patient", "clinicalStatus", "verificationStatus", "code", "reaction", "recordedDate",
        ),
        "MedicationRequest": (
            "id", "subject", "status", "medication[x]", "contained", "authoredOn", "dispenseRequest",
            "dosageInstruction",
        ),
        "MedicationStatement": (
            "id", "subject", "status", "medication[x]", "contained", "effective[x]", "dosage",
        ),
        "MedicationAdministration": (
            "id", "subject", "status", "medication[x]", "contained", "effective[x]", "dosage",
        ),
        "MedicationDispense": (
            "id", "subject", "status", "medication[x]", "contained", "whenHandedOver", "dosageInstruction",
        ),
        "Medication": ("id", "code", "form", "ingredient"),
        DRAFT_ORDER: ("id", "medication[x]", "contained"),
    }
)  # fmt: skip


class InvalidResource(ValueError):
    """An element we read of a resource does not validate as FHIR R4."""

    def __init__(self, resource: Resource, problems: list[tuple[str, str]]):
        super().__init__(f"{resource.reference} is not valid FHIR R4")
        self.resource = resource
        self.problems = problems  # (element path within the resource, what is wrong), never the values


def validate(resource: Resource, read_as: str | None = None) -> list[tuple[str, str]]:
    """Check the elements we read with the R4B model; return (path, problem) of the others, ignored."""
    try:
        model = get_fhir_model_class(resource.type)
    except ValueError:
        raise InvalidResource(resource, [("resourceType", "unknown resource type")]) from None
    elements = READ.get(read_as or resource.type)
    reads = (lambda path: True) if elements is None else (lambda path: _reads(elements, path))
    nulls = null_members(resource.data)
    # fhir.resources reads null as absent, which would silently drop what the sender meant.
    null = [(path, "null is not allowed in FHIR JSON") for path in nulls]
    if any(reads(path) for path in nulls):
        raise InvalidResource(resource, [(path, problem) for path, problem in null if reads(path)][:20])
    problems = _problems(model, resource.data)
    if not problems:
        return null
    if elements is None:
        malformed = [(path, problem) for path, problem, missing in problems if not missing]
    else:
        # The model checks across elements (one choice of name[x], those required) only once every element
        # is well formed, so a malformed element we do not read would hide them: the elements we read are
        # validated again on their own, and their choices checked from the table.
        own = _problems(model, _restricted(resource.data, elements))
        malformed = [(path, problem) for path, problem, missing in own if path and not missing]
        malformed += _choices(resource.data, elements)
    if malformed:
        raise InvalidResource(resource, malformed[:20])
    ignored = [(path, problem) for path, problem, missing in problems if not missing]
    return list(dict.fromkeys([*null, *ignored, *_absent(model, resource.data)]))


def _choices(data: dict, elements: tuple[str, ...]) -> list[tuple[str, str]]:
    """Name the choice elements we read that are given more than once (a code and a reference, say)."""
    return [
        (element, f"only one choice of {element} may be given")
        for element in elements
        if element.endswith("[x]") and sum(_is(element, name) for name in data) > 1
    ]


def _absent(model, data: dict) -> list[tuple[str, str]]:
    """Name the elements R4 requires that a resource lacks (a primitive's extension may stand in for it)."""
    return [
        (field.alias or name, "required by R4 but missing")
        for name, field in model.model_fields.items()
        if (field.is_required() or (field.json_schema_extra or {}).get("element_required"))
        and (field.alias or name) not in data
        and f"_{field.alias or name}" not in data
    ]


def _problems(model, data: dict) -> list[tuple[str, str, bool]]:
    """Validate with a model; return (path, problem, whether it is missing) of what is wrong."""
    try:
        model.model_validate(data)
        return []
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False, include_context=False):
            path = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
            # Custom validators may quote the offending value in their message; built-in ones do not.
            message = "invalid value" if error["type"] in ("value_error", "assertion_error") else error["msg"]
            problems.append((path, message, error["type"].endswith("missing")))
    except (TypeError, ValueError, LookupError) as exc:  # a contained resource of no known type: KeyError
        problems = [("resource", f"cannot be read ({type(exc).__name__})", False)]
    # Returned once the ValidationError is gone, not from within its handler: raised from there, our
    # exception would have it as context, and pydantic-core holds the validators' own exceptions where
    # the garbage collector cannot see them, so the cycle through their tracebacks (and the request in
    # their frames) would never be freed.
    return problems


def _reads(elements: tuple[str, ...], path: str) -> bool:
    """Tell whether a path (element.child...) lies within an element of the table."""
    name = path.split(".", 1)[0].removeprefix("_").removesuffix("__ext")
    return any(_is(element, name) for element in elements)


def _is(element: str, name: str) -> bool:
    """Tell whether a JSON member is a table element: itself, or a choice of name[x] (nameQuantity)."""
    if element.endswith("[x]"):
        base = element[:-3]
        return name.startswith(base) and name[len(base) : len(base) + 1].isupper()
    return name == element


def _restricted(data: dict, elements: tuple[str, ...]) -> dict:
    """Return a copy of a resource with only the elements we read, contained resources likewise."""
    copy = {name: value for name, value in data.items() if name == "resourceType" or _reads(elements, name)}
    if isinstance(copy.get("contained"), list):
        copy["contained"] = [
            _restricted(inner, READ.get(inner.get("resourceType"), ("id",)))
            if isinstance(inner, dict)
            else inner
            for inner in copy["contained"]
        ]
    return copy


def null_members(value, path: str = "") -> list[str]:
    """Name the members whose value is null: FHIR JSON allows null only in arrays (to align extensions)."""
    if not path and not _may_hold_null(value):
        return []
    found = []
    if isinstance(value, dict):
        for name, child in value.items():
            where = f"{path}.{name}" if path else name
            found += [where] if child is None else null_members(child, where)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += null_members(child, f"{path}.{index}")
    return found


def _may_hold_null(value) -> bool:
    """Tell cheaply whether any member may be null: serialised in C, one shows as ":null somewhere."""
    try:
        serialised = msgspec.json.encode(value)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
        return True
    return b'":null' in serialised  # within a string it is escaped (\\":null): a false alarm, walked


def is_resource(value) -> bool:
    """Tell whether a JSON value has the shape of a FHIR resource: an object naming its resourceType."""
    return isinstance(value, dict) and bool(RESOURCE_TYPE.fullmatch(as_str(value.get("resourceType")) or ""))


def as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def as_list(value) -> list:
    return value if isinstance(value, list) else []


def as_str(value) -> str | None:
    return value if isinstance(value, str) else None


def as_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)  # an integer past the float range overflows
    return number if math.isfinite(number) else None


def codings(concept) -> list[tuple[str | None, str | None]]:
    """Return (system, code) of every coding in a CodeableConcept."""
    return [
        (as_str(coding.get("system")), as_str(coding.get("code")))
        for coding in map(as_dict, as_list(as_dict(concept).get("coding")))
    ]


def texts(concept) -> list[str]:
    """Return the text and coding displays of a CodeableConcept."""
    concept = as_dict(concept)
    found = [as_str(concept.get("text"))]
    found += [as_str(as_dict(coding).get("display")) for coding in as_list(concept.get("coding"))]
    return [t for t in found if t]


def names(k, concept) -> frozenset[str]:
    """Name the value sets that name a CodeableConcept, by any of its codings or texts."""
    seen = _named.get()
    if seen is not None and id(concept) in seen:
        return seen[id(concept)][1]
    named = k.coded_as(codings(concept)) | k.texted_as(texts(concept))
    if seen is not None:
        seen[id(concept)] = (concept, named)  # holding the concept keeps its id from being reused
    return named


@contextmanager
def naming_once():
    """Within this block, work out each CodeableConcept's value sets once, however often it is asked."""
    if _named.get() is not None:  # inside another such block: share its memo
        yield
        return
    token = _named.set({})
    try:
        yield
    finally:
        _named.reset(token)


def matches(k, valueset: str, concept) -> bool:
    """Tell whether a CodeableConcept names a value set's concept, by code or by text."""
    return k.valueset(valueset).id in names(k, concept)


def half_surrogate(text: str, value) -> bool:
    """Tell whether JSON text parsed to this value holds half of a surrogate pair, which no UTF-8 can hold."""
    if not SURROGATE_ESCAPE.search(text):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def parse_time(value) -> datetime | None:
    """Parse a FHIR date, dateTime or instant; a partial date means its first day (UTC)."""
    value = as_str(value)
    if not value:
        return None
    partial = PARTIAL_DATE.match(value)
    try:
        if partial:
            year, month, day = partial.groups()
            written = datetime(int(year), int(month or 1), int(day or 1), tzinfo=UTC)
        else:
            written = datetime.fromisoformat(value)
        moment = written.astimezone(UTC) if written.tzinfo else written.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # an offset can carry year 1 or 9999 past the calendar
        return None
    return moment if written.year in YEARS else None


def is_final(data: dict) -> bool:
    """Tell whether a result counts: final, or a final result corrected later."""
    return as_str(data.get("status")) in FINAL_RESULT


def parse_datetime(value) -> datetime | None:
    """Parse a time the caller chose (asOf): a FHIR dateTime exactly, not whatever Python would read."""
    return parse_time(value) if isinstance(value, str) and DATETIME.fullmatch(value) else None


def effective_time(data: dict) -> datetime | None:
    """Return when an observation or report applies: effective[x], else issued."""
    return (
        parse_time(data.get("effectiveDateTime"))
        or parse_time(data.get("effectiveInstant"))
        or parse_time(as_dict(data.get("effectivePeriod")).get("start"))
        or parse_time(as_dict(data.get("effectivePeriod")).get("end"))
        or parse_time(data.get("issued"))
    )


def days_before(moment: datetime | None, now: datetime) -> float | None:
    """Return how many days before now a moment was (negative if after now)."""
    if moment is None:
        return None
    return (now - moment).total_seconds() / 86400.0


def completed_years(birth: datetime, at: datetime) -> int:
    """Return the age in completed years at a moment: a year counts once its birthday has passed."""
    return at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))


def day(moment: datetime | None) -> str:
    """Return the calendar date of a moment as a clinician reads it."""
    return moment.date().isoformat() if moment else "undated"


def attachment_text(attachment) -> str:
    """Return the text of a plain-text attachment (inline base64 data), else nothing."""
    attachment = as_dict(attachment)
    if not (as_str(attachment.get("contentType")) or "").startswith("text/plain"):
        return ""
    data = as_str(attachment.get("data")) or ""
    try:
        return base64.b64decode(data[: TEXT_LIMIT * 2], validate=True).decode("utf-8", "replace")[:TEXT_LIMIT]
    except (binascii.Error, ValueError):
        return ""


DEFAULT_PORTS = {"http": 80, "https": 443}


def is_http_url(text) -> bool:
    """Say whether this is an absolute http(s) URL naming a host, with a valid port and no spaces."""
    return isinstance(text, str) and not any(c.isspace() for c in text) and _split(text) is not None


def within(url: str, base: str) -> bool:
    """Say whether a URL lies at or under a base URL: same scheme, host and port, path inside it."""
    here = url_origin(url)
    if here is None or here != url_origin(base):
        return False
    target, path = urlsplit(url).path, urlsplit(base).path.rstrip("/")
    # Clients resolve dot segments, so ../ would lead out of the base with the token.
    if any(segment in (".", "..") for segment in unquote(target).split("/")):
        return False
    return target.rstrip("/") == path or target.startswith(path + "/")


def _split(url: str) -> tuple | None:
    """Return the parts and port of an http(s) URL naming a host, or None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return (parts, port) if parts.scheme in DEFAULT_PORTS and parts.hostname else None


def url_origin(url: str) -> tuple | None:
    """Return (scheme, host, port), or None for a URL that is not http(s), has credentials or a bad port."""
    split = _split(url)
    if split is None or split[0].username is not None:
        return None
    parts, port = split
    return parts.scheme, parts.hostname, port
