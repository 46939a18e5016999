"""Trusting CDS clients: every call carries a JWT from a trusted issuer, or gets a bare 401."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

import signing
from conftest import FIXTURES, hook_request, load
from service.config import ConfigError, Settings
from service.web.app import create_app
from service.web.auth import (
    NO_JWT_PATHS,
    Issuer,
    Rejected,
    ReplayCache,
    Verifier,
    load_issuers,
    signing_keys,
    trusted_issuers,
)
from signing import ISSUER, claims, sign

BASE = "http://localhost"
SERVICE = "/cds-services/imnm-patient-view"
SCENARIO = FIXTURES / "worked-example-hmgcr-positive"
UNAUTHORIZED = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "login", "diagnostics": "unauthorized"}],
}


@pytest.fixture
def auth_client(auth_app):
    return auth_app.test_client()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def valid(client_keys, path: str = SERVICE, kind: str = "rsa", **overrides) -> dict:
    return bearer(sign(client_keys[kind], claims(BASE + path, **overrides)))


def assert_unauthorized(response, caplog, reason: str) -> None:
    """A bare 401: the same generic OperationOutcome whatever the reason; the reason only in the log."""
    assert response.status_code == 401
    assert response.get_json() == UNAUTHORIZED
    assert response.headers["WWW-Authenticate"] == "Bearer"
    logged = [r.fields for r in caplog.records if r.getMessage() == "unauthorized"]
    assert logged and logged[-1]["reason"] == reason


REJECTIONS = {
    "missing-header": (lambda k: {}, "missing"),
    "basic-scheme": (lambda k: {"Authorization": "Basic dXNlcjpwYXNz"}, "malformed"),
    "bearer-without-token": (lambda k: {"Authorization": "Bearer "}, "malformed"),
    "not-a-jwt": (lambda k: {"Authorization": "Bearer not-a-jwt"}, "malformed"),
    "garbage-segments": (lambda k: bearer("e30.bm90IGpzb24.c2ln"), "malformed"),
    "two-tokens": (lambda k: {"Authorization": "Bearer a.b.c d.e.f"}, "malformed"),
    "unknown-issuer": (
        lambda k: bearer(sign(k["rsa"], claims(BASE + SERVICE, iss="https://other.example.org"))),
        "unknown-issuer",
    ),
    "unknown-kid": (
        lambda k: bearer(sign(signing.rsa_key("stranger"), claims(BASE + SERVICE))),
        "unknown-kid",
    ),
    "known-kid-other-key": (
        lambda k: bearer(sign(signing.rsa_key(k["rsa"].kid), claims(BASE + SERVICE))),
        "signature",
    ),
    "no-kid": (
        lambda k: bearer(jwt_without_kid(k["rsa"], claims(BASE + SERVICE))),
        "no-kid",
    ),
    "wrong-aud-other-endpoint": (lambda k: valid(k, "/cds-services"), "audience"),
    "wrong-aud-other-host": (
        lambda k: bearer(sign(k["rsa"], claims("https://elsewhere.example.org" + SERVICE))),
        "audience",
    ),
    "wrong-aud-trailing-slash": (
        lambda k: bearer(sign(k["rsa"], claims(BASE + SERVICE + "/"))),
        "audience",
    ),
    "expired": (
        lambda k: valid(k, iat=int(time.time()) - 3900, exp=int(time.time()) - 3600),
        "expired",
    ),
    "not-yet-valid-nbf": (lambda k: valid(k, nbf=int(time.time()) + 3600), "not-yet-valid"),
    "not-yet-valid-iat": (
        lambda k: valid(k, iat=int(time.time()) + 3600, exp=int(time.time()) + 3900),
        "not-yet-valid",
    ),
    "lifetime-over-an-hour": (lambda k: valid(k, lifetime=86_400), "lifetime"),
    "no-jti": (lambda k: valid(k, jti=None), "missing-claim"),
    "no-exp": (lambda k: bearer(sign(k["rsa"], without(claims(BASE + SERVICE), "exp"))), "missing-claim"),
    "no-iat": (lambda k: bearer(sign(k["rsa"], without(claims(BASE + SERVICE), "iat"))), "missing-claim"),
    "no-aud": (lambda k: bearer(sign(k["rsa"], without(claims(BASE + SERVICE), "aud"))), "missing-claim"),
    "alg-none": (lambda k: bearer(signing.unsigned(claims(BASE + SERVICE), k["rsa"].kid)), "algorithm"),
    "hs256-with-public-key": (
        lambda k: bearer(signing.forge_hs256(k["rsa"].public_pem(), claims(BASE + SERVICE), k["rsa"].kid)),
        "algorithm",
    ),
    "hs256-with-published-jwk": (
        lambda k: bearer(
            signing.forge_hs256(
                json.dumps(k["rsa"].public_jwk()).encode(), claims(BASE + SERVICE), k["rsa"].kid
            )
        ),
        "algorithm",
    ),
    "rs256-not-allowed-for-issuer": (
        lambda k: bearer(
            sign(signing.SigningKey(k["rsa"].kid, "RS256", k["rsa"].private), claims(BASE + SERVICE))
        ),
        "algorithm",
    ),
    "es384-header-on-an-rsa-key": (
        lambda k: bearer(
            sign(signing.SigningKey(k["rsa"].kid, "ES384", k["ec"].private), claims(BASE + SERVICE))
        ),
        "algorithm",
    ),
    "tampered-payload": (
        lambda k: bearer(signing.tamper(sign(k["rsa"], claims(BASE + SERVICE)), iss=ISSUER, tenant="x")),
        "signature",
    ),
    "tampered-aud": (
        lambda k: bearer(signing.tamper(sign(k["rsa"], claims(BASE + "/evaluate")), aud=BASE + SERVICE)),
        "signature",
    ),
    "typ-not-jwt": (lambda k: bearer(sign(k["rsa"], claims(BASE + SERVICE), typ="at+jwt")), "malformed"),
    "crit-header": (lambda k: bearer(sign(k["rsa"], claims(BASE + SERVICE), crit=["exp"])), "malformed"),
}


def without(payload: dict, name: str) -> dict:
    return {key: value for key, value in payload.items() if key != name}


def jwt_without_kid(key: signing.SigningKey, payload: dict) -> str:
    return jwt.encode(payload, key.private, algorithm=key.alg, headers={"typ": "JWT"})


@pytest.mark.parametrize(("make", "reason"), REJECTIONS.values(), ids=REJECTIONS.keys())
def test_every_rejection_is_a_bare_401(auth_client, client_keys, caplog, make, reason):
    caplog.set_level(logging.INFO)
    request = hook_request()
    response = auth_client.post(SERVICE, json=request, headers=make(client_keys))
    assert_unauthorized(response, caplog, reason)


def test_an_attackers_jku_is_never_fetched(auth_client, client_keys, jwks_server, caplog):
    attacker = signing.rsa_key(client_keys["rsa"].kid)
    jku = jwks_server.publish("/attacker/jwks.json", signing.jwks(attacker))
    token = sign(attacker, claims(BASE + SERVICE), jku=jku)
    assert_unauthorized(
        auth_client.post(SERVICE, json=hook_request(), headers=bearer(token)), caplog, "jku-not-allowed"
    )
    assert jwks_server.fetches.get("/attacker/jwks.json", 0) == 0


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_a_valid_token_passes_on_discovery_a_service_and_evaluate(auth_client, client_keys, kind):
    discovery = auth_client.get("/cds-services", headers=valid(client_keys, "/cds-services", kind))
    assert discovery.status_code == 200 and discovery.get_json()["services"]
    response = auth_client.post(
        SERVICE, json=load(SCENARIO / "request.json"), headers=valid(client_keys, kind=kind)
    )
    assert response.status_code == 200
    assert response.get_json() == load(SCENARIO / "expected.json")
    bundle = FIXTURES / "bundle-worked-example"
    evaluated = auth_client.post(
        "/evaluate", json=load(bundle / "request.json"), headers=valid(client_keys, "/evaluate", kind)
    )
    assert evaluated.get_json() == load(bundle / "expected.json")


def test_the_audience_ignores_the_query_string(auth_client, client_keys):
    bundle = load(FIXTURES / "bundle-worked-example" / "request.json")
    response = auth_client.post(
        "/evaluate?asOf=2024-06-01", json=bundle, headers=valid(client_keys, "/evaluate")
    )
    assert response.status_code == 200


def test_an_audience_list_naming_this_endpoint_passes(auth_client, client_keys):
    payload = claims(BASE + SERVICE) | {"aud": [BASE + "/cds-services", BASE + SERVICE]}
    headers = bearer(sign(client_keys["rsa"], payload))
    assert auth_client.post(SERVICE, json=hook_request(), headers=headers).status_code == 200


def test_the_token_header_jku_on_the_allow_list_is_used(auth_client, client_keys, jwks_server):
    key = client_keys["ec"]
    token = sign(key, claims(BASE + SERVICE), jku=jwks_server.url("/ehr/jwks.json"))
    assert auth_client.post(SERVICE, json=hook_request(), headers=bearer(token)).status_code == 200


def test_a_replayed_token_is_refused(auth_client, client_keys, caplog):
    caplog.set_level(logging.INFO)
    headers = valid(client_keys)
    assert auth_client.post(SERVICE, json=hook_request(), headers=headers).status_code == 200
    assert_unauthorized(auth_client.post(SERVICE, json=hook_request(), headers=headers), caplog, "replayed")


def test_the_same_jti_from_another_call_is_a_replay_too(auth_client, client_keys, caplog):
    caplog.set_level(logging.INFO)
    jti = str(uuid.uuid4())
    assert (
        auth_client.get("/cds-services", headers=valid(client_keys, "/cds-services", jti=jti)).status_code
        == 200
    )
    response = auth_client.post(SERVICE, json=hook_request(), headers=valid(client_keys, jti=jti))
    assert_unauthorized(response, caplog, "replayed")


def test_every_cds_route_requires_a_token(auth_app, client_keys, caplog):
    """Generic over the URL map, so routes added later (feedback) are covered without naming them."""
    caplog.set_level(logging.INFO)
    client = auth_app.test_client()
    checked = []
    for rule in auth_app.url_map.iter_rules():
        if rule.rule in NO_JWT_PATHS or rule.endpoint in ("static", "stylesheet"):
            continue  # the page's stylesheet holds no data: a browser fetches it without a JWT
        path = re.sub(r"<[^>]+>", "imnm-patient-view", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            without_token = client.open(path, method=method, json=hook_request())
            assert_unauthorized(without_token, caplog, "missing")
            wrong_aud = client.open(
                path, method=method, json=hook_request(), headers=valid(client_keys, "/x")
            )
            assert_unauthorized(wrong_aud, caplog, "audience")
            with_token = client.open(
                path, method=method, json=hook_request(), headers=valid(client_keys, path)
            )
            assert with_token.status_code != 401, (method, path)
            checked.append(f"{method} {rule.rule}")
    assert {"GET /cds-services", "POST /cds-services/<service_id>", "POST /evaluate"} <= set(checked)


def test_unknown_paths_need_a_token_too_and_health_does_not(auth_client, client_keys, caplog):
    caplog.set_level(logging.INFO)
    assert_unauthorized(auth_client.get("/nowhere"), caplog, "missing")
    assert auth_client.get("/nowhere", headers=valid(client_keys, "/nowhere")).status_code == 404
    assert auth_client.get("/health").status_code == 200
    assert auth_client.get("/health/ready").status_code == 200


def test_limits_still_hold_with_auth_on(auth_app, client_keys, caplog):
    caplog.set_level(logging.INFO)
    client = auth_app.test_client()
    deep = "[" * 10_000 + "]" * 10_000
    response = client.post(SERVICE, data=deep, content_type="application/json", headers=valid(client_keys))
    assert response.status_code == 400
    text = json.dumps(hook_request())
    response = client.post(SERVICE, data=text, content_type="text/plain", headers=valid(client_keys))
    assert response.status_code == 415
    huge = json.dumps(hook_request()) + " " * (6 * 1024 * 1024)
    response = client.post(SERVICE, data=huge, content_type="application/json", headers=valid(client_keys))
    assert response.status_code == 413
    # Without a token, the body is never read: the answer is 401 whatever it holds.
    assert_unauthorized(client.post(SERVICE, data=huge, content_type="application/json"), caplog, "missing")


CACHES = {"leeway_seconds": 30, "jwks_ttl_seconds": 300, "jwks_refetch_seconds": 0, "replay_capacity": 100}


@pytest.fixture
def verifier_for(jwks_server, client_keys, request):
    """A verifier trusting one issuer whose JWK Set sits at a path of its own, with these cache settings."""

    def make(refetch_seconds: float = 0, ttl_seconds: float = 300) -> tuple[Verifier, str]:
        path = "/{}/jwks.json".format(re.sub(r"\W", "-", request.node.name))
        url = jwks_server.publish(path, signing.jwks(client_keys["rsa"]))
        caches = {**CACHES, "jwks_ttl_seconds": ttl_seconds, "jwks_refetch_seconds": refetch_seconds}
        return Verifier([Issuer(ISSUER, jku=(url,))], **caches), path

    return make


def reason(verifier: Verifier, token: str) -> str | None:
    try:
        verifier.verify(f"Bearer {token}", BASE + SERVICE)
    except Rejected as exc:
        return exc.reason
    return None


def test_a_new_kid_in_the_jwks_is_fetched_on_first_sight(verifier_for, client_keys, jwks_server):
    verifier, path = verifier_for(refetch_seconds=0)
    old, new = client_keys["rsa"], signing.ec_key("ec-2025")
    assert reason(verifier, sign(old, claims(BASE + SERVICE))) is None
    assert jwks_server.fetches[path] == 1
    assert reason(verifier, sign(new, claims(BASE + SERVICE))) == "unknown-kid"
    jwks_server.publish(path, signing.jwks(old, new))  # the client rotates: a new key appears
    assert reason(verifier, sign(new, claims(BASE + SERVICE))) is None
    assert reason(verifier, sign(old, claims(BASE + SERVICE))) is None
    assert jwks_server.fetches[path] == 3


def test_unknown_kids_refetch_at_a_limited_rate(verifier_for, client_keys, jwks_server):
    verifier, path = verifier_for(refetch_seconds=3600)
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) is None
    jwks_server.publish(path, signing.jwks(client_keys["rsa"], client_keys["ec"]))
    for attempt in range(5):
        stranger = signing.rsa_key(f"stranger-{attempt}") if attempt else client_keys["ec"]
        assert reason(verifier, sign(stranger, claims(BASE + SERVICE))) == "unknown-kid"
    assert jwks_server.fetches[path] == 1


def test_a_stale_jwks_drops_retired_keys(verifier_for, client_keys, jwks_server):
    verifier, path = verifier_for(ttl_seconds=0, refetch_seconds=3600)
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) is None
    jwks_server.publish(path, signing.jwks(client_keys["ec"]))  # the old key is withdrawn
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) == "unknown-kid"
    assert reason(verifier, sign(client_keys["ec"], claims(BASE + SERVICE))) is None


def test_a_jwks_outage_keeps_the_last_good_keys(verifier_for, client_keys, jwks_server, caplog):
    verifier, path = verifier_for(ttl_seconds=0)
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) is None
    del jwks_server.documents[path]  # now 404
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) is None
    assert any(r.getMessage() == "jwks fetch failed" for r in caplog.records)


@pytest.mark.parametrize(
    "document",
    [
        lambda jwk: {"keys": jwk},
        lambda jwk: {"keys": [{"kty": "oct", "kid": jwk["kid"], "k": "c2VjcmV0"}]},
        lambda jwk: {"keys": [{**jwk, "d": "c2VjcmV0"}]},
        lambda jwk: {"keys": [jwk], "padding": "x" * 300_000},
    ],
    ids=["not-a-key-set", "symmetric-key", "private-key", "too-large"],
)
def test_an_unusable_jwks_gives_no_keys(verifier_for, client_keys, jwks_server, document):
    verifier, path = verifier_for()
    jwks_server.publish(path, document(client_keys["rsa"].public_jwk()))
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) == "unknown-kid"


def test_a_jwks_unreachable_from_the_start_gives_unknown_kid(client_keys, jwks_server):
    verifier = Verifier([Issuer(ISSUER, jku=(jwks_server.url("/nothing-here.json"),))], **CACHES)
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) == "unknown-kid"


def configured(keys, **entry) -> Verifier:
    return Verifier([Issuer(ISSUER, keys=signing_keys(signing.jwks(*keys), strict=True), **entry)], **CACHES)


def test_a_configured_key_set_works_without_jku(client_keys):
    verifier = configured([client_keys["ec"]])
    assert reason(verifier, sign(client_keys["ec"], claims(BASE + SERVICE))) is None
    assert reason(verifier, sign(client_keys["rsa"], claims(BASE + SERVICE))) == "unknown-kid"


def test_tenants_are_checked_when_listed(client_keys):
    verifier = configured([client_keys["ec"]], tenants=frozenset({"hospital-a"}))
    assert reason(verifier, sign(client_keys["ec"], claims(BASE + SERVICE, tenant="hospital-a"))) is None
    assert reason(verifier, sign(client_keys["ec"], claims(BASE + SERVICE, tenant="hospital-b"))) == "tenant"
    assert reason(verifier, sign(client_keys["ec"], claims(BASE + SERVICE))) == "tenant"


# Times as text are made when the test runs (a callable): made at import, a long run would expire them.
ODD_CLAIMS = {
    "exp-as-string": (lambda: {"exp": str(int(time.time()) + 100)}, "malformed"),
    "iat-as-string": (lambda: {"iat": str(int(time.time()))}, "malformed"),
    "nbf-as-bool": ({"nbf": True}, "malformed"),
    "jti-as-number": ({"jti": 5}, "malformed"),
    "jti-empty": ({"jti": ""}, "missing-claim"),
    "tenant-as-list": ({"tenant": ["hospital-a"]}, "tenant"),
    "aud-as-object": ({"aud": {"url": BASE + SERVICE}}, "audience"),
    "exp-beyond-floats": ({"exp": 10**400}, "lifetime"),
}


@pytest.mark.parametrize(("changes", "expected"), ODD_CLAIMS.values(), ids=ODD_CLAIMS.keys())
def test_odd_claim_types_are_refused_not_crashed_on(client_keys, changes, expected):
    verifier = configured([client_keys["ec"]], tenants=frozenset({"hospital-a"}))
    payload = claims(BASE + SERVICE, tenant="hospital-a") | (changes() if callable(changes) else changes)
    assert reason(verifier, sign(client_keys["ec"], payload)) == expected


ODD_HEADERS = {
    "alg-as-list": ({"alg": ["ES384"]}, "algorithm"),
    "kid-as-object": ({"kid": {"id": "ec-2024"}}, "malformed"),
    "jku-as-list": ({"jku": ["https://ehr.example.org/jwks.json"], "kid": "unpinned"}, "jku-not-allowed"),
    "typ-as-number": ({"typ": 1}, "malformed"),
    "typ-missing": ({"typ": None}, "malformed"),
}


@pytest.mark.parametrize(("changes", "expected"), ODD_HEADERS.values(), ids=ODD_HEADERS.keys())
def test_odd_header_types_are_refused_not_crashed_on(client_keys, changes, expected):
    header = {"alg": "ES384", "typ": "JWT", "kid": "ec-2024"} | changes
    header = {name: value for name, value in header.items() if value is not None}
    token = signing.signing_input(header, claims(BASE + SERVICE)) + ".c2ln"
    assert reason(configured([client_keys["ec"]]), token) == expected


def test_only_the_issuers_algorithms_are_accepted(client_keys):
    """A JWK without `alg` may verify every algorithm of its family; the issuer's list narrows that."""
    jwk = {k: v for k, v in client_keys["rsa"].public_jwk().items() if k != "alg"}
    keys = signing_keys({"keys": [jwk]}, strict=True)
    as_rs256 = signing.SigningKey(client_keys["rsa"].kid, "RS256", client_keys["rsa"].private)
    default = Verifier([Issuer(ISSUER, keys=keys)], **CACHES)
    assert reason(default, sign(as_rs256, claims(BASE + SERVICE))) == "algorithm"
    assert reason(default, sign(client_keys["rsa"], claims(BASE + SERVICE))) is None
    widened = Verifier([Issuer(ISSUER, keys=keys, algorithms=frozenset({"RS256"}))], **CACHES)
    assert reason(widened, sign(as_rs256, claims(BASE + SERVICE))) is None


def test_an_rsa_key_under_2048_bits_is_refused():
    weak = signing.rsa_key("weak", bits=1024)
    with pytest.warns(InsecureKeyLengthWarning):
        token = sign(weak, claims(BASE + SERVICE))
    assert reason(configured([weak]), token) == "weak-key"


def test_the_leeway_allows_small_clock_skew(client_keys):
    now = int(time.time())
    skewed = claims(BASE + SERVICE, iat=now + 20, nbf=now + 20, exp=now - 10 + 300)
    assert reason(configured([client_keys["ec"]]), sign(client_keys["ec"], skewed)) is None
    late = claims(BASE + SERVICE, iat=now - 300, exp=now - 20)
    assert reason(configured([client_keys["ec"]]), sign(client_keys["ec"], late)) is None


def test_the_replay_cache_is_bounded_and_forgets_expired_tokens():
    cache = ReplayCache(capacity=2)
    cache.remember((ISSUER, b"a"), expires_at=100)
    cache.remember((ISSUER, b"b"), expires_at=200)
    assert cache.seen((ISSUER, b"a"), now=50)
    cache.remember((ISSUER, b"c"), expires_at=300)  # full: not kept here; the shared store still refuses it
    assert not cache.seen((ISSUER, b"c"), now=50)
    assert not cache.seen((ISSUER, b"a"), now=150)  # expired and dropped, which makes room
    cache.remember((ISSUER, b"c"), expires_at=300)
    assert cache.seen((ISSUER, b"c"), now=150)
    assert cache.seen((ISSUER, b"b"), now=150)


def write(tmp_path, document) -> str:
    path = tmp_path / "issuers.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


JWK = {"kty": "EC", "crv": "P-384", "kid": "k1", "x": "x", "y": "y"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "Expecting property name"),
        ({}, "JSON object mapping"),
        ({"ehr": {"jku": ["https://ehr/jwks"]}}, "iss must be an http"),
        ({ISSUER: {"jku": ["https://e/jwks"], "tenant": ["a"]}}, "unknown members tenant"),
        ({ISSUER: {"jku": "https://e/jwks"}}, "jku must be a list"),
        ({ISSUER: {"jku": ["ftp://e/jwks"]}}, "every jku must be an http"),
        ({ISSUER: {"jku": ["https://e/jwks"], "algorithms": ["HS256"]}}, "algorithms must be among"),
        ({ISSUER: {"jku": ["https://e/jwks"], "algorithms": ["none"]}}, "algorithms must be among"),
        ({ISSUER: {"jku": ["https://e/jwks"], "tenants": []}}, "at least one tenant"),
        ({ISSUER: {}}, "give jku URLs, a jwks, or both"),
        ({ISSUER: {"jwks": {"keys": []}}}, "JSON Web Key Set with keys"),
        ({ISSUER: {"jwks": {"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}}}, "symmetric"),
        ({ISSUER: {"jwks": {"keys": [{**JWK, "d": "secret"}]}}}, "private"),
        ({ISSUER: {"jwks": {"keys": [{**JWK, "use": "enc"}]}}}, "not for verifying"),
        ({ISSUER: {"jwks": {"keys": [{**JWK, "kid": ""}]}}}, "has no kid"),
        ({ISSUER: {"jwks": {"keys": [JWK]}}}, "cannot be read as a public key"),
    ],
    ids=[
        "not-json",
        "empty",
        "iss-not-url",
        "misspelt-member",
        "jku-not-list",
        "jku-not-http",
        "hmac",
        "none",
        "no-tenants",
        "no-keys",
        "empty-jwks",
        "symmetric-jwk",
        "private-jwk",
        "encryption-jwk",
        "jwk-without-kid",
        "jwk-not-a-point",
    ],
)
def test_a_bad_trusted_issuer_file_refuses_to_start(tmp_path, document, message):
    with pytest.raises(ConfigError, match=f"IMNM_CDS_TRUSTED_ISSUERS: .*{message}"):
        load_issuers(Settings.from_env({"IMNM_CDS_TRUSTED_ISSUERS": write(tmp_path, document)}))


def test_the_trusted_issuer_file_reads_keys_tenants_and_algorithms(tmp_path, client_keys):
    document = {
        ISSUER: {"jwks": signing.jwks(client_keys["ec"]), "algorithms": ["ES384"], "tenants": ["a"]},
        "https://sandbox.cds-hooks.org": {"jku": ["https://sandbox.cds-hooks.org/.well-known/jwks.json"]},
    }
    ehr, sandbox = trusted_issuers(write(tmp_path, document))
    assert set(ehr.keys) == {"ec-2024"} and ehr.algorithms == {"ES384"} and ehr.tenants == {"a"}
    assert sandbox.keys is None and sandbox.algorithms == {"RS384", "ES384"} and sandbox.tenants is None


@pytest.fixture
def issuers_file(tmp_path, client_keys):
    return write(tmp_path, {ISSUER: {"jku": ["https://ehr.example.org/jwks.json"]}})


def test_jwt_mode_needs_issuers_and_a_public_url(issuers_file):
    with pytest.raises(ConfigError, match="needs IMNM_CDS_TRUSTED_ISSUERS and IMNM_CDS_PUBLIC_URL"):
        Settings.from_env({"IMNM_CDS_AUTH": "jwt", "IMNM_CDS_PUBLIC_URL": "https://cds.example.org"})
    with pytest.raises(ConfigError, match="needs IMNM_CDS_TRUSTED_ISSUERS and IMNM_CDS_PUBLIC_URL"):
        Settings.from_env({"IMNM_CDS_AUTH": "jwt", "IMNM_CDS_TRUSTED_ISSUERS": issuers_file})


def test_production_refuses_development_mode_and_plain_http(issuers_file, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("IMNM_CDS_AUTH=jwt (IMNM_CDS_AUTH=off is development")):
        Settings.from_env({"IMNM_CDS_PRODUCTION": "true"})
    secure = {
        "IMNM_CDS_PRODUCTION": "true",
        "IMNM_CDS_AUTH": "jwt",
        "IMNM_CDS_TRUSTED_ISSUERS": issuers_file,
        "IMNM_CDS_PUBLIC_URL": "https://cds.example.org/imnm/",
    }
    assert Settings.from_env(secure).public_url == "https://cds.example.org/imnm"
    with pytest.raises(ConfigError, match=re.escape("https URLs, not http://cds.example.org")):
        Settings.from_env({**secure, "IMNM_CDS_PUBLIC_URL": "http://cds.example.org"})
    plain_jku = write(tmp_path, {ISSUER: {"jku": ["http://ehr.example.org/jwks.json"]}})
    with pytest.raises(ConfigError, match=re.escape("not http://ehr.example.org/jwks.json")):
        load_issuers(Settings.from_env({**secure, "IMNM_CDS_TRUSTED_ISSUERS": plain_jku}))


@pytest.mark.parametrize(
    "environ",
    [
        {"IMNM_CDS_AUTH": "maybe"},
        {"IMNM_CDS_PRODUCTION": "sure"},
        {"IMNM_CDS_PUBLIC_URL": "cds.example.org"},
        {"IMNM_CDS_PUBLIC_URL": "https://cds.example.org/?x=1"},
        {"IMNM_CDS_AUTH_LEEWAY_SECONDS": "3600"},
        {"IMNM_CDS_JWKS_CACHE_SECONDS": "0"},
        {"IMNM_CDS_REPLAY_CACHE_SIZE": "10"},
        {"IMNM_CDS_CORS_ORIGINS": "*, https://sandbox.cds-hooks.org"},
        {"IMNM_CDS_CORS_ORIGINS": "sandbox.cds-hooks.org"},
        {"IMNM_CDS_CORS_ORIGINS": "https://sandbox.cds-hooks.org/app"},
    ],
)
def test_bad_auth_settings_refuse_to_start(environ):
    with pytest.raises(ConfigError, match=next(iter(environ))):
        Settings.from_env(environ)


class Records(logging.Handler):
    """Keep the records of one logger (create_app replaces the root handlers, and caplog's with them)."""

    def __init__(self, name: str):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Records:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def test_development_mode_is_the_default_and_says_so_loudly():
    with Records("service.web.auth") as logged:
        app = create_app()
    warnings = [r for r in logged.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "AUTHENTICATION OFF" in warnings[0].getMessage()
    assert app.test_client().post(SERVICE, json=hook_request()).status_code == 200


def test_debug_mode_is_refused(monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    with pytest.raises(ConfigError, match="debug mode"):
        create_app()


SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"


def test_a_pinned_kid_is_used_whatever_the_jku_and_nothing_is_fetched(client_keys, jwks_server):
    # As the sandbox signs: its own iss and kid, and a jku on every token.
    key = signing.SigningKey(SANDBOX_KID, "ES384", signing.ec_key(SANDBOX_KID).private)
    verifier = Verifier([Issuer(SANDBOX_ISS, keys=signing_keys(signing.jwks(key), strict=True))], **CACHES)
    unlisted = jwks_server.url("/sandbox/.well-known/jwks.json")
    jwks_server.publish("/sandbox/.well-known/jwks.json", signing.jwks(signing.ec_key(SANDBOX_KID)))
    for jku in (SANDBOX_JKU, unlisted):
        token = sign(key, claims(BASE + SERVICE, iss=SANDBOX_ISS), jku=jku)
        assert reason(verifier, token) is None
    assert jwks_server.fetches.get("/sandbox/.well-known/jwks.json", 0) == 0


def test_an_unlisted_jku_with_a_kid_not_pinned_is_refused_unfetched(client_keys, jwks_server):
    verifier = configured([client_keys["ec"]])
    stranger = signing.ec_key("not-pinned")
    jku = jwks_server.publish("/stranger/jwks.json", signing.jwks(stranger))
    assert reason(verifier, sign(stranger, claims(BASE + SERVICE), jku=jku)) == "jku-not-allowed"
    assert jwks_server.fetches.get("/stranger/jwks.json", 0) == 0


def test_a_pinned_kid_signed_by_another_key_is_still_refused(client_keys, jwks_server):
    forged = signing.SigningKey("ec-2024", "ES384", signing.ec_key("ec-2024").private)
    jku = jwks_server.publish("/forger/jwks.json", signing.jwks(forged))
    assert (
        reason(configured([client_keys["ec"]]), sign(forged, claims(BASE + SERVICE), jku=jku)) == "signature"
    )
    assert jwks_server.fetches.get("/forger/jwks.json", 0) == 0


SANDBOX_JWK = {
    "kty": "EC",
    "use": "sig",
    "crv": "P-384",
    "kid": SANDBOX_KID,
    "x": "dw_JGR8nB2I6XveNxUOl2qk699ZPLM2nYI5STSdiEl9avAkrm3CkfYMbrrjr8laB",
    "y": "Sm3mLE-n1zYNla_aiE3cb3nZsL51RbC7ysw3q8aJLxGm-hx79RPMYpITDjp7kgzy",
    "alg": "ES384",
}


@pytest.mark.parametrize(
    "document",
    [
        {SANDBOX_ISS: {"jwks": {"keys": [SANDBOX_JWK]}}},
        {SANDBOX_ISS: {"jku": [SANDBOX_JKU]}},
        {"https://ehr.example.org": {"jku": [SANDBOX_JKU]}},
        {"https://ehr.example.org": {"jwks": {"keys": [SANDBOX_JWK]}}},
    ],
    ids=["sandbox-iss-pinned", "sandbox-iss-jku", "sandbox-jku-another-iss", "sandbox-kid-another-iss"],
)
def test_production_refuses_to_trust_the_sandbox(tmp_path, document):
    secure = {"IMNM_CDS_AUTH": "jwt", "IMNM_CDS_PUBLIC_URL": "https://cds.example.org"}
    sandbox = {**secure, "IMNM_CDS_TRUSTED_ISSUERS": write(tmp_path, document)}
    assert load_issuers(Settings.from_env(sandbox))  # trusted for testing
    with pytest.raises(ConfigError, match=r"refuses to trust .*sandbox's private key is published"):
        load_issuers(Settings.from_env({**sandbox, "IMNM_CDS_PRODUCTION": "true"}))
    with pytest.raises(ConfigError, match="refuses to trust"):
        create_app(
            {
                "production": True,
                "auth": "jwt",
                "trusted_issuers": sandbox["IMNM_CDS_TRUSTED_ISSUERS"],
                "public_url": "https://cds.example.org",
            }
        )
    ehr = write(tmp_path, {ISSUER: {"jku": ["https://ehr.example.org/jwks.json"]}})
    assert load_issuers(
        Settings.from_env({**secure, "IMNM_CDS_PRODUCTION": "true", "IMNM_CDS_TRUSTED_ISSUERS": ehr})
    )
