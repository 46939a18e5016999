"""Turn the rules' conclusions into CDS Hooks 2.0 cards, worded and cited from rules/."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import replace

from rules.knowledge import SUMMARY_LIMIT, TOPICS, service_request
from service.evaluate.engine import Conclusion, Outcome
from service.facts import FactSet

# Card extension keys, prefixed to be globally unique as the spec advises (CDS Hooks 2.0, "Extensions").
RULES, EVIDENCE, RISK_TIER = "imnm-cds.rules", "imnm-cds.evidence", "imnm-cds.riskTier"
PROBABILITY, PRETEST = "imnm-cds.probability", "imnm-cds.pretestProbability"
CONTEXT, OUTCOME = "imnm-cds.probabilityContext", "imnm-cds.antibodyOutcome"
# The parameters of the IMNM probability (rules/imnm.py); "classified": the card claims none in its text.
MODEL = ("pretest", "presentation", "probability", "band", "context", "outcome", "steps", "classified")
log = logging.getLogger(__name__)

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:imnm-cds")
TOPIC_SYSTEM = "urn:imnm-cds:CodeSystem:card-topic"
OVERRIDE_SYSTEM = "urn:imnm-cds:CodeSystem:override-reason"
SEVERITY = {"critical": 0, "warning": 1, "info": 2}
CAUTION = {"partial": "partly verified", "unverified": "not verified", "local": "set locally"}


def build(k, outcome: Outcome, facts: FactSet, patient_id: str, topics: frozenset[str]) -> list[dict]:
    """Return one card per conclusion on the service's topics, most severe first, in a stable order."""
    cards = [
        card(k, conclusion, facts, patient_id)
        for conclusion in folded(k, outcome.conclusions)
        if k.cards[conclusion.key].topic in topics
    ]
    ordered = sorted(
        cards,
        key=lambda c: (
            SEVERITY[c["indicator"]],
            TOPICS.index(c["source"]["topic"]["code"]),
            c["summary"],
        ),
    )
    offer_once(ordered)
    return ordered


def offer_once(cards: list[dict]) -> None:
    """Keep each suggestion on the most severe card offering it: accepting both would order it twice."""
    offered: set[str] = set()
    for card in cards:
        kept = []
        for suggestion in card.get("suggestions", []):
            what = json.dumps([action_identity(a) for a in suggestion["actions"]], sort_keys=True)
            if what not in offered:
                offered.add(what)
                kept.append(suggestion)
        if kept:
            card["suggestions"] = kept
        else:
            card.pop("suggestions", None)
            card.pop("selectionBehavior", None)


def action_identity(action: dict) -> dict:
    """What an action does, without the reason it gives."""
    resource = {k: v for k, v in action.get("resource", {}).items() if k != "reasonCode"}
    return {"type": action["type"], "resource": resource, "resourceId": action.get("resourceId")}


def folded(k, conclusions) -> list[Conclusion]:
    """Let a card stand for the cards it replaces: it takes their rules and evidence, and they go."""
    present = {c.key: c for c in conclusions}

    def stands_for(key: str, found: dict) -> dict:
        """Collect the present cards a card replaces, directly or through a card it replaces."""
        for other in k.cards[key].replaces:
            if other in present and other not in found:
                found[other] = present[other]
                stands_for(other, found)
        return found

    replaced = {key for c in conclusions for key in stands_for(c.key, {})}
    result = []
    for conclusion in conclusions:
        if conclusion.key in replaced:
            continue
        group = [conclusion, *stands_for(conclusion.key, {}).values()]
        # The IMNM probability of a replaced card stays machine-readable on the card that stands for it.
        model = next((c.params for c in group[1:] if c.params.get("probability") is not None), {})
        result.append(
            replace(
                conclusion,
                rules=tuple(sorted({r for c in group for r in c.rules})),
                basis=tuple(dict.fromkeys(b for c in group for b in c.basis)),
                params={**{n: v for n, v in model.items() if n in MODEL}, **conclusion.params},
            )
        )
    return result


def card(k, conclusion: Conclusion, facts: FactSet, patient_id: str) -> dict:
    """Build one card; the same patient, rules and evidence always give the same uuid."""
    text = k.cards[conclusion.key]
    params = conclusion.params
    values = template_values(params)
    references = evidence(conclusion, facts)
    identity = card_uuid(conclusion, facts, patient_id)
    opening = text.detail.format_map(values).replace(" \n", "\n").rstrip()  # an empty optional sentence
    detail = [
        opening[:1].upper() + opening[1:],
        probability_section(k, params),
        basis_section("Evidence", [facts.basis[i] for i in conclusion.basis if facts.basis[i].references]),
        basis_section(
            "Not known", [facts.basis[i] for i in conclusion.basis if not facts.basis[i].references]
        ),
        list_section("Data not used", facts.notes),
        certainty_section(k, text.source, params.get("cited", ())),
    ]
    result = {
        "uuid": str(identity),
        "summary": fit(text.summary.format_map(values)),
        "indicator": params.get("indicator", text.indicator),
        "detail": "\n\n".join(part for part in detail if part),
        "source": {
            "label": text.source.label,
            "url": text.source.url,
            "topic": {"system": TOPIC_SYSTEM, "code": text.topic, "display": text.topic_display},
        },
        "overrideReasons": [
            {"code": code, "system": OVERRIDE_SYSTEM, "display": display}
            for code, display in text.override_reasons
        ],
        "extension": {
            RULES: list(conclusion.rules),
            EVIDENCE: references,
            **probability_extension(params),
            **({RISK_TIER: params["tier"]} if "tier" in params else {}),
        },
    }
    chosen = params.get("orders")
    orders = [order for order in text.suggestions if chosen is None or order.key in chosen]
    made = (suggestion(order, identity, facts, patient_id, params.get("sex")) for order in orders)
    suggestions = [s for s in made if s]
    if suggestions:
        result["suggestions"] = suggestions
        result["selectionBehavior"] = "any"
    if text.links:
        result["links"] = [{"label": s.label, "url": s.url, "type": "absolute"} for s in text.links]
    return result


def evidence(conclusion: Conclusion, facts: FactSet) -> list[str]:
    """Return the references of the resources a conclusion rests on, sorted."""
    return sorted({ref for id_ in conclusion.basis for ref in facts.basis[id_].references})


def card_uuid(conclusion: Conclusion, facts: FactSet, patient_id: str) -> uuid.UUID:
    """Identify a conclusion's card: the same patient, rules and evidence give the same uuid."""
    return uuid.uuid5(
        NAMESPACE, json.dumps([patient_id, conclusion.key, conclusion.rules, evidence(conclusion, facts)])
    )


def suggestion(order, identity: uuid.UUID, facts: FactSet, patient_id: str, sex: str | None) -> dict | None:
    """Build a suggestion: ServiceRequests to create (one, or a panel's), or resources to delete."""
    if order.target is not None:
        targets = [ref for ref in facts.basis[order.target].references if ref.count("/") == 1]
        actions = [
            {"type": "delete", "description": f"{order.label} ({ref})", "resourceId": ref} for ref in targets
        ]
    else:
        creates = [item for item in order.items if item.sex in (None, sex)] if order.items else [order]
        actions = [
            {
                "type": "create",
                "description": item.label,
                "resource": service_request(item, patient_reference(patient_id)),
            }
            for item in creates
        ]
    if not actions:
        return None
    return {"label": order.label, "uuid": str(uuid.uuid5(identity, order.key)), "actions": actions}


def patient_reference(patient_id: str) -> str:
    """Reference the patient: Patient/id, or the urn:uuid fullUrl a Bundle gave a Patient without an id."""
    return patient_id if patient_id.startswith("urn:") else f"Patient/{patient_id}"


def template_values(params: Mapping) -> dict:
    """Format rule parameters for wording templates: counts with separators, multiples, percentages."""
    values = {}
    for name, value in params.items():
        if value is None:  # e.g. the CK multiple when no CK was measured
            values[name] = "unknown"
        elif isinstance(value, list):
            values[name] = "; ".join(str(v) for v in value)
        elif name.startswith("days_"):
            values[name] = f"{value:.0f}"
        elif name.endswith("_x_uln"):
            values[name] = f"{value:.0f}" if value >= 10 else f"{value:.1f}"
        elif isinstance(value, float) and name.startswith("ck_"):
            values[name] = f"{value:,.0f}"
        elif isinstance(value, float):
            values[name] = f"{value:.1f}"
        else:
            values[name] = value
    shown = params.get("probability") is not None and not params.get("classified")
    values["probability_note"] = f" (IMNM probability {banded(params)})" if shown else ""
    return values


def percent(p: float) -> str:
    """Show a probability as a whole percentage, or below 1% as such."""
    return "below 1%" if p < 0.005 else f"{p * 100:.0f}%"


def banded(params: Mapping) -> str:
    """Show a probability as a band and a rounded figure: to 5 points from 10%, to 1 point below."""
    p = params["probability"] * 100
    rounded = round(p / 5) * 5 if p >= 10 else round(p)
    return f"{params['band']}, about {max(rounded, 1):.0f}%"


def fit(summary: str) -> str:
    """Keep a summary under the spec's 140 characters, cutting at a word if a value was unusually long."""
    if len(summary) < SUMMARY_LIMIT:
        return summary
    log.warning("card summary shortened", extra={"fields": {"length": len(summary)}})
    return summary[: SUMMARY_LIMIT - 2].rsplit(" ", 1)[0] + "…"


def probability_section(k, params: Mapping) -> str:
    """Say in one line how likely IMNM is and from what; classification cards claim no probability."""
    if params.get("probability") is None or params.get("classified"):
        return ""
    results = ", ".join(s.evidence for s in params["steps"]) or "no antibody or biopsy result yet"
    line = (
        f"**Probability of IMNM:** {banded(params)} ({results}; pre-test {percent(params['pretest'])} for "
        f"{params['presentation']}; {params['context']})."
    )
    if "negative" in params["outcome"]:
        shares = ", ".join(f"{s:.0%} {where}" for where, s in params["seronegative_shares"])
        line += f" Lowered, not excluded: IMNM is antibody-negative in about {shares}."
    return line


def probability_extension(params: Mapping) -> dict:
    """Give integrators the numbers behind the probability, on every card where the model applies."""
    if params.get("probability") is None:
        return {}
    return {
        PROBABILITY: round(params["probability"], 4),
        PRETEST: round(params["pretest"], 4),
        CONTEXT: params["context"],
        OUTCOME: params["outcome"],
    }


def basis_section(title: str, items) -> str:
    # The resources each line rests on are in the imnm-cds.evidence extension, not in the words.
    return list_section(title, [b.text for b in items])


def list_section(title: str, lines) -> str:
    if not lines:
        return ""
    return f"**{title}:**\n" + "\n".join(f"- {line}" for line in lines)


def certainty_section(k, source, cited) -> str:
    """Say in one line how sure the card is: its guidance, then each value not verified, by how far."""
    (guidance, _), *_ = sources = cited_sources(k, source, cited)
    levels: dict[str, list[str]] = {}
    for src, names in sources:
        if src.verification != "verified" and names:
            level = CAUTION[src.verification] + (f" ({src.label})" if src.verification == "local" else "")
            levels.setdefault(level, []).extend(n for n in names if n not in levels.get(level, []))
    parts = [f"guidance {CAUTION.get(guidance.verification, 'verified')}"]
    parts += [f"{level}: {', '.join(names)}" for level, names in levels.items()]
    return f"**How sure:** {'; '.join(parts)}."


def cited_sources(k, source, cited) -> list[tuple[object, list[str]]]:
    """Return the card's source and each source of a value it cites, with the values it gives."""
    used: dict[str, list[str]] = {source.id: []}
    sources = {source.id: source}
    for key in cited:
        param = k.param(key)
        if param.source.for_review:
            continue  # listed by `imnm-cds knowledge-report` for the clinical owner instead
        names = used.setdefault(param.source.id, [])
        if parameter_name(k, key) not in names:
            names.append(parameter_name(k, key))
        sources[param.source.id] = param.source
    return [(sources[id_], names) for id_, names in used.items()]


def parameter_name(k, key: str) -> str:
    """Name a cited parameter as a clinician would, e.g. 'anti-HMGCR sensitivity'."""
    if "label" in k.param(key).attributes:
        return k.param(key).attributes["label"]
    parts = key.split(".")
    if parts[1] == "tests":
        return f"{k.text(f'labels.concepts.{parts[2]}')} {parts[3]}"
    if parts[1] == "pretest":
        return "pre-test probability"
    return parts[-1].replace("-", " ")
