"""Update the probability of IMNM by the antibody panel as one test, then by further evidence."""

from __future__ import annotations

from dataclasses import dataclass

POSITIVE, NEGATIVE = "positive", "negative"


@dataclass(frozen=True)
class Step:
    evidence: str  # e.g. "anti-HMGCR positive"
    likelihood_ratio: float
    probability: float  # after this step


@dataclass(frozen=True)
class Panel:
    """The IMNM antibody panel in one clinical context: one test with mutually exclusive outcomes.

    Within IMNM the subtypes exclude each other: anti-HMGCR positive (share `hmgcr`), anti-SRP
    positive (`srp`) or both negative (the rest). Outside IMNM each antibody is falsely positive at
    its own rate. Every partial result is read from the same table, so results taken one after the
    other give exactly the likelihood ratio of the combined outcome, whatever their order.
    """

    context: str
    hmgcr: float  # P(anti-HMGCR+ | IMNM)
    srp: float  # P(anti-SRP+ | IMNM)
    false_hmgcr: float  # P(anti-HMGCR+ | not IMNM)
    false_srp: float  # P(anti-SRP+ | not IMNM)

    def __post_init__(self):
        for share in (self.hmgcr, self.srp, self.false_hmgcr, self.false_srp):
            if not 0 < share < 1:
                raise ValueError(f"{self.context}: every share must lie strictly between 0 and 1")
        if self.hmgcr + self.srp >= 1 or self.false_hmgcr + self.false_srp >= 1:
            raise ValueError(f"{self.context}: the outcomes must leave room for both negative")

    @property
    def seronegative(self) -> float:
        """P(both negative | IMNM): the antibody-negative share of IMNM."""
        return 1.0 - self.hmgcr - self.srp

    def outcomes(self, imnm: bool) -> dict[tuple[str, str], float]:
        """Return P(outcome | IMNM), or P(outcome | not IMNM), of each (anti-HMGCR, anti-SRP) outcome."""
        h, s = (self.hmgcr, self.srp) if imnm else (self.false_hmgcr, self.false_srp)
        return {(POSITIVE, NEGATIVE): h, (NEGATIVE, POSITIVE): s, (NEGATIVE, NEGATIVE): 1.0 - h - s}

    def likelihood_ratio(self, hmgcr: str | None, srp: str | None) -> float | None:
        """Return the likelihood ratio of what is known of the panel; None when nothing or both positive."""
        if hmgcr is None and srp is None:
            return None

        def chance(imnm: bool) -> float:
            outcomes = self.outcomes(imnm).items()
            return sum(p for (h, s), p in outcomes if hmgcr in (None, h) and srp in (None, s))

        # Both positive matches no outcome: the subtypes exclude each other, so it is indeterminate.
        return chance(True) / chance(False) if chance(False) else None

    def outcome(self, hmgcr: str | None, srp: str | None) -> str:
        """Name what is known of the panel, as the table of rules/PROBABILITY.md names its rows."""
        known = {POSITIVE, NEGATIVE}
        hmgcr, srp = (state if state in known else None for state in (hmgcr, srp))
        if hmgcr == srp == POSITIVE:
            return "both positive (indeterminate)"
        if POSITIVE in (hmgcr, srp):
            return "anti-HMGCR positive" if hmgcr == POSITIVE else "anti-SRP positive"
        if hmgcr == srp == NEGATIVE:
            return "both negative"
        if hmgcr:
            return "anti-HMGCR negative, anti-SRP not done"
        return "anti-SRP negative, anti-HMGCR not done" if srp else "not tested"

    def evidence(self, results: list[tuple[str, str]]) -> list[tuple[str, float]]:
        """Turn antibody results in the order given into steps, each the ratio it adds to those before."""
        known: dict[str, str] = {}
        before, steps = 1.0, []
        for antibody, state in results:
            if state not in (POSITIVE, NEGATIVE) or antibody in known:
                continue
            known[antibody] = state
            ratio = self.likelihood_ratio(known.get("anti-hmgcr"), known.get("anti-srp"))
            if ratio is None:
                return []  # both positive: no update can be stated
            label = {"anti-hmgcr": "anti-HMGCR", "anti-srp": "anti-SRP"}[antibody]
            steps.append((f"{label} {state}", ratio / before))
            before = ratio
        return steps


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
