"""A CDS client for tests: keys made here, a JWK Set served over loopback HTTP, and the tokens it signs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://ehr.example.org"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: object

    def public_jwk(self) -> dict:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def rsa_key(kid: str, alg: str = "RS384", bits: int = 2048) -> SigningKey:
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=bits))


def ec_key(kid: str, alg: str = "ES384") -> SigningKey:
    curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
    return SigningKey(kid, alg, ec.generate_private_key(curve))


def jwks(*keys: SigningKey) -> dict:
    return {"keys": [key.public_jwk() for key in keys]}


def claims(aud: str, iss: str = ISSUER, lifetime: int = 300, **overrides) -> dict:
    """The payload a CDS client sends: CDS Hooks 2.0 required claims, valid now."""
    now = int(time.time())
    return {"iss": iss, "aud": aud, "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4()), **overrides}


def sign(key: SigningKey, payload: dict, **header) -> str:
    return jwt.encode(
        payload, key.private, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT", **header}
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signing_input(header: dict, payload: dict) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


def forge_hs256(public_pem: bytes, payload: dict, kid: str) -> str:
    """The algorithm-confusion attack: an HMAC 'signature' keyed with the issuer's public key."""
    unsigned_part = signing_input({"alg": "HS256", "typ": "JWT", "kid": kid}, payload)
    mac = hmac.new(public_pem, unsigned_part.encode(), hashlib.sha256).digest()
    return f"{unsigned_part}.{b64(mac)}"


def unsigned(payload: dict, kid: str) -> str:
    """A token with alg none and an empty signature."""
    return signing_input({"alg": "none", "typ": "JWT", "kid": kid}, payload) + "."


def tamper(token: str, **changes) -> str:
    """Change claims in a signed token, keeping its header and signature."""
    header, payload, signature = token.split(".")
    claims_ = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{b64(json.dumps({**claims_, **changes}).encode())}.{signature}"


@dataclass
class JwksServer:
    """A real HTTP server on loopback publishing JWK Sets by path, counting the fetches of each."""

    documents: dict[str, dict] = field(default_factory=dict)
    fetches: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> JwksServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.fetches[self.path] = server.fetches.get(self.path, 0) + 1
                document = server.documents.get(self.path)
                body = json.dumps(document).encode()
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}{path}"

    def publish(self, path: str, document: dict) -> str:
        self.documents[path] = document
        return self.url(path)
