"""The differential: pointers to what else the picture could be, each saying what would confirm it."""

from durable.lang import c, m, pri, when_all

from rules.match import antibody, any_name, clinical, finding, muscle_involved, of_type


def define(k, emit):
    """Register the differential rules in the active ruleset."""
    fast = k.value("differential.rhabdomyolysis.fast-half-life")
    rhabdo_peak = k.value("differential.rhabdomyolysis.peak")
    raised = k.value("imnm.ck.raised")
    window = k.value("statin.persistence-window")
    dermatomyositis_antibodies = k.value("labs.antibody-groups.dermatomyositis")
    antisynthetase_antibodies = k.value("labs.antibody-groups.antisynthetase")

    def label(fact) -> str:
        return k.text(f"labels.concepts.{fact.name}")

    # Stage 1: base facts -> findings.

    @when_all(pri(1), c.r << (clinical("dermatomyositis-rash") & (m.state != "unknown")))
    def dermatomyositis_rash(c):
        emit.finding(c, "dermatomyositis-rash", c.r)

    @when_all(
        pri(1), c.ab << (of_type("antibody") & (m.state == "positive") & any_name(dermatomyositis_antibodies))
    )
    def dermatomyositis_antibody(c):
        emit.finding(c, "dermatomyositis-antibody", c.ab)

    @when_all(pri(1), c.bx << (of_type("biopsy") & (m.endomysial_invasion == "present")))
    def inflammatory_biopsy(c):
        emit.finding(c, "inflammatory-biopsy", c.bx)

    # Stage 2: pointers. Each waits for muscle involvement and stays quiet once the diagnosis it
    # points to is recorded.

    def muscle(diagnosis: str):
        return muscle_involved(), c.dx << (clinical(diagnosis) & (m.state == "unknown"))

    def not_imnm_antibody():
        # An antibody-defined IMNM (anti-HMGCR, anti-SRP) is not an overlap syndrome.
        return (
            c.hmgcr << (antibody("anti-hmgcr") & (m.state != "positive")),
            c.srp << (antibody("anti-srp") & (m.state != "positive")),
        )

    @when_all(pri(2), c.df << finding("dermatomyositis-rash"), *muscle("diagnosis-dermatomyositis"))
    def dermatomyositis_pointer_rash(c):
        emit.card(
            c, "dermatomyositis-pointer", c.df, c.mu, features=["heliotrope rash or Gottron papules/sign"]
        )

    @when_all(
        pri(2),
        c.ab << (of_type("antibody") & (m.state == "positive") & any_name(dermatomyositis_antibodies)),
        *muscle("diagnosis-dermatomyositis"),
    )
    def dermatomyositis_pointer_antibody(c):
        emit.card(c, "dermatomyositis-pointer", c.ab, c.mu, features=[f"{label(c.ab)} positive"])

    @when_all(
        pri(2),
        c.ib << finding("inflammatory-biopsy"),
        c.dx << (clinical("diagnosis-polymyositis") & (m.state == "unknown")),
    )
    def polymyositis_pointer(c):
        emit.card(c, "polymyositis-pointer", c.ib)

    @when_all(
        pri(2),
        c.ab << (of_type("antibody") & (m.state == "positive") & any_name(antisynthetase_antibodies)),
        c.dx << (clinical("diagnosis-antisynthetase") & (m.state == "unknown")),
        c.ild << clinical("interstitial-lung-disease"),
    )
    def antisynthetase_pointer(c):
        features = [f"{label(c.ab)} positive"]
        if c.ild.state != "unknown":
            features.append("interstitial lung disease")
        emit.card(c, "antisynthetase-pointer", c.ab, c.ild, features=features)

    @when_all(
        pri(2),
        c.ab << (antibody("anti-pmscl") & (m.state == "positive")),
        *not_imnm_antibody(),
        c.dx << (clinical("systemic-sclerosis") & (m.state == "unknown")),
    )
    def scleromyositis_pointer(c):
        emit.card(c, "scleromyositis-pointer", c.ab)

    @when_all(
        pri(2),
        c.ab << (antibody("anti-u1rnp") & (m.state == "positive")),
        *not_imnm_antibody(),
        c.dx << (clinical("mixed-connective-tissue-disease") & (m.state == "unknown")),
    )
    def mixed_connective_tissue_pointer(c):
        emit.card(c, "mctd-pointer", c.ab)

    @when_all(
        pri(2),
        c.ck << (of_type("ck") & (m.peak_x_uln >= rhabdo_peak) & (m.decay_half_life <= fast)),
        c.dx << (clinical("diagnosis-rhabdomyolysis") & (m.state == "unknown")),
    )
    def rhabdomyolysis_pointer(c):
        emit.card(c, "rhabdomyolysis-pointer", c.ck, half_life=c.ck.decay_half_life, ck_x_uln=c.ck.peak_x_uln)

    @when_all(
        pri(2),
        c.dx << (clinical("diagnosis-rhabdomyolysis") & (m.state != "unknown")),
        c.ck << (of_type("ck") & (m.latest_x_uln > raised) & (m.latest_after_peak_days >= window)),
    )
    def rhabdomyolysis_not_settling(c):
        emit.card(
            c,
            "rhabdomyolysis-not-settling",
            c.dx,
            c.ck,
            ck_x_uln=c.ck.latest_x_uln,
            days=c.ck.latest_after_peak_days,
        )

    @when_all(
        pri(2),
        c.th << (of_type("tsh") & (m.high == True)),
        muscle_involved(),
    )
    def hypothyroid_myopathy_by_tsh(c):
        emit.card(c, "hypothyroid-myopathy-pointer", c.th, c.mu)

    @when_all(pri(2), c.th << (clinical("hypothyroidism") & (m.state == "present")), muscle_involved())
    def hypothyroid_myopathy_by_diagnosis(c):
        emit.card(c, "hypothyroid-myopathy-pointer", c.th, c.mu)

    @when_all(
        pri(2),
        c.bx << (of_type("biopsy") & (m.rimmed_vacuoles == "present")),
        c.dx << (clinical("diagnosis-inclusion-body-myositis") & (m.state == "unknown")),
    )
    def inclusion_body_myositis_pointer(c):
        emit.card(c, "inclusion-body-myositis-pointer", c.bx)

    @when_all(
        pri(2),
        c.child << (of_type("patient") & (m.adult == "no")),
        c.ck << finding("ck-raised"),
        c.w << finding("proximal-weakness"),
        *not_imnm_antibody(),
    )
    def muscular_dystrophy_pointer(c):
        emit.card(c, "muscular-dystrophy-pointer", c.child, c.ck, c.w, c.hmgcr, c.srp)
