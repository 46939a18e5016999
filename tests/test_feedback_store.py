"""The feedback database on SQLite and PostgreSQL: one transaction, stored once, migrated, never lost."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import inspect, select, text

from conftest import free_port, serve
from service.store import feedback as feedback_store
from service.store.feedback import FeedbackStore, IssuedCard, StoreError, StoreUnavailable
from service.store.feedback_request import Coding, Feedback

SERVICE = "imnm-patient-view"
T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)


@pytest.fixture
def store(database_url):
    opened = FeedbackStore(database_url)
    yield opened
    opened.close()


def item(card: str | None = None, minute: int = 0, code: str | None = "not-relevant", **changes) -> Feedback:
    reason = Coding("urn:imnm-cds:CodeSystem:override-reason", code, code.replace("-", " ")) if code else None
    values = {
        "card": card or str(uuid.uuid4()),
        "outcome": "overridden",
        "outcome_at": T0 + timedelta(minutes=minute),
        "reason": reason,
    }
    return Feedback(**(values | changes))


def issued(
    card: str, rules=("r.finding", "r.conclusion"), topic: str = "imnm-suspected", at=T0
) -> IssuedCard:
    return IssuedCard(SERVICE, card, topic, "warning", tuple(rules), at)


def card_dict(card: IssuedCard) -> dict:
    """The parts of a card the store reads."""
    return {
        "uuid": card.uuid,
        "indicator": card.indicator,
        "source": {"topic": {"code": card.topic}},
        "extension": {"imnm-cds.rules": list(card.rules)},
    }


def row(summary: dict, rule: str, topic: str = "imnm-suspected") -> dict:
    return next(r for r in summary["rules"] if (r["rule"], r["topic"]) == (rule, topic))


def test_a_request_is_stored_in_one_transaction(store):
    good = item()
    broken = item(outcome=None)  # the database refuses it (outcome is NOT NULL)
    with pytest.raises(StoreUnavailable):
        store.save(SERVICE, [good, broken], T0)
    assert store.save(SERVICE, [good], T0) == 1


def test_feedback_is_stored_once_per_card_outcome_and_moment(store):
    card = str(uuid.uuid4())
    first = [item(card, 0), item(card, 1), item(card, 1, outcome="accepted", reason=None)]
    assert store.save(SERVICE, first, T0) == 3
    assert store.save(SERVICE, [item(card, 1), item(card, 0, code="already-addressed")], T0) == 0
    assert store.save(SERVICE, [item(card, 2), item(card, 2)], T0) == 1
    with store.engine.connect() as connection:
        stored = connection.scalar(select(feedback_store.feedback.c.reason_code).limit(1))
    assert stored == "not-relevant"  # the first word stands; a resent item changes nothing


def test_issued_cards_count_each_issue_of_the_same_uuid(store):
    store.write_cards([issued("a", at=T0), issued("a", at=T0 + timedelta(hours=1)), issued("b")])
    store.write_cards([issued("a", at=T0 - timedelta(hours=1))])
    summary = store.summary()
    for rule in ("r.finding", "r.conclusion"):
        assert (row(summary, rule)["issued"], row(summary, rule)["cards"]) == (4, 2)
    cards = feedback_store.issued_cards
    with store.engine.connect() as connection:
        first, last = connection.execute(
            select(cards.c.first_issued, cards.c.last_issued).where(cards.c.uuid == "a")
        ).one()
    assert (first, last) == (datetime(2024, 6, 1, 11), datetime(2024, 6, 1, 13))  # UTC, kept without zone


def test_summary_joins_feedback_to_rules_and_ranks_override_reasons(store):
    store.write_cards([issued("a"), issued("b", rules=("r.other",), topic="cancer-screening")])
    reasons = ["not-relevant"] * 3 + ["already-addressed"] * 2 + ["data-incorrect", "patient-declined"]
    items = [item("a", i, code) for i, code in enumerate(reasons)]
    items += [item("a", 50, None, comment="only words"), item("a", 51, outcome="accepted", reason=None)]
    items += [item("b", 60, outcome="accepted", reason=None), item("unknown", 70)]
    store.save(SERVICE, items, T0)
    summary = store.summary(top=3)
    conclusion = row(summary, "r.conclusion")
    assert (conclusion["issued"], conclusion["accepted"], conclusion["overridden"]) == (1, 1, 8)
    assert [(r["code"], r["count"]) for r in conclusion["topOverrideReasons"]] == [
        ("not-relevant", 3),
        ("already-addressed", 2),
        ("data-incorrect", 1),
    ]
    assert conclusion["topOverrideReasons"][0]["display"] == "not relevant"
    other = row(summary, "r.other", "cancer-screening")
    assert (other["accepted"], other["overridden"], other["topOverrideReasons"]) == (1, 0, [])
    assert summary["unmatchedFeedback"] == {"accepted": 0, "overridden": 1}


def test_cards_are_recorded_in_the_background(store):
    for hour in range(3):
        store.record_cards(
            SERVICE, [card_dict(issued("a")), card_dict(issued("b"))], T0 + timedelta(hours=hour)
        )
    assert store.flush()
    assert row(store.summary(), "r.conclusion")["issued"] == 6


def test_the_hook_path_never_waits_for_the_database(tmp_path, caplog):
    """While another process holds SQLite's write lock, records queue up, then the surplus is dropped."""
    path = tmp_path / "feedback.sqlite"
    store = FeedbackStore(f"sqlite:///{path}", queue_capacity=2)
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    for _ in range(6):
        store.record_cards(SERVICE, [card_dict(issued("a"))], T0)
    lock.execute("ROLLBACK")
    lock.close()
    assert store.flush()
    dropped = sum(
        r.fields["cards"] for r in caplog.records if r.getMessage().startswith("card records dropped")
    )
    assert dropped >= 1
    assert row(store.summary(), "r.conclusion")["issued"] == 6 - dropped
    store.close()


def test_sqlite_commits_are_durable(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.sqlite'}")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()


def versions(url: str) -> list[int]:
    store = FeedbackStore(url)
    with store.engine.connect() as connection:
        found = connection.scalars(select(feedback_store.schema_version.c.version)).all()
    store.close()
    return sorted(found)


def test_every_schema_version_after_the_first_has_a_migration():
    assert set(feedback_store.MIGRATIONS) == set(range(2, feedback_store.SCHEMA_VERSION + 1))


def test_the_schema_is_created_once_even_when_workers_start_together(database_url):
    stores, errors = [], []

    def start():
        try:
            stores.append(FeedbackStore(database_url))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(stores) == 4
    for opened in stores:
        opened.close()
    assert versions(database_url) == [feedback_store.SCHEMA_VERSION]


def test_an_older_database_is_migrated_at_start(database_url, monkeypatch):
    store = FeedbackStore(database_url)
    store.save(SERVICE, [item("a")], T0)
    store.close()
    current = feedback_store.SCHEMA_VERSION

    def index_outcomes(connection):
        connection.execute(text("CREATE INDEX feedback_outcome ON feedback (outcome)"))

    monkeypatch.setattr(feedback_store, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(feedback_store.MIGRATIONS, current + 1, index_outcomes)
    assert versions(database_url) == [current, current + 1]
    store = FeedbackStore(database_url)
    with store.engine.connect() as connection:
        assert "feedback_outcome" in {i["name"] for i in inspect(connection).get_indexes("feedback")}
        assert connection.scalar(text("SELECT count(*) FROM feedback")) == 1
    store.close()


def test_a_version_1_database_gains_the_knowledge_column_and_keeps_its_cards_apart(database_url):
    store = FeedbackStore(database_url)
    store.write_cards([issued("old")])
    with store.engine.begin() as connection:  # back to schema version 1, as an older release left it
        connection.execute(text("ALTER TABLE issued_cards DROP COLUMN knowledge"))
        connection.execute(text("DROP TABLE seen_tokens"))
        connection.execute(text("UPDATE schema_version SET version = 1"))
    store.close()
    store = FeedbackStore(database_url)
    store.write_cards([replace(issued("new"), knowledge="0.2.0+0123456789ab")])
    store.save(SERVICE, [item("old"), item("new")], T0)
    summary = store.summary()
    store.close()
    assert versions(database_url) == [1, 2, 3]
    rows = {r["knowledge"]: r for r in summary["rules"] if r["rule"] == "r.conclusion"}
    assert rows.keys() == {"", "0.2.0+0123456789ab"}  # "": issued before the version was recorded
    assert [(r["issued"], r["overridden"]) for r in rows.values()] == [(1, 1), (1, 1)]


def test_a_card_is_recorded_under_the_knowledge_that_issued_it_last(store):
    first, second = "0.1.0+aaaaaaaaaaaa", "0.1.0+bbbbbbbbbbbb"
    store.write_cards([replace(issued("c", at=T0), knowledge=first)])
    store.write_cards([replace(issued("c", at=T0 + timedelta(hours=1)), knowledge=second)])
    store.write_cards([replace(issued("c", at=T0 + timedelta(minutes=1)), knowledge=first)])  # written late
    rows = [r for r in store.summary()["rules"] if r["rule"] == "r.conclusion"]
    assert [(r["knowledge"], r["issued"]) for r in rows] == [(second, 3)]


def test_a_database_newer_than_the_service_refuses_to_start(database_url, monkeypatch):
    FeedbackStore(database_url).close()
    monkeypatch.setattr(feedback_store, "SCHEMA_VERSION", feedback_store.SCHEMA_VERSION - 1)
    with pytest.raises(StoreError, match="newer than this service"):
        FeedbackStore(database_url)


def test_nothing_acknowledged_is_lost_when_the_server_is_killed(database_url, tmp_path):
    """Clients post feedback while the whole gunicorn process group is killed; every 2xx item survives."""
    log = tmp_path / "server.log"
    process, url = serve(log, IMNM_CDS_DATABASE_URL=database_url)
    acknowledged, refused, lock = [], [], threading.Lock()
    enough = threading.Event()

    def client(number: int):
        with requests.Session() as http:
            for n in range(100_000):
                batch = [
                    {
                        "card": str(uuid.uuid4()),
                        "outcome": "overridden",
                        "overrideReason": {"userComment": f"client {number}, post {n}"},
                        "outcomeTimestamp": (T0 + timedelta(seconds=n)).isoformat(),
                    }
                    for _ in range(1 + n % 3)
                ]
                try:
                    response = http.post(
                        f"{url}/cds-services/{SERVICE}/feedback", json={"feedback": batch}, timeout=10
                    )
                except requests.RequestException:  # the server is gone: this item was never acknowledged
                    return
                with lock:
                    (acknowledged if response.ok else refused).append(batch)
                    if len(acknowledged) >= 300:
                        enough.set()

    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in clients:
        thread.start()
    assert enough.wait(120), log.read_text()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    for thread in clients:
        thread.join(30)
    assert not any(thread.is_alive() for thread in clients)
    assert refused == []

    items = [entry for batch in acknowledged for entry in batch]
    process, url = serve(log, IMNM_CDS_DATABASE_URL=database_url)
    try:
        store = FeedbackStore(database_url)
        with store.engine.connect() as connection:
            stored = set(connection.scalars(select(feedback_store.feedback.c.card_uuid)))
        store.close()
        assert {entry["card"] for entry in items} <= stored
        again = requests.post(f"{url}/cds-services/{SERVICE}/feedback", json={"feedback": items}, timeout=60)
        assert again.json() == {"received": len(items), "stored": 0, "duplicates": len(items)}
    finally:
        process.terminate()
        process.wait(30)


def test_a_database_that_cannot_be_opened_is_named_with_the_os_error(tmp_path):
    missing = tmp_path / "no-such-folder" / "feedback.sqlite"
    with pytest.raises(StoreError) as refused:
        FeedbackStore(f"sqlite:///{missing}")
    assert (
        str(refused.value)
        == f"cannot open the feedback database sqlite:///{missing}: No such file or directory"
    )


def test_a_folder_in_place_of_the_database_is_named_with_the_os_error(tmp_path):
    with pytest.raises(StoreError, match=f"sqlite:///{tmp_path}: Is a directory$"):
        FeedbackStore(f"sqlite:///{tmp_path}")


def test_opening_a_store_keeps_the_locks_of_the_apps_already_using_its_file(tmp_path):
    """Apps opened one after another on one file, while another process comes and goes, all write."""
    path = tmp_path / "feedback.sqlite"
    url = f"sqlite:///{path}"
    FeedbackStore(url)
    running = sqlite3.connect(path, isolation_level=None)  # an app of this process, mid-service
    running.execute("CREATE TABLE scratch (x)")
    running.execute("INSERT INTO scratch VALUES (1)")
    FeedbackStore(url)
    other = (
        f"import sqlite3; db = sqlite3.connect({str(path)!r}, isolation_level=None); "
        "db.execute('INSERT INTO scratch VALUES (2)'); db.close()"
    )
    subprocess.run([sys.executable, "-c", other], check=True)
    running.execute("INSERT INTO scratch VALUES (3)")
    # Before, opening a store opened and closed the file, dropping this process's locks: the other
    # process's close then removed the WAL under the running app, and the next app got "disk I/O error".
    FeedbackStore(url)
    later = sqlite3.connect(path, isolation_level=None)
    later.execute("INSERT INTO scratch VALUES (4)")
    assert later.execute("SELECT count(*) FROM scratch").fetchone() == (4,)


def test_a_postgresql_database_that_refuses_is_named_without_its_password():
    with pytest.raises(StoreError) as refused:
        FeedbackStore(f"postgresql+psycopg://cds:secret@127.0.0.1:{free_port()}/feedback")
    message = str(refused.value)
    assert message.startswith("cannot open the feedback database postgresql+psycopg://cds:***@127.0.0.1:")
    assert "Connection refused" in message and "secret" not in message and "\n" not in message


def test_a_report_never_creates_an_empty_database(tmp_path):
    missing = tmp_path / "feedback.sqlite"
    with pytest.raises(StoreError, match=f"no feedback database at sqlite:///{missing}"):
        FeedbackStore(f"sqlite:///{missing}", create=False)
    assert not missing.exists()
    sqlite3.connect(missing).close()  # a file, but not ours
    with pytest.raises(StoreError, match=f"sqlite:///{missing} holds no feedback database"):
        FeedbackStore(f"sqlite:///{missing}", create=False)
