"""Get SMART Backend Services access tokens: a signed client assertion exchanged for a bearer token."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART asks for exp no more than five minutes ahead; a minute less leaves room for clock skew.
ASSERTION_LIFETIME = 240
RENEW_BEFORE = 60  # seconds before expiry a token is renewed, so no request goes out on a dying one
TIMEOUT = (5, 30)  # connect, read (seconds)


class AccessError(Exception):
    """A token could not be had (the message says why; it never holds a key, assertion or token)."""


@dataclass(frozen=True)
class ClientKey:
    """The private key a backend client signs its assertions with."""

    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    alg: str

    @classmethod
    def load(cls, path: Path) -> ClientKey:
        """Read an unencrypted PEM private key: RSA (2048 bits or more) signs RS384, EC P-384 signs ES384."""
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise AccessError(f"{path} is not an unencrypted PEM private key") from None
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
            return cls(key, "RS384")
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
            return cls(key, "ES384")
        raise AccessError(f"{path} must hold an RSA key of 2048 bits or more, or an EC P-384 key")

    def public_jwk(self) -> dict:
        """Return the public key as a JWK, named by its RFC 7638 thumbprint."""
        jwk = jwt.get_algorithm_by_name(self.alg).to_jwk(self.private.public_key(), as_dict=True)
        members = {name: jwk[name] for name in ("crv", "e", "kty", "n", "x", "y") if name in jwk}
        digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
        kid = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return {**jwk, "kid": kid, "alg": self.alg, "use": "sig", "key_ops": ["verify"]}

    def jwks(self) -> dict:
        """Return the JWK Set to register with the EHR."""
        return {"keys": [self.public_jwk()]}


class BackendClient:
    """One registered backend client (id and key), with a token per FHIR server it talks to."""

    def __init__(self, client_id: str, key: ClientKey, session: requests.Session | None = None):
        self.client_id = client_id
        self.key = key
        self.kid = key.public_jwk()["kid"]
        self.session = session or requests.Session()
        self._servers: dict[tuple[str, frozenset[str]], ServerToken] = {}
        self._lock = threading.Lock()

    def auth(self, base: str, resource_types: set[str], write: bool = False) -> ServerToken:
        """Return the token source for a FHIR server and the resource types to read (or write) there."""
        scopes = (base.rstrip("/"), frozenset(f"{t}:{'w' if write else 'r'}" for t in resource_types))
        with self._lock:
            if scopes not in self._servers:
                self._servers[scopes] = ServerToken(self, scopes[0], resource_types, write)
            return self._servers[scopes]

    def assertion(self, audience: str) -> str:
        """Sign a one-use client assertion for a token endpoint."""
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key.private, self.key.alg, headers={"kid": self.kid, "typ": "JWT"})


class ServerToken(requests.auth.AuthBase):
    """Sign requests to one FHIR server with a Backend Services token, renewed before it expires."""

    def __init__(self, client: BackendClient, base: str, resource_types: set[str], write: bool):
        self.client = client
        self.base = base
        self.resource_types = sorted(resource_types)
        self.write = write
        self._configuration: dict | None = None
        self._token: tuple[str, float, float] | None = None  # token, monotonic times it was asked, renew by
        self._lock = threading.Lock()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request

    def configuration(self) -> dict:
        """Return the server's SMART configuration (.well-known/smart-configuration), read once."""
        if self._configuration is None:
            url = f"{self.base}/.well-known/smart-configuration"
            try:
                response = self.client.session.get(
                    url, headers={"Accept": "application/json"}, timeout=TIMEOUT
                )
            except requests.RequestException as exc:
                raise AccessError(f"cannot read {url}: {type(exc).__name__}") from None
            document = _json(response)
            if response.status_code != 200 or not isinstance(document, dict):
                raise AccessError(f"{url} answered HTTP {response.status_code}, not a SMART configuration")
            if not isinstance(document.get("token_endpoint"), str):
                raise AccessError(f"{url} names no token_endpoint: the server offers no backend services")
            self._configuration = document
        return self._configuration

    def scope(self) -> str:
        """Return the scopes to ask for: SMART v2 (rs, cu) where the server offers them, else v1."""
        v2 = "permission-v2" in (self.configuration().get("capabilities") or [])
        access = ("cu" if v2 else "write") if self.write else ("rs" if v2 else "read")
        return " ".join(f"system/{kind}.{access}" for kind in self.resource_types)

    def token(self) -> str:
        """Return a token good for at least another minute, asking the token endpoint when needed."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._token[2]:
                self._token = self._request_token()
            return self._token[0]

    def renew(self, issued_before: float = math.inf) -> None:
        """Forget the token (the server refused it before its time), unless asked for since issued_before."""
        with self._lock:
            if self._token is not None and self._token[1] < issued_before:
                self._token = None

    def _request_token(self) -> tuple[str, float, float]:
        endpoint = self.configuration()["token_endpoint"]
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope(),
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.client.assertion(endpoint),
        }
        asked = time.monotonic()
        try:
            response = self.client.session.post(
                endpoint, data=form, headers={"Accept": "application/json"}, timeout=TIMEOUT
            )
        except requests.RequestException as exc:
            raise AccessError(f"cannot reach the token endpoint {endpoint}: {type(exc).__name__}") from None
        answer = _json(response)
        answer = answer if isinstance(answer, dict) else {}
        if response.status_code != 200:
            reason = " ".join(str(answer.get(k, ""))[:200] for k in ("error", "error_description")).strip()
            raise AccessError(
                f"the token endpoint refused client {self.client.client_id!r} "
                f"(HTTP {response.status_code}{': ' + reason if reason else ''})"
            )
        token, lifetime = answer.get("access_token"), answer.get("expires_in", 300)
        if not isinstance(token, str) or not token or not isinstance(lifetime, int | float):
            raise AccessError("the token endpoint answered without an access_token")
        return token, asked, asked + max(lifetime - RENEW_BEFORE, lifetime / 2)


def _json(response: requests.Response):
    try:
        return response.json()
    except ValueError:
        return None
