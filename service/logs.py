"""Log one JSON object per line, with fields we choose: never bodies, patient data, tokens or JWTs."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """Format a record as JSON; an exception shows its type and where it happened, never its message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info and record.exc_info[0] is not None:
            kind, _, tb = record.exc_info
            entry["error"] = kind.__name__
            entry["where"] = [
                f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(tb)
            ][-5:]
        return json.dumps(entry, default=str)


def configure(level: str) -> None:
    """Send every log record of the service as JSON lines to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The durable library logs action failures with their messages; our engine wrapper reports them.
    logging.getLogger("durable").setLevel(logging.CRITICAL)
    # urllib3 logs request lines, whose URLs carry patient ids, and retries and pool events with URLs.
    logging.getLogger("urllib3").setLevel(logging.CRITICAL)


def gunicorn_config() -> dict:
    """Configure gunicorn's logging (dictConfig): its error log as JSON lines on stderr, no access log."""
    stderr = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": stderr, "discard": {"class": "logging.NullHandler"}},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            # Its lines carry the path and query, which may hold ids; the app logs each request instead.
            "gunicorn.access": {"level": "CRITICAL", "handlers": ["discard"], "propagate": False},
        },
    }


def ms_since(started: float) -> float:
    """Return the milliseconds since a time.perf_counter() reading, as logs show them."""
    return round((time.perf_counter() - started) * 1000, 3)
