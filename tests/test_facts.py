"""FHIR R4 resources to facts: CK, antibodies, clinical findings, biopsy, statins, patient."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from conftest import LOINC, SNOMED, WEAKNESS, antibody, ck, condition, observation
from service import facts
from service.fhir import Resource, completed_years, parse_time

NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)
ALL = frozenset(
    {
        "Patient",
        "Observation",
        "Condition",
        "DiagnosticReport",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationAdministration",
        "MedicationDispense",
    }
)
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def build(k, *resources, available=ALL):
    return facts.build(
        k, [Resource(r, location=f"test[{i}]") for i, r in enumerate(resources)], now=NOW, available=available
    )


def fact(fact_set, id_):
    return next(f for f in fact_set.facts if f["id"] == id_)


# -- every evaluation asserts the same facts ------------------------------------------------------


def test_no_data_gives_every_fact_as_unknown(knowledge):
    result = build(knowledge)
    ids = [f["id"] for f in result.facts]
    assert len(ids) == len(set(ids))
    assert fact(result, "ck") == {"id": "ck", "t": "ck", "tested": False, "count": 0, "trend": "none"}
    assert fact(result, "antibody:anti-hmgcr")["state"] == "not-tested"
    assert fact(result, "clinical:proximal-weakness")["state"] == "unknown"
    assert fact(result, "biopsy")["reported"] is False and fact(result, "biopsy")["necrosis"] == "unknown"
    assert fact(result, "statin")["exposure"] == "none-recorded"
    assert fact(build(knowledge, available=frozenset()), "statin")["exposure"] == "unknown"
    assert fact(result, "ck-kinetics") == {"id": "ck-kinetics", "t": "ck-kinetics", "applicable": False}
    assert fact(result, "draft-statin")["count"] == 0 and fact(result, "tsh")["tested"] is False


# -- creatine kinase --------------------------------------------------------------------------------


def test_ck_units_are_normalised_to_units_per_litre(knowledge):
    result = build(
        knowledge,
        ck("a", 61.5, unit="ukat/L", high=3.3),
        ck("b", 2000, unit="IU/L", high=None, when="2024-04-01T00:00:00Z"),
    )
    summary = fact(result, "ck")
    assert summary["peak"] == pytest.approx(3690.0) and summary["uln"] == pytest.approx(198.0)
    assert summary["peak_x_uln"] == pytest.approx(18.64, abs=0.01)
    assert summary["count"] == 2 and summary["uln_assumed"] is False


def test_ck_in_an_unknown_unit_is_reported_not_guessed(knowledge):
    result = build(knowledge, ck("a", 12, unit="mmol/L", high=None))
    assert fact(result, "ck")["tested"] is False
    assert result.notes == ("CK result Observation/a is in an unknown unit (mmol/L) and was not used.",)


def test_ck_mb_never_counts_as_total_ck(knowledge):
    mb = observation(
        "mb",
        {"coding": [{"system": LOINC, "code": "32673-6"}], "text": "CK-MB"},
        valueQuantity={"value": 900, "unit": "U/L"},
    )
    text_mb = observation("mb2", {"text": "CK MB isoenzyme"}, valueQuantity={"value": 900, "unit": "U/L"})
    assert fact(build(knowledge, mb, text_mb), "ck")["tested"] is False


def test_ck_without_a_range_uses_the_cited_default_and_says_so(knowledge):
    result = build(knowledge, ck("a", 616, high=None))
    summary = fact(result, "ck")
    assert summary["uln"] == knowledge.value("labs.ck.default-uln.male") and summary["uln_assumed"] is True
    assert "assumed" in result.basis["ck"].text


@pytest.mark.parametrize(
    ("gender", "uln"), [("female", 180.0), ("male", 220.0), ("other", 220.0), (None, 220.0)]
)
def test_ck_without_a_range_uses_the_sex_specific_default(knowledge, gender, uln):
    person = {"resourceType": "Patient", "id": "p1", **({"gender": gender} if gender else {})}
    summary = fact(build(knowledge, person, ck("a", 200, high=None)), "ck")
    assert summary["uln"] == uln and summary["uln_assumed"] is True
    # 200 U/L is above the women's limit (RCPA 180 U/L) and within the men's (220 U/L).
    assert (summary["latest_x_uln"] > 1) is (gender == "female")


@pytest.mark.parametrize(
    ("values", "trend"),
    [((1000, 1300), "rising"), ((1300, 1000), "falling"), ((1000, 1100), "stable"), ((1000,), "single")],
)
def test_ck_trend_compares_the_latest_two_results(knowledge, values, trend):
    series = [ck(f"c{i}", v, when=f"2024-05-{10 + i:02d}T08:00:00Z") for i, v in enumerate(values)]
    summary = fact(build(knowledge, *reversed(series)), "ck")
    assert summary["trend"] == trend
    assert summary["latest"] == values[-1] and summary["peak"] == max(values)


def test_non_final_ck_results_do_not_count(knowledge):
    for status in ("preliminary", "registered", "entered-in-error", "cancelled", "unknown"):
        assert fact(build(knowledge, ck("a", 5000, status=status)), "ck")["tested"] is False
    for status in ("final", "amended", "corrected"):
        assert fact(build(knowledge, ck("a", 5000, status=status)), "ck")["tested"] is True


def test_the_peak_is_the_first_of_equal_highs(knowledge):
    result = build(
        knowledge, ck("b", 3000, when="2024-05-20T08:00:00Z"), ck("a", 3000, when="2024-05-10T08:00:00Z")
    )
    summary = fact(result, "ck")
    assert summary["peak_days_ago"] == pytest.approx(22.17, abs=0.01) and summary["trend"] == "stable"


def test_days_are_counted_back_from_now(knowledge):
    summary = fact(build(knowledge, ck("a", 5000, when="2024-05-22T12:00:00Z")), "ck")
    assert summary["latest_days_ago"] == 10.0


# -- antibodies ------------------------------------------------------------------------------------


def interp(code):
    return [{"coding": [{"system": INTERPRETATION, "code": code}]}]


@pytest.mark.parametrize(
    ("values", "state"),
    [
        ({"interpretation": interp("POS")}, "positive"),
        ({"interpretation": interp("NEG")}, "negative"),
        ({"interpretation": interp("IND")}, "indeterminate"),
        ({"interpretation": interp("H"), "valueQuantity": {"value": 5, "unit": "U"}}, "positive"),
        ({"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "10828004"}]}}, "positive"),
        ({"valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA6577-6"}]}}, "negative"),
        ({"valueCodeableConcept": {"text": "Not detected"}}, "negative"),
        ({"valueString": "Weakly positive"}, "positive"),
        ({"valueString": "negative"}, "negative"),
        ({"valueString": "Equivocal"}, "indeterminate"),
        ({"valueBoolean": True}, "positive"),
        (
            {"valueQuantity": {"value": 45, "unit": "units"}, "referenceRange": [{"high": {"value": 19}}]},
            "positive",
        ),
        (
            {"valueQuantity": {"value": 12, "unit": "units"}, "referenceRange": [{"high": {"value": 19}}]},
            "negative",
        ),
        (
            {
                "valueQuantity": {"value": 19, "comparator": "<", "unit": "units"},
                "referenceRange": [{"high": {"value": 19}}],
            },
            "negative",
        ),
        (
            {
                "valueQuantity": {"value": 20, "comparator": "<", "unit": "units"},
                "referenceRange": [{"high": {"value": 19}}],
            },
            "indeterminate",
        ),
        (
            {
                "valueQuantity": {"value": 200, "comparator": ">", "unit": "units"},
                "referenceRange": [{"high": {"value": 19}}],
            },
            "positive",
        ),
        ({"valueQuantity": {"value": 20, "unit": "U"}}, "positive"),  # the cited cut-off: 20 is positive
        ({"valueQuantity": {"value": 19.9, "unit": "CU"}}, "negative"),
        ({"valueQuantity": {"value": 45, "unit": "AU/mL"}}, "indeterminate"),  # no range, unknown unit
    ],
    ids=[
        "interp-pos",
        "interp-neg",
        "interp-ind",
        "interp-wins",
        "snomed-positive",
        "loinc-negative",
        "text-not-detected",
        "string-weak",
        "string-neg",
        "string-equivocal",
        "boolean",
        "range-high",
        "range-normal",
        "below-range",
        "below-ambiguous",
        "above-range",
        "cutoff-at",
        "cutoff-below",
        "unreadable",
    ],
)
def test_anti_hmgcr_results_are_read_in_every_shape(knowledge, values, state):
    result = build(knowledge, antibody("a", "HMGCR antibody", **values))
    assert fact(result, "antibody:anti-hmgcr")["state"] == state
    unreadable = state == "indeterminate" and "valueQuantity" in values and "interpretation" not in values
    assert ("could not be read" in " ".join(result.notes)) == unreadable


def test_antibody_by_code_without_text(knowledge):
    srp = observation("s", {"coding": [{"system": LOINC, "code": "33921-8"}]}, interpretation=interp("POS"))
    mda5 = observation(
        "m",
        {"coding": [{"system": "urn:oid:2.16.840.1.113883.6.1", "code": "82424-3"}]},
        interpretation=interp("DET"),
    )
    result = build(knowledge, srp, mda5)
    assert fact(result, "antibody:anti-srp")["state"] == "positive"
    assert fact(result, "antibody:anti-mda5")["state"] == "positive"


def test_the_latest_result_wins_and_discordant_same_day_results_are_indeterminate(knowledge):
    old = antibody("old", "HMGCR Ab", when="2023-01-01T00:00:00Z", interpretation=interp("POS"))
    new = antibody("new", "HMGCR Ab", when="2024-05-01T00:00:00Z", interpretation=interp("NEG"))
    assert fact(build(knowledge, old, new), "antibody:anti-hmgcr")["state"] == "negative"
    clash = antibody("clash", "HMGCR Ab", when="2024-05-01T00:00:00Z", interpretation=interp("POS"))
    assert fact(build(knowledge, old, new, clash), "antibody:anti-hmgcr")["state"] == "indeterminate"


def test_panel_components_are_read_one_by_one(knowledge):
    panel = observation(
        "panel",
        {"text": "Myositis antibody panel"},
        component=[
            {"code": {"text": "Jo-1"}, "interpretation": interp("POS")},
            {"code": {"text": "PL-12 antibody"}, "valueString": "Negative"},
            {"code": {"text": "TIF1-gamma"}, "valueString": "negative"},
        ],
    )
    result = build(knowledge, panel)
    assert fact(result, "antibody:anti-jo1")["state"] == "positive"
    assert fact(result, "antibody:anti-pl12")["state"] == "negative"
    assert fact(result, "antibody:anti-tif1g")["state"] == "negative"
    assert result.basis["antibody:anti-jo1"].references == ("Observation/panel",)


def test_a_result_naming_two_antibodies_is_not_guessed(knowledge):
    result = build(knowledge, antibody("both", "Jo-1 and PL-7 antibodies", valueString="Positive"))
    assert fact(result, "antibody:anti-jo1")["state"] == "not-tested"
    assert "several antibodies" in result.notes[0]


# -- clinical findings ------------------------------------------------------------------------------


def status(system_code, system):
    return {"coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system}", "code": system_code}]}


@pytest.mark.parametrize(
    ("clinical", "verification", "state"),
    [
        (None, None, "present"),
        ("active", "confirmed", "present"),
        ("recurrence", None, "present"),
        ("resolved", "confirmed", "past"),
        ("remission", None, "past"),
        ("active", "refuted", "unknown"),
        ("active", "entered-in-error", "unknown"),
        ("active", "provisional", "unknown"),
        ("active", "differential", "unknown"),
    ],
)
def test_condition_status_decides_what_counts(knowledge, clinical, verification, state):
    extra = {}
    if clinical:
        extra["clinicalStatus"] = status(clinical, "condition-clinical")
    if verification:
        extra["verificationStatus"] = status(verification, "condition-ver-status")
    result = build(knowledge, condition("w", WEAKNESS, **extra))
    assert fact(result, "clinical:proximal-weakness")["state"] == state


def test_conditions_by_icd10_with_or_without_dots_and_by_text(knowledge):
    icd = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "R1312"}]}
    dm = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M33.12"}]}
    result = build(
        knowledge,
        condition("d", code=None) | {"code": icd},
        condition("m", code=None) | {"code": dm},
        condition("r", text="Gottron papules over knuckles"),
        condition("x", code="249942005"),  # distal weakness is not proximal weakness
    )
    assert fact(result, "clinical:dysphagia")["state"] == "present"
    assert fact(result, "clinical:diagnosis-dermatomyositis")["state"] == "present"
    assert fact(result, "clinical:dermatomyositis-rash")["state"] == "present"
    assert fact(result, "clinical:proximal-weakness")["state"] == "unknown"


def test_findings_from_observations(knowledge):
    by_value = observation(
        "e1",
        {"text": "Strength exam"},
        valueCodeableConcept={"coding": [{"system": SNOMED, "code": WEAKNESS}]},
    )
    by_code_absent = observation(
        "e2", {"coding": [{"system": SNOMED, "code": "40739000"}]}, valueBoolean=False
    )
    assert fact(build(knowledge, by_value), "clinical:proximal-weakness")["state"] == "present"
    assert fact(build(knowledge, by_code_absent), "clinical:dysphagia")["state"] == "unknown"


def test_onset_is_the_earliest_and_counted_in_days(knowledge):
    result = build(
        knowledge,
        condition("a", WEAKNESS, onsetDateTime="2024-05-01"),
        condition("b", WEAKNESS, onsetDateTime="2024-03-02"),
    )
    assert fact(result, "clinical:proximal-weakness")["onset_days_ago"] == pytest.approx(91.5)


# -- muscle biopsy ----------------------------------------------------------------------------------


def report(text, **extra):
    return {
        "resourceType": "DiagnosticReport",
        "id": "bx",
        "status": extra.pop("status", "final"),
        "code": {"text": "Muscle biopsy"},
        "effectiveDateTime": "2024-05-01",
        "conclusion": text,
        **extra,
    }


def test_biopsy_features_with_negation_in_the_same_clause(knowledge):
    result = build(
        knowledge,
        report(
            "Necrotic fibres with myophagocytosis; sparse lymphocytes. No perifascicular atrophy. "
            "C5b-9 on capillaries, but no rimmed vacuoles."
        ),
    )
    biopsy = fact(result, "biopsy")
    assert biopsy["reported"] is True
    assert biopsy["necrosis"] == biopsy["macrophages"] == biopsy["sparse_inflammation"] == "present"
    assert biopsy["mac_deposition"] == "present"
    assert biopsy["perifascicular_atrophy"] == biopsy["rimmed_vacuoles"] == "absent"
    assert biopsy["endomysial_invasion"] == "unknown"


def test_without_diagnostic_reports_biopsy_and_screening_are_unknown_not_absent(knowledge):
    onset = ck("a", 3000)  # a raised CK dates the onset
    unknown = build(knowledge, onset, available=ALL - {"DiagnosticReport"})
    assert fact(unknown, "biopsy")["reported"] == "unknown"
    assert unknown.basis["biopsy"].text == "muscle biopsy: unknown (no diagnostic reports available)"
    screened = fact(unknown, "cancer-screening")
    assert screened["basic"] == screened["enhanced"] == "unknown"  # Procedure, ServiceRequest not sent
    known = build(knowledge, onset)
    assert fact(known, "biopsy")["reported"] is False
    assert fact(known, "cancer-screening")["basic"] == "none"
    assert known.basis["cancer-screening"].text == "cancer screening: none recorded"


ALL_RECORDS = ALL | {"Procedure", "ServiceRequest"}


def request(id_, code, status="active", intent="order", authored="2024-05-10", **extra):
    return {
        "resourceType": "ServiceRequest",
        "id": id_,
        "status": status,
        "intent": intent,
        "code": code,
        "subject": {"reference": "Patient/p1"},
        "authoredOn": authored,
        **extra,
    }


def procedure(id_, code, status="completed", performed="2024-05-12"):
    data = {
        "resourceType": "Procedure",
        "id": id_,
        "status": status,
        "code": code,
        "subject": {"reference": "Patient/p1"},
    }
    return {**data, "performedDateTime": performed} if performed else data


def screened(knowledge, *records):
    return fact(build(knowledge, ck("a", 3000), *records, available=ALL_RECORDS), "cancer-screening")


def test_screening_orders_and_procedures_are_read_by_code_or_words(knowledge):
    coded_ct = {"coding": [{"system": LOINC, "code": "72254-6"}]}
    assert screened(knowledge, request("ct", coded_ct))["enhanced"] == "ordered"
    worded_ct = {"text": "CT chest/abdomen/pelvis with IV contrast"}
    assert screened(knowledge, request("ct", worded_ct))["enhanced"] == "ordered"
    colonoscopy = {"coding": [{"system": SNOMED, "code": "73761001", "display": "Colonoscopy"}]}
    egd = {"text": "EGD (esophagogastroduodenoscopy)"}
    both = screened(knowledge, procedure("c", colonoscopy), procedure("u", egd))
    assert both["endoscopy"] == "done"
    # One part alone leaves the endoscopy to be done: the high tier asks for upper and lower.
    assert screened(knowledge, procedure("c", colonoscopy))["endoscopy"] == "none"
    assert screened(knowledge, procedure("c", colonoscopy), request("u", egd))["endoscopy"] == "ordered"
    pet = {"text": "PET/CT skull base to mid-thigh, FDG"}
    assert screened(knowledge, procedure("p", pet))["pet_ct"] == "done"
    cxr = {"coding": [{"system": LOINC, "code": "36643-5", "display": "XR Chest 2 Views"}]}
    preliminary = {**report("No focal consolidation.", code=cxr, status="preliminary"), "id": "cxr"}
    assert screened(knowledge, preliminary)["basic"] == "ordered"


def test_a_not_done_procedure_or_a_revoked_order_is_declined(knowledge):
    colonoscopy, upper = {"text": "Colonoscopy"}, {"text": "Upper GI endoscopy"}
    declined = screened(
        knowledge,
        procedure("c", colonoscopy, status="not-done", performed=None),
        request("u", upper, "revoked"),
    )
    # Without a date a not-done procedure cannot be placed in the window: it is not counted.
    assert declined["endoscopy"] == "none"
    dated = procedure("c", colonoscopy, status="not-done", performed="2024-05-02")
    assert screened(knowledge, dated, request("u", upper, "revoked"))["endoscopy"] == "declined"
    # Done beats declined: a test done after one was refused.
    assert (
        screened(knowledge, dated, procedure("c2", colonoscopy), procedure("u", upper))["endoscopy"] == "done"
    )


def test_what_does_not_show_screening_is_not_read_as_screening(knowledge):
    proposed = request("ct", {"text": "CT thorax abdomen pelvis"}, intent="proposal")
    assert screened(knowledge, proposed)["enhanced"] == "none"  # a proposal is not an order
    bone = {"text": "PET/CT whole body bone, 18F-NaF"}
    assert screened(knowledge, procedure("p", bone))["pet_ct"] == "none"
    swallow = {"text": "Fiberoptic endoscopic evaluation of swallowing"}
    assert screened(knowledge, procedure("f", swallow))["endoscopy"] == "none"
    # A CT report that recommends a PET-CT has not done one.
    ct = {
        **report("No mass. Recommend FDG PET-CT if CEA rises."),
        "code": {"text": "CT chest abdomen pelvis"},
    }
    recommended = screened(knowledge, ct)
    assert recommended["enhanced"] == "done" and recommended["pet_ct"] == "none"
    old = request("ct", {"text": "CT chest abdomen pelvis"}, authored="2019-01-01")
    assert screened(knowledge, old)["enhanced"] == "none"  # before the window around the onset
    cancelled = request("ct", {"text": "CT chest abdomen pelvis"}, status="entered-in-error")
    assert screened(knowledge, cancelled)["enhanced"] == "none"


def test_the_timeline_shows_what_each_screening_record_shows_and_leaves_out_one_that_shows_nothing(knowledge):
    ct = request("ct", {"text": "CT chest abdomen pelvis"})
    mistaken = request("pet", {"text": "FDG PET-CT"}, status="entered-in-error")
    built = build(knowledge, ck("a", 3000), ct, mistaken, available=ALL_RECORDS)
    markers = [(m.reading, m.reference) for m in built.timeline.markers if m.kind == "screening"]
    assert markers == [("enhanced panel ordered", "ServiceRequest/ct")]


def test_biopsy_text_from_a_plain_text_attachment(knowledge):
    text = base64.b64encode(b"Muscle biopsy: CD8+ T cells invading non-necrotic fibres.").decode()
    attached = report("x", presentedForm=[{"contentType": "text/plain", "data": text}])
    del attached["conclusion"]
    result = build(knowledge, attached)
    assert fact(result, "biopsy")["endomysial_invasion"] == "present"


def test_only_final_muscle_biopsies_count(knowledge):
    assert (
        fact(build(knowledge, report("Necrotic fibres", status="preliminary")), "biopsy")["reported"] is False
    )
    skin = report("Skin punch biopsy: interface dermatitis") | {"code": {"text": "Skin biopsy"}}
    assert fact(build(knowledge, skin), "biopsy")["reported"] is False


V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"


def category(code):
    return [{"coding": [{"system": V2_0074, "code": code}]}]


def mri(id_, text, when="2024-05-20", code="26235-2", **extra):
    return {
        "resourceType": "DiagnosticReport",
        "id": id_,
        "status": "final",
        "category": category("RAD"),
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
        "conclusion": text,
        **extra,
    }


def test_a_report_is_a_biopsy_by_its_code_or_category_and_muscle_by_specimen_code_or_conclusion(knowledge):
    surgical = {
        "resourceType": "DiagnosticReport",
        "id": "sp",
        "status": "final",
        "category": category("SP"),
        "code": {"coding": [{"system": LOINC, "code": "11529-5"}]},
        "specimen": [{"display": "Skeletal muscle, left deltoid"}],
        "conclusion": "Scattered necrotic fibres; MHC class I: diffuse upregulation; inflammation: minimal.",
    }
    assert fact(build(knowledge, surgical), "biopsy")["level"] == "compatible-with-imnm"
    # Coded as pathology but of skin: no muscle anywhere, so no muscle biopsy.
    skin = surgical | {
        "specimen": [{"display": "Skin, left forearm, punch"}],
        "conclusion": "Necrotic keratinocytes.",
    }
    assert fact(build(knowledge, skin), "biopsy")["reported"] is False
    # A note that talks about a muscle biopsy is not one: the kind comes from the code and category.
    note = {
        "resourceType": "DiagnosticReport",
        "id": "note",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "11488-4"}], "text": "Consult note"},
        "conclusion": "Muscle biopsy of the vastus lateralis showed necrotic fibres.",
    }
    assert fact(build(knowledge, note), "biopsy")["reported"] is False
    guided = note | {"code": {"text": "MR guidance for biopsy of muscle"}}
    assert fact(build(knowledge, guided), "biopsy")["reported"] is False


def test_an_mri_naming_the_best_biopsy_site_is_an_mri_not_a_biopsy(knowledge):
    text = (
        "Symmetric STIR hyperintensity of both vastus lateralis muscles; no fatty replacement on T1. "
        "If a repeat muscle biopsy is considered, the vastus lateralis is the best site."
    )
    result = build(knowledge, mri("m1", text))
    assert fact(result, "biopsy")["reported"] is False
    latest = fact(result, "mri")
    assert latest["stir_oedema"] == "present" and latest["fatty_replacement"] == "absent"
    assert latest["date"] == "2024-05-20" and latest["studies"] == 1
    assert result.basis["mri"].references == ("DiagnosticReport/m1",)


def test_each_mri_study_is_its_own_fact_and_the_latest_is_the_mri_fact(knowledge):
    old = mri("m1", "Muscle oedema in both thighs. No fatty infiltration.", when="2023-01-10")
    new = mri("m2", "STIR: normal signal in all imaged muscles. T1: fatty atrophy of the hamstrings.")
    chest = mri("ct", "Subpleural reticulation.", code="24627-2") | {"code": {"text": "CT chest"}}
    result = build(knowledge, old, new, chest)
    studies = sorted((f for f in result.facts if f["t"] == "mri-study"), key=lambda f: f["date"])
    assert [(f["date"], f["stir_oedema"], f["fatty_replacement"]) for f in studies] == [
        ("2023-01-10", "present", "absent"),
        ("2024-05-20", "absent", "present"),
    ]
    assert fact(result, "mri")["date"] == "2024-05-20" and fact(result, "mri")["studies"] == 2


def test_without_reports_the_mri_is_unknown_not_absent(knowledge):
    assert fact(build(knowledge, available=ALL - {"DiagnosticReport"}), "mri")["stir_oedema"] == "unknown"
    assert fact(build(knowledge, available=ALL - {"DiagnosticReport"}), "mri")["reported"] == "unknown"
    assert fact(build(knowledge), "mri")["reported"] is False


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("Necrotic fibres. Dysferlin: absent.", "dystrophic"),
        ("Necrotic fibres; CD8+ T cells invade non-necrotic fibres.", "other-inflammatory"),
        (
            "Scattered necrotic fibres; sparse inflammation; C5b-9 on non-necrotic fibres.",
            "compatible-with-imnm",
        ),
        ("Findings are consistent with immune-mediated necrotizing myopathy.", "compatible-with-imnm"),
        ("Scattered necrotic fibres.", "non-specific-necrosis"),
        ("Necrotic fibres: none seen. Inflammation: minimal.", "no-necrosis"),
        ("Fibre size variation.", "unknown"),
    ],
)
def test_biopsy_levels(knowledge, text, level):
    assert fact(build(knowledge, report(text)), "biopsy")["level"] == level


# -- spirometry ------------------------------------------------------------------------------------


def fvc(id_, value, when="2024-05-01T08:00:00Z", **quantity):
    code = {"coding": [{"system": LOINC, "code": "19872-1"}]}
    return observation(id_, code, when, valueQuantity={"value": value, **quantity})


def test_an_fvc_that_cannot_be_read_as_percent_predicted_is_reported_not_guessed(knowledge):
    undated = fvc("undated", 50, unit="%")
    del undated["effectiveDateTime"]
    result = build(
        knowledge,
        fvc("unitless", 55),
        fvc("litres", 2.1, unit="L"),
        undated,
        fvc("usable", 90, "2024-04-01T08:00:00Z", unit="%"),
    )
    assert fact(result, "fvc")["latest_pct"] == 90 and fact(result, "fvc")["decline"] == 0.0
    assert result.notes == (
        "FVC result Observation/unitless is not in % predicted (no unit) and was not used.",
        "FVC result Observation/litres is not in % predicted (L) and was not used.",
        "FVC result Observation/undated has no date and was not used.",
    )


# -- statins ----------------------------------------------------------------------------------------


def statement(status="active", **drug):
    return {
        "resourceType": "MedicationStatement",
        "id": "ms",
        "status": status,
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": {"start": "2022-01-01"},
        **drug,
    }


@pytest.mark.parametrize(
    "drug",
    [
        {"medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "83367"}]}},
        {"medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "617311"}]}},
        {"medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc", "code": "C10BA02"}]}},
        {"medicationCodeableConcept": {"text": "Rosuvastatin 10 mg tablet"}},
        {
            "medicationReference": {"reference": "#m"},
            "contained": [{"resourceType": "Medication", "id": "m", "code": {"text": "simvastatin 20 mg"}}],
        },
    ],
    ids=["ingredient", "product", "atc-combination", "text", "contained"],
)
def test_statins_are_recognised_however_they_are_coded(knowledge, drug):
    assert fact(build(knowledge, statement(**drug)), "statin")["exposure"] == "current"


def test_a_referenced_medication_and_intensity(knowledge):
    med = {
        "resourceType": "Medication",
        "id": "atorva80",
        "code": {"coding": [{"system": RXNORM, "code": "259255"}]},
    }
    request = {
        "resourceType": "MedicationRequest",
        "id": "mr",
        "status": "stopped",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2023-01-01",
        "medicationReference": {"reference": "Medication/atorva80"},
    }
    statin = fact(build(knowledge, med, request), "statin")
    assert statin["exposure"] == "past" and statin["intensity"] == "high" and statin["stop_known"] is False


def test_a_drug_that_cannot_be_identified_leaves_statin_exposure_unknown(knowledge):
    missing = statement(medicationReference={"reference": "Medication/not-sent"})
    uncoded = statement(medicationCodeableConcept={"coding": [{"system": RXNORM}]}) | {"id": "ms2"}
    result = build(knowledge, missing, uncoded)
    assert fact(result, "statin")["exposure"] == "unknown"
    assert (
        result.basis["statin"].text
        == "statin exposure: unknown (2 medication records could not be identified)"
    )
    assert result.notes == (
        "2 medication records could not be identified (no drug code, or a Medication that was not sent) "
        "and were not used.",
    )
    # A statin found is exposure whatever the other records are; one never taken does not matter.
    simvastatin = statement(medicationCodeableConcept={"text": "simvastatin"}) | {"id": "ms3"}
    assert fact(build(knowledge, missing, simvastatin), "statin")["exposure"] == "current"
    never = statement("not-taken", medicationReference={"reference": "Medication/not-sent"})
    odd = statement(medicationReference={"reference": "Medication/not-sent"}) | {"status": {"code": "active"}}
    result = build(knowledge, never, odd | {"id": "ms4"})
    assert fact(result, "statin")["exposure"] == "none-recorded" and not result.notes


def test_statin_exposure_needs_requests_or_statements_to_be_known(knowledge):
    administrations = frozenset({"Patient", "Observation", "Condition", "MedicationAdministration"})
    assert fact(build(knowledge, available=administrations), "statin")["exposure"] == "unknown"
    for kind in ("MedicationRequest", "MedicationStatement"):
        known = fact(build(knowledge, available=administrations | {kind}), "statin")
        assert known["exposure"] == "none-recorded"


def test_a_stopped_statement_has_a_known_stop_date(knowledge):
    stopped = statement(
        "completed",
        medicationCodeableConcept={"text": "atorvastatin"},
        effectivePeriod={"start": "2022-01-01", "end": "2024-05-02"},
    )
    statin = fact(build(knowledge, stopped), "statin")
    assert statin["exposure"] == "past" and statin["stop_known"] is True and statin["last_days_ago"] == 30.5


def test_statements_never_taken_do_not_count(knowledge):
    for status in ("not-taken", "entered-in-error", "intended"):
        result = build(knowledge, statement(status, medicationCodeableConcept={"text": "atorvastatin"}))
        assert fact(result, "statin")["exposure"] == "none-recorded"


def test_non_statins_are_ignored(knowledge):
    result = build(knowledge, statement(medicationCodeableConcept={"text": "nystatin cream"}))
    assert fact(result, "statin")["exposure"] == "none-recorded"


# -- patient, validation, times ---------------------------------------------------------------------


def test_patient_age_and_sex(knowledge):
    patient = fact(
        build(
            knowledge, {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "2010-06-02"}
        ),
        "patient",
    )
    assert patient["sex"] == "female" and patient["adult"] == "no" and patient["age"] == 13
    for birth, age, adult in (("2006-06-01", 18, "yes"), ("2006-06-02", 17, "no"), ("2004-02-29", 20, "yes")):
        patient = fact(
            build(knowledge, {"resourceType": "Patient", "id": "p1", "birthDate": birth}), "patient"
        )
        assert (patient["age"], patient["adult"]) == (age, adult)


def test_age_at_onset_counts_completed_years(knowledge):
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1984-02-29"}
    for when, age in (("2024-02-28T08:00:00Z", 39), ("2024-02-29T08:00:00Z", 40)):
        onset = fact(build(knowledge, patient, ck("a", 3000, when=when)), "myositis-onset")
        assert onset["age_at_onset"] == age


@pytest.mark.parametrize(
    ("birth", "at", "years"),
    [("2000-06-02", "2018-06-01", 17), ("2000-06-02", "2018-06-02", 18), ("2004-02-29", "2023-02-28", 18)],
)
def test_completed_years(birth, at, years):
    assert completed_years(parse_time(birth), parse_time(at)) == years


def test_an_invalid_resource_that_matters_is_refused_with_its_location(knowledge):
    bad = ck("a", 3000) | {"effectiveDateTime": "2024-13-45"}
    with pytest.raises(facts.InvalidData) as raised:
        build(knowledge, bad)
    problem = raised.value.problems[0]
    assert problem.resource.location == "test[0]"
    assert problem.problems[0][0] == "effectiveDateTime"


def test_an_invalid_resource_that_cannot_matter_is_not_even_validated(knowledge):
    glucose = observation("g", {"text": "glucose"}, valueQuantity={"value": "n/a"})
    assert fact(build(knowledge, glucose), "ck")["tested"] is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-05", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-03T10:00:00+02:00", datetime(2024, 5, 3, 8, tzinfo=UTC)),
        ("2024-05-03T10:00:00Z", datetime(2024, 5, 3, 10, tzinfo=UTC)),
        ("garbage", None),
        (None, None),
        (20240503, None),
    ],
)
def test_fhir_times(text, expected):
    assert parse_time(text) == expected
