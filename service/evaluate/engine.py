"""Run the rule base on durable-rules, with every measured hazard of the engine contained here."""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import durable.engine
import durable.lang
from durable.lang import c, m, when_all

from service import metrics

log = logging.getLogger(__name__)

RULESET = "imnm_cds"
# The engine allows 255 properties per fact (nested leaves, sid and id included) and segfaults on
# more inside assert_facts; our facts are flat and far smaller.
MAX_PROPERTIES = 40
MAX_STRING = 200
MAX_INTEGER = 2**53
# The engine refuses more than 1024 live sessions per ruleset and crashes when the failed one is
# deleted; a process never holds more than this many.
SESSION_CEILING = 512
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Inside an action, c.<alias> is a joined fact unless the engine's Closure already has that name.
RESERVED_ALIASES = {"s", "host"} | {name for name in dir(durable.engine.Closure) if not name.startswith("__")}
OPENER = {"id": "session", "t": "session"}
# Sessions kept alive rather than deleted (see _evaluate); past this many the process asks for a restart.
LEAK_LIMIT = 64


class EngineError(RuntimeError):
    """The rule engine failed on one evaluation (nothing about the patient is in the message)."""


class EngineBusy(EngineError):
    """Every engine session slot of this process is in use."""


@functools.lru_cache(maxsize=4096)
def fnv1_32(text: str) -> int:
    """Return the engine's 32-bit FNV-1 hash: its identity for sessions, fact ids and property names."""
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


@dataclass(frozen=True)
class Finding:
    code: str
    rules: tuple[str, ...]
    basis: tuple[str, ...]  # ids of the base facts behind it


@dataclass(frozen=True)
class Conclusion:
    key: str  # card wording key in rules/cards.toml
    rules: tuple[str, ...]  # every rule in its chain, conclusion and findings
    basis: tuple[str, ...]  # ids of the base facts behind it
    params: Mapping[str, object]


@dataclass(frozen=True)
class Outcome:
    findings: tuple[Finding, ...]
    conclusions: tuple[Conclusion, ...]


@dataclass
class _Record:
    rules: list[str] = field(default_factory=list)
    basis: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)


@dataclass
class _Session:
    ids: set[int]  # identity hashes already in this session's working memory
    findings: dict[str, _Record] = field(default_factory=dict)
    cards: dict[str, _Record] = field(default_factory=dict)
    rule: str | None = None
    acted: bool = False  # an action ran, so the engine initialised what deleting the session frees
    errors: list[tuple[str, str]] = field(default_factory=list)


class _SyncHost(durable.engine.Host):
    """A host without the dispatcher and timer threads, which run other sessions' actions and crash."""

    def _run(self):
        pass


class Emit:
    """What rule actions call to record findings and card requests in their own session."""

    def __init__(self, sessions: Mapping[str, _Session], finishers: dict):
        self._sessions = sessions
        self._finishers = finishers

    def finish(self, key: str, function) -> None:
        """Complete a card's merged requests after the session (engines cannot aggregate); None drops it."""
        self._finishers[key] = function

    def finding(self, c, code: str, *basis, **values) -> None:
        """Record a finding and assert it once as a fact, so later rules can join on it."""
        session = self._sessions[c.s.sid]
        record = session.findings.get(code)
        if record is None:
            record = session.findings[code] = _Record()
            fact = {"t": "finding", "code": code, "id": f"finding:{code}", **values}
            _check_fact(fact, session.ids)
            c.assert_fact(fact)
        _merge(record, session.rule, basis, {})

    def card(self, c, key: str, *basis, **params) -> None:
        """Record a card request; repeated requests for one card merge their rules, basis and lists."""
        session = self._sessions[c.s.sid]
        record = session.cards.setdefault(key, _Record())
        _merge(record, session.rule, basis, params)


def _merge(record: _Record, rule: str | None, basis: Iterable, params: dict) -> None:
    if rule and rule not in record.rules:
        record.rules.append(rule)
    record.basis.extend(b.id for b in basis if b.id not in record.basis)
    for name, value in params.items():
        known = record.params.get(name)
        if (
            isinstance(value, list)
            and isinstance(known, list)
            and all(isinstance(v, str) for v in known + value)
        ):
            record.params[name] = sorted(set(known) | set(value))  # e.g. features found by two rules
        else:
            record.params.setdefault(name, value)


def _check_fact(fact: Mapping, ids: set[int]) -> None:
    """Refuse a fact the engine would crash on, corrupt, or confuse with another."""
    if not 2 <= len(fact) <= MAX_PROPERTIES - 1:  # the engine adds sid
        raise EngineError(f"fact {fact.get('id')!r} has {len(fact)} properties")
    hashes = {fnv1_32("sid")}
    for name, value in fact.items():
        if name == "sid" or not NAME.match(name):
            raise EngineError(f"fact {fact.get('id')!r}: property name {name!r} is not allowed")
        if isinstance(value, str):
            ok = len(value) <= MAX_STRING
        elif isinstance(value, bool) or value is None:
            ok = True
        elif isinstance(value, int):
            ok = abs(value) < MAX_INTEGER
        elif isinstance(value, float):
            ok = math.isfinite(value)
        else:
            ok = False  # nested values count as properties and are matched by path: keep facts flat
        if not ok:
            raise EngineError(f"fact {fact.get('id')!r}: property {name!r} has an unsupported value")
        hashes.add(fnv1_32(name))
    if len(hashes) != len(fact) + 1:
        raise EngineError(f"fact {fact.get('id')!r}: property names collide in the engine's hash")
    identity = fnv1_32(str(fact.get("id", "")))
    if not fact.get("id") or identity in ids:
        raise EngineError(f"fact {fact.get('id')!r}: missing or colliding id")
    ids.add(identity)


class Engine:
    """The rule base compiled once per process; evaluate() runs one isolated session per call."""

    def __init__(
        self,
        knowledge,
        modules,
        *,
        max_sessions: int = 32,
        wait_seconds: float = 2.0,
        disabled: Iterable[str] = (),
    ):
        if not 1 <= max_sessions <= SESSION_CEILING:
            raise ValueError(f"max_sessions must be 1..{SESSION_CEILING}")
        self._sessions: dict[str, _Session] = {}
        self._live: set[int] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._wait = wait_seconds
        self.disabled = frozenset(disabled)
        self.broken = False
        self.leaked = 0
        self._host = _SyncHost()
        self._host.register_rulesets({RULESET: self._compile(knowledge, modules)})
        self.rule_ids = tuple(sorted(self._rule_ids))

    def _compile(self, knowledge, modules) -> dict:
        self._finishers: dict = {}
        emit = Emit(self._sessions, self._finishers)
        rules = durable.lang.ruleset(RULESET)
        # A top-level ruleset also enrols itself for the library's global host; this one is ours alone.
        durable.lang._rulesets.pop(RULESET, None)
        with rules:
            for module in modules:
                module.define(knowledge, emit)

            # The sink makes every fact "handled": one unmatched fact otherwise fails the whole batch
            # and leaves the other facts' actions pending.
            @when_all(c.any << +m.t, c.never << (m.never == 1))
            def sink(c):
                raise AssertionError("the sink rule never fires")

            # createStateNode leaves a session's action context uninitialised, and deleting a session in
            # which no action ever ran frees those garbage pointers (SIGSEGV or abort). This rule fires
            # once in every session, so the engine sets and clears them before we delete it.
            @when_all(m.t == OPENER["t"])
            def session_opened(c):
                pass

        _, definition = rules.define()
        for rule in definition.values():
            for alias in _aliases(rule):
                if alias in RESERVED_ALIASES or alias.startswith("_"):
                    raise ValueError(f"rule alias {alias!r} shadows the engine's own c.{alias}")
        if '"$div"' in json.dumps(definition, default=str):
            # An integer division by zero inside the engine kills the process (SIGFPE).
            raise ValueError("rules must not divide by fact values; precompute ratios in the facts")
        self._rule_ids = set()
        for rule in definition.values():
            action = rule["run"]
            if action is sink:
                continue
            rule_id = f"{action.__module__.rsplit('.', 1)[-1]}.{action.__name__}"
            if action is not session_opened:
                self._rule_ids.add(rule_id)
            rule["run"] = self._guard(rule_id, action)
        return definition

    def _guard(self, rule_id: str, action):
        sessions = self._sessions
        switched_off = rule_id in self.disabled

        def run(c):
            session = sessions[c.s.sid]
            session.acted = True
            if switched_off:
                return  # the rule matches, but concludes nothing: no finding, no card
            session.rule = rule_id
            try:
                action(c)
            except Exception as exc:
                # The engine swallows action errors into the session state; keep what we need to raise.
                session.errors.append((rule_id, type(exc).__name__))
                raise
            finally:
                session.rule = None

        return run

    def evaluate(self, facts: Iterable[Mapping], wait: float | None = None) -> Outcome:
        """Assert all facts in one call, run the rules to quiescence, and return what they concluded."""
        timeout = self._wait if wait is None else wait
        if not self._slots.acquire(blocking=False):
            waited = bool(timeout) and self._slots.acquire(timeout=timeout)
            if timeout:
                metrics.engine_waits.labels("served" if waited else "refused").inc()
            if not waited:
                raise EngineBusy("all rule-engine sessions are busy")
        in_use = metrics.engine_sessions
        in_use.inc()
        try:
            return self._evaluate(list(facts))
        finally:
            in_use.dec()
            self._slots.release()

    @property
    def live_sessions(self) -> int:
        """Return how many sessions are open in the engine right now."""
        return len(self._sessions)

    @property
    def healthy(self) -> bool:
        """Tell whether this process should keep taking evaluations (else its worker should be replaced)."""
        return not self.broken and self.leaked < LEAK_LIMIT

    def _evaluate(self, facts: list[Mapping]) -> Outcome:
        facts = [*facts, OPENER]
        ids: set[int] = set()
        for fact in facts:
            _check_fact(fact, ids)
        sid, session = self._open(ids)
        created = True
        try:
            state = self._host.assert_facts(RULESET, [{**fact, "sid": sid} for fact in facts])
            if session.errors:
                rule, kind = session.errors[-1]
                raise EngineError(f"rule {rule} raised {kind}")
            if state and "exception" in state:
                raise EngineError("the engine reported an action failure")
            return _outcome(session, self._finishers)
        except MemoryError as exc:
            # The engine's session table is full; its half-made session must not be deleted (segfault).
            created = False
            self.broken = True
            raise EngineError("the rule engine has no session left") from exc
        except (durable.engine.MessageNotHandledException, durable.engine.MessageObservedException) as exc:
            raise EngineError(f"the engine rejected a fact ({type(exc).__name__})") from exc
        finally:
            if created and session.acted:
                self._host.delete_state(RULESET, sid)
            elif created:
                # No action ran, so deleting would free uninitialised pointers: keep the session instead.
                self.leaked += 1
                log.warning("engine session kept to avoid a crash", extra={"fields": {"kept": self.leaked}})
            self._close(sid)

    def _open(self, fact_ids: set[int]) -> tuple[str, _Session]:
        with self._lock:
            while True:
                # Sessions are found by a 32-bit hash of the sid, and the session's own state fact has
                # the id "sid-<sid>": keep both distinct from everything live in this process.
                sid = uuid.uuid4().hex
                state_id = fnv1_32(f"sid-{sid}")
                if fnv1_32(sid) not in self._live and state_id not in fact_ids:
                    break
            self._live.add(fnv1_32(sid))
            session = self._sessions[sid] = _Session(ids=fact_ids | {state_id})
        return sid, session

    def _close(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)
            self._live.discard(fnv1_32(sid))


def _aliases(rule: Mapping) -> set[str]:
    names = set()
    for clause in rule.get("all", []) + rule.get("any", []):
        names.update(name.split("$")[0] for name in clause)
    return names


def _outcome(session: _Session, finishers: Mapping) -> Outcome:
    def expand(basis: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        rules, facts = [], []
        for id_ in basis:
            code = id_.removeprefix("finding:")
            if id_.startswith("finding:") and code in session.findings:
                record = session.findings[code]
                sub_rules, sub_facts = expand(record.basis)
                rules += record.rules + list(sub_rules)
                facts += sub_facts
            else:
                facts.append(id_)
        return tuple(sorted(set(rules))), tuple(sorted(set(facts)))

    findings = []
    for code, record in sorted(session.findings.items()):
        rules, basis = expand(record.basis)
        findings.append(Finding(code, tuple(sorted(set(record.rules) | set(rules))), basis))
    conclusions = []
    for key, record in sorted(session.cards.items()):
        params = record.params
        if key in finishers:
            try:
                params = finishers[key](dict(params))
            except Exception as exc:
                raise EngineError(f"finishing card {key} raised {type(exc).__name__}") from exc
            if params is None:
                continue
        rules, basis = expand(record.basis)
        all_rules = tuple(sorted(set(record.rules) | set(rules)))
        conclusions.append(Conclusion(key, all_rules, basis, MappingProxyType(params)))
    return Outcome(tuple(findings), tuple(conclusions))
