"""The CDS Hooks sandbox's request shapes: its statin orders get their card, and the one rule for
invalid input holds for drafts and prefetch alike."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from conftest import FIXTURES, load

SIGN = "/cds-services/imnm-statin-order-sign"
SELECT = "/cds-services/imnm-statin-order-select"
VIEW = "/cds-services/imnm-patient-view"
RX_SIGN = load(FIXTURES / "sandbox-order-sign-statin-after-hmgcr" / "request.json")
RX_VIEW_OPENING = load(FIXTURES / "sandbox-order-select-opening" / "request.json")
PATIENT_VIEW = load(FIXTURES / "sandbox-patient-view" / "request.json")
DRAFT = "context.draftOrders.entry[0].resource"


class Records(logging.Handler):
    """Keep what the pipeline logs (create_app replaces the root handlers, and caplog's with them)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("service.evaluate.pipeline").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("service.evaluate.pipeline").removeHandler(self)

    def ignored(self) -> list[list[str]]:
        return [r.fields["elements"] for r in self.records if r.getMessage() == "unread elements ignored"]


def draft(request: dict) -> dict:
    return request["context"]["draftOrders"]["entry"][0]["resource"]


def summaries(response) -> list[tuple[str, str]]:
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return [(c["indicator"], c["source"]["topic"]["code"]) for c in response.get_json()["cards"]]


def test_rx_sign_gets_the_critical_card_and_the_log_names_what_was_ignored(client):
    with Records() as logged:
        response = client.post(SIGN, json=RX_SIGN)
    assert summaries(response) == [("critical", "statin-rechallenge-risk")]
    assert logged.ignored() == [
        [
            "context.draftOrders.type: Bundle.type is required but missing or not an R4 bundle type",
            f"{DRAFT}.category: Input should be a valid list",
        ]
    ]
    assert "community" not in json.dumps(logged.ignored())  # the path, never the value


def test_rx_view_opening_gets_no_warning(client):
    with Records() as logged:
        response = client.post(SELECT, json=RX_VIEW_OPENING)
    assert [indicator for indicator, _ in summaries(response)] in ([], ["info"])
    assert f"{DRAFT}.intent: required by R4 but missing" in logged.ignored()[0]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("status"),
        lambda d: d.pop("intent"),
        lambda d: d.update(status={"code": "draft"}, intent=["order"]),
        lambda d: d.update(subject="Patient/sandbox-hmgcr"),
        lambda d: d.update(authoredOn="today", dosageInstruction={"text": 1}),
    ],
    ids=["no-status", "no-intent", "unreadable-status-and-intent", "subject-a-string", "malformed-unread"],
)
def test_a_draft_whose_drug_can_be_read_is_a_statin_being_ordered_whatever_else(client, change):
    request = copy.deepcopy(RX_SIGN)
    change(draft(request))
    assert summaries(client.post(SIGN, json=request)) == [("critical", "statin-rechallenge-risk")]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(medicationCodeableConcept={"text": 40}),
        lambda d: d.update(medicationCodeableConcept=[{"text": "atorvastatin 40 MG Oral Tablet"}]),
        lambda d: d.update(medicationReference={"reference": "#med"}),  # two choices of medication[x]
    ],
    ids=["text-a-number", "concept-a-list", "two-choices"],
)
def test_a_draft_whose_drug_cannot_be_read_warns_a_patient_at_risk_never_a_400(client, change):
    request = copy.deepcopy(RX_SIGN)
    change(draft(request))
    assert summaries(client.post(SIGN, json=request)) == [("warning", "statin-rechallenge-risk")]


def test_a_draft_without_a_drug_on_order_sign_gets_no_warning_either(client):
    request = copy.deepcopy(RX_SIGN)
    del draft(request)["medicationCodeableConcept"]
    assert summaries(client.post(SIGN, json=request)) == []


def invalid_ck(request: dict) -> dict:
    request = copy.deepcopy(request)
    request["prefetch"]["labs"]["entry"][1]["resource"]["effectiveDateTime"] = "20 Oct 2026"
    return request


def test_an_invalid_prefetch_resource_is_left_out_and_named_when_a_statin_is_ordered(client):
    response = client.post(SIGN, json=invalid_ck(RX_SIGN))
    assert summaries(response) == [("critical", "statin-rechallenge-risk")]
    detail = response.get_json()["cards"][0]["detail"]
    assert (
        "Observation/sbx-ck (prefetch.labs.entry[1].resource) could not be read "
        "(not valid FHIR R4 at effectiveDateTime) and was left out." in detail
    )
    assert "20 Oct" not in detail and "Observation/sbx-ck)" not in detail.split("Data not used")[0]


@pytest.mark.parametrize(
    ("path", "request_"),
    [(VIEW, PATIENT_VIEW), (SELECT, RX_VIEW_OPENING)],
    ids=["patient-view", "order-select-without-a-drug"],
)
def test_an_invalid_prefetch_resource_is_a_400_naming_it_otherwise(client, path, request_):
    response = client.post(path, json=invalid_ck(request_))
    assert response.status_code == 400
    issues = response.get_json()["issue"]
    assert [i["expression"] for i in issues] == [["prefetch.labs.entry[1].resource.effectiveDateTime"]]
    assert "20 Oct" not in response.get_data(as_text=True)


def test_an_unread_element_malformed_in_prefetch_is_ignored_on_patient_view(client):
    request = copy.deepcopy(PATIENT_VIEW)
    request["prefetch"]["labs"]["entry"][1]["resource"]["category"] = {"text": "laboratory"}
    request["prefetch"]["conditions"]["entry"][0]["resource"]["note"] = "seen in clinic"
    with Records() as logged:
        response = client.post(VIEW, json=request)
    assert response.get_json() == load(FIXTURES / "sandbox-patient-view" / "expected.json")
    assert [e.split(":")[0] for e in logged.ignored()[0]] == [
        "prefetch.labs.entry[1].resource.category",
        "prefetch.conditions.entry[0].resource.note",
    ]
