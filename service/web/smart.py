"""Open the explanation page from a card: a SMART on FHIR app (EHR launch) with the EHR's authorization."""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

import requests
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from flask import Flask, Response, make_response, redirect, render_template_string, request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from service import hooks
from service.config import Settings
from service.evaluate import explain
from service.evaluate.pipeline import Evaluator
from service.outcome import ApiError

log = logging.getLogger(__name__)

LAUNCH, REDIRECT = "/smart/launch", "/smart/redirect"
STYLESHEET = f"/smart/{explain.STYLESHEET_NAME}"  # where the page's relative link resolves from here
PATHS = frozenset({LAUNCH, REDIRECT, STYLESHEET})
COOKIE = "imnm_cds_smart"
STATE_MINUTES = 10
TIMEOUT = (3.05, 10.0)  # connect, read: the EHR's discovery and token endpoints, while a person waits
LARGEST_ANSWER = 1024 * 1024  # a discovery document or token response is a few kilobytes
SCOPES = " ".join(
    [
        "launch",
        "openid",
        "fhirUser",
        *sorted({f"patient/{k.resource_type}.read" for k in hooks.PATIENT_VIEW.prefetch}),
    ]
)
ERROR_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>The explanation could not be opened</title>
<link rel="stylesheet" href="{{ stylesheet }}"></head>
<body><main><h1>The explanation could not be opened</h1><p>{{ message }}</p>
<p>Open it again from the card in the EHR.</p></main></body></html>
"""


class Refused(Exception):
    """A launch that cannot go on, with the status and the words the person sees."""

    def __init__(self, status: int, message: str, reason: str):
        super().__init__(reason)
        self.status, self.message, self.reason = status, message, reason


def install(app: Flask, settings: Settings, evaluator: Evaluator) -> None:
    """Serve the launch and redirect endpoints when the app is configured."""
    if not settings.smart_client_id:
        return
    key = settings.smart_state_key_file.read_bytes().strip()
    states = URLSafeTimedSerializer(key, salt="imnm-cds smart state")

    @app.get(LAUNCH)
    def launch():
        iss, token = request.args.get("iss", ""), request.args.get("launch", "")
        if not iss or not token:
            raise Refused(400, "The EHR did not send iss and launch: open the app from the EHR.", "no-launch")
        refusal = evaluator.fhir.refusal(iss)
        if refusal:
            raise Refused(403, f"This EHR's FHIR server is not one this service may use ({refusal}).", "iss")
        endpoints = _discover(iss, settings)
        state, verifier = generate_token(32), generate_token(64)
        url, _ = _client(settings).create_authorization_url(
            endpoints["authorization_endpoint"], state=state, code_verifier=verifier, aud=iss, launch=token
        )
        kept = {
            "state": state,
            "verifier": verifier,
            "iss": iss,
            "token": endpoints["token_endpoint"],
            "card": request.args.get("card", ""),
        }
        response = redirect(url, 302)
        response.set_cookie(
            COOKIE,
            states.dumps(kept),
            max_age=STATE_MINUTES * 60,
            path="/smart/",
            secure=True,
            httponly=True,
            samesite="None",
        )
        return response

    @app.get(REDIRECT)
    def come_back():
        kept = _kept(states, request.cookies.get(COOKIE, ""))
        if not hmac.compare_digest(request.args.get("state", ""), kept["state"]):
            raise Refused(400, "The answer from the EHR does not belong to this launch.", "state")
        if "error" in request.args or not request.args.get("code"):
            raise Refused(403, "The EHR did not authorize the app.", "not-authorized")
        token = _exchange(settings, kept, request.args["code"])
        read_at = datetime.now(UTC)
        evaluation = _evaluate(evaluator, settings, kept["iss"], token, read_at)
        html = explain.render(evaluator.knowledge, evaluation, _opened(token, kept), read_at)
        response = make_response(_page(html, 200))
        response.delete_cookie(COOKIE, path="/smart/", secure=True, httponly=True, samesite="None")
        return response

    app.add_url_rule(
        STYLESHEET, "smart_stylesheet", lambda: Response(explain.STYLESHEET, mimetype="text/css")
    )

    @app.errorhandler(Refused)
    def refused(exc: Refused):
        log.warning("launch refused", extra={"fields": {"status": exc.status, "reason": exc.reason}})
        page = render_template_string(ERROR_PAGE, message=exc.message, stylesheet=explain.STYLESHEET_NAME)
        return _page(page, exc.status)


def framing(settings: Settings) -> tuple[frozenset[str], str]:
    """Name the app's paths and their policy: data: images, same-origin styles, framed by the EHRs set."""
    if not settings.smart_client_id:
        return frozenset(), ""
    ancestors = " ".join(settings.smart_frame_ancestors) or "'none'"
    return PATHS, f"default-src 'none'; img-src data:; style-src 'self'; frame-ancestors {ancestors}"


def link(cards: list[dict], settings: Settings) -> None:
    """Give every card a link that opens its explanation in the EHR, when the app is configured."""
    if not settings.smart_client_id:
        return
    for card in cards:
        rule = card["extension"]["imnm-cds.rules"][0]
        card.setdefault("links", []).append(
            {
                "label": "Why this card",
                "url": f"{settings.public_url}{LAUNCH}?card={quote(rule, safe='')}",
                "type": "smart",
                "appContext": json.dumps({"card": rule}),
            }
        )


def _page(html: str, status: int) -> Response:
    return Response(html, status=status, mimetype="text/html")


def _client(settings: Settings) -> OAuth2Session:
    client = OAuth2Session(
        settings.smart_client_id,
        redirect_uri=settings.smart_redirect_url,
        scope=SCOPES,
        code_challenge_method="S256",
        token_endpoint_auth_method="none",  # noqa: S106 (a public client: PKCE stands in for a secret)
    )
    client.max_redirects = 0
    client.trust_env = False  # no ~/.netrc or proxy settings from the environment
    return client


def _discover(iss: str, settings: Settings) -> dict:
    """Read the EHR's authorization and token endpoints from its SMART configuration."""
    url = f"{iss.rstrip('/')}/.well-known/smart-configuration"
    try:
        answer = requests.get(
            url, timeout=TIMEOUT, allow_redirects=False, headers={"Accept": "application/json"}
        )
        document = _json(answer)
    except (requests.RequestException, ValueError):
        raise Refused(424, "The EHR's SMART configuration could not be read.", "discovery") from None
    endpoints = {name: document.get(name) for name in ("authorization_endpoint", "token_endpoint")}
    for value in endpoints.values():
        scheme = urlsplit(value).scheme if isinstance(value, str) else ""
        if scheme != "https" and not (scheme == "http" and settings.fhir_allow_http):
            raise Refused(424, "The EHR's SMART configuration lacks usable https endpoints.", "discovery")
    return endpoints


def _json(answer: requests.Response) -> dict:
    if answer.status_code != 200 or len(answer.content) > LARGEST_ANSWER:
        raise ValueError("unusable answer")
    document = answer.json()
    if not isinstance(document, dict):
        raise ValueError("not an object")
    return document


def _kept(states: URLSafeTimedSerializer, cookie: str) -> dict:
    """Read the launch's signed state cookie, refusing one too old, altered or missing."""
    if not cookie:
        raise Refused(
            400, "This browser brought no launch to finish (cookies blocked, or opened twice).", "no-state"
        )
    try:
        return states.loads(cookie, max_age=STATE_MINUTES * 60)
    except SignatureExpired:
        raise Refused(400, f"The launch took longer than {STATE_MINUTES} minutes.", "state-expired") from None
    except BadSignature:
        raise Refused(400, "The launch's state was altered.", "state-signature") from None


def _exchange(settings: Settings, kept: dict, code: str) -> dict:
    """Trade the code for an access token; the token response must name the patient."""
    client = _client(settings)
    try:
        token = client.fetch_token(
            kept["token"], code=code, code_verifier=kept["verifier"], timeout=TIMEOUT, allow_redirects=False
        )
    except (OAuthError, requests.RequestException, ValueError):
        raise Refused(403, "The EHR did not give an access token for this launch.", "token") from None
    if not isinstance(token.get("patient"), str) or not token["patient"] or not token.get("access_token"):
        raise Refused(
            403, "The EHR's token names no patient: open the app from a patient's chart.", "patient"
        )
    return token


def _evaluate(evaluator: Evaluator, settings: Settings, iss: str, token: dict, read_at: datetime):
    """Fetch the patient's record with the access token as a hook call would, and evaluate it."""
    call = {
        "hook": hooks.PATIENT_VIEW.hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": iss,
        "fhirAuthorization": {
            "access_token": token["access_token"],
            "token_type": "Bearer",
            "expires_in": 60,
            "scope": SCOPES,
            "subject": settings.smart_client_id,
        },
        "context": {"userId": "Practitioner/launch", "patientId": token["patient"]},
        "prefetch": {},
    }
    try:
        return evaluator.hook(hooks.PATIENT_VIEW, call, read_at)
    except ApiError as exc:
        # 5xx is ours to answer only for our own faults; what the EHR's data or server did is a 4xx.
        status = exc.status if exc.status < 500 else 424
        words = "; ".join(issue.diagnostics for issue in exc.issues)
        raise Refused(status, f"The patient's record could not be evaluated: {words}.", "evaluate") from None


def _opened(token: dict, kept: dict) -> str | None:
    """Name the card's rule: from the token's appContext, else from the launch URL (some EHRs drop it)."""
    try:
        context = json.loads(token.get("appContext") or "{}")
    except (TypeError, ValueError):
        context = {}
    card = context.get("card") if isinstance(context, dict) else None
    return card if isinstance(card, str) else kept["card"] or None
