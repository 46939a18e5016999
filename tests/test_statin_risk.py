"""Statin risk, treatment and onset as EHRs record them: problem lists, allergies, brands, routes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conftest import SNOMED, antibody, ck, condition, hook_request
from service import facts
from service.fhir import Resource

NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ALL = frozenset({"Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement"})
SIGN = "/cds-services/imnm-statin-order-sign"


def built(k, *resources, available=ALL | {"AllergyIntolerance"}):
    found = facts.build(k, [Resource(r) for r in resources], now=NOW, available=available)
    return {f["id"]: f for f in found.facts}


def problem(id_, text, code=None, system=ICD, **extra):
    concept = {"text": text} if text else {}
    if code:
        concept["coding"] = [{"system": system, "code": code}]
    return {**condition(id_, **extra), "code": concept}


def draft(concept, id_="d1"):
    return {
        "resourceType": "MedicationRequest",
        "id": id_,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": concept,
        "subject": {"reference": "Patient/p1"},
    }


def sign(client, drafts, resources=(), **prefetch):
    request = hook_request(resources=resources, **prefetch)
    request["hook"] = "order-sign"
    request["context"]["draftOrders"] = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": d} for d in drafts],
    }
    response = client.post(SIGN, json=request)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["cards"]


def allergy(code=None, text=None, manifestation=None, clinical=None, verification=None, system=SNOMED):
    data = {"resourceType": "AllergyIntolerance", "id": "a1", "patient": {"reference": "Patient/p1"}}
    data["code"] = {
        **({"coding": [{"system": system, "code": code}]} if code else {}),
        **({"text": text} if text else {}),
    }
    if manifestation:
        data["reaction"] = [{"manifestation": [manifestation]}]
    status = "http://terminology.hl7.org/CodeSystem/allergyintolerance-"
    if clinical:
        data["clinicalStatus"] = {"coding": [{"system": status + "clinical", "code": clinical}]}
    if verification:
        data["verificationStatus"] = {"coding": [{"system": status + "verification", "code": verification}]}
    return data


# -- statin risk on the problem list ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("G72.49", "Anti-HMGCR myopathy"),
        ("G72.49", "Statin-induced necrotizing autoimmune myopathy"),
        ("M60.89", "statin associated autoimmune myopathy"),
        ("M60.80", "HMG-CoA reductase antibody positive myopathy"),
        (None, "anti-HMGCR necrotising myopathy"),
    ],
)
def test_a_statin_myopathy_on_the_problem_list_is_statin_risk_not_an_imnm_diagnosis(knowledge, code, text):
    found = built(knowledge, problem("c1", text, code))
    assert found["clinical:statin-myopathy"]["state"] == "present"
    assert found["clinical:diagnosis-imnm"]["state"] == "unknown"


@pytest.mark.parametrize(
    "text", ["Anti-HMGCR myopathy ruled out", "anti-HMGCR negative myopathy", "? statin-induced myopathy"]
)
def test_negated_or_questioned_wording_is_not_statin_risk(knowledge, text):
    assert built(knowledge, problem("c1", text, "G72.49"))["clinical:statin-myopathy"]["state"] == "unknown"


def test_a_bare_g72_49_names_no_cause(knowledge):
    found = built(knowledge, problem("c1", "Other inflammatory and immune myopathies, NEC", "G72.49"))
    assert found["clinical:statin-myopathy"]["state"] == "unknown"
    assert found["clinical:diagnosis-imnm"]["state"] == "unknown"


@pytest.mark.parametrize("text", ["Anti-HMGCR myopathy", "statin-induced necrotizing autoimmune myopathy"])
def test_a_statin_myopathy_on_the_problem_list_makes_a_statin_order_critical(client, text):
    [card] = sign(client, [draft({"text": "atorvastatin 40 mg tablet"})], [problem("c1", text, "G72.49")])
    assert card["indicator"] == "critical" and "statin-associated" in card["detail"]


# -- indicator by cause ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        problem("c1", "Anti-SRP necrotizing myopathy", "G72.49"),
        problem("c1", "Immune-mediated necrotizing myopathy, seronegative"),
        problem("c1", None, "715863001", SNOMED),
    ],
)
def test_other_imnm_warns_and_anti_hmgcr_makes_it_critical(client, record):
    statin = draft({"text": "simvastatin 20 mg"})
    [card] = sign(client, [statin], [record])
    assert card["indicator"] == "warning" and "IMNM diagnosis" in card["detail"]
    hmgcr = antibody("h", "HMGCR antibody", valueString="Positive")
    [card] = sign(client, [statin], [record, hmgcr])
    assert card["indicator"] == "critical"


# -- statin allergies ----------------------------------------------------------------------------------

RHABDO = {"coding": [{"system": SNOMED, "code": "240131006", "display": "Rhabdomyolysis"}]}


@pytest.mark.parametrize(
    "record",
    [
        allergy("372912004", manifestation=RHABDO),
        allergy("96302009", "Statins", manifestation={"text": "muscle pain"}),
        allergy("83367", "atorvastatin", manifestation={"text": "Myositis"}, system=RXNORM),
        allergy(
            text="Lipitor",
            manifestation={"text": "elevated CK"},
            clinical="active",
            verification="unconfirmed",
        ),
        allergy("617318", manifestation={"coding": [{"system": SNOMED, "code": "26889001"}]}, system=RXNORM),
    ],
)
def test_a_statin_allergy_for_myopathy_makes_a_statin_order_critical(client, knowledge, record):
    assert built(knowledge, record)["statin-allergy"] == {
        "id": "statin-allergy",
        "t": "statin-allergy",
        "state": "present",
        "myopathy": True,
    }
    [card] = sign(client, [draft({"text": "CRESTOR 20 MG tablet"})], [record])
    assert card["indicator"] == "critical" and "muscle reaction" in card["detail"]


@pytest.mark.parametrize(
    "record",
    [
        allergy("372912004", manifestation=RHABDO, verification="refuted"),
        allergy("372912004", manifestation=RHABDO, verification="entered-in-error"),
        allergy("372912004", manifestation=RHABDO, clinical="inactive"),
        allergy("372912004", manifestation=RHABDO, clinical="resolved"),
        allergy("372912004", manifestation={"text": "nausea"}),
        allergy(text="Nystatin", manifestation={"text": "myalgia"}),
    ],
)
def test_a_refuted_inactive_or_non_muscle_statin_allergy_gives_no_card(client, record):
    assert sign(client, [draft({"text": "rosuvastatin 10 mg"})], [record]) == []


def test_allergies_are_unknown_without_the_key_and_discovery_asks_for_them(client, knowledge):
    assert built(knowledge, available=ALL)["statin-allergy"]["state"] == "unknown"
    assert built(knowledge)["statin-allergy"]["state"] == "none-recorded"
    for service in client.get("/cds-services").get_json()["services"]:
        assert service["prefetch"]["allergies"] == "AllergyIntolerance?patient={{context.patientId}}"


# -- brand names and branded products ------------------------------------------------------------------


@pytest.mark.parametrize(
    "concept",
    [
        {"text": "CRESTOR 20 MG tablet"},
        {"text": "Lipitor 40mg"},
        {"text": "Zypitamag 2 mg"},
        {"text": "Vytorin 10/40"},
        {"coding": [{"system": RXNORM, "code": "859753"}]},  # rosuvastatin calcium 20 MG [Crestor]
        {"coding": [{"system": RXNORM, "code": "320864", "display": "Crestor"}]},
        {"coding": [{"system": RXNORM, "code": "750203"}]},  # amlodipine/atorvastatin [Caduet]
    ],
)
def test_a_brand_or_branded_product_is_a_statin_in_draft_orders_and_history(client, knowledge, concept):
    [card] = sign(client, [draft(concept)], [antibody("h", "HMGCR antibody", valueString="Positive")])
    assert card["indicator"] == "critical" and card["suggestions"]
    taken = {**draft(concept), "status": "completed", "authoredOn": "2023-01-01"}
    assert built(knowledge, taken)["statin"]["exposure"] == "past"


# -- CK persisting after the statin: bounded in time and by the cited band ---------------------------


def stopped_statement(end):
    return {
        "resourceType": "MedicationStatement",
        "id": "ms",
        "status": "stopped",
        "statusReason": [{"text": "nausea"}],
        "effectivePeriod": {"start": "2020-01-01", "end": end},
        "medicationCodeableConcept": {"text": "atorvastatin 20 mg"},
        "subject": {"reference": "Patient/p1"},
    }


def test_a_mildly_raised_ck_years_after_a_statin_gives_no_rechallenge_card(client):
    old = [stopped_statement("2021-05-01"), ck("c1", 250, "2021-04-20T08:00:00Z"), ck("c2", 250)]
    assert sign(client, [draft({"text": "atorvastatin 20 mg"})], old) == []


def test_a_mildly_raised_ck_weeks_after_a_statin_gives_no_rechallenge_card(client):
    recent = [stopped_statement("2024-03-01"), ck("c1", 300, "2024-02-25T08:00:00Z"), ck("c2", 250)]
    assert sign(client, [draft({"text": "atorvastatin 20 mg"})], recent) == []


def test_a_high_ck_weeks_after_a_statin_warns_before_a_rechallenge(client):
    recent = [stopped_statement("2024-03-01"), ck("c1", 4000, "2024-02-25T08:00:00Z"), ck("c2", 2400)]
    [card] = sign(client, [draft({"text": "atorvastatin 20 mg"})], recent)
    assert card["indicator"] == "warning" and "persisted" in card["detail"]


# -- toxicity cards never reassure when the myopathy is autoimmune -------------------------------------


@pytest.mark.parametrize(
    "cause",
    [antibody("h", "HMGCR antibody", valueString="Positive"), problem("c9", "Anti-HMGCR myopathy", "G72.49")],
)
def test_a_settled_ck_with_anti_hmgcr_is_not_called_toxicity(client, cause):
    resources = [
        stopped_statement("2024-05-20"),
        ck("c1", 12000, "2024-05-19T08:00:00Z"),
        ck("c2", 150, "2024-05-31T08:00:00Z"),
        cause,
    ]
    request = hook_request(resources=resources)
    body = client.post("/cds-services/imnm-patient-view", json=request).get_json()
    keys = {c["summary"] for c in body["cards"]}
    assert not any("settled" in s or "toxic pattern" in s for s in keys), keys
    [card] = [c for c in body["cards"] if c["summary"].startswith("Avoid statins")]
    assert "not simple statin toxicity" in card["summary"]


# -- medications that drive treatment state -------------------------------------------------------------


def course(concept, route=None, dosage_text=None):
    dosage = {**({"route": route} if route else {}), **({"text": dosage_text} if dosage_text else {})}
    return {
        "resourceType": "MedicationStatement",
        "id": "t1",
        "status": "active",
        "effectivePeriod": {"start": "2023-08-06"},  # 300 days before now
        "medicationCodeableConcept": concept,
        **({"dosage": [dosage]} if dosage else {}),
        "subject": {"reference": "Patient/p1"},
    }


OPHTHALMIC = {"coding": [{"system": SNOMED, "code": "54485002"}]}
ORAL = {"coding": [{"system": SNOMED, "code": "26643006"}]}


@pytest.mark.parametrize(
    "record",
    [
        course({"text": "prednisolone acetate 1% eye drops"}),
        course({"text": "Prednisolone 1% ophthalmic suspension"}),
        course({"coding": [{"system": RXNORM, "code": "8638"}]}, OPHTHALMIC),
        course({"text": "dexamethasone"}, {"text": "both eyes"}),
        course({"text": "hydrocortisone 1% cream"}),
        course({"text": "inhaled corticosteroid"}),
        course({"text": "dexamethasone"}, dosage_text="1 drop in each eye four times a day"),
        course({"text": "tacrolimus 0.1% ointment"}),
        course({"text": "Hepatitis B immune globulin (human)"}),
        course({"text": "Rho(D) immune globulin"}),
        course({"text": "anti-thymocyte globulin (rabbit)"}),
        course({"text": "Rabies immune globulin"}),
    ],
)
def test_local_steroids_and_hyperimmune_globulins_are_not_immunosuppression(knowledge, record):
    found = built(knowledge, record)["immunosuppression"]
    assert found["tried"] == "" and found["on"] is False


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        (course({"text": "prednisolone 5 mg tablets"}), "glucocorticoids"),
        (course({"coding": [{"system": RXNORM, "code": "8638"}]}, ORAL), "glucocorticoids"),
        (course({"coding": [{"system": RXNORM, "code": "1743726"}]}), "glucocorticoids"),
        (course({"text": "Solu-Medrol 1 g"}, {"text": "IV"}), "glucocorticoids"),
        (course({"text": "Immune globulin (human) 10% (Privigen)"}, {"text": "IV"}), "ivig"),
        (course({"coding": [{"system": RXNORM, "code": "68149"}]}), "mycophenolate"),
        (course({"coding": [{"system": RXNORM, "code": "200060"}]}), "mycophenolate"),
        (course({"coding": [{"system": RXNORM, "code": "105586"}]}), "methotrexate"),
        (course({"coding": [{"system": RXNORM, "code": "1657864"}]}), "rituximab"),
    ],
)
def test_systemic_products_count_by_their_ingredient(knowledge, record, kind):
    assert built(knowledge, record)["immunosuppression"]["tried"] == kind


def test_eye_drops_for_300_days_do_not_make_myositis_refractory(client):
    resources = [
        antibody("h", "HMGCR antibody", valueString="Positive"),
        problem("w", "proximal muscle weakness", "249939004", SNOMED),
        ck("c1", 6000, "2024-03-01T08:00:00Z"),
        ck("c2", 6200),
        course({"text": "prednisolone acetate 1% eye drops"}),
    ]
    body = client.post("/cds-services/imnm-patient-view", json=hook_request(resources=resources)).get_json()
    assert not [c for c in body["cards"] if c["source"]["topic"]["code"] == "treatment-escalation"]


# -- onset from the current episode ------------------------------------------------------------------


def test_an_old_raised_ck_before_a_normal_one_does_not_date_the_onset(knowledge, client):
    resources = [
        ck("c0", 640, "2018-03-01T08:00:00Z", high=None),  # after exercise, six years ago
        ck("c1", 150, "2022-03-01T08:00:00Z", high=None),
        ck("c2", 5200, "2024-04-20T08:00:00Z", high=None),
        ck("c3", 6100, high=None),
        antibody("h", "HMGCR antibody", valueString="Positive"),
        problem("w", "proximal muscle weakness", "249939004", SNOMED, onsetDateTime="2024-04-01"),
    ]
    onset = built(knowledge, *resources)["myositis-onset"]
    assert onset["onset_on"] == "2024-04-01" and onset["days_ago"] < 365
    body = client.post("/cds-services/imnm-patient-view", json=hook_request(resources=resources)).get_json()
    assert [c for c in body["cards"] if c["source"]["topic"]["code"] == "cancer-screening"]
