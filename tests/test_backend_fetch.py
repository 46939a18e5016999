"""Hook calls without fhirAuthorization fetched with our SMART backend client, for bound CDS clients only."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_bulk_screen import pem
from test_gather import full_prefetch_answer, stored

import signing
from conftest import FHIR_TOKEN, HOOK_SCENARIOS, authorised, sekmet
from service.config import ConfigError
from service.gather import backend
from service.web.app import create_app

CLIENT_ID = "imnm-cds-hooks"
SERVICE = "/cds-services/imnm-patient-view"
PUBLIC = "http://localhost"
OTHER_ISSUER = "https://other-ehr.example.org"
SCENARIO = next(s for s in HOOK_SCENARIOS if s.name == "seropositive-hmgcr")
GENEROUS = {"deadline_ms": 30_000, "fetch_budget_ms": 20_000, "fetch_read_timeout_ms": 10_000}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("backend")
    (folder / "backend.pem").write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    return folder


@pytest.fixture(scope="module")
def cds_keys():
    return {signing.ISSUER: signing.rsa_key("ehr-1"), OTHER_ISSUER: signing.ec_key("other-1")}


def ehr(folder: Path, name: str, **auth):
    """sekmet wanting a token: the EHR's own, or one its token endpoint gives our registered client."""
    jwks = backend.ClientKey.load(folder / "backend.pem").jwks()
    settings = {
        "types": ["bearer", "smart"],
        "tokens": [FHIR_TOKEN],
        "smart_clients": [{"client_id": CLIENT_ID, "jwks": jwks, "scopes": "system/*.rs"}],
        **auth,
    }
    (folder / name).mkdir()
    return sekmet(folder / name, server_auth=settings)


@pytest.fixture(scope="module")
def ehr_server(folder):
    with ehr(folder, "ehr") as base:
        yield base


def service(folder: Path, base: str, cds_keys, auth: str = "jwt", **bound):
    """The service trusting two CDS clients, with our backend client for base bound to the north tenant."""
    issuers = folder / "issuers.json"
    issuers.write_text(json.dumps({iss: {"jwks": signing.jwks(key)} for iss, key in cds_keys.items()}))
    clients = folder / f"backend-{abs(hash((base, auth)))}.json"
    entry = {"client_id": CLIENT_ID, "private_key": "backend.pem", "algorithm": "RS384"}
    entry["cds_clients"] = [{"iss": signing.ISSUER, "tenant": "north"}]
    clients.write_text(json.dumps({base: {**entry, **bound}}))
    settings = {"fhir_servers": base, "fhir_allow_http": True, "backend_clients": clients, **GENEROUS}
    if auth == "jwt":
        settings |= {"auth": "jwt", "trusted_issuers": issuers, "public_url": PUBLIC}
    settings["database_url"] = f"sqlite:///{folder / 'replays.sqlite'}"
    return create_app(settings)


def token_requests(app, base: str) -> list[str]:
    """Record each request our backend client makes to the token endpoint of base."""
    asked: list[str] = []
    session = app.extensions["imnm_cds"].fhir.bindings.servers[base].token.client.session
    session.hooks["response"].append(
        lambda r, *a, **k: asked.append(r.url) if r.url.endswith("/auth/token") else None
    )
    return asked


@pytest.fixture(scope="module")
def app(folder, ehr_server, cds_keys):
    return service(folder, ehr_server, cds_keys)


def call(app, cds_keys, request: dict, iss: str = signing.ISSUER, **claims):
    token = signing.sign(cds_keys[iss], signing.claims(PUBLIC + SERVICE, iss=iss, **claims))
    return app.test_client().post(SERVICE, json=request, headers={"Authorization": f"Bearer {token}"})


def fetched(caplog) -> dict:
    return next(r.fields for r in reversed(caplog.records) if r.getMessage() == "fetched")


def without_prefetch(base: str, token: str | None = None) -> dict:
    """The scenario's request, stored on the server, asking the service to fetch every key itself."""
    request = stored(SCENARIO, base)
    request["prefetch"] = {}
    return authorised(request, base, token)


def test_a_bound_client_without_a_token_is_fetched_with_our_backend_token(app, ehr_server, cds_keys, caplog):
    asked = token_requests(app, ehr_server)
    caplog.set_level(logging.INFO)
    for _ in range(2):
        response = call(app, cds_keys, without_prefetch(ehr_server), tenant="north")
        assert response.status_code == 200, response.get_json()
        assert response.get_json() == full_prefetch_answer(create_app().test_client(), SCENARIO)
        assert response.get_json()["cards"]
        assert fetched(caplog)["credentials"] == "backend"
        assert all("resources" in key for key in fetched(caplog)["keys"].values())
    assert len(asked) == 1  # the token is kept for the next call
    logged = caplog.text + "".join(json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert "eyJ" not in logged  # neither our token, our assertion nor the caller's JWT


@pytest.mark.parametrize(
    "caller",
    [
        {"iss": signing.ISSUER, "tenant": "south"},
        {"iss": signing.ISSUER},
        {"iss": OTHER_ISSUER, "tenant": "north"},
    ],
    ids=["other-tenant", "no-tenant", "other-issuer"],
)
def test_a_client_not_bound_to_the_server_gets_no_fetch_with_our_credentials(
    app, ehr_server, cds_keys, caller, caplog
):
    asked = token_requests(app, ehr_server)
    caplog.set_level(logging.INFO)
    response = call(app, cds_keys, without_prefetch(ehr_server), **caller)
    # Today's behaviour: fetched without a token, which this server refuses; the Patient is required.
    assert response.status_code == 412
    assert "refused the access token (HTTP 401)" in response.get_json()["issue"][0]["diagnostics"]
    assert fetched(caplog)["credentials"] == "none"
    assert asked == []


def test_a_hook_token_the_server_refuses_is_never_replaced_by_ours(app, ehr_server, cds_keys, caplog):
    asked = token_requests(app, ehr_server)
    caplog.set_level(logging.INFO)
    response = call(app, cds_keys, without_prefetch(ehr_server, "revoked-token"), tenant="north")
    assert response.status_code == 412
    assert "refused the access token (HTTP 401)" in response.get_json()["issue"][0]["diagnostics"]
    assert fetched(caplog)["credentials"] == "ehr"
    refusal = next(r for r in caplog.records if r.getMessage() == "fhir access refused")
    assert refusal.levelno == logging.WARNING
    assert refusal.fields["reasons"] == ["the FHIR server refused the access token (HTTP 401)"]
    assert asked == []
    assert "revoked-token" not in caplog.text + json.dumps(refusal.fields)


def test_the_ehr_token_is_used_when_sent_even_by_a_bound_client(app, ehr_server, cds_keys, caplog):
    asked = token_requests(app, ehr_server)
    caplog.set_level(logging.INFO)
    response = call(app, cds_keys, without_prefetch(ehr_server, FHIR_TOKEN), tenant="north")
    assert response.status_code == 200
    assert fetched(caplog)["credentials"] == "ehr"
    assert asked == []


def test_with_authentication_off_no_caller_is_verified_so_nothing_is_fetched_with_ours(
    folder, ehr_server, cds_keys, caplog
):
    open_app = service(folder, ehr_server, cds_keys, auth="off")
    logging.getLogger().addHandler(caplog.handler)  # the app's start set the service's own handler
    asked = token_requests(open_app, ehr_server)
    caplog.set_level(logging.INFO)
    response = open_app.test_client().post(SERVICE, json=without_prefetch(ehr_server))
    assert response.status_code == 412
    assert fetched(caplog)["credentials"] == "none"
    assert asked == []


def test_our_token_is_renewed_before_it_expires_and_once_when_refused_early(folder, cds_keys, caplog):
    with ehr(folder, "short-lived", token_lifetime=4) as base:
        app = service(folder, base, cds_keys)
        logging.getLogger().addHandler(caplog.handler)
        asked = token_requests(app, base)
        caplog.set_level(logging.INFO)
        token = app.extensions["imnm_cds"].fhir.bindings.servers[base].token

        def answered() -> bool:
            response = call(app, cds_keys, without_prefetch(base), tenant="north")
            return response.status_code == 200 and fetched(caplog)["credentials"] == "backend"

        assert answered() and len(asked) == 1
        first = token.token()
        assert answered() and len(asked) == 1  # still good: kept
        time.sleep(2.5)  # a 4-second token is renewed once half its life is gone, before it runs out
        assert answered() and len(asked) == 2
        assert token.token() != first
        # A token the server forgot before its time (here: one it never issued) is renewed once.
        with token._lock:
            token._token = ("forgotten-token", time.monotonic() - 1, time.monotonic() + 60)
        assert answered() and len(asked) == 3


def test_a_backend_client_the_token_endpoint_refuses_leaves_the_keys_unknown(folder, ehr_server, cds_keys):
    app = service(folder, ehr_server, cds_keys, client_id="not-registered")
    response = call(app, cds_keys, without_prefetch(ehr_server), tenant="north")
    assert response.status_code == 412
    assert "token endpoint gave our backend client no access token" in json.dumps(response.get_json())


def write(folder: Path, document) -> Path:
    path = folder / "clients.json"
    path.write_text(json.dumps(document))
    return path


BASE = "https://ehr.example.org/fhir"
GOOD = {"client_id": CLIENT_ID, "private_key": "backend.pem", "cds_clients": [{"iss": signing.ISSUER}]}


@pytest.mark.parametrize(
    "document, message",
    [
        ({BASE: {**GOOD, "tenants": ["north"]}}, "unknown members tenants"),
        ({BASE: {**GOOD, "algorithm": "ES384"}}, "the key signs RS384"),
        ({BASE: {**GOOD, "cds_clients": []}}, "at least one CDS client"),
        ({BASE: {**GOOD, "cds_clients": [{"iss": "ehr"}]}}, "iss must be an http(s) URL"),
        ({BASE: {**GOOD, "cds_clients": [{"iss": signing.ISSUER, "tenant": ""}]}}, "non-empty string"),
        ({BASE: {**GOOD, "private_key": "missing.pem"}}, "is not a file"),
        ({BASE: {**GOOD, "private_key": "clients.json"}}, "not an unencrypted PEM private key"),
        ({"https://elsewhere.example.org/fhir": GOOD}, "is not one of IMNM_CDS_FHIR_SERVERS"),
        ({BASE + "?x=1": GOOD}, "without query"),
        ([], "must be a JSON object"),
    ],
)
def test_a_bad_backend_client_file_stops_the_start(folder, document, message):
    with pytest.raises(ConfigError, match="IMNM_CDS_BACKEND_CLIENTS") as raised:
        create_app({"fhir_servers": BASE, "backend_clients": write(folder, document)})
    assert message in str(raised.value)


def test_an_ec_key_is_read_for_es384(tmp_path):
    (tmp_path / "backend.pem").write_bytes(pem(ec.generate_private_key(ec.SECP384R1())))
    clients = write(tmp_path, {BASE: {**GOOD, "algorithm": "ES384"}})
    app = create_app({"fhir_servers": BASE, "backend_clients": clients})
    assert app.extensions["imnm_cds"].fhir.bindings.servers[BASE].token.client.key.alg == "ES384"
