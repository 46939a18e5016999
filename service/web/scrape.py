"""Serve GET /metrics in the Prometheus text format; with JWT on, only to the callers the settings name."""

from __future__ import annotations

import hmac
from ipaddress import ip_address

from flask import Flask, Response, request

from service import metrics
from service.config import ConfigError, Settings
from service.outcome import error

PATH = "/metrics"


def install(app: Flask, settings: Settings) -> None:
    """Add GET /metrics: open in development mode, else for IMNM_CDS_METRICS_ADDRESSES or the secret."""
    token_file = settings.metrics_token_file
    secret = token_file.read_text(encoding="utf-8").strip() if token_file else None
    if secret == "":
        raise ConfigError("IMNM_CDS_METRICS_TOKEN_FILE: the file holds no secret")

    def allowed() -> bool:
        if settings.auth != "jwt":
            return True
        authorization = request.headers.get("Authorization", "")
        if secret and hmac.compare_digest(authorization.encode(), f"Bearer {secret}".encode()):
            return True
        try:
            address = ip_address(request.remote_addr or "")
        except ValueError:  # a Unix socket has no address
            return False
        return any(address in network for network in settings.metrics_addresses)

    def scrape() -> Response:
        if not allowed():
            raise error(
                403,
                "forbidden",
                "metrics are served only to the addresses and the bearer secret the settings name",
                reason="metrics-access",
            )
        return Response(metrics.exposition(), content_type=metrics.CONTENT_TYPE)

    app.add_url_rule(PATH, "metrics", scrape, methods=["GET"])
