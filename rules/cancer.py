"""Cancer screening (IMACS 2023): who is screened, the risk tier from cited factors, and the panels."""

from durable.lang import c, m, pri, when_all

from rules.knowledge import KnowledgeError
from rules.match import any_name, clinical, finding, muscle_involved, of_type

DIAGNOSES = (
    "diagnosis-imnm",
    "diagnosis-polymyositis",
    "diagnosis-dermatomyositis",
    "diagnosis-antisynthetase",
)
ANTIBODY_FACTORS = ("anti-tif1g", "anti-nxp2", "anti-sae1", "anti-hmgcr")
# The screening panels (the cancer-screening fact's fields), what the card calls them and orders for them.
PANELS = {
    "basic": ("basic panel", "basic-screening"),
    "enhanced": ("enhanced panel", "enhanced-screening"),
    "pet_ct": ("PET-CT", "pet-ct"),
    "endoscopy": ("GI endoscopy", "gi-endoscopy"),
}
SETTLED = ("done", "declined")


def dermatomyositis_feature():
    """Match a finding of dermatomyositis: its rash or one of its antibodies."""
    return (m.t == "finding") & ((m.code == "dermatomyositis-rash") | (m.code == "dermatomyositis-antibody"))


def define(k, emit):
    """Register the cancer-screening rules in the active ruleset."""
    window = k.value("cancer.window")
    adult_age = k.value("cancer.adult")
    if k.value("cancer.high-clears") not in ("all", "any"):
        raise KnowledgeError("cancer.high-clears: 'all' or 'any'")

    # Stage 3 (after the IMNM and differential conclusions): is there myositis at all?

    @when_all(pri(3), c.f << finding("imnm-classified"))
    def myositis_by_classification(c):
        emit.finding(c, "myositis", c.f)

    @when_all(
        pri(3),
        c.f << dermatomyositis_feature(),
        muscle_involved(),
    )
    def myositis_by_dermatomyositis_features(c):
        emit.finding(c, "myositis", c.f, c.mu)

    @when_all(
        pri(3),
        c.ab << (of_type("antibody-profile") & (m.positive_antisynthetase > 0)),
        muscle_involved(),
    )
    def myositis_by_antisynthetase_antibody(c):
        emit.finding(c, "myositis", c.mu)

    @when_all(pri(3), c.dx << (of_type("clinical") & (m.state != "unknown") & any_name(DIAGNOSES)))
    def myositis_by_diagnosis(c):
        emit.finding(c, "myositis", c.dx)

    # Stage 4: adults within the window around onset are due a screening decision.

    @when_all(
        pri(4),
        c.my << finding("myositis"),
        c.pt << (of_type("patient") & (m.age >= adult_age)),
        c.on << (of_type("myositis-onset") & (m.known == True) & (m.days_ago <= window)),
        c.done << of_type("cancer-screening"),
    )
    def screening_due(c):
        emit.finding(c, "screening-due", c.my, c.pt, c.on)
        emit.card(
            c,
            "cancer-screening",
            c.my,
            c.on,
            c.done,
            sex=c.pt.sex,
            recorded={panel: getattr(c.done, panel) for panel in PANELS},
            onset=f"{c.on.onset_on}, from the {c.on.source}",
            factors=[],
        )

    # Stage 5: the risk factors, each a cited parameter (cancer.factors.*).

    def due():
        return c.due << finding("screening-due")

    @when_all(
        pri(5), due(), c.ab << (of_type("antibody") & (m.state == "positive") & any_name(ANTIBODY_FACTORS))
    )
    def antibody_factor(c):
        emit.card(c, "cancer-screening", c.ab, factors=[c.ab.name])

    @when_all(pri(5), due(), c.f << finding("imnm-seronegative"))
    def seronegative_factor(c):
        emit.card(c, "cancer-screening", c.f, factors=["seronegative-imnm"])

    @when_all(
        pri(5),
        due(),
        c.f << dermatomyositis_feature(),
    )
    def dermatomyositis_factor(c):
        emit.card(c, "cancer-screening", c.f, factors=["dermatomyositis"])

    @when_all(pri(5), due(), c.dx << (clinical("diagnosis-dermatomyositis") & (m.state != "unknown")))
    def dermatomyositis_diagnosis_factor(c):
        emit.card(c, "cancer-screening", c.dx, factors=["dermatomyositis"])

    @when_all(pri(5), due(), c.d << (clinical("dysphagia") & (m.state == "present")))
    def dysphagia_factor(c):
        emit.card(c, "cancer-screening", c.d, factors=["dysphagia"])

    @when_all(pri(5), due(), c.pt << (of_type("patient") & (m.sex == "male")))
    def male_factor(c):
        emit.card(c, "cancer-screening", c.pt, factors=["male"])

    @when_all(
        pri(5), due(), c.on << (of_type("myositis-onset") & (m.age_at_onset > k.value("cancer.older-onset")))
    )
    def older_onset_factor(c):
        emit.card(c, "cancer-screening", c.on, factors=["older-onset"])

    def near_onset(name: str):
        """Match a concept dated within the window either side of the myositis onset."""
        return (
            c.on << of_type("myositis-onset"),
            c.x
            << (
                clinical(name)
                & (m.state != "unknown")
                & (m.onset_days_ago <= c.on.days_ago + window)
                & (m.onset_days_ago >= c.on.days_ago - window)
            ),
        )

    @when_all(pri(5), due(), c.f << finding("refractory"))
    def refractory_factor(c):
        emit.card(c, "cancer-screening", c.f, factors=["refractory"])

    @when_all(pri(5), due(), *near_onset("weight-loss"))
    def weight_loss_factor(c):
        emit.card(c, "cancer-screening", c.x, factors=["weight-loss"])

    @when_all(pri(5), due(), *near_onset("malignancy"))
    def cancer_near_onset_factor(c):
        emit.card(c, "cancer-screening", c.x, factors=["cancer-near-onset"])

    emit.finish("cancer-screening", lambda params: tier(k, params))


def tier(k, params: dict) -> dict | None:
    """Count the factors into a tier (IMACS counting rule) and choose the panels; None if nothing is due."""
    levels = [k.value(f"cancer.factors.{f}") for f in params["factors"]]
    high, intermediate = levels.count("high"), levels.count("intermediate")
    needs = {name: k.value(f"cancer.tiers.{name}") for name in k.children("cancer.tiers")}
    if high >= needs["high-needs-high"]:
        chosen = "high"
    elif high >= needs["moderate-needs-high"] or intermediate >= needs["moderate-needs-intermediate"]:
        chosen = "moderate"
    else:
        chosen = "standard"
    recorded = params["recorded"]
    wanted = ["basic", "enhanced"] if chosen != "standard" else ["basic"]
    if chosen == "high":
        extra = ("pet_ct", "endoscopy")
        settled = (all if k.value("cancer.high-clears") == "all" else any)(
            recorded[p] in SETTLED for p in extra
        )
        wanted += [] if settled else extra
    # A panel is offered unless it is on record: "unknown" (nothing available to tell) is offered too.
    missing = [p for p in wanted if recorded[p] in ("none", "unknown")]
    pending = [p for p in wanted if recorded[p] == "ordered"]
    factors = params["factors"]
    known_cancer = "cancer-near-onset" in factors
    if not (missing or pending or known_cancer):
        return None  # every panel this tier calls for is done or declined
    reasons = [
        f"{k.param(f'cancer.factors.{f}').attributes['label']} ({k.value(f'cancer.factors.{f}')})"
        for f in factors
    ]
    known_sex = params["sex"] in ("female", "male")
    if known_cancer:
        action = k.text("cancer.texts.known-cancer-action")
    elif missing:
        action = k.text("cancer.texts.screen-action")
    else:
        action = k.text("cancer.texts.follow-up-action")
    on_record = [p for p, state in recorded.items() if state not in ("none", "unknown")]
    by_state = {
        s: [PANELS[p][0] for p in on_record if recorded[p] == s] for s in ("done", "ordered", "declined")
    }
    shown = "; ".join(
        f"{', '.join(names[:-1])} and {names[-1]} {state}" if len(names) > 1 else f"{names[0]} {state}"
        for state, names in by_state.items()
        if names
    )
    # The basic and enhanced panels are recognised by their chest radiograph and CT alone.
    told = k.text("cancer.texts.panel-by-imaging") if {"basic", "enhanced"} & set(on_record) else ""
    return {
        **params,
        "tier": chosen,
        "tier_label": k.text(f"cancer.texts.{chosen}"),
        "action": action.format(
            tier=k.text(f"cancer.texts.{chosen}"), pending=", ".join(PANELS[p][0] for p in pending)
        ),
        "indicator": k.indicator(
            "cancer-screening.known-cancer"
            if known_cancer
            else "cancer-screening.panel-missing"
            if missing and chosen != "standard"
            else "cancer-screening.on-record"
        ),
        # A known cancer is staged with oncology, not screened for (IMACS: PET-CT and endoscopy are for
        # patients whose cancer has not been found).
        "orders": ["referral-oncology"] if known_cancer else [PANELS[p][1] for p in missing],
        "recorded": f"On record: {shown}. {told}".rstrip() if shown else "",
        "reasons": reasons or ["no risk factor recorded"],
        "sex_note": "" if known_sex else "Sex is not recorded: sex-specific tests are left out.",
        "plan": k.text(f"cancer.texts.plan-{'known-cancer' if known_cancer else chosen}"),
        "cited": [
            "cancer.window",
            *(["cancer.high-clears"] if chosen == "high" else []),
            *(f"cancer.tiers.{n}" for n in needs),
            *(f"cancer.factors.{f}" for f in factors),
        ],
    }
