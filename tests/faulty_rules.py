"""Rules that fail on purpose, added to the real rule base to show that a fault stays in its request.

Each fault is triggered by the patient sent, so a request with any other patient is evaluated normally:
gender `other` makes an action raise; age 7 makes an action assert a fact the engine would choke on;
age 5 makes a card's finisher raise; age 3 holds its engine session until released, for at most
HOLD_SECONDS. In process, HELD tells that it holds and HOLD releases it; across processes, it creates
the file named by $FAULTY_RULES_HELD_FILE and is released by the file named by $FAULTY_RULES_RELEASE_FILE.
`create()` is an app factory for gunicorn: the service with this rule base.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from durable.lang import c, m, when_all

import rules
from service.evaluate.engine import Engine
from service.web.app import create_app

HOLD = threading.Event()  # set: a held evaluation may finish
HELD = threading.Event()  # set by an evaluation once it holds its session
HOLD_SECONDS = 30.0  # bounds a hold that nothing releases
AGES = {"finding": 7, "finisher": 5, "hold": 3}


def define(k, emit):
    """Register the faulty rules in the active ruleset."""

    @when_all(c.p << ((m.t == "patient") & (m.sex == "other")))
    def action_raises(c):
        raise RuntimeError("Jane Doe, born 2017-01-01")  # a message that must never reach a client or log

    @when_all(c.p << ((m.t == "patient") & (m.age == AGES["finding"])))
    def asserts_a_nested_fact(c):
        emit.finding(c, "nested", c.p, detail={"nested": True})

    emit.finish("faulty-card", lambda params: params["missing"])

    @when_all(c.p << ((m.t == "patient") & (m.age == AGES["finisher"])))
    def card_whose_finisher_raises(c):
        emit.card(c, "faulty-card", c.p)

    @when_all(c.p << ((m.t == "patient") & (m.age == AGES["hold"])))
    def holds_its_session(c):
        HELD.set()
        if held := os.environ.get("FAULTY_RULES_HELD_FILE"):
            Path(held).touch()
        release = os.environ.get("FAULTY_RULES_RELEASE_FILE")
        deadline = time.monotonic() + HOLD_SECONDS
        while not HOLD.wait(0.05) and time.monotonic() < deadline:
            if release and Path(release).exists():
                break


def install(app, sessions: int = 1, wait_seconds: float = 0.2):
    """Replace an app's rule engine with the real rule base plus these rules, with few sessions."""
    evaluator = app.extensions["imnm_cds"]
    evaluator.engine = Engine(
        evaluator.knowledge,
        [*rules.RULE_MODULES, sys.modules[__name__]],
        max_sessions=sessions,
        wait_seconds=wait_seconds,
    )
    return app


def create():
    """Build the service with the faulty rules (for gunicorn)."""
    # Past the hook deadline a request is answered with no cards while its rules run on: a held session
    # would then outlive its request. Out of reach, it is held for exactly one request.
    return install(create_app({"deadline_ms": 60_000}))
