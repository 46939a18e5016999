"""Update a probability by likelihood ratios, one piece of evidence at a time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    evidence: str  # e.g. "anti-HMGCR positive"
    likelihood_ratio: float
    probability: float  # after this step


def likelihood_ratio(sensitivity: float, specificity: float, positive: bool) -> float:
    """Return LR+ = sens / (1 - spec) for a positive result, LR- = (1 - sens) / spec for a negative one."""
    return sensitivity / (1.0 - specificity) if positive else (1.0 - sensitivity) / specificity


def update(pretest: float, evidence: list[tuple[str, float]]) -> list[Step]:
    """Apply each (evidence, likelihood ratio) in order to the pre-test probability via odds."""
    steps = []
    odds = pretest / (1.0 - pretest)
    for name, ratio in evidence:
        odds *= ratio
        steps.append(Step(name, ratio, odds / (1.0 + odds)))
    return steps
