"""CDS Hooks discovery, services and feedback, Bundle evaluation, health; errors as OperationOutcome."""

from __future__ import annotations

import codecs
import functools
import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType

import msgspec
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from service import hooks, logs, metrics
from service.config import ConfigError, Settings
from service.evaluate import explain, guidance
from service.evaluate.pipeline import Evaluation, Evaluator
from service.fhir import half_surrogate
from service.logs import ms_since
from service.outcome import ApiError, Issue, error, operation_outcome
from service.store import feedback_request
from service.store.feedback import FeedbackStore, StoreUnavailable
from service.web import auth, headers, openapi, scrape, smart

log = logging.getLogger("service.http")
access = logging.getLogger("service.access")

JSON_TYPES = ("application/json", "application/fhir+json")
NO_SERVICE = "no CDS service with this id; see GET /cds-services"
DATABASE_DOWN = Issue("transient", "the feedback database is unavailable; nothing was stored; retry")
INTERNAL_ERROR = Issue("exception", "internal error; no advice was produced")
HTTP_ISSUE = {
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    413: "too-long",
    415: "not-supported",
}
NOT_STRUCTURE = bytes(range(256)).translate(None, b'"[]{}')  # every byte but quotes and brackets


def create_app(config: Settings | Mapping | None = None) -> Flask:
    """Build the app: settings checked, knowledge loaded, rules compiled now, so bad ones fail the start."""
    settings = config if isinstance(config, Settings) else Settings.from_env(**dict(config or {}))
    logs.configure(settings.log_level)
    evaluator = Evaluator(settings)
    store = FeedbackStore(settings.database_url)
    app = Flask(__name__, static_folder=None)  # no static files: every route is in the OpenAPI document
    if app.debug:
        # Flask's debug mode (FLASK_DEBUG) serves an interactive debugger: never in any configuration.
        raise ConfigError("FLASK_DEBUG is on; the service never runs in debug mode")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["imnm_cds"] = evaluator
    app.extensions["imnm_cds_feedback"] = store
    _account_for(app, evaluator)
    auth.protect(app, settings)
    headers.install(app, settings.cors_origins, *smart.framing(settings))
    smart.install(app, settings, evaluator)
    scrape.install(app, settings)

    @app.get("/cds-services")
    def discovery():
        return _json(hooks.discovery())

    @app.post("/cds-services/<service_id>")
    def call_service(service_id: str):
        service = hooks.SERVICES.get(service_id)
        if service is None:
            raise error(404, "not-found", NO_SERVICE, reason="unknown-service")
        evaluation = evaluator.hook(service, _noted(_body(settings)), datetime.now(UTC), auth.caller())
        smart.link(evaluation.cards, settings)
        _report(service.id, evaluation, evaluator.knowledge_version)
        store.record_cards(service.id, evaluation.cards, datetime.now(UTC), evaluator.knowledge_version)
        return _json(evaluation.response())

    @app.post("/cds-services/<service_id>/feedback")
    def receive_feedback(service_id: str):
        if service_id not in hooks.SERVICES:
            raise error(404, "not-found", NO_SERVICE, reason="unknown-service")
        items = feedback_request.parse(_body(settings))
        stored = store.save(service_id, items, datetime.now(UTC))
        log.info(
            "feedback",
            extra={"fields": {"service": service_id, "items": len(items), "stored": stored}},
        )
        return _json({"received": len(items), "stored": stored, "duplicates": len(items) - stored})

    @app.get("/feedback/summary")
    def feedback_summary():
        return _json(store.summary())

    @app.post("/evaluate")
    def evaluate_bundle():
        answer = _answer_type()
        hook = request.args.get("hook", "patient-view")
        evaluation = evaluator.bundle(_body(settings), datetime.now(UTC), request.args.get("asOf"), hook)
        _report("evaluate", evaluation, evaluator.knowledge_version)
        store.record_cards("evaluate", evaluation.cards, datetime.now(UTC), evaluator.knowledge_version)
        return _answer(answer, evaluation, hook, evaluator.knowledge)

    app.add_url_rule(
        f"/{explain.STYLESHEET_NAME}", "stylesheet", lambda: Response(explain.STYLESHEET, mimetype="text/css")
    )
    _serve_documents(app, settings)

    @app.get("/health")
    def health():
        return _json({"status": "ok"})

    @app.get("/health/ready")
    def ready():
        problem = evaluator.readiness_problem()
        if problem:
            raise error(503, "transient", problem, reason="not-ready")
        return _json(
            {
                "status": "ready",
                "rules": len(evaluator.engine.rule_ids),
                "disabledRules": list(settings.disabled_rules),
                "knowledge": evaluator.knowledge_version,
            }
        )

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return _refuse(exc.status, exc.issues, exc.reason)

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(exc: StoreUnavailable):
        # The error's text is the database driver's exception type, never a value.
        return _refuse(503, [DATABASE_DOWN], "database-unavailable", {"error": str(exc)})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        issue = Issue(HTTP_ISSUE.get(exc.code, "processing"), exc.description or exc.name)
        return _refuse(exc.code or 500, [issue], exc.name.lower().replace(" ", "-"))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        return _refuse(500, [INTERNAL_ERROR], "exception", exc_info=exc)

    return app


def _serve_documents(app: Flask, settings: Settings) -> None:
    """Serve the OpenAPI document, and at / a short index of it."""
    document = openapi.document(settings)
    app.add_url_rule("/openapi.json", "openapi", functools.partial(_json, document))
    app.add_url_rule("/", "index", functools.partial(_json, openapi.index(document)))


def _body(settings: Settings):
    """Read the request body as JSON: right content type, within size and nesting limits."""
    if request.mimetype not in JSON_TYPES:
        raise error(
            415, "not-supported", f"send the body as {' or '.join(JSON_TYPES)}", reason="content-type"
        )
    raw = request.get_data(cache=False)
    if request.content_length is None and len(raw) >= settings.max_body_bytes:
        raise RequestEntityTooLarge()  # a chunked body is cut at the limit, so one that reaches it is longer
    try:
        # msgspec reads exactly what the standard library reads (big integers too), only faster; what it
        # refuses, or nests too deeply, is read again by the standard library, whose words clients know.
        body = msgspec.json.decode(raw.removeprefix(codecs.BOM_UTF8))
        if not _depth_exceeds(raw, settings.max_json_depth):
            return body
    except (msgspec.DecodeError, RecursionError):
        pass
    return _refused(raw, settings.max_json_depth)


def _refused(raw: bytes, max_depth: int):
    """Read a body the fast reader refused with the standard library, to say exactly what is wrong."""
    try:
        text = raw.decode("utf-8-sig")  # RFC 8259 section 8.1: UTF-8, a byte order mark ignored
        body = json.loads(text, parse_constant=_not_json)
        if half_surrogate(text, body):
            raise ValueError("half of a surrogate pair")
    except RecursionError:
        raise error(400, "structure", "the JSON is nested too deeply", reason="json-depth") from None
    except ValueError:
        raise error(400, "structure", "the body is not valid JSON in UTF-8", reason="json") from None
    if _depth_exceeds(raw, max_depth):
        raise error(
            400, "structure", f"the JSON is nested deeper than {max_depth} levels", reason="json-depth"
        )
    return body  # a number past the float range: the standard library reads it as infinity, as it did


def _not_json(constant: str):
    """Refuse NaN and Infinity, which Python reads but JSON (RFC 8259) does not have."""
    raise ValueError(constant)


def _answer_type() -> str:
    """Choose cards, FHIR resources or the explanation page by Accept; refuse what none satisfies."""
    if not request.accept_mimetypes:
        return "application/json"
    best = request.accept_mimetypes.best_match(["application/json", "application/fhir+json", "text/html"])
    if best is None:
        answers = "answers are application/json (cards), application/fhir+json or text/html (explanation)"
        raise error(406, "not-supported", answers, reason="accept")
    return best


def _answer(answer: str, evaluation: Evaluation, hook: str, knowledge) -> Response:
    """Answer an evaluation as cards, as FHIR resources, or as the page explaining it."""
    if answer == "text/html":
        return headers.page(explain.render(knowledge, evaluation))
    if answer == "application/fhir+json":
        service_id = hooks.service_for(hook).id
        results = guidance.bundle(evaluation.cards, evaluation.patient_id, service_id, evaluation.now)
        return _json(results, mimetype="application/fhir+json")
    return _json(evaluation.response())


def _depth_exceeds(raw: bytes, limit: int) -> bool:
    """Tell whether valid JSON nests deeper than the limit, from its brackets outside strings."""
    brackets = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, NOT_STRUCTURE)
    brackets = b"".join(brackets.split(b'"')[::2])  # every other piece between quotes is outside strings
    for _ in range(limit):
        # One level a pass: the innermost pairs of either kind are marked first, then removed together.
        brackets = brackets.replace(b"[]", b"()").replace(b"{}", b"()").replace(b"()", b"")
        if not brackets:
            return False
    return True


def _json(payload: dict, status: int = 200, mimetype: str = "application/json") -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status, mimetype=mimetype)


def _refuse(
    status: int, issues, reason: str, fields: Mapping = MappingProxyType({}), exc_info=None
) -> Response:
    """Answer an OperationOutcome and log one line an operator can count: never the path, query or body."""
    service_id = (request.view_args or {}).get("service_id")
    log.log(
        logging.ERROR if status >= 500 else logging.WARNING,
        "error",
        exc_info=exc_info,
        extra={
            "fields": {
                "status": status,
                "route": _route(),
                "code": issues[0].code if issues else None,
                "reason": reason,
                # Only our own ids: an unknown one is text the client chose.
                "service": service_id if service_id in hooks.SERVICES else None,
                "hookInstance": g.get("hook_instance"),
                **fields,
            }
        },
    )
    return _json(operation_outcome(issues), status, "application/fhir+json")


def _route() -> str:
    """Name the route template that answered (e.g. /cds-services/<service_id>): a path may hold ids."""
    return request.url_rule.rule if request.url_rule else "unmatched"


def _noted(body):
    """Note the request's hookInstance for the logs if it is a UUID (else it is text the client chose)."""
    instance = body.get("hookInstance") if isinstance(body, dict) else None
    g.hook_instance = instance if isinstance(instance, str) and hooks.is_uuid(instance) else None
    return body


def _account_for(app: Flask, evaluator: Evaluator) -> None:
    """Count and log every answer; show in the metrics that this worker serves, and with what knowledge."""
    metrics.workers.set(1)
    metrics.knowledge.labels(evaluator.knowledge_version).set(1)
    # Before auth's before-request function, so that a call it refuses is timed too.
    app.before_request(_start)
    app.after_request(_account)


def _start() -> None:
    g.started = time.perf_counter()


def _account(response: Response) -> Response:
    """Count the answer and log one access line: method, route template, status and milliseconds."""
    route = _route()
    metrics.requests.labels(route, str(response.status_code)).inc()
    fields = {"method": request.method, "route": route, "status": response.status_code}
    if "started" in g:
        fields["ms"] = ms_since(g.started)
    access.info("request", extra={"fields": fields})
    return response


def _report(service_id: str, evaluation: Evaluation, knowledge: str) -> None:
    """Log what was evaluated and count it."""
    log.info(
        "evaluated",
        extra={
            "fields": {
                "service": service_id,
                "hookInstance": evaluation.hook_instance,
                "cards": len(evaluation.cards),
                "rules": list(evaluation.rules),
                "knowledge": knowledge,
                "ms": evaluation.timings,
                **({"ranOut": evaluation.ran_out} if evaluation.ran_out else {}),
            }
        },
    )
    _count(evaluation)


def _count(evaluation: Evaluation) -> None:
    """Count an evaluation's stage times, its cards by rule, topic and indicator, and a deadline run-out."""
    for stage, ms in evaluation.timings.items():
        metrics.stage_seconds.labels(stage).observe(ms / 1000)
    for card in evaluation.cards:
        topic, indicator = card["source"]["topic"]["code"], card["indicator"]
        for rule in card["extension"]["imnm-cds.rules"]:
            metrics.cards.labels(rule, topic, indicator).inc()
    if evaluation.ran_out:
        metrics.ran_out.labels(evaluation.ran_out).inc()
