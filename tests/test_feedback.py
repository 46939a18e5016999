"""The feedback endpoint: CDS Hooks 2.0 items checked one by one, stored once, summarised per rule."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine
from test_app import assert_outcome

from conftest import FIXTURES, load
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"
FEEDBACK = f"{SERVICE}/feedback"
WHEN = "2024-06-01T12:00:00Z"


@pytest.fixture(scope="module")
def card(app) -> dict:
    """A card the service issued, with a suggestion and override reasons."""
    request = load(FIXTURES / "worked-example-hmgcr-positive" / "request.json")
    return app.test_client().post(SERVICE, json=request).get_json()["cards"][0]


def accepted(card: dict, when: str = WHEN) -> dict:
    return {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": when,
    }


def overridden(card: dict, when: str = WHEN, reason: int | None = 0, comment: str | None = None) -> dict:
    override = {}
    if reason is not None:
        override["reason"] = card["overrideReasons"][reason]
    if comment is not None:
        override["userComment"] = comment
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": when}
    return item | ({"overrideReason": override} if override else {})


def post(client, *items) -> dict:
    response = client.post(FEEDBACK, json={"feedback": list(items)})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_feedback_is_stored_and_counted(client, card):
    first = accepted(card, "2024-06-02T08:00:00Z")
    second = overridden(card, "2024-06-02T08:05:00Z", comment="seen by neurology already")
    assert post(client, first, second) == {"received": 2, "stored": 2, "duplicates": 0}


def test_the_same_item_sent_again_is_stored_once(client, card):
    item = accepted(card, "2024-06-03T08:00:00Z")
    assert post(client, item, item) == {"received": 2, "stored": 1, "duplicates": 1}
    same_moment = item | {"outcomeTimestamp": "2024-06-03T10:00:00+02:00", "card": f"urn:uuid:{card['uuid']}"}
    assert post(client, same_moment) == {"received": 1, "stored": 0, "duplicates": 1}


def test_a_card_issued_again_takes_feedback_again(client, card):
    # The card's uuid comes from the patient's data: each later action on it is new feedback.
    later = [overridden(card, f"2024-06-04T0{hour}:00:00Z") for hour in range(3)]
    assert post(client, *later)["stored"] == 3


def test_no_feedback_is_an_empty_answer(client):
    assert post(client) == {"received": 0, "stored": 0, "duplicates": 0}


def drop(name):
    return lambda item: {key: value for key, value in item.items() if key != name}


def put(name, value):
    return lambda item: item | {name: value}


BAD_ITEMS = {
    "not-an-object": (lambda item: "accepted", "feedback[1]"),
    "no-card": (drop("card"), "feedback[1].card"),
    "card-not-uuid": (put("card", "card-1"), "feedback[1].card"),
    "card-number": (put("card", 7), "feedback[1].card"),
    "no-outcome": (drop("outcome"), "feedback[1].outcome"),
    "outcome-ignored": (put("outcome", "ignored"), "feedback[1].outcome"),
    "no-timestamp": (drop("outcomeTimestamp"), "feedback[1].outcomeTimestamp"),
    "timestamp-without-offset": (
        put("outcomeTimestamp", "2024-06-01T12:00:00"),
        "feedback[1].outcomeTimestamp",
    ),
    "timestamp-date-only": (put("outcomeTimestamp", "2024-06-01"), "feedback[1].outcomeTimestamp"),
    "timestamp-impossible": (put("outcomeTimestamp", "2024-02-30T12:00:00Z"), "feedback[1].outcomeTimestamp"),
    "timestamp-number": (put("outcomeTimestamp", 1717243200), "feedback[1].outcomeTimestamp"),
    "timestamp-before-year-1-in-utc": (
        put("outcomeTimestamp", "0001-01-01T00:00:00+01:00"),
        "feedback[1].outcomeTimestamp",
    ),
    "timestamp-after-year-9999-in-utc": (
        put("outcomeTimestamp", "9999-12-31T23:00:00-05:00"),
        "feedback[1].outcomeTimestamp",
    ),
    "accepted-without-suggestions": (drop("acceptedSuggestions"), "feedback[1].acceptedSuggestions"),
    "accepted-empty-suggestions": (put("acceptedSuggestions", []), "feedback[1].acceptedSuggestions"),
    "suggestion-not-object": (put("acceptedSuggestions", ["x"]), "feedback[1].acceptedSuggestions[0]"),
    "suggestion-without-id": (put("acceptedSuggestions", [{}]), "feedback[1].acceptedSuggestions[0].id"),
    "suggestion-id-not-uuid": (
        put("acceptedSuggestions", [{"id": "order-1"}]),
        "feedback[1].acceptedSuggestions[0].id",
    ),
    "accepted-with-override": (put("overrideReason", {"userComment": "no"}), "feedback[1].overrideReason"),
}
BAD_OVERRIDES = {
    "override-with-suggestions": (
        put("acceptedSuggestions", [{"id": "c3db09ee-2925-534f-8ae3-99401fb2c3c8"}]),
        "feedback[1].acceptedSuggestions",
    ),
    "override-empty": (put("overrideReason", {}), "feedback[1].overrideReason"),
    "override-not-object": (put("overrideReason", "not relevant"), "feedback[1].overrideReason"),
    "reason-not-coding": (put("overrideReason", {"reason": "x"}), "feedback[1].overrideReason.reason"),
    "reason-without-code": (
        put("overrideReason", {"reason": {"system": "urn:x"}}),
        "feedback[1].overrideReason.reason.code",
    ),
    "reason-without-system": (
        put("overrideReason", {"reason": {"code": "x"}}),
        "feedback[1].overrideReason.reason.system",
    ),
    "reason-empty-display": (
        put("overrideReason", {"reason": {"system": "urn:x", "code": "x", "display": ""}}),
        "feedback[1].overrideReason.reason.display",
    ),
    "comment-empty": (put("overrideReason", {"userComment": " "}), "feedback[1].overrideReason.userComment"),
}


@pytest.mark.parametrize(
    ("outcome", "mutate", "expression"),
    [("accepted", *case) for case in BAD_ITEMS.values()]
    + [("overridden", *c) for c in BAD_OVERRIDES.values()],
    ids=[*BAD_ITEMS, *BAD_OVERRIDES],
)
def test_a_bad_item_gets_400_naming_it_and_nothing_is_stored(client, card, outcome, mutate, expression):
    good = accepted(card) | {"card": str(uuid.uuid4())}
    bad = mutate(accepted(card) if outcome == "accepted" else overridden(card))
    assert_outcome(client.post(FEEDBACK, json={"feedback": [good, bad]}), 400, expression)
    assert post(client, good)["stored"] == 1  # nothing of the refused request was kept


@pytest.mark.parametrize(
    "body",
    [[], {"feedback": {"card": "x"}}, {"items": []}, {"feedback": None}],
    ids=["array", "feedback-object", "no-feedback", "feedback-null"],
)
def test_a_body_without_a_feedback_array_gets_400(client, body):
    response = client.post(FEEDBACK, json=body)
    assert_outcome(response, 400, None if isinstance(body, list) else "feedback")


def test_every_bad_item_is_named(client, card):
    items = [accepted(card) | {"outcome": "maybe"}, accepted(card), overridden(card) | {"card": "x"}]
    body = assert_outcome(client.post(FEEDBACK, json={"feedback": items}), 400)
    named = [e for issue in body["issue"] for e in issue["expression"]]
    assert named == ["feedback[0].outcome", "feedback[2].card"]


def test_unknown_service_wrong_type_and_method(client, card):
    assert_outcome(client.post("/cds-services/other/feedback", json={"feedback": [accepted(card)]}), 404)
    assert_outcome(client.post(FEEDBACK, data="{}", content_type="text/plain"), 415)
    assert_outcome(client.get(FEEDBACK), 405)
    assert_outcome(client.post(FEEDBACK, data=b"{oops", content_type="application/json"), 400)


def test_an_unreachable_database_gets_503_and_the_hook_still_answers(
    app, client, card, tmp_path, caplog, monkeypatch
):
    store = app.extensions["imnm_cds_feedback"]
    assert store.flush()
    monkeypatch.setattr(store, "engine", create_engine(f"sqlite:///{tmp_path / 'gone' / 'feedback.sqlite'}"))
    body = assert_outcome(client.post(FEEDBACK, json={"feedback": [accepted(card)]}), 503)
    assert body["issue"][0]["code"] == "transient"
    request = load(FIXTURES / "worked-example-hmgcr-positive" / "request.json")
    answer = client.post(SERVICE, json=request)
    assert answer.status_code == 200
    assert_outcome(client.get("/feedback/summary"), 503)
    assert store.flush()  # the writer reports the cards it could not record, and keeps going
    lost = [r.fields["cards"] for r in caplog.records if r.getMessage() == "card records lost"]
    assert lost == [len(answer.get_json()["cards"])]


def test_summary_counts_issued_cards_and_what_users_did(tmp_path):
    app = create_app({"database_url": f"sqlite:///{tmp_path / 'feedback.sqlite'}"})
    client = app.test_client()
    request = load(FIXTURES / "worked-example-hmgcr-positive" / "request.json")
    for _ in range(3):
        issued = client.post(SERVICE, json=request).get_json()["cards"][0]
    # The same patient as a Bundle: another card (its evidence references differ) from the same rules.
    bundle = load(FIXTURES / "bundle-worked-example" / "request.json")
    assert client.post("/evaluate", json=bundle).get_json()["cards"][0]["uuid"] != issued["uuid"]
    post(
        client,
        accepted(issued, "2024-06-01T12:00:00Z"),
        overridden(issued, "2024-06-01T12:01:00Z", reason=1),
        overridden(issued, "2024-06-01T12:02:00Z", reason=1),
        overridden(issued, "2024-06-01T12:03:00Z", reason=None, comment="free text only"),
        overridden(
            {"uuid": "7b0c3b4e-7f51-4d2c-9d7a-3f1e2b6a9c01"}, "2024-06-01T12:04:00Z", reason=None, comment="?"
        ),
    )
    assert app.extensions["imnm_cds_feedback"].flush()
    summary = client.get("/feedback/summary").get_json()
    rows = {(row["rule"], row["topic"]): row for row in summary["rules"]}
    row = rows["imnm.seropositive_hmgcr", "imnm-suspected"]
    reason = issued["overrideReasons"][1]
    assert row == {
        "knowledge": app.extensions["imnm_cds"].knowledge_version,
        "rule": "imnm.seropositive_hmgcr",
        "topic": "imnm-suspected",
        "issued": 4,
        "cards": 2,
        "accepted": 1,
        "overridden": 3,
        "topOverrideReasons": [reason | {"count": 2}],
    }
    assert set(issued["extension"]["imnm-cds.rules"]) <= {rule for rule, _ in rows}
    assert summary["unmatchedFeedback"] == {"accepted": 0, "overridden": 1}
