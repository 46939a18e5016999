"""Trust CDS clients: verify the signed JWT on every call (CDS Hooks 2.0, "Trusting CDS Clients").

https://cds-hooks.hl7.org/2.0/#trusting-cds-clients and the service-side procedure in the spec's
best practices: issuer allow-list, key by `kid` from a configured or allow-listed `jku` key set,
asymmetric signature only, `aud` the exact endpoint URL, `exp`/`iat`/`nbf`, `tenant`, `jti` replay.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt
import requests
from flask import Flask, g, request

from service import metrics
from service.config import ConfigError, Settings
from service.fhir import is_http_url, url_origin
from service.gather.bindings import Caller
from service.outcome import error
from service.store.replay import ReplayStore, ReplayStoreUnavailable
from service.web import scrape, smart

log = logging.getLogger(__name__)

# Health checks are for the platform, not CDS clients; CORS preflights carry no credentials by design.
OPEN_PATHS = frozenset({"/health", "/health/ready", "/explain.css"})  # the page's stylesheet: no data
# /metrics checks its own callers; the SMART app's browser brings no JWT, it authenticates through OAuth.
NO_JWT_PATHS = OPEN_PATHS | {scrape.PATH} | smart.PATHS
DEFAULT_ALGORITHMS = ("RS384", "ES384")  # the spec's RECOMMENDED pair
# Each algorithm is bound to the key type it may verify with, so a token never picks the family.
KEY_ALGORITHMS = {
    ("RSA", None): ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-384"): ("ES384",),
    ("EC", "P-521"): ("ES512",),
}
ASYMMETRIC = frozenset(alg for algs in KEY_ALGORITHMS.values() for alg in algs)
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# The spec's best practice keeps each jti "for the maximum duration of all JWTs ... no more than an hour".
MAX_LIFETIME_SECONDS = 3600
MAX_TOKEN_CHARS = 16_384
MAX_JWKS_BYTES = 256 * 1024
JWKS_TIMEOUT = (3.05, 5)
BEARER = re.compile(r"Bearer +([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)", re.IGNORECASE)
# The CDS Hooks sandbox signs in the browser with a key committed to its repository (keys/ecprivkey.pem).
SANDBOX_HOST, SANDBOX_KID = "sandbox.cds-hooks.org", "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
URL_FOR_LOG = re.compile(r"https?://[A-Za-z0-9.-]+(:\d+)?(/[A-Za-z0-9._~/-]*)?")

# The library's errors as reason codes, most specific first.
DECODE_REASONS = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not-yet-valid"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.MissingRequiredClaimError, "missing-claim"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.InvalidKeyError, "weak-key"),  # an RSA key under 2048 bits, with enforce_minimum_key_length
    (jwt.PyJWTError, "malformed"),
)

# key id -> {algorithm -> key}: every algorithm a key may verify, parsed once.
KeySet = dict[str, dict[str, jwt.PyJWK]]


class Rejected(Exception):
    """A call without a valid token from a trusted client; `reason` is a code safe to log."""

    def __init__(self, reason: str, issuer: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.issuer = issuer


@dataclass(frozen=True, eq=False)
class Issuer:
    """A trusted CDS client: its `iss`, where its keys come from, and what its tokens may carry."""

    iss: str
    jku: tuple[str, ...] = ()
    keys: KeySet | None = None
    algorithms: frozenset[str] = frozenset(DEFAULT_ALGORITHMS)
    tenants: frozenset[str] | None = None


def load_issuers(settings: Settings) -> tuple[Issuer, ...]:
    """Read and check the trusted-issuer file a setting names; a bad file is a ConfigError."""
    if settings.trusted_issuers is None:
        return ()
    try:
        issuers = trusted_issuers(str(settings.trusted_issuers))
    except ValueError as exc:
        raise ConfigError(f"IMNM_CDS_TRUSTED_ISSUERS: {exc}") from None
    settings.require_https(*(url for issuer in issuers for url in issuer.jku))
    public = [issuer.iss for issuer in issuers if _is_sandbox(issuer)]
    if settings.production and public:
        raise ConfigError(
            f"IMNM_CDS_PRODUCTION=true refuses to trust {', '.join(public)}: "
            "the CDS Hooks sandbox's private key is published, so anyone can sign as it"
        )
    return issuers


def _is_sandbox(issuer: Issuer) -> bool:
    """Tell whether an issuer is the CDS Hooks sandbox: by its iss or jku host, or its published kid."""
    hosts = {url_origin(url)[1] for url in (issuer.iss, *issuer.jku) if url_origin(url)}
    return SANDBOX_HOST in hosts or SANDBOX_KID in (issuer.keys or {})


def trusted_issuers(text: str) -> tuple[Issuer, ...]:
    """Read the trusted-issuer file (JSON: iss -> {jku, jwks, algorithms, tenants}); empty text: none."""
    if not text:
        return ()
    try:
        document = json.loads(Path(text).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {text}: {type(exc).__name__}") from None
    if not isinstance(document, dict) or not document:
        raise ValueError("must be a JSON object mapping each trusted iss to its keys")
    return tuple(_issuer(iss, entry) for iss, entry in document.items())


def _issuer(iss: str, entry) -> Issuer:
    where = f"issuer {iss!r}"
    if not is_http_url(iss):
        raise ValueError(f"{where}: iss must be an http(s) URL")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be an object")
    # An unknown member is refused: a misspelt "tenant" must not silently drop the tenant check.
    unknown = set(entry) - {"jku", "jwks", "algorithms", "tenants"}
    if unknown:
        raise ValueError(f"{where}: unknown members {', '.join(sorted(unknown))}")
    jku = _strings(entry.get("jku", []), f"{where}: jku")
    if not all(is_http_url(url) for url in jku):
        raise ValueError(f"{where}: every jku must be an http(s) URL")
    algorithms = _strings(entry.get("algorithms", DEFAULT_ALGORITHMS), f"{where}: algorithms")
    if not algorithms or not set(algorithms) <= ASYMMETRIC:
        raise ValueError(f"{where}: algorithms must be among {', '.join(sorted(ASYMMETRIC))}")
    try:
        keys = signing_keys(entry["jwks"], strict=True) if "jwks" in entry else None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not jku and not keys:
        raise ValueError(f"{where}: give jku URLs, a jwks, or both")
    tenants = None
    if "tenants" in entry:
        tenants = frozenset(_strings(entry["tenants"], f"{where}: tenants"))
        if not tenants:
            raise ValueError(f"{where}: tenants, when given, must list at least one tenant")
    return Issuer(iss, tuple(jku), keys, frozenset(algorithms), tenants)


def _strings(value, where: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return list(value)


def signing_keys(jwks, strict: bool = False) -> KeySet:
    """Index a JWK Set's public signing keys by kid; others are left out, or refused when `strict`."""
    members = jwks.get("keys") if isinstance(jwks, dict) else None
    if strict and (not isinstance(members, list) or not members):
        raise ValueError("jwks must be a JSON Web Key Set with keys")
    keys: KeySet = {}
    for index, jwk in enumerate(members if isinstance(members, list) else []):
        try:
            kid, by_algorithm = _verifying_key(jwk)
            if kid in keys:
                raise ValueError("repeats a kid")
        except ValueError as exc:
            if strict:
                raise ValueError(f"jwks.keys[{index}] {exc}") from None
            continue
        keys[kid] = by_algorithm
    return keys


def _verifying_key(jwk) -> tuple[str, dict[str, jwt.PyJWK]]:
    """Read a JWK as a public signing key: its kid and a key per algorithm it may verify."""
    if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
        raise ValueError("has no kid")
    if PRIVATE_MEMBERS & set(jwk):
        raise ValueError("holds private or symmetric key material")
    if jwk.get("use", "sig") != "sig" or "verify" not in jwk.get("key_ops", ["verify"]):
        raise ValueError("is not for verifying signatures")
    kind = (jwk.get("kty"), jwk.get("crv") if jwk.get("kty") == "EC" else None)
    algorithms = [alg for alg in KEY_ALGORITHMS.get(kind, ()) if jwk.get("alg", alg) == alg]
    if not algorithms:
        raise ValueError("is not an RSA or EC (P-256, P-384, P-521) key for a supported algorithm")
    try:
        return jwk["kid"], {alg: jwt.PyJWK(jwk, algorithm=alg) for alg in algorithms}
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError):
        raise ValueError("cannot be read as a public key") from None


class RemoteKeySets:
    """JWK Sets from allow-listed jku URLs: cached, fetched again for an unknown kid, at a limited rate."""

    def __init__(
        self,
        urls: Iterable[str],
        ttl_seconds: float,
        refetch_seconds: float,
    ):
        self.ttl_seconds = ttl_seconds
        self.refetch_seconds = refetch_seconds
        self._locks = {url: threading.Lock() for url in urls}
        self._cached: dict[str, tuple[float, KeySet]] = {}  # url -> (checked at, keys)

    def find(self, url: str, kid: str) -> dict[str, jwt.PyJWK] | None:
        """Return the key `kid` published at `url`, fetching the set when stale or when `kid` is new."""
        if self._due(url, kid):
            with self._locks[url]:
                if self._due(url, kid):  # another thread may have fetched it while we waited
                    self._refresh(url)
        return self._cached[url][1].get(kid)

    def _due(self, url: str, kid: str) -> bool:
        if url not in self._cached:
            return True
        checked, keys = self._cached[url]
        age = time.monotonic() - checked
        return age >= self.ttl_seconds or (kid not in keys and age >= self.refetch_seconds)

    def _refresh(self, url: str) -> None:
        previous = self._cached.get(url, (0.0, {}))[1]
        try:
            keys = signing_keys(_fetch_json(url))
        except (requests.RequestException, ValueError, RecursionError) as exc:
            # Keep the last good keys: a JWKS outage should not lock out clients whose keys we hold.
            log.warning("jwks fetch failed", extra={"fields": {"jku": url, "error": type(exc).__name__}})
            keys = previous
        else:
            log.info("jwks fetched", extra={"fields": {"jku": url, "kids": sorted(keys)}})
        self._cached[url] = (time.monotonic(), keys)


def _fetch_json(url: str):
    with requests.get(
        url,
        timeout=JWKS_TIMEOUT,
        stream=True,
        allow_redirects=False,
        headers={"Accept": "application/json"},
    ) as response:
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        body = b""
        for chunk in response.iter_content(16_384):
            body += chunk
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWK Set too large")
    return json.loads(body)


class ReplayCache:
    """The jti of tokens this process accepted, each kept until its token expires; bounded in entries.

    It only refuses early what this process has seen: the replay store decides for every process.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._expiry: dict[tuple[str, bytes], float] = {}
        self._queue: list[tuple[float, tuple[str, bytes]]] = []  # heap by expiry
        self._lock = threading.Lock()

    def seen(self, key: tuple[str, bytes], now: float) -> bool:
        """Tell whether this process accepted this token id and its token has not expired."""
        with self._lock:
            while self._queue and self._queue[0][0] <= now:
                del self._expiry[heapq.heappop(self._queue)[1]]
            return key in self._expiry

    def remember(self, key: tuple[str, bytes], expires_at: float) -> None:
        """Keep this token id until it expires; when full, keep nothing more (the store still refuses)."""
        with self._lock:
            if key not in self._expiry and len(self._expiry) < self.capacity:
                self._expiry[key] = expires_at
                heapq.heappush(self._queue, (expires_at, key))


class Verifier:
    """Check a bearer JWT against the trusted issuers, for one endpoint URL (the audience)."""

    def __init__(
        self,
        issuers: Iterable[Issuer],
        *,
        leeway_seconds: float,
        jwks_ttl_seconds: float,
        jwks_refetch_seconds: float,
        replay_capacity: int,
        replay_store: ReplayStore | None = None,
    ):
        self.issuers = {issuer.iss: issuer for issuer in issuers}
        self.leeway = leeway_seconds
        self.remote = RemoteKeySets(
            {url for issuer in self.issuers.values() for url in issuer.jku},
            jwks_ttl_seconds,
            jwks_refetch_seconds,
        )
        self.replays = ReplayCache(replay_capacity)
        # Without a store (tests of the other checks), only this process's own memory refuses replays.
        self.store = replay_store

    def verify(self, authorization: str | None, audience: str) -> dict:
        """Return the token's claims, or raise Rejected with a reason code."""
        token = _bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Rejected("malformed") from None
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Rejected(
                "unknown-issuer", iss if isinstance(iss, str) and URL_FOR_LOG.fullmatch(iss) else None
            )
        key = self._key(issuer, header)
        claims = self._decode(token, key, audience, issuer)
        # NumericDate is a JSON number (RFC 7519 §2); the library also accepts numeric strings.
        times = [claims[name] for name in ("exp", "iat", "nbf") if name in claims]
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise Rejected("malformed", issuer.iss)
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise Rejected("missing-claim", issuer.iss)
        now = time.time()
        if claims["exp"] > now + MAX_LIFETIME_SECONDS + self.leeway:
            raise Rejected("lifetime", issuer.iss)
        tenant = claims.get("tenant")
        if issuer.tenants is not None and not (isinstance(tenant, str) and tenant in issuer.tenants):
            raise Rejected("tenant", issuer.iss)
        # A digest keeps every entry the same small size, however long the client's jti.
        jti = hashlib.sha256(claims["jti"].encode()).digest()
        expires_at = claims["exp"] + self.leeway
        if self.replays.seen((issuer.iss, jti), now):
            raise Rejected("replayed", issuer.iss)
        # One atomic insert-if-absent decides, whichever worker or instance the token reaches first.
        first = self.store is None or self.store.first_use(issuer.iss, jti, expires_at, now)
        self.replays.remember((issuer.iss, jti), expires_at)
        if not first:
            raise Rejected("replayed", issuer.iss)
        return claims

    def _key(self, issuer: Issuer, header: dict) -> jwt.PyJWK:
        """Find the key the header names, for the algorithm it names, among this issuer's keys only."""
        alg, kid, jku = header.get("alg"), header.get("kid"), header.get("jku")
        if str(header.get("typ", "")).upper() != "JWT" or "crit" in header:
            raise Rejected("malformed", issuer.iss)
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise Rejected("algorithm", issuer.iss)
        if not isinstance(kid, str) or not kid:
            raise Rejected("no-kid", issuer.iss)
        pinned = (issuer.keys or {}).get(kid)
        if pinned is not None:  # a pinned key is the key, whatever jku says: nothing is fetched
            found = pinned
        elif jku is not None:
            # Checked before any fetch: an attacker's jku is never requested.
            if jku not in issuer.jku:
                raise Rejected("jku-not-allowed", issuer.iss)
            found = self.remote.find(jku, kid)
        else:
            found = next((keys for url in issuer.jku if (keys := self.remote.find(url, kid))), None)
        if found is None:
            raise Rejected("unknown-kid", issuer.iss)
        if alg not in found:
            raise Rejected("algorithm", issuer.iss)
        return found[alg]

    def _decode(self, token: str, key: jwt.PyJWK, audience: str, issuer: Issuer) -> dict:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                audience=audience,
                issuer=issuer.iss,
                leeway=self.leeway,
                options={
                    "require": ["iss", "aud", "exp", "iat", "jti"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.PyJWTError as exc:
            reason = next(code for kind, code in DECODE_REASONS if isinstance(exc, kind))
            raise Rejected(reason, issuer.iss) from None


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Rejected("missing")
    match = BEARER.fullmatch(authorization.strip())
    if match is None or len(match.group(1)) > MAX_TOKEN_CHARS:
        raise Rejected("malformed")
    return match.group(1)


def protect(app: Flask, settings: Settings) -> None:
    """Require a trusted client's JWT on every route but the open ones, or warn that nothing is checked."""
    if settings.auth == "off":
        log.warning(
            "AUTHENTICATION OFF: IMNM_CDS_AUTH=off trusts every caller; development only, never on a network",
            extra={"fields": {"mode": "development"}},
        )
        return
    store = ReplayStore(settings.database_url, settings.replay_store_timeout_ms / 1000)
    app.extensions["imnm_cds_replays"] = store
    verifier = Verifier(
        load_issuers(settings),
        leeway_seconds=settings.auth_leeway_seconds,
        jwks_ttl_seconds=settings.jwks_cache_seconds,
        jwks_refetch_seconds=settings.jwks_refetch_seconds,
        replay_capacity=settings.replay_cache_size,
        replay_store=store,
    )
    log.info(
        "authentication on",
        extra={"fields": {"issuers": sorted(verifier.issuers), "publicUrl": settings.public_url}},
    )

    @app.before_request
    def authenticate():
        if request.method == "OPTIONS" or request.path in NO_JWT_PATHS:
            return
        try:
            claims = verifier.verify(request.headers.get("Authorization"), settings.public_url + request.path)
        except Rejected as exc:
            log.warning("unauthorized", extra={"fields": {"reason": exc.reason, "issuer": exc.issuer}})
            # The spec: "HTTP 401 Unauthorized ... without any additional information".
            metrics.jwt_refusals.labels(exc.reason).inc()
            raise error(401, "login", "unauthorized", reason=f"jwt-{exc.reason}") from None
        except ReplayStoreUnavailable:
            # Fail closed: a token that cannot be recorded could be replayed. Logged and counted by the store.
            raise error(
                503, "transient", "the token could not be checked for replay; retry", reason="replay-store"
            ) from None
        tenant = claims.get("tenant")
        g.imnm_cds_caller = Caller(claims["iss"], tenant if isinstance(tenant, str) else None)


def caller() -> Caller | None:
    """Return the CDS client whose JWT this call carried; None with authentication off (no one verified)."""
    return g.get("imnm_cds_caller")
