"""Headers on every response: security headers, and CORS for browser-based CDS clients."""

from __future__ import annotations

from flask import Flask, Response, request
from werkzeug.exceptions import MethodNotAllowed

# The service answers JSON only: nothing to sniff, cache, frame, run or refer from.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# The explanation page: charts are data: images, its stylesheet comes from this origin, nothing runs.
PAGE_POLICY = (
    "default-src 'none'; img-src data:; style-src 'self'; frame-ancestors 'none'; form-action 'none'"
)
# Clients send the JWT in the Authorization header, never as a cookie, so CORS never allows
# credentials; that is also why "*" is safe to configure.
CORS_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


def page(html: str) -> Response:
    """Answer an HTML page under its own policy: data: images and same-origin styles only."""
    return Response(html, mimetype="text/html", headers={"Content-Security-Policy": PAGE_POLICY})


def install(
    app: Flask, cors_origins: tuple[str, ...], framed: frozenset[str] = frozenset(), policy: str = ""
) -> None:
    """Add the security headers, and CORS headers for allowed origins, to every response.

    The paths in `framed` (the SMART app's) answer under `policy` instead, and may be framed by EHRs.
    """

    @app.after_request
    def add_headers(response: Response) -> Response:
        page = response.headers.get("Content-Security-Policy") == PAGE_POLICY
        response.headers.update(SECURITY_HEADERS)
        if page:
            response.headers["Content-Security-Policy"] = PAGE_POLICY
        if request.path in framed:
            response.headers["Content-Security-Policy"] = policy
            del response.headers["X-Frame-Options"]  # superseded by the policy's frame-ancestors
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750 §3, with no error detail
        if isinstance(request.routing_exception, MethodNotAllowed):
            response.allow.update(request.routing_exception.valid_methods or ())  # RFC 9110 §15.5.6
        if cors_origins and "*" not in cors_origins:
            response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origin and ("*" in cors_origins or origin in cors_origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in cors_origins else origin
            if request.method == "OPTIONS":
                response.headers.update(CORS_PREFLIGHT)
        return response
