"""One replay store for every worker and instance: a token is accepted once, wherever it arrives."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import create_engine, func, select

import signing
from conftest import hook_request, serve
from service.store import replay
from service.store.feedback import seen_tokens
from service.store.replay import ReplayStore
from service.web.app import create_app
from signing import claims, sign

BASE = "http://localhost"
SERVICE = "/cds-services/imnm-patient-view"


def digest(jti: str) -> bytes:
    return hashlib.sha256(jti.encode()).digest()


def rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(seen_tokens))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def key() -> signing.SigningKey:
    return signing.ec_key("replay-2024")


@pytest.fixture(scope="module")
def issuers(key, tmp_path_factory):
    path = tmp_path_factory.mktemp("replay-trust") / "issuers.json"
    path.write_text(json.dumps({signing.ISSUER: {"jwks": signing.jwks(key)}}))
    return path


def token(key, path: str = SERVICE) -> str:
    return sign(key, claims(BASE + path))


@pytest.fixture
def auth_instance(issuers):
    """Make apps verifying JWTs from one client, each with its own connections; close them after."""
    apps = []

    def make(database_url: str, **settings):
        config = {"auth": "jwt", "trusted_issuers": issuers, "public_url": BASE, "database_url": database_url}
        apps.append(create_app(config | settings))
        return apps[-1].test_client()

    yield make
    for app in apps:
        app.extensions["imnm_cds_replays"].close()
        app.extensions["imnm_cds_feedback"].close()


def test_an_id_is_accepted_once_until_it_expires_then_purged(database_url, monkeypatch):
    store = ReplayStore(database_url, timeout_seconds=1.0)
    now = time.time()
    assert store.first_use("https://a.example", digest("1"), now + 300, now)
    assert not store.first_use("https://a.example", digest("1"), now + 300, now + 1)
    assert store.first_use("https://b.example", digest("1"), now + 300, now + 1)  # ids are per issuer
    assert store.first_use("https://a.example", digest("old"), now + 5, now + 2)
    assert rows(database_url) == 3
    # A minute on, the next call purges the expired id; until then nothing is deleted.
    assert store.first_use("https://a.example", digest("2"), now + 300, now + 30)
    assert rows(database_url) == 4
    assert store.first_use("https://a.example", digest("3"), now + 300, now + replay.PURGE_INTERVAL + 1)
    assert rows(database_url) == 4
    assert not store.first_use("https://a.example", digest("1"), now + 300, now + replay.PURGE_INTERVAL + 2)
    store.close()


def test_two_stores_on_one_database_accept_an_id_once_when_it_arrives_at_both_at_once(database_url):
    stores = [ReplayStore(database_url, timeout_seconds=5.0) for _ in range(2)]
    now = time.time()
    for round_ in range(5):
        jti = digest(f"race-{round_}")
        start = threading.Barrier(8)

        def attempt(index: int, jti=jti, start=start) -> bool:
            start.wait()
            return stores[index % 2].first_use(signing.ISSUER, jti, now + 300, now)

        with ThreadPoolExecutor(8) as pool:
            accepted = list(pool.map(attempt, range(8)))
        assert accepted.count(True) == 1, accepted
    for store in stores:
        store.close()


def test_two_app_instances_on_one_database_refuse_a_replay_whichever_it_reaches(
    database_url, auth_instance, key
):
    first, second = (auth_instance(database_url) for _ in range(2))
    headers = {"Authorization": f"Bearer {token(key)}"}
    assert first.post(SERVICE, json=hook_request(), headers=headers).status_code == 200
    assert second.post(SERVICE, json=hook_request(), headers=headers).status_code == 401
    assert first.post(SERVICE, json=hook_request(), headers=headers).status_code == 401

    for _ in range(3):
        headers = {"Authorization": f"Bearer {token(key, '/cds-services')}"}
        start = threading.Barrier(6)

        def call(index: int, headers=headers, start=start) -> int:
            start.wait()
            return (first, second)[index % 2].get("/cds-services", headers=headers).status_code

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(call, range(6)))
        assert sorted(statuses) == [200] + [401] * 5


@pytest.fixture
def impatient(tmp_path, auth_instance):
    """An app whose replay store waits at most 100 ms, on a SQLite file in tmp_path."""
    return auth_instance(f"sqlite:///{tmp_path / 'feedback.sqlite'}", replay_store_timeout_ms=100)


def test_a_store_that_does_not_answer_in_time_gets_503_transient(impatient, tmp_path, key, caplog):
    caplog.set_level(logging.INFO)
    client = impatient
    headers = {"Authorization": f"Bearer {token(key, '/cds-services')}"}
    # Another process holds the write lock longer than the timeout.
    holder = sqlite3.connect(tmp_path / "feedback.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        response = client.get("/cds-services", headers=headers)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503
    assert response.mimetype == "application/fhir+json"
    assert response.get_json()["issue"][0]["code"] == "transient"
    assert waited < 5  # bounded by the timeout, not the feedback store's 10 s
    logged = [r.fields for r in caplog.records if r.getMessage() == "token store unavailable"]
    assert logged and logged[-1]["refusedSoFar"] >= 1
    assert token(key) not in caplog.text
    # Nothing was recorded, so once the store answers the same token is accepted.
    assert client.get("/cds-services", headers=headers).status_code == 200


def test_two_gunicorn_workers_refuse_a_replay_whichever_worker_it_reaches(tmp_path, issuers, key):
    url = f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    process, base = serve(
        tmp_path / "stderr.log",
        IMNM_CDS_AUTH="jwt",
        IMNM_CDS_TRUSTED_ISSUERS=str(issuers),
        IMNM_CDS_PUBLIC_URL=BASE,
        IMNM_CDS_DATABASE_URL=url,
    )
    try:
        for _ in range(3):
            headers = {"Authorization": f"Bearer {token(key, '/cds-services')}"}
            start = threading.Barrier(8)

            def call(_, headers=headers, start=start) -> list[int]:
                start.wait()
                # A new connection for every call, so calls land on either worker.
                return [
                    requests.get(f"{base}/cds-services", headers=headers, timeout=30).status_code
                    for _ in range(3)
                ]

            with ThreadPoolExecutor(8) as pool:
                statuses = [status for statuses in pool.map(call, range(8)) for status in statuses]
            assert sorted(statuses) == [200] + [401] * 23
        assert rows(url) == 3
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
