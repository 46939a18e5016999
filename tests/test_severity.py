"""Severity red flags (swallowing, breathing, anti-SRP, anti-MDA5) and escalation of failing treatment."""

from __future__ import annotations

import pytest

from conftest import LOINC, WEAKNESS, antibody, ck, condition, hook_request, observation
from service.hooks import PATIENT_VIEW
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
DYSPHAGIA = "40739000"
RESPIRATORY_FAILURE = "409622000"
ILD = "233703007"

IMNM = [ck("ck", 6000, "2024-05-02T08:00:00Z"), condition("w", WEAKNESS, onsetDateTime="2024-03-01")]
HMGCR = antibody("h", "HMGCR antibody", valueString="Positive")
SRP = antibody("s", "SRP antibody", valueString="Positive")


def evaluate(client, *resources, spirometry=(), administrations=()):
    request = hook_request(resources=resources)
    for key, entries in (("spirometry", spirometry), ("medicationAdministrations", administrations)):
        request["prefetch"][key] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        request["prefetch"][key]["entry"] = [{"resource": r} for r in entries]
    response = client.post(SERVICE, json=request)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["cards"]


def by_topic(cards, topic):
    return [c for c in cards if c["source"]["topic"]["code"] == topic]


def red_flags(cards):
    return {
        c["extension"]["imnm-cds.rules"][-1].split(".")[1]: c for c in by_topic(cards, "severity-red-flag")
    }


def fvc(id_, pct, when, unit="%"):
    code = {"coding": [{"system": LOINC, "code": "19872-1"}]}
    return observation(id_, code, when, valueQuantity={"value": pct, "unit": unit})


def statement(id_, text, start, status="active", end=None, code=None):
    concept = {"text": text} | ({"coding": [{"system": RXNORM, "code": code}]} if code else {})
    period = {"start": start} | ({"end": end} if end else {})
    return {
        "resourceType": "MedicationStatement",
        "id": id_,
        "status": status,
        "medicationCodeableConcept": concept,
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": period,
    }


def infusion(id_, text, when):
    return {
        "resourceType": "MedicationAdministration",
        "id": id_,
        "status": "completed",
        "medicationCodeableConcept": {"text": text},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
    }


def ck_series(*values):
    """CK results a month apart, ending shortly before the evaluation date."""
    months = ["2024-01-05", "2024-02-05", "2024-03-05", "2024-04-05", "2024-05-05", "2024-05-28"]
    return [
        ck(f"ck{i}", v, f"{day}T08:00:00Z")
        for i, (v, day) in enumerate(zip(values, months[-len(values) :], strict=True))
    ]


PREDNISONE = statement("pred", "prednisone 40 mg daily", "2024-01-10")
ON_TREATMENT = [condition("w", WEAKNESS, onsetDateTime="2023-12-01"), PREDNISONE]


# -- severe, rapidly progressive IMNM ------------------------------------------------------------------


def imnm_cards(cards):
    return by_topic(cards, "imnm-suspected")


def orders(card):
    return {
        a["resource"]["resourceType"] + ":" + a["description"]: a["resource"]
        for s in card.get("suggestions", [])
        for a in s["actions"]
    }


def test_anti_srp_with_dysphagia_and_rising_ck_is_one_critical_card_with_induction_orders(client):
    rising = [ck("a", 4000, "2024-05-05T08:00:00Z"), ck("b", 9500, "2024-05-28T08:00:00Z")]
    weak = condition("w", WEAKNESS, onsetDateTime="2024-04-01")
    cards = evaluate(client, *rising, weak, SRP, condition("d", DYSPHAGIA))
    [card] = imnm_cards(cards)
    assert card["indicator"] == "critical"
    assert not by_topic(cards, "severity-red-flag")  # the red flags are bullets of the one card
    assert {"severity.dysphagia", "severity.ck_rising_fast_with_weakness", "severity.severe_imnm"} <= set(
        card["extension"]["imnm-cds.rules"]
    )
    assert "Condition/d" in card["extension"]["imnm-cds.evidence"]
    assert card["summary"].startswith("Today: same-day")
    made = orders(card)
    methylprednisolone = next(r for r in made.values() if "Methylprednisolone" in str(r))
    assert methylprednisolone["resourceType"] == "MedicationRequest"
    assert (methylprednisolone["intent"], methylprednisolone["status"]) == ("proposal", "draft")
    assert methylprednisolone["medicationCodeableConcept"]["coding"][0]["code"] == "6902"
    assert "doseAndRate" not in str(methylprednisolone)  # no dose is cited
    codes = {c["code"] for r in made.values() for c in r.get("code", {}).get("coding", [])}
    assert {"29303009", "10839-9"} <= codes  # ECG, troponin I
    # Dysphagia and CK rising, no breathing feature: the swallow is assessed, blood gases and NIV are not.
    assert "Nil by mouth until a swallow assessment." in card["detail"]
    assert not {"24336-0", "306275005"} & codes and "NIV" not in card["detail"]


def test_the_severe_card_adds_breathing_orders_with_a_low_fvc_and_stops_a_current_statin(client):
    rising = [ck("a", 4000, "2024-05-05T08:00:00Z"), ck("b", 9500, "2024-05-28T08:00:00Z")]
    weak = condition("w", WEAKNESS, onsetDateTime="2024-04-01")
    statin = statement("s", "atorvastatin 40 mg tablet", "2022-01-01")
    cards = evaluate(client, *rising, weak, SRP, statin, fvc("f", 70, "2024-05-20T08:00:00Z"))
    [card] = imnm_cards(cards)
    assert card["indicator"] == "critical"
    codes = {c["code"] for r in orders(card).values() for c in r.get("code", {}).get("coding", [])}
    assert {"24336-0", "306275005"} <= codes  # blood gases, NIV assessment
    assert "Nil by mouth" not in card["detail"]  # no dysphagia
    assert "Stop the statin and do not restart it." in card["detail"]


@pytest.mark.parametrize(("pct", "critical"), [(44, True), (49.5, True), (50, False), (58, False)])
def test_fvc_below_the_critical_level_makes_active_imnm_critical(client, pct, critical):
    cards = evaluate(client, *IMNM, HMGCR, spirometry=[fvc("f", pct, "2024-05-20T10:00:00Z")])
    [card] = imnm_cards(cards)
    assert (card["indicator"] == "critical") == critical
    assert bool(by_topic(cards, "severity-red-flag")) != critical  # otherwise the low-FVC warning stays
    if critical:
        assert f"FVC {pct:g}% predicted" in card["detail"]
        assert "below 50% predicted" in card["detail"]  # the unverified threshold is quoted
        assert "ECG" not in str(card["suggestions"])  # the cardiac work-up is for anti-SRP


def test_red_flags_without_active_imnm_keep_their_own_cards(client):
    cards = evaluate(client, *IMNM, condition("d", DYSPHAGIA))  # no IMNM antibody, no biopsy
    assert red_flags(cards)["dysphagia"]["indicator"] == "warning"
    assert all(c["indicator"] != "critical" for c in imnm_cards(cards))


def test_respiratory_failure_makes_seropositive_imnm_critical(client):
    cards = evaluate(client, *IMNM, HMGCR, condition("rf", RESPIRATORY_FAILURE))
    [card] = imnm_cards(cards)
    assert card["indicator"] == "critical" and "respiratory failure" in card["detail"]
    assert "Condition/rf" in card["extension"]["imnm-cds.evidence"]


# -- red flags ------------------------------------------------------------------------------------------


def test_dysphagia_is_a_red_flag_only_with_muscle_involvement(client):
    dysphagia = condition("d", DYSPHAGIA)
    assert "dysphagia" not in red_flags(evaluate(client, dysphagia, ck("ck", 150)))
    card = red_flags(evaluate(client, *IMNM, dysphagia))["dysphagia"]
    assert card["indicator"] == "warning" and "Condition/d" in card["extension"]["imnm-cds.evidence"]
    assert card["suggestions"][0]["label"] == "Request an urgent swallow assessment"


def test_respiratory_failure_with_myositis_is_critical(client):
    card = red_flags(evaluate(client, *IMNM, condition("rf", RESPIRATORY_FAILURE)))["respiratory_failure"]
    assert card["indicator"] == "critical"


@pytest.mark.parametrize(("pct", "flagged"), [(80, True), (81, False), (55, True)])
def test_low_fvc_at_or_below_the_threshold(client, pct, flagged):
    flags = red_flags(evaluate(client, *IMNM, spirometry=[fvc("f", pct, "2024-05-20T10:00:00Z")]))
    assert ("low_fvc_red_flag" in flags) == flagged
    if flagged:
        assert f"FVC is {pct}% predicted" in flags["low_fvc_red_flag"]["detail"]


@pytest.mark.parametrize(
    ("earlier", "when", "flagged"),
    [
        (92, "2023-09-01T10:00:00Z", True),
        (86, "2023-09-01T10:00:00Z", True),
        (85, "2023-09-01T10:00:00Z", False),
    ],
)
def test_fvc_falling_by_the_threshold_within_a_year(client, earlier, when, flagged):
    series = [fvc("f1", earlier, when), fvc("f2", 81, "2024-05-20T10:00:00Z")]
    flags = red_flags(evaluate(client, *IMNM, spirometry=series))
    assert ("falling_fvc" in flags) == flagged
    if flagged:
        assert f"FVC fell {earlier - 81} points within 1 year" in flags["falling_fvc"]["detail"]
        assert {"Observation/f1", "Observation/f2"} <= set(
            flags["falling_fvc"]["extension"]["imnm-cds.evidence"]
        )


def test_an_fvc_fall_from_before_the_window_does_not_count(client):
    series = [fvc("f1", 99, "2022-01-01T10:00:00Z"), fvc("f2", 85, "2024-05-20T10:00:00Z")]
    assert "falling_fvc" not in red_flags(evaluate(client, *IMNM, spirometry=series))


def test_the_fvc_card_words_a_local_window(tmp_path):
    overrides = tmp_path / "local.toml"
    overrides.write_text('[severity.fvc.decline-window]\nvalue = 180\nsource = "Myositis MDT, 2026-01"\n')
    client = create_app({"knowledge_overrides": str(overrides)}).test_client()
    series = [fvc("f1", 90, "2024-01-01T10:00:00Z"), fvc("f2", 84, "2024-05-20T10:00:00Z")]
    detail = red_flags(evaluate(client, *IMNM, spirometry=series))["falling_fvc"]["detail"]
    assert "FVC fell 6 points within 180 days" in detail
    assert "5% predicted or more within 180 days, after the ATS/ERS criteria" in detail
    assert "1 year" not in detail


def test_fvc_in_litres_is_not_read_as_percent_predicted(client):
    flags = red_flags(evaluate(client, *IMNM, spirometry=[fvc("f", 2.1, "2024-05-20T10:00:00Z", unit="L")]))
    assert "low_fvc_red_flag" not in flags


def test_fvc_sent_among_the_labs_is_read_too(client):
    assert "low_fvc_red_flag" in red_flags(evaluate(client, *IMNM, fvc("f", 60, "2024-05-20T10:00:00Z")))


@pytest.mark.parametrize(
    ("antibody_", "first_day", "flagged"),
    [(SRP, "2024-05-10", True), (SRP, "2024-03-01", False), (HMGCR, "2024-05-10", False)],
)
def test_anti_srp_with_ck_rising_fast(client, antibody_, first_day, flagged):
    rising = [ck("a", 3000, f"{first_day}T08:00:00Z"), ck("b", 9000, "2024-05-30T08:00:00Z")]
    flags = red_flags(evaluate(client, *rising, antibody_))
    assert ("srp_rapidly_rising_ck" in flags) == flagged


def test_anti_mda5_is_critical_with_lung_disease_and_a_warning_without(client):
    mda5 = antibody("m", "MDA5 antibody", valueString="Positive")
    with_ild = red_flags(evaluate(client, *IMNM, mda5, condition("ild", ILD)))["anti_mda5"]
    without = red_flags(evaluate(client, *IMNM, mda5))["anti_mda5"]
    assert with_ild["indicator"] == "critical" and without["indicator"] == "warning"


def test_the_spirometry_prefetch_asks_for_the_value_set_codes(knowledge):
    query = next(p.query for p in PATIENT_VIEW.prefetch if p.key == "spirometry")
    asked = {part.split("|")[1] for part in query.split("code=")[1].split(",")}
    listed = {code for _, code in knowledge.valueset("fvc-percent-predicted").codes}
    assert asked == listed


# -- escalation -------------------------------------------------------------------------------------------


def escalation(cards):
    found = by_topic(cards, "treatment-escalation")
    return found[0] if found else None


def test_active_disease_on_glucocorticoids_alone_is_not_refractory(client):
    card = escalation(evaluate(client, *ON_TREATMENT, *ck_series(9000, 5000, 5200), HMGCR))
    assert card["summary"] == "This week: myositis still active after 143 days of treatment: add IVIG"
    assert "Not yet refractory" in card["detail"] and "Tried: glucocorticoids." in card["detail"]
    assert "IVIG, rituximab, methotrexate, mycophenolate." in card["detail"]
    assert "cyclophosphamide" not in card["detail"]  # a late option only once refractory
    assert "MedicationStatement/pred" in card["extension"]["imnm-cds.evidence"]


def test_refractory_needs_a_non_glucocorticoid_agent_for_the_refractory_time(client):
    ivig = [infusion("iv1", "IVIG 2 g/kg", "2024-03-01"), infusion("iv2", "IVIG 2 g/kg", "2024-04-29")]
    cards = evaluate(client, *ON_TREATMENT, *ck_series(9000, 5000, 5200), SRP, administrations=ivig)
    card = escalation(cards)
    assert card["summary"].startswith("This week: escalate refractory myositis")
    assert card["summary"].endswith("add rituximab")
    assert "Tried: glucocorticoids, IVIG." in card["detail"]
    assert "rituximab, methotrexate, mycophenolate, cyclophosphamide (a late option" in card["detail"]
    assert "refractory myositis (intermediate)" in by_topic(cards, "cancer-screening")[0]["detail"]
    late = [infusion("iv1", "IVIG 2 g/kg", "2024-04-01")]  # 61 days: not yet refractory
    assert (
        "Not yet refractory"
        in escalation(
            evaluate(client, *ON_TREATMENT, *ck_series(9000, 5000, 5200), SRP, administrations=late)
        )["detail"]
    )


def test_falling_ck_on_treatment_needs_no_escalation(client):
    assert escalation(evaluate(client, *ON_TREATMENT, *ck_series(9000, 4000, 1500), HMGCR)) is None


def test_too_short_a_course_is_not_yet_refractory(client):
    recent = statement("pred", "prednisone 40 mg daily", "2024-04-01")
    cards = evaluate(client, condition("w", WEAKNESS), recent, *ck_series(9000, 5000, 5200), HMGCR)
    assert escalation(cards) is None


def test_a_course_that_ended_long_ago_is_not_current_treatment(client):
    stopped = statement("pred", "prednisone 40 mg daily", "2023-01-01", status="completed", end="2023-06-01")
    cards = evaluate(client, condition("w", WEAKNESS), stopped, *ck_series(9000, 5000, 5200), HMGCR)
    assert escalation(cards) is None


def test_an_infusion_within_the_window_counts_as_current_treatment(client):
    rituximab = statement(
        "rtx", "rituximab 1 g", "2023-12-01", status="completed", end="2023-12-15", code="121191"
    )
    given = [infusion("r2", "Rituximab 1000 mg IV", "2024-05-01")]
    card = escalation(
        evaluate(
            client,
            condition("w", WEAKNESS),
            rituximab,
            *ck_series(9000, 5000, 5200),
            SRP,
            administrations=given,
        )
    )
    assert "Tried: rituximab." in card["detail"] and card["summary"].endswith("add IVIG")


def test_falling_fvc_on_treatment_asks_to_escalate_even_with_ck_falling(client):
    series = [fvc("f1", 90, "2023-12-01T10:00:00Z"), fvc("f2", 78, "2024-05-20T10:00:00Z")]
    cards = evaluate(client, *ON_TREATMENT, *ck_series(9000, 4000, 1500), HMGCR, spirometry=series)
    card = escalation(cards)
    assert card is not None and "treatment: FVC is falling." in card["detail"]


def test_the_refractory_time_is_a_local_setting(tmp_path):
    overrides = tmp_path / "local.toml"
    overrides.write_text('[severity.refractory.days]\nvalue = 180\nsource = "Myositis MDT, 2026-01"\n')
    client = create_app({"knowledge_overrides": str(overrides)}).test_client()
    assert escalation(evaluate(client, *ON_TREATMENT, *ck_series(9000, 5000, 5200), HMGCR)) is None


def muscle_mri(conclusion, when="2024-05-15"):
    return {
        "resourceType": "DiagnosticReport",
        "id": "mri",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "26235-2", "display": "MR Thigh - bilateral"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
        "conclusion": conclusion,
    }


WEAK_LATE = condition("w2", WEAKNESS, onsetDateTime="2023-12-01", recordedDate="2024-05-20")
NORMAL_CK = ck_series(9000, 400, 150)


def test_weakness_with_normal_ck_and_no_stir_oedema_is_an_info_card_not_a_drug(client):
    damage = muscle_mri("T1 fatty replacement of both adductor compartments. No STIR oedema.")
    for resources in (
        [PREDNISONE, WEAK_LATE, *NORMAL_CK, HMGCR],
        [PREDNISONE, WEAK_LATE, *NORMAL_CK, HMGCR, damage],
    ):
        [card] = by_topic(evaluate(client, *resources), "treatment-escalation")
        assert card["indicator"] == "info"
        assert "steroid" in card["summary"] and "add" not in card["summary"].replace("Do not add", "")
        assert "rehabilitation" in card["detail"]
    assert "T1 fatty replacement without STIR oedema" in card["detail"]
    assert "suggestions" not in card  # the MRI that would tell is on record


def test_stir_oedema_during_treatment_asks_to_escalate_even_with_a_normal_ck(client):
    active = muscle_mri(
        "Symmetric STIR hyperintensity of the vastus lateralis, in keeping with active myositis."
    )
    card = escalation(evaluate(client, PREDNISONE, WEAK_LATE, *NORMAL_CK, HMGCR, active))
    assert card["indicator"] == "warning" and "shows STIR oedema" in card["detail"]
    before = muscle_mri("Symmetric STIR hyperintensity of the vastus lateralis.", when="2023-12-20")
    # Oedema seen before treatment began says nothing about the response to it.
    assert escalation(evaluate(client, PREDNISONE, WEAK_LATE, *NORMAL_CK, HMGCR, before)) is None


def test_a_cancer_near_onset_is_named_and_treated_first(client):
    cancer = condition("ca", text="Non-small cell lung cancer, right upper lobe", onsetDateTime="2024-02-01")
    cancer["code"]["coding"] = [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C34.11"}]
    cards = evaluate(client, *ON_TREATMENT, *ck_series(9000, 5000, 5200), HMGCR, cancer)
    card = escalation(cards)
    assert card["summary"].endswith("plan cancer treatment and the next step with oncology")
    assert "Plan cancer treatment (Non-small cell lung cancer, right upper lobe)" in card["detail"]
    assert "Refer to oncology" in [s["label"] for s in card["suggestions"]]
    assert "occult" not in card["detail"]
