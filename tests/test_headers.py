"""Security headers on every response; CORS for allowed browser origins, their preflight without a JWT."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES, SANDBOX, hook_request, load
from service.web.app import create_app
from service.web.headers import SECURITY_HEADERS

SERVICE = "/cds-services/imnm-patient-view"


def assert_secured(response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/cds-services", {}, 200),
        ("POST", SERVICE, {"json": hook_request()}, 200),
        ("POST", SERVICE, {"data": "{", "content_type": "application/json"}, 400),
        ("POST", SERVICE, {"data": "{}", "content_type": "text/plain"}, 415),
        ("POST", "/cds-services/none", {"json": {}}, 404),
        ("DELETE", "/cds-services", {}, 405),
        ("POST", SERVICE, {"data": "[" * 5000, "content_type": "application/json"}, 413),
        ("OPTIONS", SERVICE, {}, 200),
        ("GET", "/health", {}, 200),
    ],
    ids=[
        "discovery",
        "service",
        "bad-json",
        "not-json",
        "unknown",
        "wrong-method",
        "too-large",
        "options",
        "health",
    ],
)
def test_every_response_carries_the_security_headers(method, path, kwargs, status):
    app = create_app({"max_body_bytes": 4096})
    response = app.test_client().open(path, method=method, **kwargs)
    assert response.status_code == status
    assert_secured(response)


def test_a_401_carries_them_and_a_bare_bearer_challenge(auth_app):
    response = auth_app.test_client().get("/cds-services")
    assert response.status_code == 401
    assert_secured(response)
    assert response.headers["WWW-Authenticate"] == "Bearer"


PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_a_preflight_from_an_allowed_origin_needs_no_token(auth_app):
    response = auth_app.test_client().options(SERVICE, headers={"Origin": SANDBOX, **PREFLIGHT})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert "Origin" in response.vary
    assert_secured(response)


def test_an_allowed_origin_can_read_answers_even_a_401(auth_app):
    response = auth_app.test_client().get("/cds-services", headers={"Origin": SANDBOX})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert "Access-Control-Allow-Methods" not in response.headers


def test_other_origins_get_no_cors_headers(auth_app):
    client = auth_app.test_client()
    for response in (
        client.options(SERVICE, headers={"Origin": "https://evil.example.org", **PREFLIGHT}),
        client.get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org.evil.example.org"}),
    ):
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Methods" not in response.headers


def test_no_cors_by_default():
    response = create_app().test_client().options(SERVICE, headers={"Origin": SANDBOX, **PREFLIGHT})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_wildcard_allows_any_origin_but_never_credentials():
    client = create_app({"cors_origins": "*"}).test_client()
    response = client.post(SERVICE, json=hook_request(), headers={"Origin": "https://any.example.org"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert_secured(response)
    assert json.loads(response.data)["cards"] == []


def test_the_explanation_page_allows_only_data_images_and_its_own_stylesheet(client):
    bundle = load(FIXTURES / "bundle-worked-example" / "request.json")
    page = client.post("/evaluate", json=bundle, headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'none'; img-src data:; style-src 'self';")
    assert "script-src" not in policy and page.headers["X-Content-Type-Options"] == "nosniff"
    stylesheet = client.get("/explain.css")
    assert stylesheet.status_code == 200 and stylesheet.mimetype == "text/css"
    assert_secured(stylesheet)
