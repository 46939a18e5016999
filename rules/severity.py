"""Severity red flags (swallowing, breathing, anti-SRP, anti-MDA5) and escalation of failing treatment."""

from durable.lang import c, m, pri, when_all

from rules.match import antibody, any_code, clinical, finding, muscle_involved, of_type

SEVERE_ORDERS = ["referral-neuromuscular", "methylprednisolone-iv", "ivig"]
# What each severe feature adds to the severe card: its orders and the sentence saying what to do today.
BREATHING = (["blood-gases", "spirometry", "niv-assessment"], "breathing")
SEVERE_PLAN = {
    "severe-dysphagia": (["swallow-assessment"], "swallow"),
    "severe-respiratory-failure": BREATHING,
    "severe-fvc": BREATHING,
    "low-fvc": BREATHING,
}
CARDIAC_ORDERS = ["ecg", "troponin-i"]
ESCALATION_CARDS = ("treatment-escalation", "treatment-intensify")
SEVERE_FEATURES = ["severe-dysphagia", "severe-respiratory-failure", "severe-fvc", "severe-ck-rising"]


def define(k, emit):
    """Register the severity and escalation rules in the active ruleset."""
    low_fvc = k.value("severity.fvc.low")
    critical_fvc = k.value("severity.fvc.critical")
    fvc_decline = k.value("severity.fvc.decline")
    decline_window = k.quote("severity.fvc.decline-window")
    rapid = k.value("severity.srp-rising-within")
    refractory_days = k.value("severity.refractory.days")
    raised = k.value("imnm.ck.raised")
    cancer_window = k.value("cancer.window")

    # Red flags: each waits for muscle involvement, so a stroke's dysphagia is not a myositis card.

    @when_all(pri(2), c.d << (clinical("dysphagia") & (m.state == "present")), muscle_involved())
    def dysphagia(c):
        emit.finding(c, "severe-dysphagia", c.d, severe="dysphagia")
        emit.card(c, "dysphagia-red-flag", c.d, c.mu)

    @when_all(pri(2), c.rf << (clinical("respiratory-failure") & (m.state == "present")), muscle_involved())
    def respiratory_failure(c):
        emit.finding(c, "severe-respiratory-failure", c.rf, severe="respiratory failure")
        emit.card(c, "respiratory-failure-red-flag", c.rf, c.mu)

    @when_all(
        pri(2), c.fvc << (of_type("fvc") & (m.tested == True) & (m.latest_pct <= low_fvc)), muscle_involved()
    )
    def low_fvc_red_flag(c):
        emit.card(c, "fvc-red-flag", c.fvc, c.mu, reasons=[f"FVC is {c.fvc.latest_pct:g}% predicted"])

    @when_all(pri(2), c.fvc << (of_type("fvc") & (m.decline >= fvc_decline)), muscle_involved())
    def falling_fvc(c):
        emit.finding(c, "fvc-falling", c.fvc)
        reason = f"FVC fell {c.fvc.decline:g} points within {decline_window}"
        emit.card(c, "fvc-red-flag", c.fvc, c.mu, reasons=[reason])

    @when_all(pri(2), c.fvc << (of_type("fvc") & (m.tested == True) & (m.latest_pct < critical_fvc)))
    def critical_fvc_level(c):
        emit.finding(
            c,
            "severe-fvc",
            c.fvc,
            severe=f"FVC {c.fvc.latest_pct:g}% predicted",
            cite="severity.fvc.critical",
        )

    @when_all(
        pri(2),
        c.ck << (of_type("ck") & (m.trend == "rising") & (m.trend_days <= rapid) & (m.latest_x_uln > raised)),
        c.w << (clinical("proximal-weakness") & (m.state == "present")),
    )
    def ck_rising_fast_with_weakness(c):
        severe = (
            f"CK rising fast (to {c.ck.latest_x_uln:.0f}× ULN within {c.ck.trend_days:g} days) with weakness"
        )
        emit.finding(c, "severe-ck-rising", c.ck, c.w, severe=severe, cite="severity.srp-rising-within")

    # Severe, rapidly progressive IMNM: one critical card, which takes the red flags' place (cards.toml).
    @when_all(
        pri(4),
        c.active << finding("imnm-active"),
        c.sev << ((m.t == "finding") & any_code(SEVERE_FEATURES)),
        c.srp << antibody("anti-srp"),
        c.hmgcr << antibody("anti-hmgcr"),
        c.statin << of_type("statin"),
    )
    def severe_imnm(c):
        srp = c.srp.state == "positive"
        subtype = next(
            (
                k.text(f"labels.concepts.{n}")
                for n, f in (("anti-srp", c.srp), ("anti-hmgcr", c.hmgcr))
                if f.state == "positive"
            ),
            "antibody-negative",
        )
        emit.card(
            c,
            "imnm-severe",
            c.active,
            c.sev,
            features=[c.sev.severe],
            severe_codes=[c.sev.code],
            subtype=subtype,
            rituximab=k.text("severity.texts.rituximab-srp" if srp else "severity.texts.rituximab"),
            cardiac=k.text("severity.texts.cardiac") if srp else "",
            stop_statin=k.text("severity.texts.stop-statin") if c.statin.exposure == "current" else "",
            orders=[*SEVERE_ORDERS, *(CARDIAC_ORDERS if srp else [])],
            cited=[c.sev.cite] if c.sev.cite else [],
        )

    # The low FVC warning folds into the severe card: its breathing assessment comes with it.
    @when_all(
        pri(4),
        c.active << finding("imnm-active"),
        c.sev << ((m.t == "finding") & any_code(SEVERE_FEATURES)),
        c.fvc << (of_type("fvc") & (m.tested == True) & (m.latest_pct <= low_fvc)),
    )
    def severe_imnm_low_fvc(c):
        emit.card(c, "imnm-severe", c.fvc, severe_codes=["low-fvc"])

    emit.finish("imnm-severe", lambda params: severe_plan(k, params))

    @when_all(
        pri(2),
        c.srp << (antibody("anti-srp") & (m.state == "positive")),
        c.ck << (of_type("ck") & (m.trend == "rising") & (m.trend_days <= rapid) & (m.latest_x_uln > raised)),
    )
    def srp_rapidly_rising_ck(c):
        emit.card(
            c, "srp-rising-ck-red-flag", c.srp, c.ck, ck_x_uln=c.ck.latest_x_uln, days=f"{c.ck.trend_days:g}"
        )

    @when_all(
        pri(2),
        c.mda5 << (antibody("anti-mda5") & (m.state == "positive")),
        c.ild << clinical("interstitial-lung-disease"),
    )
    def anti_mda5(c):
        with_ild = c.ild.state != "unknown"
        situation = "with-ild" if with_ild else "without-ild"
        emit.card(c, "mda5-red-flag", c.mda5, c.ild, indicator=k.indicator(f"mda5-red-flag.{situation}"))

    # Escalation: treatment for long enough, and the disease still active (CK not falling, STIR oedema on
    # an MRI taken during treatment, FVC falling). Refractory needs a non-glucocorticoid agent that long.

    def long_on_treatment():
        return c.imm << (of_type("immunosuppression") & (m.on == True) & (m.days_on >= refractory_days))

    def subtype():
        return c.hmgcr << antibody("anti-hmgcr"), c.srp << antibody("anti-srp"), c.bx << of_type("biopsy")

    def ck_active():
        return (m.latest_x_uln > raised) & ((m.trend == "rising") | (m.trend == "stable"))

    @when_all(pri(3), long_on_treatment(), c.ck << (of_type("ck") & ck_active()), *subtype())
    def ck_not_falling_on_treatment(c):
        escalate(c, c.ck, f"CK is still {c.ck.latest_x_uln:.1f}× ULN and {c.ck.trend}")

    @when_all(
        pri(3),
        long_on_treatment(),
        c.mri << (of_type("mri") & (m.stir_oedema == "present") & (m.days_ago <= c.imm.days_on)),
        *subtype(),
    )
    def stir_oedema_on_treatment(c):
        escalate(c, c.mri, f"the latest muscle MRI ({c.mri.date}) shows STIR oedema, active inflammation")

    @when_all(
        pri(3),
        long_on_treatment(),
        c.fall << ((m.t == "finding") & (m.code == "fvc-falling")),
        *subtype(),
    )
    def fvc_falling_on_treatment(c):
        escalate(c, c.fall, "FVC is falling")

    # Weakness that persists without activity is damage or steroid myopathy until shown otherwise.
    @when_all(
        pri(3),
        long_on_treatment(),
        c.w
        << (
            clinical("proximal-weakness")
            & (m.state == "present")
            & (m.noted_days_ago <= c.imm.days_on - refractory_days)
        ),
        c.ck << (of_type("ck") & (m.latest_x_uln <= raised)),
        c.mri << (of_type("mri") & (m.stir_oedema != "present")),
    )
    def weakness_without_activity(c):
        into = round(c.imm.days_on - c.w.noted_days_ago)
        fatty = c.mri.fatty_replacement == "present"
        emit.card(
            c,
            "weakness-without-activity",
            c.imm,
            c.w,
            c.ck,
            c.mri,
            days_into=into,
            mri_note=k.text("severity.texts.mri-damage" if fatty else "severity.texts.mri-unknown"),
            orders=[] if c.mri.reported is True else ["mri-thighs"],
        )

    # A cancer near onset changes the escalation card: the cancer is treated first.
    @when_all(
        pri(3),
        c.on << of_type("myositis-onset"),
        c.x
        << (
            clinical("malignancy")
            & (m.state != "unknown")
            & (m.onset_days_ago <= c.on.days_ago + cancer_window)
            & (m.onset_days_ago >= c.on.days_ago - cancer_window)
        ),
    )
    def cancer_near_onset(c):
        cancer = c.x.named or k.text("labels.concepts.malignancy")
        for key in ESCALATION_CARDS:
            emit.card(c, key, c.x, cancer=cancer)

    def escalate(c, evidence, reason):
        """Ask for the escalation card: what was tried, and the untried options listed for the subtype."""
        refractory = c.imm.sparing_days >= refractory_days
        if c.srp.state == "positive" or c.hmgcr.state == "positive":
            kind = "anti-srp" if c.srp.state == "positive" else "anti-hmgcr"
        elif c.bx.level == "compatible-with-imnm":
            kind = "seronegative"
        else:
            kind = "other"
        tried = [t for t in c.imm.tried.split(",") if t]
        untried = [o for o in k.value(f"severity.next.{kind}") if o not in tried]
        if refractory:  # the late options only once the disease is refractory
            untried += [o for o in k.value("severity.next.late") if o not in tried]
        late = set(k.value("severity.next.late"))
        options = [
            k.text(f"labels.concepts.{o}") + (k.text("severity.texts.late-flag") if o in late else "")
            for o in untried
        ]
        first = k.text(f"labels.concepts.{untried[0]}") if untried else None
        if refractory:
            emit.finding(c, "refractory", c.imm)
        emit.card(
            c,
            "treatment-escalation" if refractory else "treatment-intensify",
            c.imm,
            evidence,
            reasons=[reason],
            days_on=int(c.imm.days_on),  # whole days completed
            tried=", ".join(k.text(f"labels.concepts.{t}") for t in tried),
            first=first,
            options=", ".join(options) or "none left on the list",
            cited=[
                "severity.refractory.days",
                f"severity.next.{kind}",
                *(["severity.next.late"] * refractory),
            ],
        )

    emit.finish("treatment-escalation", lambda params: escalation_step(k, params, refractory=True))
    emit.finish("treatment-intensify", lambda params: escalation_step(k, params, refractory=False))


def severe_plan(k, params: dict) -> dict:
    """Add to the severe card only what its features call for: the swallow, the breathing, the FVC line."""
    codes = set(params["severe_codes"])
    plans = [SEVERE_PLAN[code] for code in sorted(codes) if code in SEVERE_PLAN]
    texts = dict.fromkeys(text for _, text in plans)
    return {
        **params,
        "orders": [*params["orders"], *(order for orders, _ in plans for order in orders)],
        "today": "".join(" " + k.text(f"severity.texts.today-{text}") for text in texts),
        "fvc_note": k.text("severity.texts.critical-fvc-note") if "severe-fvc" in codes else "",
    }


def escalation_step(k, params: dict, refractory: bool) -> dict | None:
    """Word the next step: plan it with oncology for a known cancer, else add the first untried option."""
    if "reasons" not in params:
        return None  # a cancer near onset alone asks for no escalation
    orders = ["referral-neuromuscular"]
    if params.get("cancer"):
        step = k.text("severity.texts.treat-cancer-short")
        next_text = k.text("severity.texts.treat-cancer").format(cancer=params["cancer"])
        orders.append("referral-oncology")
    else:
        first = params.get("first")
        step = f"add {first}" if first else "review with a specialist"
        next_text = f"{step[:1].upper()}{step[1:]}."
        if refractory:
            next_text += f" {k.text('severity.texts.look-for-cancer')}."
    return {**params, "step": step, "next_text": next_text, "orders": orders}
