"""Read report text as a clinician would: each feature present, absent, uncertain or unknown (ConText)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.fhir import as_list, as_str, attachment_text, texts

# Across mentions in one report: a finding stated anywhere wins over a doubt, a doubt over a denial.
RANK = {"unknown": 0, "absent": 1, "uncertain": 2, "present": 3}
# Knowledge is loaded once per process (tests load a few): compile its patterns once each.
COMPILED: dict[int, tuple[object, Reader]] = {}
CUES = (
    "termination",
    "pre-negation",
    "post-negation",
    "pseudo",
    "pre-uncertain",
    "post-uncertain",
    "historical",
    "current",
    "hypothetical",
)


@dataclass(frozen=True)
class Mention:
    pattern: re.Pattern
    means: str
    negatable: bool


@dataclass(frozen=True)
class Feature:
    name: str
    mentions: tuple[Mention, ...]
    label: re.Pattern | None  # names the feature in a "Label: value" line
    template_states: dict[str, str]  # value class -> state


@dataclass(frozen=True)
class Reader:
    cues: dict[str, re.Pattern]
    sentence: re.Pattern
    line: re.Pattern
    value_classes: tuple[tuple[str, re.Pattern], ...]
    features: dict[str, tuple[Feature, ...]]  # report kind -> its features


def compile_(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


def reader(k) -> Reader:
    """Return the report-reading rules in rules/reports.toml, compiled once per knowledge."""
    known = COMPILED.get(id(k))
    if known is None or known[0] is not k:
        COMPILED[id(k)] = known = (k, compile_reader(k))
    return known[1]


def compile_reader(k) -> Reader:
    """Compile the report-reading rules in rules/reports.toml."""
    classes = tuple(
        (name, compile_(k.value(f"reports.template.values.{name}")))
        for name in k.children("reports.template.values")
    )
    features = {}
    for kind in ("pathology", "mri"):
        found = []
        for name in k.children(f"reports.{kind}"):
            prefix = f"reports.{kind}.{name}"
            mentions, label, states = [], None, {c: c for c, _ in classes}
            states |= {"normal": "absent", "marked": "present"}
            for part in k.children(prefix):
                if part == "label":
                    continue
                param = k.param(f"{prefix}.{part}")
                if part == "template":
                    label = compile_(param.value)
                    states |= {c: param.attributes[c] for c, _ in classes if c in param.attributes}
                    continue
                mentions.append(
                    Mention(
                        compile_(param.value),
                        param.attributes.get("means", "present"),
                        param.attributes.get("negatable", True),
                    )
                )
            found.append(Feature(name.replace("-", "_"), tuple(mentions), label, states))
        features[kind] = tuple(found)
    return Reader(
        cues={cue: compile_(k.value(f"reports.context.{cue}")) for cue in CUES},
        sentence=compile_(k.value("reports.context.sentence")),
        line=compile_(k.value("reports.template.line")),
        value_classes=classes,
        features=features,
    )


def report_text(data: dict) -> str:
    """Return what a report says in words: conclusion, coded conclusions, plain-text attachments."""
    parts = [as_str(data.get("conclusion")) or ""]
    for concept in as_list(data.get("conclusionCode")):
        parts += texts(concept)
    parts += [attachment_text(a) for a in as_list(data.get("presentedForm"))]
    return "\n".join(p for p in parts if p)


def read(k, kind: str, text: str) -> dict[str, str]:
    """Return every feature of a report kind ('pathology', 'mri') as the text states it."""
    r = reader(k)
    states = dict.fromkeys((f.name for f in r.features[kind]), "unknown")
    for sentence in r.sentence.split(text):
        for name, state in read_sentence(r, r.features[kind], sentence).items():
            if RANK[state] > RANK[states[name]]:
                states[name] = state
    return states


def read_sentence(r: Reader, features, sentence: str) -> dict[str, str]:
    """Read one sentence: a "Label: value" line by its label, any other text mention by mention."""
    if r.cues["hypothetical"].search(sentence):
        return {}
    found: dict[str, str] = {}
    template = r.line.match(sentence)
    if template:
        label, value = template.group(1), template.group(2)
        value_class = next(name for name, pattern in r.value_classes if pattern.match(value))
        for feature in features:
            if feature.label is not None and feature.label.search(label):
                found[feature.name] = feature.template_states[value_class]
        sentence = value
    for feature in features:
        if feature.name in found:
            continue
        for mention in feature.mentions:
            for match in mention.pattern.finditer(sentence):
                state = mention_state(r, sentence, match, mention)
                if RANK[state] > RANK[found.get(feature.name, "unknown")]:
                    found[feature.name] = state
    return found


def mention_state(r: Reader, sentence: str, match: re.Match, mention: Mention) -> str:
    """Read one mention by the cues around it in its clause and sentence."""
    if historical(r, sentence[: match.start()]):
        return "unknown"
    start, end = clause(r, sentence, match)
    before, inside, after = sentence[start : match.start()], match.group(), sentence[match.end() : end]
    denied = mention.means == "absent"

    def negation(name: str, text: str) -> bool:
        return any(not pseudo(r, text, m) for m in r.cues[name].finditer(text))

    if r.cues["pre-uncertain"].search(before) or r.cues["post-uncertain"].search(after):
        return "uncertain"
    if mention.negatable and (
        negation("pre-negation", before)
        or negation("post-negation", after)
        or negation("pre-negation", inside)
        or negation("post-negation", inside)
    ):
        denied = not denied
    return "absent" if denied else "present"


def clause(r: Reader, sentence: str, match: re.Match) -> tuple[int, int]:
    """Return the bounds of the clause around a mention: terminations outside it end the scope."""
    start, end = 0, len(sentence)
    for term in r.cues["termination"].finditer(sentence):
        if term.end() <= match.start():
            start = term.end()
        elif term.start() >= match.end():
            end = term.start()
            break
    return start, end


def pseudo(r: Reader, text: str, cue: re.Match) -> bool:
    """Tell whether a negation cue is part of a pseudo-negation or an uncertainty phrase, so no cue."""
    for phrase in (*r.cues["pseudo"].finditer(text), *r.cues["post-uncertain"].finditer(text)):
        if phrase.start() <= cue.start() < phrase.end():
            return True
    return False


def historical(r: Reader, before: str) -> bool:
    """Tell whether a historical cue precedes a mention with no 'current' cue after it."""
    cues = list(r.cues["historical"].finditer(before))
    return bool(cues) and not r.cues["current"].search(before, cues[-1].end())
