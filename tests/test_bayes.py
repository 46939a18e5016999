"""The Bayesian update, against the worked example our clinical source gives."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rules.bayes import Panel, likelihood_ratio, update


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


STATIN = Panel("statin on record", hmgcr=0.75, srp=0.05, false_hmgcr=0.05, false_srp=0.01)
NO_STATIN = Panel("no statin or unknown", hmgcr=0.35, srp=0.25, false_hmgcr=0.05, false_srp=0.05)


def probability(panel: Panel, pretest: float, results: list[tuple[str, str]]) -> float:
    steps = update(pretest, panel.evidence(results))
    return steps[-1].probability if steps else pretest


@pytest.mark.parametrize(
    "panel, results, expected",
    [
        (STATIN, [("anti-hmgcr", "positive")], 0.789),
        (STATIN, [("anti-hmgcr", "negative")], 0.062),
        (NO_STATIN, [("anti-hmgcr", "positive")], 0.636),
        (NO_STATIN, [("anti-hmgcr", "negative")], 0.146),
        (STATIN, [("anti-hmgcr", "negative"), ("anti-srp", "negative")], 0.051),
        (NO_STATIN, [("anti-hmgcr", "negative"), ("anti-srp", "negative")], 0.100),
        (STATIN, [("anti-srp", "positive")], 0.556),
        (NO_STATIN, [("anti-srp", "positive")], 0.556),
    ],
)
def test_the_panel_gives_the_figures_worked_by_hand(panel, results, expected):
    assert probability(panel, 0.20, results) == pytest.approx(expected, abs=5e-4)


def test_both_positive_is_indeterminate():
    assert STATIN.likelihood_ratio("positive", "positive") is None
    assert STATIN.evidence([("anti-hmgcr", "positive"), ("anti-srp", "positive")]) == []


def test_a_panel_that_leaves_no_room_for_seronegative_imnm_is_refused():
    with pytest.raises(ValueError, match="both negative"):
        Panel("incoherent", hmgcr=0.75, srp=0.25, false_hmgcr=0.05, false_srp=0.05)


states = st.sampled_from(["positive", "negative", "not-tested"])


@st.composite
def panels(draw) -> Panel:
    """A coherent panel in which each antibody is commoner within IMNM than outside it."""
    false_hmgcr, false_srp = draw(st.floats(0.001, 0.2)), draw(st.floats(0.001, 0.2))
    hmgcr = draw(st.floats(false_hmgcr + 0.01, 0.8))
    srp = draw(st.floats(false_srp + 0.01, max(false_srp + 0.011, 0.98 - hmgcr)))
    assume(hmgcr + srp < 0.99)
    return Panel("drawn", hmgcr, srp, false_hmgcr, false_srp)


@given(panels())
def test_within_imnm_the_outcomes_sum_to_one(panel):
    assert sum(panel.outcomes(imnm=True).values()) == pytest.approx(1.0)
    assert sum(panel.outcomes(imnm=False).values()) == pytest.approx(1.0)


@given(panels(), st.floats(0.01, 0.99), states, states)
def test_the_order_of_results_never_changes_the_answer(panel, pretest, hmgcr, srp):
    results = [("anti-hmgcr", hmgcr), ("anti-srp", srp)]
    forward, backward = probability(panel, pretest, results), probability(panel, pretest, results[::-1])
    assert forward == pytest.approx(backward, rel=1e-9)
    assert 0 < forward < 1


@given(panels(), st.floats(0.01, 0.99), states, st.sampled_from(["positive", "negative"]))
def test_a_positive_never_lowers_and_a_negative_never_raises(panel, pretest, first, second):
    before = probability(panel, pretest, [("anti-hmgcr", first)])
    after = probability(panel, pretest, [("anti-hmgcr", first), ("anti-srp", second)])
    if first == "positive" and second == "positive":
        return  # indeterminate: no figure is given at all
    if second == "positive":
        assert after >= before
    else:
        assert after <= before
