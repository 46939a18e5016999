"""Know which FHIR servers we hold a backend client for, and which CDS clients may have us fetch with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from service import hooks
from service.config import ConfigError, Settings
from service.fhir import is_http_url, within
from service.gather.backend import AccessError, BackendClient, ClientKey, ServerToken

MEMBERS = frozenset({"client_id", "private_key", "algorithm", "cds_clients"})
# One token per server reads every type any of our services prefetches, so it is shared by all of them.
READ_TYPES = frozenset(key.resource_type for service in hooks.SERVICES.values() for key in service.prefetch)


@dataclass(frozen=True)
class Caller:
    """The CDS client that called, as its verified JWT names it: `iss`, and `tenant` if it has one."""

    iss: str
    tenant: str | None = None


@dataclass(frozen=True)
class BackendServer:
    """A FHIR server we hold a backend client for, and the CDS clients bound to it."""

    base: str
    token: ServerToken
    callers: frozenset[Caller]


class Bindings:
    """The backend servers of the setting, each found by its exact base URL."""

    def __init__(self, servers: tuple[BackendServer, ...] = ()):
        self.servers = {server.base: server for server in servers}

    def credentials(self, base: str | None, caller: Caller | None) -> ServerToken | None:
        """Return our token source for this server if the caller is bound to it; None for anyone else."""
        server = self.servers.get((base or "").rstrip("/"))
        if server is None or caller is None or caller not in server.callers:
            return None
        return server.token


def load(settings: Settings) -> Bindings:
    """Read the backend-client file a setting names; a bad file or key is a ConfigError."""
    if settings.backend_clients is None:
        return Bindings()
    try:
        servers = backend_servers(settings.backend_clients)
        for server in servers:
            if not any(within(server.base, allowed) for allowed in settings.fhir_servers):
                raise ValueError(f"{server.base} is not one of IMNM_CDS_FHIR_SERVERS")
    except (ValueError, AccessError) as exc:
        raise ConfigError(f"IMNM_CDS_BACKEND_CLIENTS: {exc}") from None
    settings.require_https(*(server.base for server in servers))
    return Bindings(servers)


def backend_servers(path: Path) -> tuple[BackendServer, ...]:
    """Read the file: {base: {client_id, private_key, algorithm?, cds_clients: [{iss, tenant?}]}}."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}") from None
    if not isinstance(document, dict) or not document:
        raise ValueError("must be a JSON object mapping each FHIR server base URL to its backend client")
    return tuple(_server(base, entry, path.parent) for base, entry in document.items())


def _server(base: str, entry, folder: Path) -> BackendServer:
    where = f"server {base!r}"
    parts = urlsplit(base)
    if not is_http_url(base) or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"{where}: must be an http(s) base URL without query, fragment or credentials")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be an object")
    # An unknown member is refused: a misspelt "tenant" must not silently bind every tenant.
    unknown = set(entry) - MEMBERS
    if unknown:
        raise ValueError(f"{where}: unknown members {', '.join(sorted(unknown))}")
    client_id, key_path = entry.get("client_id"), entry.get("private_key")
    if not isinstance(client_id, str) or not client_id or not isinstance(key_path, str) or not key_path:
        raise ValueError(f"{where}: client_id and private_key (a PEM file) are required")
    key_file = folder / key_path  # relative to the file's own folder
    if not key_file.is_file():
        raise ValueError(f"{where}: private_key {key_file} is not a file")
    key = ClientKey.load(key_file)
    if entry.get("algorithm", key.alg) != key.alg:
        raise ValueError(f"{where}: the key signs {key.alg}, not {entry['algorithm']!r}")
    callers = entry.get("cds_clients")
    if not isinstance(callers, list) or not callers:
        raise ValueError(f"{where}: cds_clients must list at least one CDS client")
    client = BackendClient(client_id, key)
    base = base.rstrip("/")
    bound = frozenset(_caller(where, c) for c in callers)
    return BackendServer(base, client.auth(base, set(READ_TYPES)), bound)


def _caller(where: str, entry) -> Caller:
    if not isinstance(entry, dict) or set(entry) - {"iss", "tenant"}:
        raise ValueError(f"{where}: each CDS client is an object with iss and optionally tenant")
    iss, tenant = entry.get("iss"), entry.get("tenant")
    if not isinstance(iss, str) or not is_http_url(iss):
        raise ValueError(f"{where}: a CDS client's iss must be an http(s) URL")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise ValueError(f"{where}: a CDS client's tenant, when given, must be a non-empty string")
    return Caller(iss, tenant)
