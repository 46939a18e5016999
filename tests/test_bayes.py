"""The Bayesian update, against the worked example our clinical source gives."""

from __future__ import annotations

import pytest

from rules.bayes import likelihood_ratio, update


def test_positive_anti_hmgcr_takes_the_worked_example_from_0_20_to_0_79():
    ratio = likelihood_ratio(0.75, 0.95, positive=True)
    assert ratio == pytest.approx(15.0)
    assert update(0.20, [("anti-HMGCR positive", ratio)])[-1].probability == pytest.approx(0.789, abs=5e-4)


def test_negative_anti_hmgcr_in_the_worked_example():
    # The worked example quotes 0.066 for a negative result: that is the post-test odds
    # (0.25 x 0.263 = 0.0658). As a probability it is 0.0617, which is what the service reports.
    ratio = likelihood_ratio(0.75, 0.95, positive=False)
    assert ratio == pytest.approx(0.263, abs=5e-4)
    probability = update(0.20, [("anti-HMGCR negative", ratio)])[-1].probability
    assert probability / (1 - probability) == pytest.approx(0.066, abs=5e-4)
    assert probability == pytest.approx(0.0617, abs=5e-4)


def test_each_step_updates_the_odds_in_turn():
    steps = update(0.5, [("a", 3.0), ("b", 1 / 3.0), ("c", 9.0)])
    assert [s.probability for s in steps] == pytest.approx([0.75, 0.5, 0.9])
    assert [s.evidence for s in steps] == ["a", "b", "c"]


def test_no_evidence_leaves_no_steps():
    assert update(0.2, []) == []
