"""Cancer-screening tiers, windows and panels; the differential's pointers and what steers them away."""

from __future__ import annotations

import pytest

from conftest import LOINC, WEAKNESS, antibody, ck, condition, hook_request
from rules import knowledge as knowledge_module
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"


def patient(gender="female", birth="1960-01-01"):
    return {"resourceType": "Patient", "id": "p1", "gender": gender, "birthDate": birth}


def evaluate(client, *resources, who=None, reports=()):
    request = hook_request(resources=resources)
    request["prefetch"]["patient"] = who or patient()
    request["prefetch"]["reports"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in reports],
    }
    response = client.post(SERVICE, json=request)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["cards"]


def by_topic(cards, topic):
    return [c for c in cards if c["source"]["topic"]["code"] == topic]


def screening(cards):
    found = by_topic(cards, "cancer-screening")
    return found[0] if found else None


IMNM = [ck("ck", 6000), condition("w", WEAKNESS, onsetDateTime="2024-03-01")]
HMGCR = antibody("h", "HMGCR antibody", valueString="Positive")
SRP = antibody("s", "SRP antibody", valueString="Positive")


def cxr(when="2024-05-10"):
    return {
        "resourceType": "DiagnosticReport",
        "id": "cxr",
        "status": "final",
        "code": {"text": "Chest X-ray"},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
        "conclusion": "Normal",
    }


# -- tiers --------------------------------------------------------------------------------------------


def test_anti_srp_without_red_flags_is_standard_risk(client):
    card = screening(evaluate(client, *IMNM, SRP, who=patient(birth="1992-01-01")))
    assert card["extension"]["imnm-cds.riskTier"] == "standard" and card["indicator"] == "info"
    assert [s["label"] for s in card["suggestions"]] == ["Order the basic cancer screening panel"]


def test_standard_risk_with_basic_screening_done_gets_no_card(client):
    assert screening(evaluate(client, *IMNM, SRP, who=patient(birth="1992-01-01"), reports=[cxr()])) is None


def test_anti_hmgcr_in_an_older_man_is_moderate(client):
    card = screening(evaluate(client, *IMNM, HMGCR, who=patient("male", "1955-01-01")))
    assert card["extension"]["imnm-cds.riskTier"] == "moderate" and card["indicator"] == "warning"
    labels = [s["label"] for s in card["suggestions"]]
    assert labels == ["Order the basic cancer screening panel", "Order the enhanced cancer screening panel"]


def test_two_high_risk_factors_are_high_and_add_pet_ct_and_endoscopy(client):
    tif = antibody("t", "TIF1-gamma antibody", valueString="Positive")
    dysphagia = condition("d", "40739000")
    card = screening(evaluate(client, *IMNM, tif, dysphagia))
    assert card["extension"]["imnm-cds.riskTier"] == "high"
    assert [s["label"] for s in card["suggestions"]][-2:] == [
        "Consider whole-body FDG PET-CT if screening finds no cancer",
        "Consider upper and lower GI endoscopy",
    ]


@pytest.mark.parametrize(
    ("gender", "present", "absent"),
    [
        ("female", {"Mammography", "Cervical smear", "CA-125"}, {"Prostate-specific antigen"}),
        ("male", {"Prostate-specific antigen"}, {"Mammography", "Cervical smear", "CA-125"}),
        ("unknown", set(), {"Mammography", "Prostate-specific antigen"}),
    ],
)
def test_sex_specific_tests_only_for_the_recorded_sex(client, gender, present, absent):
    card = screening(evaluate(client, *IMNM, HMGCR, condition("d", "40739000"), who=patient(gender)))
    enhanced = next(s for s in card["suggestions"] if "enhanced" in s["label"])
    items = {a["description"] for a in enhanced["actions"]}
    assert present <= items and not absent & items
    assert ("Sex is not recorded" in card["detail"]) == (gender == "unknown")


def test_juvenile_patients_are_not_screened(client):
    assert screening(evaluate(client, *IMNM, HMGCR, who=patient(birth="2010-01-01"))) is None


def test_screening_applies_only_within_three_years_of_onset(client):
    old = [ck("ck", 6000, when="2019-01-10T00:00:00Z"), condition("w", WEAKNESS, onsetDateTime="2019-01-01")]
    assert screening(evaluate(client, *old, HMGCR)) is None


@pytest.mark.parametrize(("onset", "counted"), [("2023-06-01", True), ("2018-06-01", False)])
def test_weight_loss_counts_only_near_onset(client, onset, counted):
    weight_loss = condition("wl", "448765001", onsetDateTime=onset)
    card = screening(evaluate(client, *IMNM, SRP, weight_loss, who=patient(birth="1992-01-01")))
    assert ("weight loss around onset (high)" in card["detail"]) == counted
    assert card["extension"]["imnm-cds.riskTier"] == ("moderate" if counted else "standard")


def test_a_cancer_near_onset_is_named_as_paraneoplastic(client):
    lung = condition("ca", None) | {"code": {"coding": [{"system": ICD, "code": "C34.90"}]}}
    card = screening(evaluate(client, *IMNM, HMGCR, lung))
    assert card["summary"].startswith("Known cancer near myositis onset: confirm with oncology it is staged")
    assert "no screening panel: stage and treat the cancer recorded near onset" in card["detail"]
    assert [s["label"] for s in card["suggestions"]] == ["Refer to oncology"]
    assert "Condition/ca" in card["extension"]["imnm-cds.evidence"]


def test_tier_membership_is_data_a_local_override_can_change(tmp_path):
    overrides = tmp_path / "local.toml"
    overrides.write_text('[cancer.factors.anti-hmgcr]\nvalue = "high"\nsource = "Myositis MDT, 2026-01"\n')
    app = create_app({"knowledge_overrides": str(overrides)})
    card = screening(
        evaluate(
            app.test_client(), *IMNM, HMGCR, condition("d", "40739000"), who=patient("female", "1990-01-01")
        )
    )
    assert card["extension"]["imnm-cds.riskTier"] == "high"
    assert "set locally (Myositis MDT, 2026-01): anti-HMGCR positive" in card["detail"]


def screened(knowledge, *factors, **recorded):
    from rules.cancer import tier

    panels = {"basic": "none", "enhanced": "none", "pet_ct": "none", "endoscopy": "none", **recorded}
    return tier(knowledge, {"factors": list(factors), "recorded": panels, "sex": "female"})


def test_the_counting_rule_against_hand_worked_cases(knowledge):
    def counted(*factors, **recorded):
        result = screened(knowledge, *factors, **recorded)
        return result and result["tier"]

    assert counted() == "standard"
    assert counted("male") == "standard"  # one intermediate
    assert counted("male", "older-onset") == "moderate"  # two intermediate
    assert counted("dysphagia") == "moderate"  # one high
    assert counted("dysphagia", "anti-tif1g") == "high"  # two high
    assert counted(basic="done") is None  # standard risk, basic panel done
    assert counted("male", "older-onset", basic="done", enhanced="done") is None
    assert (
        counted("dysphagia", "anti-tif1g", basic="done", enhanced="done") == "high"
    )  # PET-CT, endoscopy remain
    # Without records, whether a panel was done is unknown: it is offered.
    assert counted(basic="unknown") == "standard"
    assert counted("male", "older-onset", basic="done", enhanced="unknown") == "moderate"


HIGH = ("dysphagia", "anti-tif1g")


def test_screening_warns_while_a_panel_is_missing_then_informs_while_the_rest_are_ordered(knowledge):
    due = screened(knowledge, *HIGH)
    assert due["indicator"] == "warning" and due["orders"] == [
        "basic-screening",
        "enhanced-screening",
        "pet-ct",
        "gi-endoscopy",
    ]
    assert due["action"].startswith("Screen now (at diagnosis): High risk")
    part = screened(knowledge, *HIGH, basic="done", enhanced="ordered")
    assert part["indicator"] == "warning" and part["orders"] == ["pet-ct", "gi-endoscopy"]
    ordered = screened(
        knowledge, *HIGH, basic="done", enhanced="ordered", pet_ct="ordered", endoscopy="ordered"
    )
    assert ordered["indicator"] == "info" and ordered["orders"] == []
    assert ordered["action"].startswith(
        "Follow up the cancer screening ordered (enhanced panel, PET-CT, GI endoscopy)"
    )
    assert ordered["recorded"] == (
        "On record: basic panel done; enhanced panel, PET-CT and GI endoscopy ordered. "
        "(A panel counts by its chest radiograph or CT.)"
    )
    # A declined panel is settled: nothing to order and nothing to follow up.
    assert screened(knowledge, "male", "older-onset", basic="declined", enhanced="done") is None
    # Standard risk never warns, even with nothing on record.
    assert screened(knowledge)["indicator"] == "info"


def test_the_high_tier_clears_when_pet_ct_and_endoscopy_are_done_or_declined(knowledge, tmp_path):
    basics = {"basic": "done", "enhanced": "done"}
    assert screened(knowledge, *HIGH, **basics, pet_ct="done", endoscopy="declined") is None
    one = screened(knowledge, *HIGH, **basics, pet_ct="declined")
    assert one["orders"] == ["gi-endoscopy"] and one["indicator"] == "warning"
    assert "cancer.high-clears" in one["cited"]
    overrides = tmp_path / "local.toml"
    overrides.write_text('[cancer.high-clears]\nvalue = "any"\nsource = "Myositis MDT, 2026-01"\n')
    from rules.knowledge import load

    either = load(overrides=overrides)
    assert screened(either, *HIGH, **basics, pet_ct="declined") is None
    assert screened(either, *HIGH, **basics)["orders"] == ["pet-ct", "gi-endoscopy"]


def test_without_reports_or_orders_screening_is_offered_and_said_to_be_unknown(client):
    request = hook_request(resources=[*IMNM, HMGCR])
    request["prefetch"]["patient"] = patient()
    card = screening(client.post(SERVICE, json=request).get_json()["cards"])
    assert card["suggestions"][0]["label"] == "Order the basic cancer screening panel"
    assert "- cancer screening: unknown (no reports, procedures or orders available)" in card["detail"]
    assert "none recorded" not in card["detail"]


# -- the differential -----------------------------------------------------------------------------------


def test_antisynthetase_pointer_names_ild(client):
    jo1 = antibody("j", "Jo-1 antibody", valueString="Positive")
    ild = condition("ild", "233703007")
    card = by_topic(evaluate(client, *IMNM, jo1, ild), "alternative-diagnosis")[0]
    assert "anti-Jo-1 positive; interstitial lung disease" in card["detail"]


def test_an_antisynthetase_antibody_silences_the_imnm_workup(client):
    jo1 = antibody("j", "Jo-1 antibody", valueString="Positive")
    assert by_topic(evaluate(client, *IMNM), "imnm-suspected")
    assert not by_topic(evaluate(client, *IMNM, jo1), "imnm-suspected")


@pytest.mark.parametrize(
    ("text", "key"), [("PM-Scl antibody", "scleromyositis"), ("U1-RNP antibody", "connective")]
)
def test_overlap_pointers_unless_an_imnm_antibody_defines_the_disease(client, text, key):
    overlap = antibody("o", text, valueString="Positive")
    alone = by_topic(evaluate(client, *IMNM, overlap), "alternative-diagnosis")
    with_hmgcr = by_topic(evaluate(client, *IMNM, overlap, HMGCR), "alternative-diagnosis")
    assert any(key in c["summary"] for c in alone) and not with_hmgcr


def test_rhabdomyolysis_pointer_needs_a_fast_fall(client):
    fast = [
        ck("a", 40000, "2024-05-20T00:00:00Z"),
        ck("b", 10000, "2024-05-23T00:00:00Z"),
        ck("c", 2500, "2024-05-26T00:00:00Z"),
    ]
    slow = [
        ck("a", 40000, "2024-05-01T00:00:00Z"),
        ck("b", 30000, "2024-05-15T00:00:00Z"),
        ck("c", 25000, "2024-05-29T00:00:00Z"),
    ]
    assert (
        "fell fast (half-life 1.5 days)"
        in by_topic(evaluate(client, *fast), "alternative-diagnosis")[0]["summary"]
    )
    assert not by_topic(evaluate(client, *slow), "alternative-diagnosis")


def test_recorded_rhabdomyolysis_that_does_not_settle_points_to_imnm(client):
    rhabdo = condition("r", "240131006", onsetDateTime="2024-04-01")
    series = [ck("a", 30000, "2024-04-02T00:00:00Z"), ck("b", 9000, "2024-05-20T00:00:00Z")]
    card = by_topic(evaluate(client, rhabdo, *series), "alternative-diagnosis")[0]
    assert card["indicator"] == "warning" and "consider IMNM" in card["summary"]


def test_hypothyroidism_by_tsh_or_by_diagnosis(client):
    tsh = {
        "resourceType": "Observation",
        "id": "t",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": "3016-3"}]},
        "effectiveDateTime": "2024-05-01",
        "valueQuantity": {"value": 25, "unit": "mIU/L"},
        "referenceRange": [{"high": {"value": 4.5}}],
    }
    diagnosis = condition("hypo", None) | {"code": {"coding": [{"system": ICD, "code": "E03.9"}]}}
    for extra in (tsh, diagnosis):
        cards = by_topic(evaluate(client, *IMNM, extra), "alternative-diagnosis")
        assert any("Hypothyroidism" in c["summary"] for c in cards)


def test_a_dermatomyositis_diagnosis_silences_its_pointer(client):
    rash = condition("rash", text="Gottron papules")
    dm = condition("dm", "396230008")
    assert by_topic(evaluate(client, *IMNM, rash), "alternative-diagnosis")
    assert not by_topic(evaluate(client, *IMNM, rash, dm), "alternative-diagnosis")


def test_every_pointer_says_it_is_not_a_diagnosis_and_what_would_confirm_it():
    k = knowledge_module.load()
    pointers = [c for c in k.cards.values() if c.topic == "alternative-diagnosis"]
    assert len(pointers) >= 8
    for card in pointers:
        words = " ".join(card.detail.split())
        assert "This is not a diagnosis." in words and "What would confirm it" in words, card.key
