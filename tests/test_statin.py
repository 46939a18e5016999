"""Statin advice: exposure, CK kinetics computed by hand, the EAS bands, and re-challenge on order hooks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conftest import WEAKNESS, antibody, ck, condition, hook_request
from service import facts
from service.facts.kinetics import expected_value, observed_half_life
from service.facts.labs import CkResult
from service.fhir import Resource

NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)
ALL = frozenset({"Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement"})
SERVICE = "/cds-services/imnm-patient-view"


def at(days: float) -> datetime:
    return datetime(2024, 5, 1, tzinfo=UTC) + timedelta(days=days)


def result(days: float, value: float, uln: float = 200.0) -> CkResult:
    return CkResult(Resource({"resourceType": "Observation", "id": f"c{days}"}), at(days), value, uln, False)


def statement(
    status="completed", end: str | None = "2024-05-20", start="2023-01-01", text="atorvastatin 40 mg"
):
    period = {"start": start} | ({"end": end} if end else {})
    return {
        "resourceType": "MedicationStatement",
        "id": "ms",
        "status": status,
        "effectivePeriod": period,
        "medicationCodeableConcept": {"text": text},
        "subject": {"reference": "Patient/p1"},
    }


def kinetics(k, *resources, now=NOW):
    built = facts.build(k, [Resource(r) for r in resources], now=now, available=ALL)
    return next(f for f in built.facts if f["id"] == "ck-kinetics"), built


# -- the arithmetic, against hand-computed values ---------------------------------------------------


def test_expected_value_halves_every_half_life():
    peak = result(0, 8000)
    assert expected_value(peak, at(1.5), 1.5) == pytest.approx(4000)
    assert expected_value(peak, at(6), 1.5) == pytest.approx(500)


def test_observed_half_life_of_an_exact_exponential_series():
    series = [result(0, 8000), result(1.5, 4000), result(3, 2000), result(4.5, 1000)]
    assert observed_half_life(series) == pytest.approx(1.5)
    slow = [result(0, 6000), result(30, 3000), result(60, 1500)]
    assert observed_half_life(slow) == pytest.approx(30.0)


def test_observed_half_life_needs_three_falling_points():
    assert observed_half_life([result(0, 8000), result(3, 2000)]) is None
    assert observed_half_life([result(0, 1000), result(3, 2000), result(6, 4000)]) is None


def test_kinetics_of_a_series_around_the_last_dose(knowledge):
    # Last dose 2024-05-20; peak 12,000 U/L (ULN 200: 60x) on 05-19; 2,600 U/L on 05-23; both at 00:00.
    fact, _ = kinetics(
        knowledge,
        statement(),
        ck("a", 12000, "2024-05-19T00:00:00Z"),
        ck("b", 2600, "2024-05-23T00:00:00Z"),
        ck("old", 99999, "2024-01-01T00:00:00Z"),
    )
    assert fact["applicable"] and fact["stop_known"] and fact["stop_on"] == "2024-05-20"
    assert fact["peak_x_uln"] == 60.0  # the January result is outside the episode
    assert fact["days_since_stop"] == pytest.approx(12.5)
    assert fact["after_stop_count"] == 1 and fact["latest_days_after_stop"] == 3.0
    # expected after 4 days from 12,000 with a 1.5-day half-life: 12,000 x 0.5^(4/1.5) = 1,889.8
    assert fact["expected_ratio"] == pytest.approx(2600 / (12000 * 0.5 ** (4 / 1.5)), abs=0.01)
    assert fact["rising_after_stop"] is False
    # normal by 05-19 + 1.5 x log2(60) days (05-27), but not before 14 days after the last dose (06-03)
    assert fact["recheck_on"] == "2024-06-03"


def test_a_current_statin_has_no_kinetics(knowledge):
    fact, _ = kinetics(knowledge, statement(status="active", end=None), ck("a", 5000))
    assert fact == {"id": "ck-kinetics", "t": "ck-kinetics", "applicable": False}


def test_a_stop_inferred_from_the_supply_is_said_to_be_inferred(knowledge):
    request = {
        "resourceType": "MedicationRequest",
        "id": "mr",
        "status": "completed",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2024-03-01",
        "medicationCodeableConcept": {"text": "simvastatin 20 mg"},
        "dispenseRequest": {
            "expectedSupplyDuration": {
                "value": 30,
                "unit": "days",
                "code": "d",
                "system": "http://unitsofmeasure.org",
            },
            "numberOfRepeatsAllowed": 1,
        },
    }
    fact, built = kinetics(knowledge, request, ck("a", 4000, "2024-04-25T00:00:00Z"))
    statin = next(f for f in built.facts if f["id"] == "statin")
    assert statin["exposure"] == "past" and statin["stop_known"] is False
    assert fact["stop_on"] == "2024-04-30"  # 2024-03-01 + 30 days x 2 fills
    assert "inferred" in built.basis["ck-kinetics"].text


def test_an_active_statement_whose_end_has_passed_is_past(knowledge):
    _, built = kinetics(
        knowledge, statement(status="active", end="2024-05-01"), ck("a", 4000, "2024-05-02T00:00:00Z")
    )
    assert next(f for f in built.facts if f["id"] == "statin")["exposure"] == "past"


# -- the rules, through the service -----------------------------------------------------------------


def cards(client, *resources, as_of="2024-06-01T12:00:00Z"):
    request = hook_request(
        resources=resources, medicationStatements={"resourceType": "Bundle", "type": "searchset", "entry": []}
    )
    for resource in resources:
        if resource["resourceType"] == "MedicationStatement":
            request["prefetch"]["medicationStatements"]["entry"].append({"resource": resource})
    request["extension"]["imnm-cds.asOf"] = as_of
    response = client.post(SERVICE, json=request)
    assert response.status_code == 200, response.get_json()
    return {c["source"]["topic"]["code"]: c for c in response.get_json()["cards"]}


@pytest.mark.parametrize(
    ("days_after_stop", "topic"),
    [(13, "statin-toxic-myopathy"), (14, "statin-autoimmune-pattern")],
)
def test_the_persistence_window_separates_toxic_from_autoimmune(client, days_after_stop, topic):
    # CK flat at 10x ULN: too slow for toxicity, but only judged autoimmune once the window has passed.
    stop = datetime(2024, 5, 1, tzinfo=UTC)
    late = (stop + timedelta(days=days_after_stop)).isoformat()
    found = cards(
        client,
        statement(end="2024-05-01"),
        ck("a", 2000, "2024-04-30T00:00:00Z"),
        ck("b", 2000, late),
        as_of="2024-05-20T00:00:00Z",
    )
    assert topic in found
    if topic == "statin-toxic-myopathy":
        assert "too early to tell" in found[topic]["summary"]


def test_ck_back_to_normal_is_resolved_toxicity(client):
    found = cards(
        client,
        statement(end="2024-05-01"),
        ck("a", 3000, "2024-04-30T00:00:00Z"),
        ck("b", 150, "2024-05-09T00:00:00Z"),
    )
    assert (
        list(found) == ["statin-toxic-myopathy"]
        and "back to normal" in found["statin-toxic-myopathy"]["summary"]
    )


def test_weakness_starting_after_the_statin_stopped_is_an_autoimmune_pattern(client):
    found = cards(
        client,
        statement(end="2024-02-01"),
        ck("a", 900, "2024-01-31T00:00:00Z"),
        ck("b", 150, "2024-02-20T00:00:00Z"),
        condition("w", WEAKNESS, onsetDateTime="2024-04-01"),
    )
    assert "weakness began more than 2 weeks after stopping" in found["statin-autoimmune-pattern"]["detail"]


def test_an_old_stop_gets_no_kinetics_card(client):
    found = cards(client, statement(end="2022-01-01"), ck("a", 3000, "2021-12-31T00:00:00Z"))
    assert found == {}


@pytest.mark.parametrize(
    ("ck_value", "key", "indicator"),
    [
        (700, "statin-muscle-symptoms", "info"),
        (1000, "statin-muscle-symptoms", "warning"),
        (5000, "statin-muscle-symptoms", "warning"),
        (12000, "statin-muscle-symptoms", "critical"),
    ],
)
def test_eas_bands_set_the_indicator(client, ck_value, key, indicator):
    found = cards(client, statement(status="active", end=None), ck("a", ck_value, "2024-05-25T00:00:00Z"))
    assert found[key]["indicator"] == indicator


def test_the_band_edges_follow_the_cited_multiples(client):
    # ULN 200: 800 U/L is 4.0x (still the under-4x band), 801 U/L is over it.
    mild = cards(client, statement(status="active", end=None), ck("a", 800, "2024-05-25T00:00:00Z"))
    moderate = cards(client, statement(status="active", end=None), ck("a", 801, "2024-05-25T00:00:00Z"))
    assert "incidental" in mild["statin-muscle-symptoms"]["summary"]
    assert "4 to 10" in moderate["statin-muscle-symptoms"]["summary"]


def test_symptoms_without_a_recent_ck_ask_for_one(client):
    found = cards(
        client,
        statement(status="active", end=None),
        ck("a", 150, "2023-01-01T00:00:00Z"),
        condition("m", "68962001"),
    )
    card = found["statin-muscle-symptoms"]
    assert [s["label"] for s in card["suggestions"]] == ["Order CK (total creatine kinase)", "Order TSH"]


def tsh(id_, when=None):
    return {
        "resourceType": "Observation",
        "id": id_,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "3016-3"}]},
        "valueQuantity": {"value": 2.1, "unit": "mIU/L"},
        "referenceRange": [{"high": {"value": 4.5}}],
        **({"effectiveDateTime": when} if when else {}),
    }


def test_a_recent_tsh_is_not_asked_for_again_and_an_undated_one_is_not_called_missing(client):
    on_statin, ache, mild = statement(status="active", end=None), condition("m", "68962001"), ck("a", 500)
    recent = cards(client, on_statin, ache, mild, tsh("t", "2024-05-01"))["statin-muscle-symptoms"]
    assert [s["label"] for s in recent["suggestions"]] == ["Order CK (total creatine kinase)"]
    undated = cards(client, on_statin, ache, mild, tsh("t"))["statin-muscle-symptoms"]
    # When it was taken is unknown, so it may not be recent: a TSH is still offered, but not as missing.
    assert [s["label"] for s in undated["suggestions"]][-1] == "Order TSH"
    assert "TSH: not tested" not in undated["detail"]
    assert "- TSH: undated, not used" in undated["detail"]
    assert "Observation/t" in undated["extension"]["imnm-cds.evidence"]
    assert "- TSH result Observation/t has no date and was not used." in undated["detail"]


# -- order-select and order-sign -----------------------------------------------------------------------


def draft(id_="d1", text="atorvastatin 20 mg tablet", patient="p1"):
    return {
        "resourceType": "MedicationRequest",
        "id": id_,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {"text": text},
        "subject": {"reference": f"Patient/{patient}"},
    }


def order_request(hook, drafts, resources=(), selections=None):
    request = hook_request(resources=resources)
    request["hook"] = hook
    request["context"]["draftOrders"] = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": d} for d in drafts],
    }
    if selections is not None:
        request["context"]["selections"] = selections
    return request


HMGCR = antibody("h", "HMGCR antibody", valueString="Positive")


def test_discovery_lists_the_order_services(client):
    services = {s["hook"]: s for s in client.get("/cds-services").get_json()["services"]}
    assert {"patient-view", "order-select", "order-sign"} <= set(services)
    assert services["order-sign"]["id"] == "imnm-statin-order-sign"


def test_order_sign_warns_and_offers_to_delete_the_statin(client):
    body = client.post(
        "/cds-services/imnm-statin-order-sign",
        json=order_request("order-sign", [draft(), draft("d2", "metformin")], [HMGCR]),
    ).get_json()
    [card] = body["cards"]
    assert card["indicator"] == "critical" and card["source"]["topic"]["code"] == "statin-rechallenge-risk"
    [action] = card["suggestions"][0]["actions"]
    assert action == {
        "type": "delete",
        "description": "Remove the statin order (MedicationRequest/d1)",
        "resourceId": "MedicationRequest/d1",
    }
    assert all(reason["display"] for reason in card["overrideReasons"])


def test_order_select_looks_only_at_the_selected_orders(client):
    drafts = [draft(), draft("d2", "metformin")]
    picked_other = order_request("order-select", drafts, [HMGCR], selections=["MedicationRequest/d2"])
    picked_statin = order_request("order-select", drafts, [HMGCR], selections=["MedicationRequest/d1"])
    url = "/cds-services/imnm-statin-order-select"
    assert client.post(url, json=picked_other).get_json() == {"cards": []}
    assert len(client.post(url, json=picked_statin).get_json()["cards"]) == 1


def by_reference(id_="d1", medication="Medication/m1"):
    order = draft(id_)
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": medication}
    return order


def test_a_draft_naming_a_medication_sent_with_the_drafts_is_recognised(client):
    atorvastatin = {"resourceType": "Medication", "id": "m1", "code": {"text": "atorvastatin 40 mg tablet"}}
    request = order_request("order-sign", [by_reference(), atorvastatin], [HMGCR])
    [card] = client.post("/cds-services/imnm-statin-order-sign", json=request).get_json()["cards"]
    assert card["indicator"] == "critical"
    assert card["suggestions"][0]["actions"][0]["resourceId"] == "MedicationRequest/d1"


def test_a_draft_whose_drug_cannot_be_told_is_flagged_for_a_patient_at_risk(client):
    url = "/cds-services/imnm-statin-order-sign"
    at_risk = order_request(
        "order-sign", [by_reference("d1", "Medication/absent"), draft("d2", "metformin")], [HMGCR]
    )
    [card] = client.post(url, json=at_risk).get_json()["cards"]
    assert card["indicator"] == "warning" and card["source"]["topic"]["code"] == "statin-rechallenge-risk"
    assert "check it is not a statin" in card["summary"] and "suggestions" not in card
    assert "1 of the medication orders being placed name no drug" in card["detail"]
    evidence = card["extension"]["imnm-cds.evidence"]
    assert "MedicationRequest/d1" in evidence and "MedicationRequest/d2" not in evidence
    not_at_risk = order_request("order-sign", [by_reference("d1", "Medication/absent")])
    assert client.post(url, json=not_at_risk).get_json() == {"cards": []}
    with_a_statin = order_request(
        "order-sign", [by_reference("d1", "Medication/absent"), draft("d3")], [HMGCR]
    )
    [card] = client.post(url, json=with_a_statin).get_json()["cards"]
    assert card["indicator"] == "critical"
    assert [a["resourceId"] for a in card["suggestions"][0]["actions"]] == ["MedicationRequest/d3"]


def test_order_hooks_answer_only_with_the_rechallenge_card(client):
    # Weakness, raised CK and an untested panel give patient-view cards, but not on order-sign.
    resources = [ck("a", 3000), condition("w", WEAKNESS)]
    body = client.post(
        "/cds-services/imnm-statin-order-sign", json=order_request("order-sign", [draft()], resources)
    )
    assert body.get_json() == {"cards": []}


@pytest.mark.parametrize(
    ("mutate", "expression"),
    [
        (lambda r: r["context"].pop("draftOrders"), "context.draftOrders"),
        (lambda r: r["context"].update(draftOrders=[]), "context.draftOrders"),
        (lambda r: r["context"].update(selections="MedicationRequest/d1"), "context.selections"),
    ],
)
def test_bad_order_context_gets_400(client, mutate, expression):
    request = order_request("order-select", [draft()], selections=["MedicationRequest/d1"])
    mutate(request)
    response = client.post("/cds-services/imnm-statin-order-select", json=request)
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == [expression]


def test_a_draft_for_another_patient_is_refused(client):
    request = order_request("order-sign", [draft(patient="someone-else")])
    response = client.post("/cds-services/imnm-statin-order-sign", json=request)
    assert response.status_code == 400


def test_evaluate_a_bundle_as_order_sign(client):
    patient = {"resourceType": "Patient", "id": "p1"}
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (patient, HMGCR, draft())],
    }
    as_order = client.post("/evaluate?hook=order-sign&asOf=2024-06-01", json=bundle).get_json()
    as_view = client.post("/evaluate?asOf=2024-06-01", json=bundle).get_json()
    assert [c["source"]["topic"]["code"] for c in as_order["cards"]] == ["statin-rechallenge-risk"]
    assert all(c["source"]["topic"]["code"] != "statin-rechallenge-risk" for c in as_view["cards"])


def test_a_seropositive_imnm_card_stands_for_the_autoimmune_pattern_card(client):
    # CK flat at 10x ULN weeks after stopping, weakness and anti-HMGCR: one IMNM card, with the kinetics.
    found = cards(
        client,
        statement(end="2024-05-01"),
        ck("a", 2000, "2024-04-30T00:00:00Z"),
        ck("b", 2000, "2024-05-18T00:00:00Z"),
        condition("w", WEAKNESS, onsetDateTime="2024-04-01"),
        HMGCR,
        as_of="2024-05-20T00:00:00Z",
    )
    assert "statin-autoimmune-pattern" not in found
    card = found["imnm-suspected"]
    assert any(r.startswith("statin.") for r in card["extension"]["imnm-cds.rules"])
    assert "Observation/b" in card["extension"]["imnm-cds.evidence"]
