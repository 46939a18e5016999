"""Evaluate one patient: request → resources → facts → rules → cards, timing each stage."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from logging import getLogger

import rules
from rules import knowledge
from service import facts, hooks
from service.config import ConfigError, Settings
from service.evaluate import cards
from service.evaluate.engine import Engine, EngineBusy, EngineError, Outcome
from service.facts import FactSet
from service.fhir import Resource, naming_once, parse_datetime, validate
from service.gather import prefetch
from service.gather.fhirclient import FhirClient
from service.logs import ms_since
from service.outcome import ApiError, Issue, error

log = getLogger(__name__)

STAGES = ("validate", "facts", "rules", "cards")  # the stages after gathering, in order


@dataclass
class Evaluation:
    cards: list[dict]
    patient_id: str
    now: datetime
    hook_instance: str | None = None
    rules: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage
    ran_out: str | None = None  # the stage during which the deadline passed
    ignored: tuple[str, ...] = ()  # elements we do not read that are malformed or missing: where, and why
    # What the cards were made from, for the explanation page; None when the deadline passed first.
    facts: FactSet | None = None
    outcome: Outcome | None = None
    topics: frozenset[str] = frozenset()  # the card topics of the service that evaluated

    def response(self) -> dict:
        return {"cards": self.cards}


class Evaluator:
    """The loaded knowledge and compiled rules of one process, and the flow through them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.knowledge = knowledge.load(settings.knowledge_overrides)
        # The package version and a hash of rules/ after local overrides: which knowledge made a card.
        self.knowledge_version = (
            f"{version('imnm-cds')}+{knowledge.fingerprint(settings.knowledge_overrides)[:12]}"
        )
        self.engine = Engine(
            self.knowledge,
            rules.RULE_MODULES,
            max_sessions=settings.engine_sessions,
            wait_seconds=settings.engine_wait_seconds,
            disabled=settings.disabled_rules,
        )
        unknown = set(settings.disabled_rules) - set(self.engine.rule_ids)
        if unknown:
            raise ConfigError(f"IMNM_CDS_DISABLED_RULES: no such rules: {', '.join(sorted(unknown))}")
        if settings.disabled_rules:
            log.warning("rules switched off", extra={"fields": {"rules": list(settings.disabled_rules)}})
        self.fhir = FhirClient(settings)
        # One pool per process, as many threads as engine sessions: each runs one evaluation at a time.
        # Its threads start on first use, so a pool made before gunicorn forks its workers is still empty.
        self.workers = ThreadPoolExecutor(settings.engine_sessions, "evaluate")
        warm_up()

    def hook(
        self, service: hooks.Service, body, now: datetime, caller: prefetch.Caller | None = None
    ) -> Evaluation:
        """Evaluate a CDS Hooks request for one of our services; past its deadline, answer no cards."""
        started, arrived = time.perf_counter(), time.monotonic()
        request = hooks.parse(service, body, now)
        gathered = prefetch.from_prefetch(
            request,
            self.fhir,
            until=arrived + self.settings.fetch_budget_ms / 1000,
            failed_prefetch=self.settings.prefetch_failure,
            caller=caller,
        )
        deadline = arrived + self.settings.deadline_ms / 1000
        evaluation = self._by(deadline, service, gathered, request.now, {"gather": ms_since(started)})
        evaluation.hook_instance = request.hook_instance
        _report_ignored(service, evaluation)
        return evaluation

    def _by(
        self,
        deadline: float,
        service: hooks.Service,
        gathered: prefetch.Gathered,
        now: datetime,
        timings: dict,
    ) -> Evaluation:
        """Evaluate on a pool thread, waited for only until the deadline: after it, no cards."""
        stage = "gather"
        if time.monotonic() < deadline:
            future = self.workers.submit(self._evaluate, service, gathered, now, timings, deadline)
            try:
                return future.result(timeout=max(0.0, deadline - time.monotonic()))
            except (TimeoutError, OutOfTime):
                # Still waiting for a free thread: it never starts. Else the stage under way, after which
                # the thread stops before it would begin another.
                stage = (
                    "queue" if future.cancel() else next((s for s in STAGES if s not in timings), STAGES[-1])
                )
        return Evaluation([], gathered.patient_id, now, timings=dict(timings), ran_out=stage)

    def bundle(self, body, now: datetime, as_of: str | None = None, hook: str = "patient-view") -> Evaluation:
        """Evaluate a Bundle as our service for the hook would; 'now' is asOf, else Bundle.timestamp."""
        started = time.perf_counter()
        service = hooks.service_for(hook)
        gathered = prefetch.from_bundle(body, with_drafts="draftOrders" in service.context)
        if body.get("timestamp") is not None:  # checked even when asOf overrides it
            now = _chosen_time(body["timestamp"], "Bundle.timestamp")
        if as_of is not None:
            now = _chosen_time(as_of, "asOf")
        evaluation = self._evaluate(service, gathered, now, {"gather": ms_since(started)})
        _report_ignored(service, evaluation)
        return evaluation

    def _evaluate(
        self,
        service: hooks.Service,
        gathered: prefetch.Gathered,
        now: datetime,
        timings: dict,
        deadline: float = math.inf,
    ) -> Evaluation:
        """Validate, make facts, run rules, build cards: each stage timed, none begun past the deadline."""
        with naming_once():  # validation and facts name the same codings: once for both
            started = time.perf_counter()
            try:
                selected = facts.select(self.knowledge, gathered.resources, gathered.drafts)
            except facts.InvalidData as exc:
                raise ApiError(400, *_invalid_issues(exc), reason="invalid-fhir") from None
            timings["validate"] = ms_since(started)
            in_time(deadline)
            started = time.perf_counter()
            fact_set = facts.from_selected(self.knowledge, selected, now=now, available=gathered.available)
            timings["facts"] = ms_since(started)
        in_time(deadline)
        started = time.perf_counter()
        try:
            outcome = self.engine.evaluate(fact_set.facts)
        except EngineBusy:
            log.warning("rule engine busy", extra={"fields": {"sessions": self.settings.engine_sessions}})
            raise error(
                503, "transient", "the service is at capacity; retry shortly", reason="engine-busy"
            ) from None
        except EngineError as exc:
            # Engine errors name the rule and the exception type, never a value from the request.
            log.error("rule engine failed", extra={"fields": {"error": str(exc)}})
            raise error(
                500, "exception", "the rule engine failed on this request; no advice was produced"
            ) from exc
        timings["rules"] = ms_since(started)
        in_time(deadline)
        started = time.perf_counter()
        built = cards.build(self.knowledge, outcome, fact_set, gathered.patient_id, service.topics)
        timings["cards"] = ms_since(started)
        fired = tuple(sorted({r for c in outcome.conclusions for r in c.rules}))
        ran_out = "gather" if gathered.out_of_time else None
        return Evaluation(
            built,
            gathered.patient_id,
            now,
            rules=fired,
            timings=timings,
            ran_out=ran_out,
            ignored=(*gathered.ignored, *selected.ignored),
            facts=fact_set,
            outcome=outcome,
            topics=service.topics,
        )

    def readiness_problem(self) -> str | None:
        """Say why this process should not take traffic (the engine cannot evaluate), or None."""
        if not self.engine.healthy:
            return "the rule engine needs a restart"
        try:
            self.engine.evaluate(
                facts.build(self.knowledge, [], now=datetime.now(UTC), available=frozenset()).facts, wait=0
            )
        except EngineBusy:
            return None  # busy evaluating is healthy: out of rotation, its load would only go elsewhere
        except EngineError:
            return "the rule engine cannot evaluate"
        return None


def warm_up() -> None:
    """Build each FHIR model's validator now: the first validation of a type costs tens of milliseconds."""
    for data in (
        {"resourceType": "Patient"},
        {"resourceType": "Observation", "status": "final", "code": {"text": "warm-up"}},
        {"resourceType": "Condition", "subject": {"reference": "Patient/x"}},
        {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "warm-up"}},
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/x"},
            "medicationCodeableConcept": {"text": "warm-up"},
            # As order screens send drafts (the CDS Hooks sandbox's Rx Sign): dose and supply.
            "category": [{"text": "warm-up"}],
            "dosageInstruction": [
                {"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}, "doseAndRate": [{}]}
            ],
            "dispenseRequest": {"expectedSupplyDuration": {"value": 30, "code": "d"}},
        },
        {
            "resourceType": "MedicationStatement",
            "status": "active",
            "subject": {"reference": "Patient/x"},
            "medicationCodeableConcept": {"text": "warm-up"},
        },
        {
            "resourceType": "MedicationAdministration",
            "status": "completed",
            "subject": {"reference": "Patient/x"},
            "medicationCodeableConcept": {"text": "warm-up"},
            "effectiveDateTime": "2024-01-01",
        },
        {
            "resourceType": "MedicationDispense",
            "status": "completed",
            "medicationCodeableConcept": {"text": "warm-up"},
        },
    ):
        validate(Resource(data))


class OutOfTime(Exception):
    """The deadline passed: the stages not yet begun are skipped."""


def in_time(deadline: float) -> None:
    """Go on to the next stage only while the deadline has not passed."""
    if time.monotonic() > deadline:
        raise OutOfTime


def _report_ignored(service: hooks.Service, evaluation: Evaluation) -> None:
    """Log once per request the elements we do not read that were malformed or missing: paths, no values."""
    if evaluation.ignored:
        log.warning(
            "unread elements ignored",
            extra={
                "fields": {
                    "service": service.id,
                    "hookInstance": evaluation.hook_instance,
                    "count": len(evaluation.ignored),
                    "elements": list(evaluation.ignored[:20]),
                }
            },
        )


def _invalid_issues(exc: facts.InvalidData) -> list[Issue]:
    issues = [
        Issue(
            "invalid",
            f"{problem.resource.type} is not valid FHIR R4: {message}",
            ".".join(p for p in (problem.resource.location or problem.resource.type, path) if p),
        )
        for problem in exc.problems
        for path, message in problem.problems
    ]
    return issues[:50]


def _chosen_time(value, where: str) -> datetime:
    """Read an evaluation time the caller gave; refuse one that is not a FHIR dateTime."""
    moment = parse_datetime(value)
    if moment is None:
        raise error(400, "value", f"{where} must be a FHIR dateTime", where)
    return moment
