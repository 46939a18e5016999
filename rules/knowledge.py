"""Load and check the clinical knowledge in rules/: sources, cited parameters, value sets, wording, orders."""

from __future__ import annotations

import hashlib
import json
import re
import string
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.valueset import ValueSet as FhirValueSet

PARAMETER_FILES = (
    "imnm",
    "labs",
    "reports",
    "labels",
    "statin",
    "cancer",
    "differential",
    "severity",
    "products",
)
VERIFICATION = ("verified", "partial", "unverified", "local")
# In the order a clinician should read them, within one indicator.
TOPICS = (
    "severity-red-flag",
    "statin-rechallenge-risk",
    "imnm-suspected",
    "treatment-escalation",
    "statin-autoimmune-pattern",
    "statin-muscle-symptoms",
    "statin-toxic-myopathy",
    "cancer-screening",
    "alternative-diagnosis",
)
INDICATORS = ("info", "warning", "critical")
SUMMARY_LIMIT = 140
PLACEHOLDER_WIDTH = 16
CACHED_LENGTH = 200  # codes and texts longer than this are matched afresh, so caches stay small
NONE: frozenset[str] = frozenset()
# Wording quotes a parameter's value in force as [[key]]: brackets, unlike braces, leave str.format alone.
QUOTE = re.compile(r"\[\[([^\[\]]*)\]\]")
# A parameter counted in days with `display` set is quoted in that unit when it divides evenly.
DISPLAY_DAYS = {"weeks": 7, "years": 365}
EXTENSION = "urn:imnm-cds:StructureDefinition:"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
# Systems as EHRs also send them: HL7 OIDs and SNOMED CT edition URIs.
SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    # FHIR R3 examples name HL7 v2 table 0074 (report categories) by its older URI.
    "http://hl7.org/fhir/v2/0074": "http://terminology.hl7.org/CodeSystem/v2-0074",
}


class KnowledgeError(ValueError):
    """The knowledge in rules/, or a local override of it, is inconsistent."""


def normalise_system(system: str | None) -> str:
    """Return the canonical URI for a code system as sent by an EHR."""
    system = (system or "").strip()
    if system.startswith(SNOMED + "/"):
        return SNOMED
    return SYSTEM_ALIASES.get(system, system)


def normalise_code(system: str, code: str | None) -> str:
    """Return a code in the form value sets list it (ICD-10-CM without dots, upper case)."""
    code = (code or "").strip()
    return code.replace(".", "").upper() if system == ICD10CM else code


@dataclass(frozen=True)
class Source:
    id: str
    label: str
    verification: str
    url: str | None = None
    note: str = ""
    for_review: bool = False  # an engineering default: listed for the clinical owner, not shown on cards


@dataclass(frozen=True)
class Parameter:
    key: str
    value: object
    source: Source
    unit: str = ""
    note: str = ""
    bounds: tuple[float, float] | None = None
    attributes: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ValueSet:
    id: str
    title: str
    codes: Mapping[tuple[str, str], str]  # (system, code) -> verification level
    is_a: tuple[tuple[str, str, str], ...]  # (system, low, high) prefix ranges
    text: re.Pattern | None
    exclude_text: re.Pattern | None

    def has_code(self, system: str | None, code: str | None) -> bool:
        """Tell whether the coding is in this value set."""
        system = normalise_system(system)
        code = normalise_code(system, code)
        if not code:
            return False
        if (system, code) in self.codes:
            return True
        return any(s == system and low <= code[: len(low)] <= high for s, low, high in self.is_a)

    def has_text(self, text: str | None) -> bool:
        """Tell whether free text names this concept (the fallback for uncoded results)."""
        if not text or self.text is None or not self.text.search(text):
            return False
        return self.exclude_text is None or not self.exclude_text.search(text)


@dataclass(frozen=True)
class Order:
    key: str
    label: str
    reason: str
    text: str = ""  # what a create action orders
    coding: Mapping[str, str] | None = None
    target: str | None = None  # for a delete action: the fact whose resources are removed
    items: tuple[Order, ...] = ()  # for a panel: the orders it creates together
    sex: str | None = None  # only for patients of this recorded sex
    medication: bool = False  # proposed as a MedicationRequest, not a ServiceRequest
    route: Mapping[str, str] | None = None  # a medication's route of administration


@dataclass(frozen=True)
class CardText:
    key: str
    topic: str
    topic_display: str
    indicator: str
    source: Source
    links: tuple[Source, ...]
    suggestions: tuple[Order, ...]
    summary: str
    detail: str
    override_reasons: tuple[tuple[str, str], ...]  # (code, display)
    replaces: tuple[str, ...] = ()  # cards this one stands for when both would show


@dataclass(frozen=True)
class Knowledge:
    sources: Mapping[str, Source]
    parameters: Mapping[str, Parameter]
    texts: Mapping[str, str]
    valuesets: Mapping[str, ValueSet]
    cards: Mapping[str, CardText]
    orders: Mapping[str, Order]
    indicators: Mapping[str, str]  # a card's key, or "card.situation" -> info, warning or critical

    def __post_init__(self):
        by_code: dict[tuple[str, str], set[str]] = {}
        for valueset in self.valuesets.values():
            for coding in valueset.codes:
                by_code.setdefault(coding, set()).add(valueset.id)
        index = {coding: frozenset(ids) for coding, ids in by_code.items()}
        ranged = [v for v in self.valuesets.values() if v.is_a]
        patterned = [v for v in self.valuesets.values() if v.text is not None]

        def code_names(system: str | None, code: str | None) -> frozenset[str]:
            system = normalise_system(system)
            code = normalise_code(system, code)
            named = index.get((system, code), NONE)
            in_ranges = frozenset(v.id for v in ranged if v.has_code(system, code))
            return named | in_ranges if in_ranges else named

        def text_names(text: str) -> frozenset[str]:
            return frozenset(v.id for v in patterned if v.has_text(text))

        # Every resource's codes and texts are tried against every value set, and the same few recur
        # across resources and requests: remember the answers for short ones, a bounded number.
        object.__setattr__(self, "_code_names", _remembered(code_names))
        object.__setattr__(self, "_text_names", _remembered(text_names))

    def coded_as(self, codings: Iterable[tuple[str | None, str | None]]) -> frozenset[str]:
        """Name the value sets that hold any of these (system, code) pairs."""
        return NONE.union(*(self._code_names(system, code) for system, code in codings))

    def texted_as(self, texts: Iterable[str]) -> frozenset[str]:
        """Name the value sets whose text pattern any of these texts matches."""
        return NONE.union(*(self._text_names(text) for text in texts if text))

    def value(self, key: str):
        """Return the value of a cited parameter."""
        return self.param(key).value

    def param(self, key: str) -> Parameter:
        """Return a cited parameter by its dotted key, e.g. 'imnm.ck.raised'."""
        try:
            return self.parameters[key]
        except KeyError:
            raise KnowledgeError(f"no parameter {key!r} in rules/") from None

    def quote(self, key: str) -> str:
        """Return a parameter's value as wording shows it, e.g. '4' or '2 weeks'."""
        return quoted(self.param(key))

    def text(self, key: str) -> str:
        """Return a plain text entry by its dotted key, e.g. 'imnm.tests.anti-hmgcr.positive'."""
        try:
            return self.texts[key]
        except KeyError:
            raise KnowledgeError(f"no text {key!r} in rules/") from None

    def indicator(self, situation: str) -> str:
        """Return the indicator of a card in a situation (rules/indicators.toml)."""
        try:
            return self.indicators[situation]
        except KeyError:
            raise KnowledgeError(f"no indicator for {situation!r} in rules/indicators.toml") from None

    def valueset(self, id_: str) -> ValueSet:
        """Return a value set by id."""
        try:
            return self.valuesets[id_]
        except KeyError:
            raise KnowledgeError(f"no value set {id_!r} in rules/valuesets") from None

    def for_review(self) -> list[Parameter]:
        """List the parameters set as engineering defaults, for the clinical owner to review."""
        return [p for p in self.parameters.values() if p.source.for_review]

    def children(self, prefix: str) -> list[str]:
        """List the immediate sub-keys under a dotted prefix, in file order."""
        seen: dict[str, None] = {}
        for key in [*self.parameters, *self.texts]:
            if key.startswith(prefix + "."):
                seen.setdefault(key[len(prefix) + 1 :].split(".")[0], None)
        return list(seen)


def _remembered(compute):
    """Wrap a function of short strings with a bounded cache; long arguments are computed afresh."""
    cached = lru_cache(maxsize=8192)(compute)

    def answer(*arguments):
        if sum(len(a or "") for a in arguments) > CACHED_LENGTH:
            return compute(*arguments)
        return cached(*arguments)

    return answer


def load(overrides: Path | None = None, root: Path | None = None) -> Knowledge:
    """Load every knowledge file in rules/ (or a copy of it), apply local overrides, and check them all."""
    root = root if root is not None else resources.files("rules")
    sources = _load_sources(_read_toml(root / "sources.toml"))
    parameters: dict[str, Parameter] = {}
    texts: dict[str, str] = {}
    for name in PARAMETER_FILES:
        _flatten(name, _read_toml(root / f"{name}.toml"), sources, parameters, texts)
    if overrides is not None:
        _apply_overrides(overrides, parameters)
    for param in parameters.values():
        _check_pattern(param)
        if "display" in param.attributes:
            quoted(param)  # a bad display fails the start, quoted or not
    # Quoted after the overrides, so the wording shows the values the rules use.
    texts = {key: _fill(text, parameters, key) for key, text in texts.items()}
    parameters = {
        key: replace(param, attributes=MappingProxyType(_fill(dict(param.attributes), parameters, key)))
        for key, param in parameters.items()
    }
    valuesets = _load_valuesets(root / "valuesets")
    orders = _load_orders(_fill(_read_toml(root / "orders.toml"), parameters, "orders.toml"))
    wording = _fill(_read_toml(root / "cards.toml"), parameters, "cards.toml")
    indicators = _load_indicators(_read_toml(root / "indicators.toml"), wording.get("cards", {}))
    return Knowledge(
        sources=MappingProxyType(sources),
        parameters=MappingProxyType(parameters),
        texts=MappingProxyType(texts),
        valuesets=MappingProxyType(valuesets),
        cards=MappingProxyType(_load_cards(wording, sources, orders, indicators)),
        orders=MappingProxyType(orders),
        indicators=MappingProxyType(indicators),
    )


def fingerprint(overrides: Path | None = None, root=None) -> str:
    """Hash every file of rules/ (or a copy of it) and the local overrides: what a card was made from."""
    digest = hashlib.sha256()
    pending = [(root if root is not None else resources.files("rules"), "")]
    while pending:
        folder, prefix = pending.pop()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                if entry.name != "__pycache__":
                    pending.append((entry, f"{name}/"))
            elif not entry.name.endswith(".pyc"):
                data = entry.read_bytes()
                digest.update(f"{name}\0{len(data)}\0".encode() + data)
    if overrides is not None:
        digest.update(b"overrides\0" + Path(overrides).read_bytes())
    return digest.hexdigest()


def _read_toml(path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KnowledgeError(f"{getattr(path, 'name', path)}: {exc}") from exc


def _load_sources(table: dict) -> dict[str, Source]:
    sources = {}
    for id_, entry in table.items():
        if entry.get("verification") not in VERIFICATION[:3]:
            raise KnowledgeError(f"source {id_}: verification must be one of {VERIFICATION[:3]}")
        if not entry.get("label"):
            raise KnowledgeError(f"source {id_}: a label is required")
        sources[id_] = Source(
            id=id_,
            label=entry["label"],
            verification=entry["verification"],
            url=entry.get("url"),
            note=entry.get("note", ""),
            for_review=entry.get("for-review", False),
        )
    return sources


def _flatten(prefix: str, table: dict, sources, parameters: dict, texts: dict) -> None:
    for key, value in table.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and "value" in value:
            parameters[path] = _parameter(path, value, sources)
        elif isinstance(value, dict):
            _flatten(path, value, sources, parameters, texts)
        elif isinstance(value, str):
            texts[path] = value
        else:
            raise KnowledgeError(f"{path}: a value outside a cited parameter (give it a value and a source)")


def _parameter(path: str, entry: dict, sources: Mapping[str, Source]) -> Parameter:
    source = sources.get(entry.get("source", ""))
    if source is None:
        raise KnowledgeError(f"{path}: source {entry.get('source')!r} is not in sources.toml")
    bounds = entry.get("range")
    if bounds is not None and not (
        isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)
    ):
        raise KnowledgeError(f"{path}: range must be [low, high]")
    known = {"value", "source", "unit", "note", "range"}
    if any(not isinstance(v, str | bool) for k, v in entry.items() if k not in known):
        raise KnowledgeError(f"{path}: a parameter's other attributes take only words or true/false")
    param = Parameter(
        key=path,
        value=entry["value"],
        source=source,
        unit=entry.get("unit", ""),
        note=entry.get("note", ""),
        bounds=tuple(bounds) if bounds else None,
        attributes=MappingProxyType({k: v for k, v in entry.items() if k not in known}),
    )
    _check_bounds(param, param.value)
    return param


def _check_bounds(param: Parameter, value) -> None:
    if param.bounds is None:
        return
    low, high = param.bounds
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise KnowledgeError(f"{param.key}: {value!r} is outside the allowed range [{low}, {high}]")


def _check_pattern(param: Parameter) -> None:
    if isinstance(param.value, str):
        try:
            re.compile(param.value)
        except re.error as exc:
            raise KnowledgeError(f"{param.key}: not a valid regular expression ({exc})") from exc


def quoted(param: Parameter) -> str:
    """Return a parameter's value as wording shows it: a number, or days in the unit `display` names."""
    value = param.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KnowledgeError(f"{param.key}: only a number can be quoted in wording")
    display = param.attributes.get("display")
    if display is None:
        return _number(value)
    if display not in DISPLAY_DAYS or not param.unit.startswith("days"):
        raise KnowledgeError(f"{param.key}: display takes {tuple(DISPLAY_DAYS)} for a value in days")
    count, rest = divmod(value, DISPLAY_DAYS[display])
    if rest:
        return f"{_number(value)} days"
    return f"{_number(count)} {display.removesuffix('s') if count == 1 else display}"


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def _fill(wording, parameters: Mapping[str, Parameter], where: str):
    """Replace every [[key]] in wording (a string, or the strings of a table) by the parameter's value."""
    if isinstance(wording, dict):
        return {key: _fill(value, parameters, f"{where}.{key}") for key, value in wording.items()}
    if isinstance(wording, list):
        return [_fill(value, parameters, where) for value in wording]
    if not isinstance(wording, str):
        return wording

    def value(match: re.Match) -> str:
        param = parameters.get(match[1])
        if param is None:
            raise KnowledgeError(f"{where}: quotes [[{match[1]}]], which is not a parameter")
        return quoted(param)

    filled = QUOTE.sub(value, wording)
    if "[[" in filled or "]]" in filled:
        raise KnowledgeError(f"{where}: an unclosed [[parameter]] quote")
    return filled


def _apply_overrides(path: Path, parameters: dict[str, Parameter]) -> None:
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KnowledgeError(f"knowledge overrides {path}: {exc}") from exc
    found: dict[str, Parameter] = {}
    _flatten_overrides("", table, found, parameters)
    parameters.update(found)


def _flatten_overrides(prefix: str, table: dict, found: dict, parameters: dict) -> None:
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if not isinstance(value, dict):
            raise KnowledgeError(f"override {path}: expected a table with value and source")
        if "value" not in value:
            _flatten_overrides(path, value, found, parameters)
            continue
        current = parameters.get(path)
        if current is None:
            raise KnowledgeError(f"override {path}: no such parameter")
        if (
            set(value) - {"value", "source"}
            or not isinstance(value.get("source"), str)
            or not value["source"]
        ):
            raise KnowledgeError(
                f"override {path}: give exactly a value and a source (who decided it, and why)"
            )
        if type(value["value"]) is not type(current.value) and not (
            isinstance(value["value"], int | float) and isinstance(current.value, int | float)
        ):
            raise KnowledgeError(f"override {path}: expected a {type(current.value).__name__}")
        _check_bounds(current, value["value"])
        local = Source(id="local", label=value["source"], verification="local")
        found[path] = Parameter(
            key=path,
            value=value["value"],
            source=local,
            unit=current.unit,
            note=current.note,
            bounds=current.bounds,
            attributes=current.attributes,
        )


def _load_valuesets(folder) -> dict[str, ValueSet]:
    valuesets = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            raw = json.loads(entry.read_text(encoding="utf-8"))
            FhirValueSet.model_validate(raw)
        except ValueError as exc:
            raise KnowledgeError(f"valuesets/{entry.name}: not a valid FHIR R4 ValueSet ({exc})") from exc
        if raw["id"] != entry.name.removesuffix(".json"):
            raise KnowledgeError(f"valuesets/{entry.name}: id {raw['id']!r} does not match the file name")
        valuesets[raw["id"]] = _valueset(raw)
    return valuesets


def _extension(element: dict, name: str) -> str | None:
    for ext in element.get("extension", []):
        if ext.get("url") == EXTENSION + name:
            return ext.get("valueString") or ext.get("valueCode")
    return None


def _valueset(raw: dict) -> ValueSet:
    codes: dict[tuple[str, str], str] = {}
    is_a: list[tuple[str, str, str]] = []
    for include in raw.get("compose", {}).get("include", []):
        system = include["system"]
        for concept in include.get("concept", []):
            level = _extension(concept, "verification")
            if level not in ("A", "B", "C"):
                raise KnowledgeError(
                    f"valueset {raw['id']}: {concept['code']} lacks a verification level A-C"
                )
            codes[(system, normalise_code(system, concept["code"]))] = level
        for flt in include.get("filter", []):
            if _extension(include, "verification") not in ("A", "B", "C"):
                raise KnowledgeError(f"valueset {raw['id']}: a filter lacks a verification level A-C")
            if flt["property"] != "concept" or flt["op"] != "is-a":
                raise KnowledgeError(f"valueset {raw['id']}: only 'concept is-a' filters are supported")
            low, _, high = flt["value"].partition("-")
            is_a.append((system, normalise_code(system, low), normalise_code(system, high or low)))
    text, exclude = _extension(raw, "text-pattern"), _extension(raw, "exclude-text-pattern")
    if not codes and not is_a and not text:
        raise KnowledgeError(f"valueset {raw['id']}: neither codes nor a text pattern")
    return ValueSet(
        id=raw["id"],
        title=raw["title"],
        codes=MappingProxyType(codes),
        is_a=tuple(is_a),
        text=re.compile(text, re.IGNORECASE) if text else None,
        exclude_text=re.compile(exclude, re.IGNORECASE) if exclude else None,
    )


def _load_orders(table: dict) -> dict[str, Order]:
    orders: dict[str, Order] = {}
    # Panels name their items, so single orders are loaded first.
    for key, entry in sorted(table.items(), key=lambda item: "items" in item[1]):
        coding = entry.get("coding")
        if any(
            c is not None and c.get("verification") not in ("A", "B") for c in (coding, entry.get("route"))
        ):
            raise KnowledgeError(f"order {key}: only codes verified at level A or B may be ordered")
        if any(item not in orders or orders[item].items for item in entry.get("items", [])):
            raise KnowledgeError(f"order {key}: a panel's items must be single orders")
        order = Order(
            key=key,
            label=entry["label"],
            reason=entry["reason"],
            text=entry.get("text", ""),
            coding=MappingProxyType({k: v for k, v in coding.items() if k != "verification"})
            if coding
            else None,
            target=entry.get("target"),
            items=tuple(orders[item] for item in entry.get("items", [])),
            sex=entry.get("sex"),
            medication=entry.get("resource") == "MedicationRequest",
            route=MappingProxyType({k: v for k, v in entry["route"].items() if k != "verification"})
            if "route" in entry
            else None,
        )
        if entry.get("resource", "ServiceRequest") not in ("ServiceRequest", "MedicationRequest"):
            raise KnowledgeError(f"order {key}: resource must be ServiceRequest or MedicationRequest")
        kinds = [bool(order.text), order.target is not None, bool(order.items)]
        if kinds.count(True) != 1 or (order.target is not None) != (entry.get("action") == "delete"):
            raise KnowledgeError(
                f"order {key}: give exactly one of text (create), target (delete) or items (panel)"
            )
        if order.sex not in (None, "female", "male"):
            raise KnowledgeError(f"order {key}: sex must be female or male")
        if order.text:
            model = MedicationRequest if order.medication else ServiceRequest
            model.model_validate(service_request(order, "example"))
        orders[key] = order
    return {key: orders[key] for key in table}  # in the order the file gives them


def service_request(order: Order, patient: str) -> dict:
    """Return the FHIR R4 ServiceRequest (or MedicationRequest) a suggestion proposes for this order."""
    code = {"text": order.text}
    if order.coding:
        code["coding"] = [dict(order.coding)]
    proposal = {"status": "draft", "intent": "proposal"}
    common = {"subject": {"reference": patient}, "reasonCode": [{"text": order.reason}]}
    if not order.medication:
        return {"resourceType": "ServiceRequest", **proposal, "code": code, **common}
    # No dose: none is cited in rules/, so the prescriber sets it.
    dosage = [{"text": order.text, "route": {"coding": [dict(order.route)]}}] if order.route else []
    return {
        "resourceType": "MedicationRequest",
        **proposal,
        "medicationCodeableConcept": code,
        **common,
        **({"dosageInstruction": dosage} if dosage else {}),
    }


def _load_indicators(table: dict, cards: dict) -> dict[str, str]:
    """Check the indicator table: one for every card, each situation of a card, and known values."""
    for situation, indicator in table.items():
        if indicator not in INDICATORS or situation.split(".", 1)[0] not in cards:
            raise KnowledgeError(f"indicators.toml: {situation} = {indicator!r} names no card or indicator")
    missing = sorted(set(cards) - set(table))
    if missing:
        raise KnowledgeError(f"indicators.toml: no indicator for the cards {', '.join(missing)}")
    return table


def _load_cards(
    wording: dict, sources: Mapping[str, Source], orders: Mapping[str, Order], indicators: Mapping[str, str]
) -> dict:
    topics = wording.get("topics", {})
    if set(topics) != set(TOPICS):
        raise KnowledgeError(f"cards.toml [topics] must name exactly {TOPICS}")
    reasons = wording.get("override-reasons", {})
    cards = {}
    for key, entry in wording.get("cards", {}).items():
        chosen = entry.get("override-reasons", wording.get("default-override-reasons", []))
        if not chosen or set(chosen) - set(reasons):
            raise KnowledgeError(f"card {key}: override reasons must name entries of [override-reasons]")
        card = CardText(
            key=key,
            topic=entry["topic"],
            topic_display=topics.get(entry["topic"], ""),
            indicator=indicators[key],
            source=_card_source(key, entry["source"], sources),
            links=tuple(_card_source(key, s, sources) for s in entry.get("links", [])),
            suggestions=tuple(_order(key, o, orders) for o in entry.get("suggestions", [])),
            summary=entry["summary"].strip(),
            detail=entry["detail"].strip(),
            override_reasons=tuple((code, reasons[code]) for code in chosen),
            replaces=tuple(entry.get("replaces", [])),
        )
        if card.topic not in TOPICS:
            raise KnowledgeError(f"card {key}: unknown topic")
        widest = _render_widest(card.summary)
        if len(widest) >= SUMMARY_LIMIT:
            raise KnowledgeError(
                f"card {key}: summary may reach {len(widest)} characters (limit < {SUMMARY_LIMIT})"
            )
        cards[key] = card
    for card in cards.values():
        if set(card.replaces) - set(cards):
            raise KnowledgeError(f"card {card.key}: replaces must name other cards")
    return cards


def _card_source(card: str, id_: str, sources: Mapping[str, Source]) -> Source:
    source = sources.get(id_)
    if source is None or not source.url:
        raise KnowledgeError(f"card {card}: source {id_!r} must exist and have a url")
    return source


def _order(card: str, key: str, orders: Mapping[str, Order]) -> Order:
    if key not in orders:
        raise KnowledgeError(f"card {card}: unknown order {key!r}")
    return orders[key]


def _render_widest(template: str) -> str:
    return template.format(**dict.fromkeys(placeholders(template), "X" * PLACEHOLDER_WIDTH))


def placeholders(template: str) -> set[str]:
    """Return the names a wording template needs."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}
