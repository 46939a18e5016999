"""Every registered rule can fire: none binds one fact twice, and each fires in a fixture or a test."""

from __future__ import annotations

import json
import re

import durable.lang
import pytest

from conftest import FIRED_RULES, load, scenarios
from rules import RULE_MODULES
from service.cli import scenario_target
from service.evaluate.engine import Emit


def patterns(rule: dict) -> list[tuple[str, set[str], set[str]]]:
    """Return each pattern of a rule: its alias, the fact types and the names or codes it asks for."""
    found = []
    for pattern in rule.get("all") or rule.get("any") or []:
        for alias, expression in pattern.items():
            text = json.dumps(expression)
            types = set(re.findall(r'"t": "([^"]+)"', text))
            found.append((alias, types, set(re.findall(r'"(?:name|code)": "([^"]+)"', text))))
    return found


def test_no_rule_has_two_patterns_for_one_fact(knowledge):
    # The engine never binds one fact to two patterns of one rule: such a rule can never fire.
    rules = durable.lang.ruleset("audit")
    durable.lang._rulesets.pop("audit", None)
    with rules:
        for module in RULE_MODULES:
            module.define(knowledge, Emit({}, {}))
    _, definition = rules.define()
    overlapping = []
    for rule in definition.values():
        found = patterns(rule)
        for i, (alias, types, names) in enumerate(found):
            for other, other_types, other_names in found[i + 1 :]:
                if types & other_types and (not names or not other_names or names & other_names):
                    overlapping.append(f"{rule['run'].__name__}: c.{alias} and c.{other}")
    assert len(definition) > 50
    assert overlapping == []


def test_every_registered_rule_fires(client, evaluator, whole_suite):
    for scenario in scenarios():
        request = load(scenario / "request.json")
        client.post(scenario_target(request, ""), json=request)
    assert FIRED_RULES, "no rule fired in any fixture"
    if not whole_suite:
        pytest.skip("every rule is checked when the whole suite runs (other tests fire the rest)")
    # The engine's own housekeeping rules (its sink never fires by design) are not clinical rules.
    clinical = {r for r in evaluator.engine.rule_ids if not r.startswith("engine.")}
    assert len(clinical) > 50
    never = sorted(clinical - FIRED_RULES)
    assert never == [], "rules no fixture or test fires: " + ", ".join(never)
