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
    """Compile a pattern from rules/reports.toml: every one is case-insensitive."""
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
    cues = None
    for feature in features:
        if feature.name in found:
            continue
        for mention in feature.mentions:
            for match in mention.pattern.finditer(sentence):
                cues = cues or Cues.find(r, sentence)
                state = cues.state(match, mention)
                if RANK[state] > RANK[found.get(feature.name, "unknown")]:
                    found[feature.name] = state
    return found


@dataclass(frozen=True)
class Cues:
    """Where each cue sits in one sentence, found once for all its mentions."""

    spans: dict[str, list[tuple[int, int]]]
    length: int

    @classmethod
    def find(cls, r: Reader, sentence: str) -> Cues:
        spans = {name: [m.span() for m in r.cues[name].finditer(sentence)] for name in CUES}
        # A negation cue inside a pseudo-negation or an uncertainty phrase ("not ruled out") is no cue.
        phrases = spans["pseudo"] + spans["post-uncertain"]
        for name in ("pre-negation", "post-negation"):
            spans[name] = [c for c in spans[name] if not any(s <= c[0] < e for s, e in phrases)]
        return cls(spans, len(sentence))

    def within(self, name: str, start: int, end: int) -> bool:
        return any(start <= s and e <= end for s, e in self.spans[name])

    def state(self, match: re.Match, mention: Mention) -> str:
        """Read one mention by the cues around it in its clause and sentence."""
        begin, end = match.span()
        historical = [e for s, e in self.spans["historical"] if e <= begin]
        if historical and not self.within("current", historical[-1], begin):
            return "unknown"
        # The clause: terminations outside the mention end a cue's scope.
        first = max((e for s, e in self.spans["termination"] if e <= begin), default=0)
        last = min((s for s, e in self.spans["termination"] if s >= end), default=self.length)
        if self.within("pre-uncertain", first, begin) or self.within("post-uncertain", end, last):
            return "uncertain"
        # A cue that opens the mention is part of the finding ("absent dysferlin staining").
        negated = mention.negatable and (
            self.within("pre-negation", first, begin)
            or self.within("pre-negation", begin + 1, end)
            or self.within("post-negation", begin + 1, last)
        )
        return "absent" if (mention.means == "absent") != negated else "present"
