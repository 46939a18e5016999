"""Settings from IMNM_CDS_* environment variables, checked when the service starts."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

PREFIX = "IMNM_CDS_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting is missing or out of range; the service refuses to start."""


def _number(kind: type, low: float, high: float) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Read every setting from the environment (IMNM_CDS_<NAME>), then apply explicit overrides."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
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
