"""CDS Hooks discovery, services and feedback, Bundle evaluation, health; errors as OperationOutcome."""

from __future__ import annotations

import codecs
import functools
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

import msgspec
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from service import hooks, logs
from service.config import ConfigError, Settings
from service.evaluate import guidance
from service.evaluate.pipeline import Evaluation, Evaluator
from service.fhir import half_surrogate
from service.outcome import ApiError, Issue, error, operation_outcome
from service.store import feedback_request
from service.store.feedback import FeedbackStore, StoreUnavailable
from service.web import auth, headers, openapi

log = logging.getLogger("service.http")

JSON_TYPES = ("application/json", "application/fhir+json")
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
    auth.protect(app, settings)
    headers.install(app, settings.cors_origins)

    @app.get("/cds-services")
    def discovery():
        return _json(hooks.discovery())

    @app.post("/cds-services/<service_id>")
    def call_service(service_id: str):
        service = hooks.SERVICES.get(service_id)
        if service is None:
            raise error(404, "not-found", "no CDS service with this id; see GET /cds-services")
        evaluation = evaluator.hook(service, _body(settings), datetime.now(UTC))
        _log_evaluation(service.id, evaluation)
        store.record_cards(service.id, evaluation.cards, datetime.now(UTC))
        return _json(evaluation.response())

    @app.post("/cds-services/<service_id>/feedback")
    def receive_feedback(service_id: str):
        if service_id not in hooks.SERVICES:
            raise error(404, "not-found", "no CDS service with this id; see GET /cds-services")
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
        fhir = _wants_fhir()
        hook = request.args.get("hook", "patient-view")
        evaluation = evaluator.bundle(_body(settings), datetime.now(UTC), request.args.get("asOf"), hook)
        _log_evaluation("evaluate", evaluation)
        store.record_cards("evaluate", evaluation.cards, datetime.now(UTC))
        if fhir:
            service_id = hooks.service_for(hook).id
            results = guidance.bundle(evaluation.cards, evaluation.patient_id, service_id, evaluation.now)
            return _json(results, mimetype="application/fhir+json")
        return _json(evaluation.response())

    app.add_url_rule("/openapi.json", "openapi", functools.partial(_json, openapi.document(settings)))

    @app.get("/health")
    def health():
        return _json({"status": "ok"})

    @app.get("/health/ready")
    def ready():
        problem = evaluator.readiness_problem()
        if problem:
            raise error(503, "transient", problem)
        return _json({"status": "ready", "rules": len(evaluator.engine.rule_ids)})

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return _outcome(exc.status, exc.issues)

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(exc: StoreUnavailable):
        log.error("feedback database unavailable", extra={"fields": {"error": str(exc)}})
        return _outcome(
            503, [Issue("transient", "the feedback database is unavailable; nothing was stored; retry")]
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _outcome(
            exc.code or 500, [Issue(HTTP_ISSUE.get(exc.code, "processing"), exc.description or exc.name)]
        )

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # The route, not the path: a path the client chose may hold identifiers.
        route = request.url_rule.rule if request.url_rule else None
        log.error("unhandled error", exc_info=exc, extra={"fields": {"route": route}})
        return _outcome(500, [Issue("exception", "internal error; no advice was produced")])

    return app


def _body(settings: Settings):
    """Read the request body as JSON: right content type, within size and nesting limits."""
    if request.mimetype not in JSON_TYPES:
        raise error(415, "not-supported", "send the body as application/json or application/fhir+json")
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
        raise error(400, "structure", "the JSON is nested too deeply") from None
    except ValueError:
        raise error(400, "structure", "the body is not valid JSON in UTF-8") from None
    if _depth_exceeds(raw, max_depth):
        raise error(400, "structure", f"the JSON is nested deeper than {max_depth} levels")
    return body  # a number past the float range: the standard library reads it as infinity, as it did


def _not_json(constant: str):
    """Refuse NaN and Infinity, which Python reads but JSON (RFC 8259) does not have."""
    raise ValueError(constant)


def _wants_fhir() -> bool:
    """Tell whether the client asked for FHIR resources rather than cards; refuse what neither satisfies."""
    if not request.accept_mimetypes:
        return False
    best = request.accept_mimetypes.best_match(["application/json", "application/fhir+json"])
    if best is None:
        raise error(406, "not-supported", "answers are application/json (cards) or application/fhir+json")
    return best == "application/fhir+json"


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


def _outcome(status: int, issues) -> Response:
    return _json(operation_outcome(issues), status, "application/fhir+json")


def _log_evaluation(service_id: str, evaluation: Evaluation) -> None:
    log.info(
        "evaluated",
        extra={
            "fields": {
                "service": service_id,
                "hookInstance": evaluation.hook_instance,
                "cards": len(evaluation.cards),
                "rules": list(evaluation.rules),
                "ms": evaluation.timings,
                **({"ranOut": evaluation.ran_out} if evaluation.ran_out else {}),
            }
        },
    )
