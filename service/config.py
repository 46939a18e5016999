"""Settings from IMNM_CDS_* environment variables, checked when the service starts."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

PREFIX = "IMNM_CDS_"
TEST_PREFIX = PREFIX + "TEST_"  # read by the test suite only, never by the service
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting is missing or out of range; the service refuses to start."""


def _number(kind: type, low: float, high: float) -> Callable[[str], float]:
    form = f"{'a whole number' if kind is int else 'a number'} from {low} to {high}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number; give {form}") from None
        if not low <= value <= high:
            raise ValueError(f"{text!r} is out of range; give {form}")
        return value

    return parse


def _level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _file(text: str) -> Path | None:
    if not text:
        return None
    path = Path(text)
    if not path.is_file():
        raise ValueError("must name an existing file")
    return path


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text.lower()

    return parse


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("must be true or false")
    return text.lower() in ("true", "1", "yes")


def _base_url(text: str) -> str | None:
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("must be an absolute http(s) URL without query or fragment")
    return text.rstrip("/")


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    if "*" in origins and len(origins) > 1:
        raise ValueError("* allows every origin; list origins or give * alone")
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
            raise ValueError(f"{origin!r} is not an origin such as https://sandbox.cds-hooks.org")
    return origins


def _database_url(text: str) -> str:
    try:
        url = make_url(text)
    except ArgumentError:
        raise ValueError("must be a database URL, e.g. postgresql://user:password@host/db") from None
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        raise ValueError("must be sqlite:///<file> or postgresql://…")
    return text


def _base_urls(text: str) -> tuple[str, ...]:
    """Parse base URLs separated by spaces or commas, each one host's, without credentials."""
    urls = tuple(_base_url(url) for url in text.replace(",", " ").split())
    for url in urls:
        parts = urlsplit(url)
        if parts.username is not None or not parts.hostname:
            raise ValueError(f"{url!r} must name a host, without credentials")
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    return urls


def _names(text: str) -> tuple[str, ...]:
    return tuple(sorted({name.strip() for name in text.split(",") if name.strip()}))


def _networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    try:
        return tuple(ip_network(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"must be IP addresses or networks, e.g. 10.0.0.0/8: {exc}") from None


def about(parse: Callable[[str], object], doc: str) -> dict:
    """Describe a setting: how its environment text is parsed and checked, and what it is for."""
    return {"parse": parse, "doc": doc}


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = field(
        default=5 * 1024 * 1024,
        metadata=about(
            _number(int, 1024, 512 * 1024 * 1024), "Largest request body accepted; larger gets 413."
        ),
    )
    max_json_depth: int = field(
        default=64, metadata=about(_number(int, 8, 512), "Deepest JSON nesting accepted; deeper gets 400.")
    )
    engine_sessions: int = field(
        default=32,
        metadata=about(
            _number(int, 1, 512), "Rule-engine sessions one process runs at once (the engine breaks at 1024)."
        ),
    )
    engine_wait_seconds: float = field(
        default=2.0,
        metadata=about(
            _number(float, 0.0, 60.0), "How long a request waits for a free engine session before a 503."
        ),
    )
    knowledge_overrides: Path | None = field(
        default=None,
        metadata=about(
            _file, "A TOML file of local values for cited parameters in rules/, each with its own source."
        ),
    )
    database_url: str = field(
        default="sqlite:///imnm-cds.sqlite",
        metadata=about(
            _database_url,
            "Where feedback and issued cards are stored: a SQLite file, or PostgreSQL (psycopg 3).",
        ),
    )
    log_level: str = field(default="INFO", metadata=about(_level, "DEBUG, INFO, WARNING or ERROR."))
    auth: str = field(
        default="off",
        metadata=about(
            _choice("off", "jwt"),
            "`jwt`: every call but `/health*` and `/metrics` needs a signed JWT from a trusted CDS client. "
            "`off`: development mode, nothing is checked (logged as a warning at start-up).",
        ),
    )
    production: bool = field(
        default=False,
        metadata=about(
            _flag, "`true` refuses to start unless `IMNM_CDS_AUTH=jwt` and every configured URL is https."
        ),
    )
    public_url: str | None = field(
        default=None,
        metadata=about(
            _base_url,
            "The service's base URL as clients call it (behind a proxy, the proxy's); "
            "a token's `aud` must be this plus the path called. Needed with `IMNM_CDS_AUTH=jwt`.",
        ),
    )
    trusted_issuers: Path | None = field(
        default=None,
        metadata=about(
            _file,
            "A JSON file of the trusted CDS clients: each `iss` with its `jku` URLs and/or `jwks`, "
            "and optionally `algorithms` and `tenants`. Needed with `IMNM_CDS_AUTH=jwt`.",
        ),
    )
    auth_leeway_seconds: int = field(
        default=60,
        metadata=about(_number(int, 0, 300), "Clock skew allowed when checking `exp`, `iat` and `nbf`."),
    )
    jwks_cache_seconds: int = field(
        default=300,
        metadata=about(_number(int, 10, 86400), "How long a JWK Set fetched from a `jku` is used."),
    )
    jwks_refetch_seconds: int = field(
        default=30,
        metadata=about(
            _number(int, 0, 3600),
            "Least time between two fetches of one `jku` when a token names a `kid` not in its set.",
        ),
    )
    replay_cache_size: int = field(
        default=100_000,
        metadata=about(
            _number(int, 100, 10_000_000),
            "Token ids (`jti`) a process keeps to refuse its own replays early; the shared store decides.",
        ),
    )
    replay_store_timeout_ms: int = field(
        default=250,
        metadata=about(
            _number(int, 10, 10_000),
            "Longest wait for the replay store (the database) on a call; then 503, and nothing is answered.",
        ),
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata=about(
            _origins,
            "Comma-separated origins of browser-based CDS clients allowed by CORS, "
            "e.g. `https://sandbox.cds-hooks.org`; `*` for any.",
        ),
    )
    fhir_servers: tuple[str, ...] = field(
        default=(),
        metadata=about(
            _base_urls,
            "FHIR server base URLs (space- or comma-separated) the service may fetch from; a request that "
            "needs a fetch from any other `fhirServer` gets 403 and nothing is contacted.",
        ),
    )
    backend_clients: Path | None = field(
        default=None,
        metadata=about(
            _file,
            "A JSON file naming, per FHIR server base, our SMART backend client (`client_id`, "
            "`private_key`, `algorithm`) and the CDS clients (`iss`, `tenant`) whose calls without "
            '`fhirAuthorization` may be fetched with it (README, "Fetching with our own credentials").',
        ),
    )
    fhir_allow_http: bool = field(
        default=False,
        metadata=about(_flag, "Allow `http://` FHIR servers (development only); otherwise `https` only."),
    )
    deadline_ms: int = field(
        default=400,
        metadata=about(
            _number(int, 50, 60_000),
            "Time a CDS Hooks call has to answer; once spent, it answers with the cards it has, or none.",
        ),
    )
    fetch_budget_ms: int = field(
        default=250,
        metadata=about(
            _number(int, 10, 60_000),
            "Part of the deadline fetching may take; keys not fetched by then count as unknown.",
        ),
    )
    fetch_connect_timeout_ms: int = field(
        default=200,
        metadata=about(_number(int, 10, 60_000), "Connect timeout of one call to a FHIR server."),
    )
    fetch_read_timeout_ms: int = field(
        default=250,
        metadata=about(
            _number(int, 10, 60_000), "Read timeout of one call to a FHIR server (between bytes)."
        ),
    )
    fetch_max_pages: int = field(
        default=10,
        metadata=about(_number(int, 1, 1000), "Most pages (`next` links) fetched for one prefetch key."),
    )
    fetch_max_resources: int = field(
        default=1000,
        metadata=about(_number(int, 1, 100_000), "Most resources fetched for one prefetch key."),
    )
    fetch_threads: int = field(
        default=12,
        metadata=about(_number(int, 1, 16), "Prefetch keys one request fetches at once."),
    )
    prefetch_failure: str = field(
        default="fetch",
        metadata=about(
            _choice("fail", "omit", "fetch"),
            "What a prefetch key the client reports as failed (an OperationOutcome) gets: `fail` (412), "
            "`omit` (unknown; 412 if required) or `fetch` (fetched from `fhirServer` as if missing).",
        ),
    )
    port: int = field(
        default=8080,
        metadata=about(_number(int, 0, 65535), "Port `imnm-cds serve` listens on (0: any free port)."),
    )
    workers: int = field(
        default=2, metadata=about(_number(int, 1, 64), "Processes `imnm-cds serve` runs (gunicorn workers).")
    )
    threads: int = field(
        default=4, metadata=about(_number(int, 1, 64), "Threads each worker answers calls with.")
    )
    disabled_rules: tuple[str, ...] = field(
        default=(),
        metadata=about(
            _names,
            "Comma-separated rule ids (e.g. `statin.ck_persists_after_stop`) whose conclusions and cards "
            "are switched off; an unknown id refuses the start. Logged at start-up and in `/health/ready`.",
        ),
    )
    metrics_addresses: tuple[IPv4Network | IPv6Network, ...] = field(
        default=(),
        metadata=about(
            _networks,
            "With `IMNM_CDS_AUTH=jwt`: the addresses or networks (comma-separated) `GET /metrics` answers.",
        ),
    )
    metrics_token_file: Path | None = field(
        default=None,
        metadata=about(
            _file,
            "With `IMNM_CDS_AUTH=jwt`: a file holding a secret that also opens `GET /metrics` when sent as "
            "`Authorization: Bearer <secret>`.",
        ),
    )

    smart_client_id: str = field(
        default="",
        metadata=about(
            str.strip,
            "The client id the EHR registered for the SMART app (the explanation page opened from a card); "
            "setting it turns the app on, and every card gets a link to `/smart/launch`.",
        ),
    )
    smart_redirect_url: str | None = field(
        default=None,
        metadata=about(
            _base_url,
            "The redirect URL registered with the EHR: `<public URL>/smart/redirect`. Needed with the app.",
        ),
    )
    smart_state_key_file: Path | None = field(
        default=None,
        metadata=about(
            _file,
            "A file holding the secret (32 bytes or more) that signs the launch's state cookie; the same "
            "file for every worker and instance. Needed with the app.",
        ),
    )
    smart_frame_ancestors: tuple[str, ...] = field(
        default=(),
        metadata=about(
            _origins,
            "Comma-separated origins of EHRs that may show the app in a frame (CSP `frame-ancestors`); "
            "none: the app cannot be framed.",
        ),
    )

    def __post_init__(self):
        """Check the settings that only make sense together."""
        if self.production:
            problems = self.production_problems()
            if problems:
                raise ConfigError(
                    "IMNM_CDS_PRODUCTION=true refuses to start until these are set:\n"
                    + "\n".join(f"  {problem}" for problem in problems)
                )
        if self.auth == "jwt" and not (self.trusted_issuers and self.public_url):
            raise ConfigError("IMNM_CDS_AUTH=jwt needs IMNM_CDS_TRUSTED_ISSUERS and IMNM_CDS_PUBLIC_URL")
        if self.smart_client_id:
            self._check_smart()
        if self.fetch_budget_ms >= self.deadline_ms:
            raise ConfigError("IMNM_CDS_FETCH_BUDGET_MS must be less than IMNM_CDS_DEADLINE_MS")

    def _check_smart(self) -> None:
        """Refuse a SMART app that cannot sign its state, has nowhere to come back to, or no link to give."""
        missing = [
            PREFIX + name.upper()
            for name in ("smart_redirect_url", "smart_state_key_file", "public_url")
            if not getattr(self, name)
        ]
        if missing:
            raise ConfigError(f"IMNM_CDS_SMART_CLIENT_ID needs {', '.join(missing)}")
        if "*" in self.smart_frame_ancestors:
            raise ConfigError("IMNM_CDS_SMART_FRAME_ANCESTORS must list the EHRs' origins, not *")
        if len(self.smart_state_key_file.read_bytes().strip()) < 32:
            raise ConfigError("IMNM_CDS_SMART_STATE_KEY_FILE must hold a secret of 32 bytes or more")

    def production_problems(self) -> list[str]:
        """List, at once, every setting production mode still needs and how to set it."""
        problems = []
        if self.auth != "jwt":
            problems.append("IMNM_CDS_AUTH=jwt (IMNM_CDS_AUTH=off is development mode)")
        if not self.trusted_issuers:
            problems.append("IMNM_CDS_TRUSTED_ISSUERS=<JSON file of the trusted CDS clients>")
        if not self.public_url:
            problems.append("IMNM_CDS_PUBLIC_URL=<https URL clients call this service at>")
        if self.fhir_allow_http:
            problems.append("IMNM_CDS_FHIR_ALLOW_HTTP=false (plain-http FHIR servers are for development)")
        plain = _plain_http(self.public_url, self.smart_redirect_url, *self.fhir_servers)
        if plain:
            problems.append(f"https URLs, not {', '.join(plain)}")
        return problems

    def require_https(self, *urls: str | None) -> None:
        """Refuse plain-http URLs in production mode."""
        plain = _plain_http(*urls)
        if self.production and plain:
            raise ConfigError(f"IMNM_CDS_PRODUCTION=true needs https URLs, not {', '.join(plain)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Read every setting from the environment (IMNM_CDS_<NAME>), then apply explicit overrides."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        _refuse_misspelt(environ, [PREFIX + name.upper() for name in fields])
        unknown = set(overrides) - set(fields)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        texts = {name: environ[PREFIX + name.upper()] for name in fields if PREFIX + name.upper() in environ}
        texts.update({name: "" if value is None else str(value) for name, value in overrides.items()})
        values = {}
        for name, text in texts.items():
            try:
                values[name] = fields[name].metadata["parse"](text)
            except ValueError as exc:
                raise ConfigError(f"{PREFIX}{name.upper()}: {exc}") from None
        return cls(**values)

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str]]:
        """List (variable, default, meaning) for the README."""
        return [
            (PREFIX + f.name.upper(), repr(f.default), f.metadata["doc"]) for f in dataclasses.fields(cls)
        ]


def _refuse_misspelt(environ: Mapping[str, str], variables: list[str]) -> None:
    """Refuse an IMNM_CDS_* variable that is no setting: a typo would silently leave the default."""
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in variables and not name.startswith(TEST_PREFIX):
            # Compared without the prefix, which every name shares and would make any two look alike.
            names = [variable.removeprefix(PREFIX) for variable in variables]
            closest = difflib.get_close_matches(name.removeprefix(PREFIX), names, n=1, cutoff=0.6)
            hint = f"; did you mean {PREFIX}{closest[0]}?" if closest else "; see the README's settings"
            raise ConfigError(f"{name} is not a setting{hint}")


def _plain_http(*urls: str | None) -> list[str]:
    return [url for url in urls if url and not url.startswith("https://")]
