"""The feedback database: feedback items, the cards we issued, and what clinicians did with them."""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError

from service import metrics
from service.store.feedback_request import Feedback

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
MIGRATION_LOCK = 0x1A4C_F33D  # PostgreSQL advisory lock: one process migrates at a time
BUSY_SECONDS = 10.0  # how long a SQLite writer waits for another process's write to finish
CARD_QUEUE = 10_000  # requests' issued cards waiting for the writer; beyond this they are dropped
# The writer lets cards gather this long, so one transaction carries many requests' cards: a killed
# process loses at most this much of issued-card records (feedback is written before it is answered).
WRITE_INTERVAL = 0.5
TOP_REASONS = 3

metadata = MetaData()
schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime, nullable=False),
)
# One row per card uuid. The uuid is derived from the patient's data, so the same card is issued
# again on every visit that shows it: times_issued counts those, and no patient data is kept.
issued_cards = Table(
    "issued_cards",
    metadata,
    Column("uuid", String(36), primary_key=True),
    Column("service", String(64), nullable=False),
    Column("topic", String(64), nullable=False),
    Column("indicator", String(16), nullable=False),
    Column("times_issued", Integer, nullable=False),
    Column("first_issued", DateTime, nullable=False),
    Column("last_issued", DateTime, nullable=False),
    # The knowledge (package version + hash of rules/) that last issued it; NULL for cards issued before
    # schema version 3. A card issued again under other knowledge moves to it, with its feedback.
    Column("knowledge", String(64)),
)
card_rules = Table(
    "card_rules",
    metadata,
    Column("card_uuid", String(36), ForeignKey("issued_cards.uuid"), primary_key=True),
    Column("rule", String(128), primary_key=True),
)
# One row per user action on a card. Its identity is (service, card, outcome, outcome time): a
# client resending an item is stored once; another user, or the same user later, is a new row.
feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service", String(64), nullable=False),
    Column("card_uuid", String(36), nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
    Column("outcome_at", DateTime, nullable=False),
    Column("accepted_suggestions", Text, nullable=False),  # JSON array of suggestion uuids
    Column("reason_system", Text),
    Column("reason_code", Text),
    Column("reason_display", Text),
    Column("user_comment", Text),
    Column("received_at", DateTime, nullable=False),
    UniqueConstraint("service", "card_uuid", "outcome", "outcome_at", name="feedback_identity"),
)
IDENTITY = [feedback.c.service, feedback.c.card_uuid, feedback.c.outcome, feedback.c.outcome_at]
# One row per accepted token, until it expires: a replay is refused by whichever process or instance
# it reaches (service/store/replay.py). A digest of the jti keeps every key the same small size.
seen_tokens = Table(
    "seen_tokens",
    metadata,
    Column("issuer", Text, primary_key=True),
    Column("jti_sha256", LargeBinary(32), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),  # seconds since the epoch
)
# The summary, per knowledge, rule and topic. A card counts under every rule that fired for it.
BY_RULE = (issued_cards.c.knowledge, card_rules.c.rule, issued_cards.c.topic)
FEEDBACK_ON_CARDS = feedback.join(issued_cards, issued_cards.c.uuid == feedback.c.card_uuid).join(
    card_rules, card_rules.c.card_uuid == issued_cards.c.uuid
)
ISSUED = (
    select(*BY_RULE, func.count(), func.sum(issued_cards.c.times_issued))
    .join_from(card_rules, issued_cards)
    .group_by(*BY_RULE)
)
OUTCOME_COUNTS = (
    select(*BY_RULE, feedback.c.outcome, func.count())
    .select_from(FEEDBACK_ON_CARDS)
    .group_by(*BY_RULE, feedback.c.outcome)
)
REASONS = (
    select(
        *BY_RULE,
        feedback.c.reason_system,
        feedback.c.reason_code,
        func.max(feedback.c.reason_display),
        func.count(),
    )
    .select_from(FEEDBACK_ON_CARDS)
    .where(feedback.c.outcome == "overridden", feedback.c.reason_code.is_not(None))
    .group_by(*BY_RULE, feedback.c.reason_system, feedback.c.reason_code)
    .order_by(func.count().desc(), feedback.c.reason_code)
)
UNMATCHED = (
    select(feedback.c.outcome, func.count())
    .select_from(feedback.outerjoin(issued_cards, issued_cards.c.uuid == feedback.c.card_uuid))
    .where(issued_cards.c.uuid.is_(None))
    .group_by(feedback.c.outcome)
)


class StoreError(RuntimeError):
    """The feedback database cannot be opened or migrated; the service refuses to start."""


class StoreUnavailable(StoreError):
    """The feedback database did not answer or refused a write; nothing of the request was stored."""


@dataclass(frozen=True)
class IssuedCard:
    service: str
    uuid: str
    topic: str
    indicator: str
    rules: tuple[str, ...]
    at: datetime  # UTC
    knowledge: str | None = None


class FeedbackStore:
    """Feedback and issued cards in SQLite (a file, by default) or PostgreSQL, one per process."""

    def __init__(self, url: str, queue_capacity: int = CARD_QUEUE, create: bool = True):
        self.name = display_url(url)
        _check_reachable(url, self.name, create)
        self.engine = connect(url)
        try:
            migrate(self.engine, create)
        except DBAPIError as exc:
            reason = (
                str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
            )
            raise StoreError(f"cannot open the feedback database {self.name}: {reason}") from None
        finally:
            # No pooled connection may cross a fork (gunicorn --preload): each worker opens its own.
            self.engine.dispose()
        self._queue: queue.Queue = queue.Queue(queue_capacity)
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()  # flush and close: write now, do not wait out the interval
        self._dropped = 0
        atexit.register(self.close)

    def save(self, service: str, items: Iterable[Feedback], received_at: datetime) -> int:
        """Store every item in one transaction; return how many were new (the rest were stored before)."""
        rows = [_feedback_row(service, item, received_at) for item in items]
        if not rows:
            return 0
        statement = (
            self._insert(feedback)
            .on_conflict_do_nothing(index_elements=IDENTITY)
            .returning(feedback.c.card_uuid, feedback.c.outcome)
        )
        try:
            with self.engine.begin() as connection:
                stored = connection.execute(statement, rows).all()
        except DBAPIError as exc:
            raise StoreUnavailable(type(exc.orig).__name__) from None
        # Read after the commit, so the write transaction stays as short as before; the items are stored
        # whatever this read does, so a failure here only counts them under rule "unknown".
        cards = {uuid for uuid, _ in stored}
        try:
            with self.engine.connect() as connection:
                rules = connection.execute(
                    select(card_rules.c.card_uuid, card_rules.c.rule).where(card_rules.c.card_uuid.in_(cards))
                ).all()
        except DBAPIError:
            rules = []
        by_card = defaultdict(list)
        for uuid, rule in rules:
            by_card[uuid].append(rule)
        for uuid, outcome in stored:
            for rule in by_card.get(uuid, ["unknown"]):
                metrics.feedback.labels(rule, outcome).inc()
        return len(stored)

    def record_cards(
        self, service: str, cards: list[dict], at: datetime, knowledge: str | None = None
    ) -> None:
        """Queue the cards just returned for the background writer; never wait for the database."""
        if not cards:
            return
        self._start_writer()
        issued = [
            IssuedCard(
                service,
                card["uuid"],
                card["source"]["topic"]["code"],
                card["indicator"],
                tuple(card["extension"]["imnm-cds.rules"]),
                at,
                knowledge,
            )
            for card in cards
        ]
        try:
            self._queue.put_nowait(issued)
        except queue.Full:
            with self._lock:
                self._dropped += len(issued)

    def write_cards(self, issued: Iterable[IssuedCard]) -> None:
        """Add issued cards to their records: count, first and last time, topic, indicator, rules."""
        by_card: dict[str, list[IssuedCard]] = defaultdict(list)
        for card in issued:
            by_card[card.uuid].append(card)
        if not by_card:
            return
        cards = [
            {
                "uuid": uuid,
                "service": issues[0].service,
                "topic": issues[-1].topic,
                "indicator": issues[-1].indicator,
                "times_issued": len(issues),
                "first_issued": _naive(min(card.at for card in issues)),
                "last_issued": _naive(max(card.at for card in issues)),
                "knowledge": max(issues, key=lambda card: card.at).knowledge,
            }
            for uuid, issues in by_card.items()
        ]
        rules = [
            {"card_uuid": uuid, "rule": rule}
            for uuid, issues in by_card.items()
            for rule in sorted({rule for card in issues for rule in card.rules})
        ]
        upsert = self._insert(issued_cards)
        new, old = upsert.excluded, issued_cards.c
        upsert = upsert.on_conflict_do_update(
            index_elements=[old.uuid],
            set_={
                "times_issued": old.times_issued + new.times_issued,
                "first_issued": case(
                    (new.first_issued < old.first_issued, new.first_issued), else_=old.first_issued
                ),
                "last_issued": case(
                    (new.last_issued > old.last_issued, new.last_issued), else_=old.last_issued
                ),
                "topic": new.topic,
                "indicator": new.indicator,
                "knowledge": case((new.last_issued >= old.last_issued, new.knowledge), else_=old.knowledge),
            },
        )
        with self.engine.begin() as connection:
            connection.execute(upsert, cards)
            connection.execute(self._insert(card_rules).on_conflict_do_nothing(), rules)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the cards queued so far are written; say whether that happened in time."""
        if self._writer_pid != os.getpid():
            return True
        done = threading.Event()
        self._queue.put(done, timeout=timeout)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and close the database connections."""
        writer = self._writer
        if writer is not None and writer.is_alive() and self._writer_pid == os.getpid():
            try:
                self._queue.put(None, timeout=timeout)
                self._wake.set()
            except queue.Full:
                log.warning("card records lost at shutdown: the writer is stuck")
            writer.join(timeout)
        self.engine.dispose()

    def summary(self, top: int = TOP_REASONS) -> dict:
        """Per rule and topic: cards issued, distinct cards, accepted, overridden, top override reasons."""
        try:
            with self.engine.connect() as connection:
                connection.execution_options(read_only=True)
                issued, outcomes, reasons, unmatched = (
                    connection.execute(query).all() for query in (ISSUED, OUTCOME_COUNTS, REASONS, UNMATCHED)
                )
        except DBAPIError as exc:
            raise StoreUnavailable(type(exc.orig).__name__) from None
        rows: dict[tuple[str, str, str], dict] = defaultdict(
            lambda: {"issued": 0, "cards": 0, "accepted": 0, "overridden": 0, "topOverrideReasons": []}
        )
        for knowledge, rule, topic, cards, times in issued:
            rows[knowledge or "", rule, topic].update(cards=cards, issued=int(times))
        for knowledge, rule, topic, outcome, count in outcomes:
            rows[knowledge or "", rule, topic][outcome] = count
        for knowledge, rule, topic, system, code, display, count in reasons:  # most given first
            listed = rows[knowledge or "", rule, topic]["topOverrideReasons"]
            if len(listed) < top:
                listed.append(
                    {"system": system, "code": code, "count": count}
                    | ({"display": display} if display else {})
                )
        return {
            # Knowledge "" holds cards issued before it was recorded (schema version 1).
            "rules": [
                {"knowledge": knowledge, "rule": rule, "topic": topic, **rows[knowledge, rule, topic]}
                for knowledge, rule, topic in sorted(rows)
            ],
            "unmatchedFeedback": {"accepted": 0, "overridden": 0} | dict(unmatched),
        }

    def _insert(self, table: Table):
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    def _start_writer(self) -> None:
        if self._writer_pid == os.getpid():
            return
        with self._lock:
            if self._writer_pid != os.getpid():
                self._writer = threading.Thread(target=self._write_loop, name="card-records", daemon=True)
                self._writer.start()
                self._writer_pid = os.getpid()

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, list):  # let more requests' cards join this transaction
                self._wake.wait(WRITE_INTERVAL)
            self._wake.clear()
            items = [first, *self._drain()]
            self._write_batch([card for item in items if isinstance(item, list) for card in item])
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()
            if None in items:
                return

    def _drain(self):
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def _write_batch(self, batch: list[IssuedCard]) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("card records dropped: the writer fell behind", extra={"fields": {"cards": dropped}})
        try:
            self.write_cards(batch)
        except Exception as exc:  # the writer must outlive a database outage
            log.error("card records lost", exc_info=exc, extra={"fields": {"cards": len(batch)}})


def display_url(url: str) -> str:
    """Render a database URL for messages: a SQLite file as an absolute path, a password as ***."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        parsed = parsed.set(database=os.path.abspath(parsed.database))
    return parsed.render_as_string(hide_password=True)


def _check_reachable(url: str, name: str, create: bool) -> None:
    """Refuse a SQLite file that cannot be opened with the OS's reason; without create, a missing one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return
    path = parsed.database
    if not create and not os.path.isfile(path):
        raise StoreError(f"no feedback database at {name} (set IMNM_CDS_DATABASE_URL to the service's)")
    if os.path.exists(path):
        # Never open() a file SQLite may hold: closing any descriptor of it drops this process's locks,
        # and another process may then remove the WAL under our live connections ("disk I/O error").
        if os.path.isdir(path):
            raise StoreError(f"cannot open the feedback database {name}: {os.strerror(errno.EISDIR)}")
        if not os.access(path, os.R_OK | (os.W_OK if create else 0)):
            raise StoreError(f"cannot open the feedback database {name}: {os.strerror(errno.EACCES)}")
        return
    try:
        with open(path, "ab"):  # create it here, as the driver says only "unable to open"
            pass
    except OSError as exc:
        raise StoreError(f"cannot open the feedback database {name}: {exc.strerror}") from None


def connect(url: str, timeout: float | None = None, wait_for_disk: bool = True) -> Engine:
    """Create the engine: SQLite in WAL mode with durable commits, or PostgreSQL through psycopg 3.

    With a timeout (seconds), every wait is bounded by it: for a connection, a lock, a statement.
    Without waiting for the disk, a commit survives the process but not a power loss.
    """
    if make_url(url).get_backend_name() != "sqlite":
        if timeout is None:
            return create_engine(url, pool_pre_ping=True)
        milliseconds = max(1, round(timeout * 1000))
        options = f"-c statement_timeout={milliseconds} -c lock_timeout={milliseconds}"
        if not wait_for_disk:
            options += " -c synchronous_commit=off"
        # libpq's connect_timeout is whole seconds, at least 2: a dead server costs that, once a
        # connection breaks; pooled connections are reused, so calls do not pay it.
        connect_args = {"connect_timeout": max(2, round(timeout)), "options": options}
        return create_engine(url, pool_timeout=timeout, connect_args=connect_args)
    engine = create_engine(url, connect_args={"timeout": BUSY_SECONDS if timeout is None else timeout})
    event.listen(engine, "connect", _sqlite_connected if wait_for_disk else _sqlite_connected_unsynced)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connected_unsynced(dbapi_connection, record) -> None:
    _sqlite_connected(dbapi_connection, record)
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: no fsync at commit


def _sqlite_connected(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # the driver's own BEGIN is replaced by _sqlite_begin
    _use_wal(dbapi_connection)
    dbapi_connection.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we acknowledge it
    dbapi_connection.execute("PRAGMA foreign_keys=ON")


def _use_wal(dbapi_connection) -> None:
    """Put the database in WAL mode (it stays so): readers never block the writer, nor it them."""
    deadline = time.monotonic() + BUSY_SECONDS
    while dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            # Switching fails at once, without the busy timeout, while another process switches too.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_begin(connection: Connection) -> None:
    # A deferred transaction that reads and then writes fails at once when another process wrote in
    # between; IMMEDIATE takes the write lock first and waits its turn (BUSY_SECONDS).
    read_only = connection.get_execution_options().get("read_only")
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def migrate(engine: Engine, create: bool = True) -> None:
    """Create the schema in an empty database (if create), or bring an older one to SCHEMA_VERSION, once."""
    now = _naive(datetime.now(UTC))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        if not inspect(connection).has_table(schema_version.name):
            if not create:
                raise StoreError(f"{display_url(str(engine.url))} holds no feedback database")
            metadata.create_all(connection)
            connection.execute(insert(schema_version).values(version=SCHEMA_VERSION, applied_at=now))
            return
        current = connection.scalar(select(func.max(schema_version.c.version))) or 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the feedback database is at schema version {current}, newer than this service "
                f"({SCHEMA_VERSION}); run a newer imnm-cds"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](connection)
            connection.execute(insert(schema_version).values(version=version, applied_at=now))
            log.info("feedback database migrated", extra={"fields": {"schemaVersion": version}})


def _add_knowledge(connection: Connection) -> None:
    connection.exec_driver_sql("ALTER TABLE issued_cards ADD COLUMN knowledge VARCHAR(64)")


# MIGRATIONS[n] brings a database at schema version n - 1 to version n (see README, "Feedback").
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: seen_tokens.create, 3: _add_knowledge}


def _feedback_row(service: str, item: Feedback, received_at: datetime) -> dict:
    return {
        "service": service,
        "card_uuid": item.card,
        "outcome": item.outcome,
        "outcome_at": _naive(item.outcome_at),
        "accepted_suggestions": json.dumps(list(item.accepted_suggestions)),
        "reason_system": item.reason.system if item.reason else None,
        "reason_code": item.reason.code if item.reason else None,
        "reason_display": item.reason.display if item.reason else None,
        "user_comment": item.comment,
        "received_at": _naive(received_at),
    }


def _naive(moment: datetime) -> datetime:
    """Return the UTC wall time without a zone: every time in the database is UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)
