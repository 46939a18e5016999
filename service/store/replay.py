"""Token ids already accepted, in the feedback database: a replay is refused by every process and instance."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from service.store.feedback import StoreError, connect, migrate, seen_tokens

log = logging.getLogger(__name__)

PURGE_INTERVAL = 60.0  # seconds between two deletions of expired ids by one process


class ReplayStoreUnavailable(StoreError):
    """The token store did not answer in time: the call cannot be checked, so it is refused."""


class ReplayStore:
    """Accept each (issuer, jti digest) once until it expires, by one atomic insert-if-absent."""

    def __init__(self, url: str, timeout_seconds: float):
        # An id is committed without waiting for the disk (about 13 ms a call saved, measured): a power
        # loss or an operating system crash may forget the last ids, never a process crash.
        self.engine = connect(url, timeout_seconds, wait_for_disk=False)
        try:
            migrate(self.engine)
        except DBAPIError as exc:
            raise StoreError(f"cannot open the token store: {type(exc.orig).__name__}") from None
        finally:
            self.engine.dispose()  # no pooled connection may cross a fork: each worker opens its own
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        # RETURNING says whether the row went in: psycopg gives no row count for ON CONFLICT DO NOTHING.
        self._insert = dialect.insert(seen_tokens).on_conflict_do_nothing().returning(seen_tokens.c.issuer)
        self._lock = threading.Lock()
        self._purged_at = 0.0
        self.unavailable = 0  # calls refused because the store did not answer, in this process

    def first_use(self, issuer: str, jti_sha256: bytes, expires_at: float, now: float) -> bool:
        """Record this token id; False when any process recorded it before. Raise when the store fails."""
        row = {"issuer": issuer, "jti_sha256": jti_sha256, "expires_at": expires_at}
        # One retry, on a pooled connection the server has closed since (a restart): nothing was written.
        for attempt in (1, 2):
            try:
                with self.engine.begin() as connection:
                    inserted = connection.execute(self._insert, row).first() is not None
                break
            except DBAPIError as exc:
                if attempt == 1 and exc.connection_invalidated:
                    continue
                raise self._failed(exc) from None
            except SQLAlchemyError as exc:  # the pool gave no connection in time
                raise self._failed(exc) from None
        if self._purge_due(now):
            self._purge(now)
        return inserted

    def _failed(self, exc: Exception) -> ReplayStoreUnavailable:
        with self._lock:
            self.unavailable += 1
            count = self.unavailable
        error = type(getattr(exc, "orig", None) or exc).__name__
        log.error("token store unavailable", extra={"fields": {"error": error, "refusedSoFar": count}})
        return ReplayStoreUnavailable(error)

    def _purge_due(self, now: float) -> bool:
        with self._lock:
            if now - self._purged_at < PURGE_INTERVAL:
                return False
            self._purged_at = now
            return True

    def _purge(self, now: float) -> None:
        try:
            with self.engine.begin() as connection:
                expired = delete(seen_tokens).where(seen_tokens.c.expires_at < now)
                purged = connection.execute(expired).rowcount
        except SQLAlchemyError as exc:  # the next purge, a minute on, deletes them
            log.warning("expired token ids not purged", extra={"fields": {"error": type(exc).__name__}})
        else:
            log.info("expired token ids purged", extra={"fields": {"ids": purged}})

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()
