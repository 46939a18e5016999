"""IMNM suspicion: the ENMC 2017 classification paths, with a Bayesian post-test probability."""

from durable.lang import c, m, pri, when_all

from rules.bayes import Panel, update
from rules.match import antibody, clinical, finding, of_type


def define(k, emit):
    """Register the IMNM rules in the active ruleset."""
    raised = k.value("imnm.ck.raised")
    panels = {
        name: Panel(
            k.text(f"imnm.panel.{name}.context"),
            *(k.value(f"imnm.panel.{name}.{share}") for share in SHARES),
        )
        for name in ("statin", "no-statin")
    }

    # Stage 1: base facts -> findings.

    @when_all(pri(1), c.ck << (of_type("ck") & (m.peak_x_uln > raised)))
    def ck_raised(c):
        emit.finding(c, "ck-raised", c.ck, peak=c.ck.peak, x_uln=c.ck.peak_x_uln)

    @when_all(pri(1), c.w << (clinical("proximal-weakness") & (m.state == "present")))
    def proximal_weakness(c):
        emit.finding(c, "proximal-weakness", c.w)

    # Only a biopsy compatible with IMNM meets the ENMC 2017 biopsy criterion; necrosis alone does not.
    @when_all(pri(1), c.bx << (of_type("biopsy") & (m.level == "compatible-with-imnm")))
    def necrotizing_biopsy(c):
        emit.finding(c, "necrotizing-biopsy", c.bx)

    # Stage 2: findings -> conclusions. Every IMNM conclusion joins both antibody summaries, the biopsy
    # and the rash, so that its probability always comes from the same evidence.

    def evidence(hmgcr=None, srp=None, biopsy=None, rash=None):
        return (
            c.hmgcr << (antibody("anti-hmgcr") & (hmgcr if hmgcr is not None else +m.state)),
            c.srp << (antibody("anti-srp") & (srp if srp is not None else +m.state)),
            c.bx << (of_type("biopsy") & (biopsy if biopsy is not None else +m.reported)),
            c.rash << (clinical("dermatomyositis-rash") & (rash if rash is not None else +m.state)),
            c.dx << (clinical("diagnosis-imnm") & (m.state == "unknown")),
            c.statin << of_type("statin"),
            c.p << of_type("patient"),
        )

    def presentation():
        return c.ck << finding("ck-raised"), c.w << finding("proximal-weakness")

    @when_all(pri(2), *presentation(), *evidence(hmgcr=m.state == "positive"))
    def seropositive_hmgcr(c):
        seropositive(c)

    @when_all(pri(2), *presentation(), *evidence(srp=m.state == "positive"))
    def seropositive_srp(c):
        seropositive(c)

    def seropositive(c):
        """Ask for the seropositive card; with anti-HMGCR, show statin exposure beside it (not counted)."""
        emit.finding(c, "imnm-classified", c.ck, c.w, c.hmgcr, c.srp)
        emit.finding(c, "imnm-active", c.ck, c.w, c.hmgcr, c.srp)
        hmgcr = c.hmgcr.state == "positive"
        exposed = c.statin.exposure in ("current", "past")
        note = "imnm-current" if c.statin.exposure == "current" else "imnm-note" if hmgcr and exposed else ""
        suspect(
            c,
            "imnm-seropositive",
            *([c.statin] if exposed else []),
            classified=True,
            antibody=positive_antibodies(c),
            statin_note=k.text(f"statin.texts.{note}") if note else "",
            monitoring=k.text("severity.texts.monitoring"),
        )

    # Weakness is rarely coded: a positive IMNM antibody with a raised CK still deserves a card. One rule
    # per antibody, since the engine never binds one fact to two patterns of a rule (the antibody is
    # bound once, inside evidence()).
    def weakness_unknown():
        return c.ck << finding("ck-raised"), c.wk << (clinical("proximal-weakness") & (m.state == "unknown"))

    @when_all(pri(2), *weakness_unknown(), *evidence(hmgcr=m.state == "positive"))
    def seropositive_hmgcr_weakness_unknown(c):
        seropositive_weakness_unknown(c, c.hmgcr)

    @when_all(pri(2), *weakness_unknown(), *evidence(srp=m.state == "positive", hmgcr=m.state != "positive"))
    def seropositive_srp_weakness_unknown(c):
        seropositive_weakness_unknown(c, c.srp)

    def seropositive_weakness_unknown(c, positive):
        emit.finding(c, "imnm-active", c.ck, positive)
        emit.card(
            c,
            "imnm-seropositive-weakness-unknown",
            c.ck,
            positive,
            antibody=positive_antibodies(c),
            ck_peak=c.ck.peak,
            ck_x_uln=c.ck.x_uln,
        )

    @when_all(
        pri(2),
        *presentation(),
        c.nb << finding("necrotizing-biopsy"),
        *evidence(hmgcr=m.state == "negative", srp=m.state == "negative"),
    )
    def seronegative(c):
        emit.finding(c, "imnm-classified", c.ck, c.w, c.nb, c.hmgcr, c.srp)
        emit.finding(c, "imnm-seronegative", c.nb, c.hmgcr, c.srp)
        emit.finding(c, "imnm-active", c.ck, c.w, c.nb)
        suspect(c, "imnm-seronegative", c.nb, classified=True, monitoring=k.text("severity.texts.monitoring"))

    # Work-up prompts only where neither a skin rash nor another syndrome's antibody (dermatomyositis,
    # antisynthetase) already points elsewhere.

    def unexplained():
        return c.profile << (
            of_type("antibody-profile") & (m.positive_dermatomyositis == 0) & (m.positive_antisynthetase == 0)
        )

    @when_all(
        pri(2),
        *presentation(),
        *evidence(hmgcr=unresulted(), srp=m.state != "positive", rash=m.state == "unknown"),
        unexplained(),
    )
    def workup_hmgcr_missing(c):
        workup(c)

    @when_all(
        pri(2),
        *presentation(),
        *evidence(hmgcr=m.state != "positive", srp=unresulted(), rash=m.state == "unknown"),
        unexplained(),
    )
    def workup_srp_missing(c):
        workup(c)

    @when_all(
        pri(2),
        *presentation(),
        # No biopsy reported, or no reports available: suggesting one is right either way.
        *evidence(
            hmgcr=m.state == "negative",
            srp=m.state == "negative",
            biopsy=(m.reported == False) | (m.reported == "unknown"),
            rash=m.state == "unknown",
        ),
        unexplained(),
    )
    def seronegative_without_biopsy(c):
        suspect(c, "imnm-seronegative-possible")

    def workup(c):
        missing = [
            n
            for n, f in (("anti-hmgcr", c.hmgcr), ("anti-srp", c.srp))
            if f.state in ("not-tested", "indeterminate")
        ]
        labels = " and ".join(k.text(f"labels.concepts.{n}") for n in missing)
        suspect(c, "imnm-workup", missing_tests=labels, orders=[*missing, "mri-thighs"])

    def suspect(c, key, *basis, **params):
        """Ask for an IMNM card whose probability comes from the joined evidence."""
        emit.card(
            c,
            key,
            c.ck,
            c.w,
            *basis,
            c.hmgcr,
            c.srp,
            c.bx,
            ck_peak=c.ck.peak,
            ck_x_uln=c.ck.x_uln,
            **probability(c),
            **params,
        )

    def probability(c) -> dict:
        """Return the pre-test probability, its context and each Bayesian step; nothing where none applies."""
        # A child, CK below the work-up threshold or a rash of dermatomyositis: the model does not apply.
        too_young = c.p.age is not None and c.p.age < k.value("imnm.probability.adult-age")
        too_low = c.ck.x_uln < k.value("imnm.probability.workup-threshold")
        if c.rash.state != "unknown" or too_young or too_low:
            return {}
        high = c.ck.x_uln > k.value("imnm.pretest.high-ck-from")
        pretest_key = f"imnm.pretest.{'high-ck' if high else 'moderate-ck'}"
        context = "statin" if c.statin.exposure in ("current", "past") else "no-statin"
        panel = panels[context]
        # Older results first, so the ladder reads in the order the results came.
        results = sorted((("anti-hmgcr", c.hmgcr), ("anti-srp", c.srp)), key=lambda r: -(r[1].days_ago or 0))
        found = panel.evidence([(name, fact.state) for name, fact in results])
        cited = [pretest_key, *(f"imnm.panel.{context}.{share}" for share in SHARES if found)]
        both_positive = c.hmgcr.state == c.srp.state == "positive"
        biopsy = f"imnm.biopsy-ratio.{c.bx.level}"
        if biopsy in k.parameters and not both_positive:
            found.append((k.param(biopsy).attributes["evidence"], k.value(biopsy)))
            cited.append(biopsy)
        pretest = k.value(pretest_key)
        steps = update(pretest, found)
        posttest = None if both_positive else steps[-1].probability if steps else pretest
        return {
            "pretest": pretest,
            "presentation": k.param(pretest_key).attributes["presentation"],
            "probability": posttest,
            "band": band(posttest),
            "context": panel.context,
            "outcome": panel.outcome(c.hmgcr.state, c.srp.state),
            "seronegative_shares": [
                ("after a statin", panels["statin"].seronegative),
                ("otherwise", panels["no-statin"].seronegative),
            ],
            "steps": steps,
            "cited": cited,
        }

    def band(probability: float | None) -> str | None:
        """Name the band a work-up card shows: low, moderate or high."""
        if probability is None:
            return None
        if probability < k.value("imnm.probability.low-below"):
            return "low"
        return "high" if probability >= k.value("imnm.probability.high-from") else "moderate"

    def positive_antibodies(c) -> str:
        positive = [n for n, f in (("anti-hmgcr", c.hmgcr), ("anti-srp", c.srp)) if f.state == "positive"]
        return " and ".join(k.text(f"labels.concepts.{n}") for n in positive)


SHARES = ("hmgcr", "srp", "false-hmgcr", "false-srp")


def unresulted():
    """Match an antibody summary with no usable result."""
    return (m.state == "not-tested") | (m.state == "indeterminate")
