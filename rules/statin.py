"""Statin advice: muscle symptoms on a statin (EAS bands), toxic or autoimmune CK kinetics, re-challenge."""

from durable.lang import c, m, pri, when_all

from rules.knowledge import INDICATORS
from rules.match import antibody, any_name, clinical, finding, of_type

SYMPTOMS = ("myalgia", "proximal-weakness", "statin-associated-muscle-symptoms")


def define(k, emit):
    """Register the statin rules in the active ruleset."""
    raised = k.value("imnm.ck.raised")
    window = k.value("statin.persistence-window")
    window_words = k.quote("statin.persistence-window")
    tolerance = k.value("statin.expected-tolerance")
    relevance = k.value("statin.relevance-window")
    persisting = k.value("statin.persistence-ck")
    recent = k.value("statin.recent-ck")
    moderate, high, very_high = (k.value(f"statin.bands.{b}") for b in ("moderate", "high", "very-high"))

    def stopped(*conditions):
        """Match the CK kinetics of a stopped statin, with more conditions."""
        expression = of_type("ck-kinetics") & (m.applicable == True)
        for condition in conditions:
            expression = expression & condition
        return expression

    # Stage 1: base facts -> findings.

    @when_all(pri(1), c.sx << (of_type("clinical") & (m.state == "present") & any_name(SYMPTOMS)))
    def muscle_symptoms(c):
        emit.finding(c, "muscle-symptoms", c.sx)

    def after_stop(*conditions):
        """Match kinetics with a CK taken after the persistence window and within the relevance window."""
        return stopped(m.latest_days_after_stop >= window, m.latest_days_after_stop <= relevance, *conditions)

    @when_all(pri(1), c.kin << after_stop(m.latest_x_uln > persisting))
    def ck_persists_after_stop(c):
        emit.finding(c, "ck-persists-after-statin", c.kin)

    @when_all(
        pri(1),
        c.kin << after_stop(m.rising_after_stop == True, m.latest_x_uln > raised),
    )
    def ck_rises_after_stop(c):
        emit.finding(c, "ck-rises-after-statin", c.kin)

    @when_all(
        pri(1),
        c.kin << stopped(),
        c.w
        << (
            clinical("proximal-weakness")
            & (m.state == "present")
            & (m.onset_days_ago < c.kin.days_since_stop - window)
            & (m.onset_days_ago > c.kin.days_since_stop - relevance)
        ),
    )
    def weakness_after_stop(c):
        emit.finding(c, "weakness-after-statin", c.kin, c.w)

    # Stage 2: conclusions. On patient-view: kinetics of a recently stopped statin.

    def recently_stopped(*conditions):
        return c.kin << stopped(m.days_since_stop <= relevance, m.peak_x_uln > raised, *conditions)

    def autoimmune(c, reason):
        orders = ["ck", "referral-neuromuscular"]
        if c.hmgcr.state in ("not-tested", "indeterminate"):
            orders.insert(0, "anti-hmgcr")
        emit.card(
            c,
            "statin-autoimmune-pattern",
            c.ap,
            c.kin,
            c.hmgcr,
            reasons=[reason],
            orders=orders,
            **kinetics(c.kin),
        )

    def pattern(code):
        return (
            c.ap << finding(code),
            recently_stopped(),
            c.hmgcr << antibody("anti-hmgcr"),
            c.dx << (clinical("diagnosis-imnm") & (m.state == "unknown")),
        )

    @when_all(pri(2), *pattern("ck-persists-after-statin"))
    def autoimmune_persistent_ck(c):
        autoimmune(
            c,
            f"CK was still {c.kin.latest_x_uln:.1f}× ULN "
            f"{c.kin.latest_days_after_stop:.0f} days after stopping",
        )

    @when_all(pri(2), *pattern("ck-rises-after-statin"))
    def autoimmune_rising_ck(c):
        autoimmune(c, "CK rose between results taken after stopping")

    @when_all(pri(2), *pattern("weakness-after-statin"))
    def autoimmune_new_weakness(c):
        autoimmune(c, f"proximal weakness began more than {window_words} after stopping")

    settling_as_expected = (
        (m.latest_x_uln > raised)
        & (m.latest_days_after_stop < window)
        & (m.expected_ratio <= tolerance)
        & (m.rising_after_stop == False)
    )

    def no_autoimmune_myopathy_known():
        """Match only when nothing known makes a settling CK more than toxicity."""
        return (
            c.hmgcr << (antibody("anti-hmgcr") & (m.state != "positive")),
            c.dx << (clinical("diagnosis-imnm") & (m.state == "unknown")),
            c.sm << (clinical("statin-myopathy") & (m.state == "unknown")),
        )

    @when_all(pri(2), recently_stopped(settling_as_expected), *no_autoimmune_myopathy_known())
    def toxic_resolving(c):
        emit.card(c, "statin-toxic-resolving", c.kin, c.hmgcr, **kinetics(c.kin))

    @when_all(pri(2), recently_stopped(m.latest_x_uln <= raised), *no_autoimmune_myopathy_known())
    def toxic_resolved(c):
        emit.card(c, "statin-toxic-resolved", c.kin, c.hmgcr, **kinetics(c.kin))

    # A falling or normal CK never reassures when the myopathy is known to be autoimmune.

    def settling():
        return recently_stopped((m.latest_x_uln <= raised) | settling_as_expected)

    def not_simple_toxicity(c, reason):
        emit.card(c, "statin-not-simple-toxicity", c.kin, c.why, reasons=[reason], **kinetics(c.kin))

    @when_all(pri(2), settling(), c.why << (antibody("anti-hmgcr") & (m.state == "positive")))
    def settling_with_hmgcr(c):
        not_simple_toxicity(c, "anti-HMGCR antibodies are positive")

    @when_all(pri(2), settling(), c.why << (clinical("statin-myopathy") & (m.state != "unknown")))
    def settling_with_statin_myopathy(c):
        not_simple_toxicity(c, "anti-HMGCR or statin-associated autoimmune myopathy is recorded")

    @when_all(pri(2), settling(), c.why << (clinical("diagnosis-imnm") & (m.state != "unknown")))
    def settling_with_imnm(c):
        not_simple_toxicity(c, "an IMNM diagnosis is recorded")

    @when_all(pri(2), recently_stopped(m.after_stop_count == 0))
    def no_ck_since_stop(c):
        emit.card(c, "statin-ck-recheck", c.kin, **kinetics(c.kin))

    @when_all(
        pri(2),
        recently_stopped(
            m.latest_x_uln > raised,
            m.latest_days_after_stop < window,
            (m.expected_ratio > tolerance) | (m.rising_after_stop == True),
        ),
    )
    def slow_fall_too_early_to_judge(c):
        emit.card(c, "statin-ck-recheck", c.kin, **kinetics(c.kin))

    # On patient-view: muscle symptoms or raised CK on a current statin, by the EAS 2015 CK bands.

    def on_statin():
        return c.st << (of_type("statin") & (m.exposure == "current"))

    def recent_ck(*conditions):
        expression = of_type("ck") & (m.tested == True) & (m.latest_days_ago <= recent)
        for condition in conditions:
            expression = expression & condition
        return c.ck << expression

    @when_all(
        pri(2),
        on_statin(),
        c.sx << finding("muscle-symptoms"),
        recent_ck(m.latest_x_uln <= raised),
        c.tsh << of_type("tsh"),
    )
    def symptoms_normal_ck(c):
        sams(c, "sams-normal-ck", c.sx)

    @when_all(
        pri(2),
        on_statin(),
        c.sx << finding("muscle-symptoms"),
        c.ck << (of_type("ck") & ((m.tested == False) | (m.latest_days_ago > recent))),
        c.tsh << of_type("tsh"),
    )
    def symptoms_without_recent_ck(c):
        sams(c, "sams-ck-unknown", c.sx, orders=["ck"])

    @when_all(
        pri(2),
        on_statin(),
        c.sx << finding("muscle-symptoms"),
        recent_ck(m.latest_x_uln > raised, m.latest_x_uln <= moderate),
        c.tsh << of_type("tsh"),
    )
    def symptoms_mild_ck(c):
        sams(c, "sams-mild", c.sx, orders=["ck"])

    @when_all(
        pri(2),
        on_statin(),
        c.ache << (clinical("myalgia") & (m.state == "unknown")),
        c.weak << (clinical("proximal-weakness") & (m.state == "unknown")),
        c.sams << (clinical("statin-associated-muscle-symptoms") & (m.state == "unknown")),
        recent_ck(m.latest_x_uln > raised, m.latest_x_uln <= moderate),
        c.tsh << of_type("tsh"),
    )
    def incidental_mild_ck(c):
        sams(c, "statin-ck-incidental")

    @when_all(
        pri(2),
        on_statin(),
        recent_ck(m.latest_x_uln > moderate, m.latest_x_uln <= high),
        c.tsh << of_type("tsh"),
    )
    def ck_four_to_ten_times(c):
        sams(c, "sams-moderate", orders=["ck"])

    @when_all(
        pri(2),
        on_statin(),
        recent_ck(m.latest_x_uln > high, m.latest_x_uln <= very_high),
        c.tsh << of_type("tsh"),
    )
    def ck_over_ten_times(c):
        sams(c, "sams-high", orders=["ck"])

    @when_all(pri(2), on_statin(), recent_ck(m.latest_x_uln > very_high), c.tsh << of_type("tsh"))
    def ck_over_forty_times(c):
        sams(c, "sams-very-high", orders=["creatinine", "urine-myoglobin", "ck"])

    # On order-select and order-sign: a statin about to be ordered for a patient at risk.

    def drafted():
        """Match orders being placed that are, or may be, a statin."""
        return c.draft << (of_type("draft-statin") & ((m.count > 0) | (m.unidentified > 0)))

    # By cause: a statin-triggered myopathy is critical; other IMNM (anti-SRP, seronegative) and a CK
    # pattern not yet explained are warnings.

    @when_all(pri(2), drafted(), c.why << (antibody("anti-hmgcr") & (m.state == "positive")))
    def rechallenge_after_hmgcr(c):
        rechallenge(c, "anti-HMGCR antibodies are positive", "statin-triggered")

    @when_all(pri(2), drafted(), c.why << (clinical("statin-myopathy") & (m.state != "unknown")))
    def rechallenge_after_statin_myopathy(c):
        rechallenge(c, "anti-HMGCR or statin-associated autoimmune myopathy is recorded", "statin-triggered")

    @when_all(pri(2), drafted(), c.why << (of_type("statin-allergy") & (m.myopathy == True)))
    def rechallenge_after_statin_allergy(c):
        rechallenge(c, "a statin allergy with a muscle reaction is recorded", "statin-triggered")

    @when_all(pri(2), drafted(), c.why << (clinical("diagnosis-imnm") & (m.state != "unknown")))
    def rechallenge_after_imnm(c):
        rechallenge(c, "an IMNM diagnosis is recorded", "other-cause")

    @when_all(
        pri(2),
        drafted(),
        c.why
        << (
            (m.t == "finding")
            & (
                (m.code == "ck-persists-after-statin")
                | (m.code == "ck-rises-after-statin")
                | (m.code == "weakness-after-statin")
            )
        ),
    )
    def rechallenge_after_autoimmune_pattern(c):
        rechallenge(c, "muscle injury persisted or progressed after the last statin dose", "other-cause")

    def rechallenge(c, reason, situation):
        if c.draft.count:
            orders = ["remove-draft-statin"]
            emit.card(
                c,
                "statin-rechallenge-risk",
                c.draft,
                c.why,
                reasons=[reason],
                orders=orders,
                situations=[situation],
            )
        else:  # no statin among the orders, but a drug that cannot be told may be one
            emit.card(
                c,
                "statin-rechallenge-unidentified",
                c.draft,
                c.why,
                reasons=[reason],
                unidentified=c.draft.unidentified,
            )

    emit.finish("statin-rechallenge-risk", lambda params: most_severe(k, params))

    def sams(c, key, *basis, orders=()):
        """Ask for a statin-muscle-symptoms card; suggest a TSH unless one was checked recently."""
        if c.tsh.days_ago is None or c.tsh.days_ago > k.value("statin.recent-tsh"):  # untested or undated
            orders = [*orders, "tsh"]
        emit.card(c, key, c.st, c.ck, c.tsh, *basis, ck_x_uln=c.ck.latest_x_uln, orders=list(orders))


def most_severe(k, params: dict) -> dict:
    """Give the re-challenge card the indicator of its gravest cause (rules/indicators.toml)."""
    found = [k.indicator(f"statin-rechallenge-risk.{s}") for s in params["situations"]]
    return {**params, "indicator": max(found, key=INDICATORS.index)}


def kinetics(kin) -> dict:
    """Return what the kinetics cards show: days since the last dose, the latest CK, when to recheck."""
    values = {
        "days_since_stop": kin.days_since_stop,
        "recheck_on": kin.recheck_on,
        "last_dose": f"{kin.stop_on}, {'recorded' if kin.stop_known else 'inferred from the prescriptions'}",
    }
    if kin.after_stop_count:
        values.update(ck_x_uln=kin.latest_x_uln, days_after_stop=kin.latest_days_after_stop)
    return values
