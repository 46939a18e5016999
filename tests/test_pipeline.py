"""The deadline is hard: a stage still running when it passes is not waited for."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from conftest import hook_request
from rules import knowledge as knowledge_module
from service.evaluate.engine import Engine
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"


def holding_rules(gate: threading.Event, held: threading.Event, let_go: threading.Event):
    """A rule base whose one rule holds the rules stage until the gate opens."""

    def define(k, emit):
        from durable.lang import c, m, when_all

        @when_all(c.p << (m.t == "patient"))
        def hold(c):
            held.set()
            gate.wait(30)
            let_go.set()

    return type("holding", (), {"define": staticmethod(define)})


@pytest.fixture
def hurried_app():
    return create_app({"deadline_ms": 300, "fetch_budget_ms": 100})


def test_the_answer_goes_at_the_deadline_while_a_stage_still_runs(hurried_app, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    gate, held, let_go = threading.Event(), threading.Event(), threading.Event()
    engine = Engine(knowledge_module.load(), [holding_rules(gate, held, let_go)])
    monkeypatch.setattr(hurried_app.extensions["imnm_cds"], "engine", engine)
    try:
        response = hurried_app.test_client().post(SERVICE, json=hook_request())
        answered_while_held = held.is_set() and not let_go.is_set()
    finally:
        gate.set()
    assert answered_while_held
    assert response.get_json() == {"cards": []}
    evaluated = next(r.fields for r in caplog.records if r.getMessage() == "evaluated")
    assert evaluated["ranOut"] == "rules" and "rules" not in evaluated["ms"]
    assert let_go.wait(10)
    deadline = time.monotonic() + 10  # the worker ends its engine session once the rule returns
    while engine.live_sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.live_sessions == 0


@pytest.fixture
def one_thread_app():
    return create_app({"deadline_ms": 300, "fetch_budget_ms": 100, "engine_sessions": 1})


def test_a_call_that_finds_no_free_thread_by_its_deadline_answers_no_cards(
    one_thread_app, monkeypatch, caplog
):
    app = one_thread_app
    caplog.set_level(logging.INFO)
    gate, held, let_go = threading.Event(), threading.Event(), threading.Event()
    evaluator = app.extensions["imnm_cds"]
    engine = evaluator.engine
    monkeypatch.setattr(
        evaluator, "engine", Engine(knowledge_module.load(), [holding_rules(gate, held, let_go)])
    )
    first = threading.Thread(target=lambda: app.test_client().post(SERVICE, json=hook_request()))
    first.start()
    try:
        assert held.wait(10)  # the only pool thread is taken
        response = app.test_client().post(SERVICE, json=hook_request())
    finally:
        gate.set()
        first.join(10)
    assert response.get_json() == {"cards": []}
    evaluated = [r.fields for r in caplog.records if r.getMessage() == "evaluated"]
    assert sorted(e["ranOut"] for e in evaluated) == ["queue", "rules"]
    assert next(e for e in evaluated if e["ranOut"] == "queue")["ms"].keys() == {"gather"}
    # The queued call never ran: the one thread is free again and evaluates the next call in full.
    monkeypatch.setattr(evaluator, "engine", engine)
    assert app.test_client().post(SERVICE, json=hook_request()).status_code == 200
    last = [r.fields for r in caplog.records if r.getMessage() == "evaluated"][-1]
    assert "ranOut" not in last and "cards" in last["ms"]
