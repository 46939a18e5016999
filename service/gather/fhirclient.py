"""Read FHIR R4 searches from an EHR's FHIR server: allow-listed bases, bearer token, time and size limits."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from service import metrics
from service.fhir import as_dict, as_list, as_str, url_origin, within
from service.gather.backend import AccessError, ServerToken
from service.gather.bindings import Bindings, load
from service.logs import ms_since

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from service.config import Settings

# Severities that report no failure; any other (error, fatal, or one that cannot be read) does.
IGNORED = frozenset({"warning", "information"})
CHUNK_BYTES = 64 * 1024
# Why a query went unanswered, in the words an OperationOutcome gives the EHR.
REASONS = {
    "unreachable": "the FHIR server could not be reached",
    "timeout": "the FHIR server did not answer within the read timeout",
    "deadline": "the time for fetching ran out",
    "refused": "the FHIR server refused the access token",
    "no-token": "the FHIR server's token endpoint gave our backend client no access token",
    "not-found": "the FHIR server has no such resource or search",
    "rejected": "the FHIR server rejected the query",
    "server-error": "the FHIR server failed",
    "redirected": "the FHIR server redirected to another host",
    "invalid": "the FHIR server's answer is not a FHIR resource in JSON",
    "wrong-type": "the FHIR server answered with resources of another type",
    "outcome": "the FHIR server reported an error (OperationOutcome)",
    "too-large": "a page from the FHIR server is larger than IMNM_CDS_MAX_BODY_BYTES",
    "too-many": (
        "it has more pages or resources than IMNM_CDS_FETCH_MAX_PAGES or IMNM_CDS_FETCH_MAX_RESOURCES allow"
    ),
    "elsewhere": "a next link leads off the FHIR server",
}


class FetchFailed(Exception):
    """A query that could not be answered completely, and why (one of REASONS)."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status

    def describe(self) -> str:
        """Say why in words, with the HTTP status where the server gave one."""
        return REASONS[self.reason] + (f" (HTTP {self.status})" if self.status else "")


@dataclass(frozen=True)
class Query:
    path: str  # relative to the server's base, e.g. Observation?patient=p1&category=laboratory
    resource_type: str


@dataclass(frozen=True)
class Answer:
    """What one query gave: resources with their fullUrls, or why it failed; how many pages, how long."""

    entries: tuple[tuple[dict, str | None], ...] = ()
    failure: FetchFailed | None = None
    pages: int = 0
    ms: float = 0.0


class FhirClient:
    """The process's connection pool to FHIR servers, with the allow-list and limits that govern it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session = _SameOriginSession()
        self.session.max_redirects = 3
        self.session.headers["Accept"] = "application/fhir+json"
        # Cookies set for one user's token must never ride along with another user's request.
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.bindings: Bindings = load(settings)

    def refusal(self, base: str) -> str | None:
        """Say why this service may not contact a FHIR server, or None when it may."""
        parts = urlsplit(base)
        if parts.scheme != "https" and not self.settings.fhir_allow_http:
            return "fhirServer must use https"
        if parts.query or parts.fragment or not any(within(base, ok) for ok in self.settings.fhir_servers):
            return "fhirServer is not one of the FHIR servers this service may contact"
        return None

    def fetch(
        self, base: str, auth: requests.auth.AuthBase | None, queries: Mapping[str, Query], until: float
    ) -> dict[str, Answer]:
        """Answer each query, a few at once; what is not answered by `until` (time.monotonic) fails."""
        started = time.perf_counter()
        pool = ThreadPoolExecutor(min(self.settings.fetch_threads, len(queries)), "fetch")
        futures = {key: pool.submit(self._answer, base, auth, query, until) for key, query in queries.items()}
        done, _ = wait(futures.values(), timeout=max(0.0, until - time.monotonic()))
        late = Answer(failure=FetchFailed("deadline"), ms=ms_since(started))
        answers = {key: future.result() if future in done else late for key, future in futures.items()}
        pool.shutdown(wait=False, cancel_futures=True)
        for answer in answers.values():
            metrics.fhir_fetches.labels(answer.failure.reason if answer.failure else "ok").inc()
        return answers

    def _answer(self, base: str, auth: requests.auth.AuthBase | None, query: Query, until: float) -> Answer:
        started = time.perf_counter()
        try:
            entries, pages = self._search(base, auth, query, until)
        except FetchFailed as failure:
            return Answer(failure=failure, ms=ms_since(started))
        return Answer(tuple(entries), pages=pages, ms=ms_since(started))

    def _search(
        self, base: str, auth: requests.auth.AuthBase | None, query: Query, until: float
    ) -> tuple[list, int]:
        """Follow next links from the first page, within the page, resource and time limits."""
        url: str | None = f"{base.rstrip('/')}/{query.path}"
        found: list[tuple[dict, str | None]] = []
        pages = 0
        while url:
            pages += 1
            if pages > self.settings.fetch_max_pages:
                raise FetchFailed("too-many")
            page = self._get(url, auth, until)
            found += _entries(page, query.resource_type)
            if len(found) > self.settings.fetch_max_resources:
                raise FetchFailed("too-many")
            url = _next_link(page)
            if url is not None and not within(url, base):
                raise FetchFailed("elsewhere")
        return found, pages

    def _get(self, url: str, auth: requests.auth.AuthBase | None, until: float) -> dict:
        """GET one page in the time left: status checked, size capped, decoded as a FHIR resource."""
        asked = time.monotonic()
        try:
            body = self._body(url, auth, until)
        except FetchFailed as failure:
            if failure.status != 401 or not isinstance(auth, ServerToken):
                raise
            # Our token refused before its time (revoked, or the server forgot it): once more with a new one.
            auth.renew(issued_before=asked)
            body = self._body(url, auth, until)
        try:
            page = json.loads(body)
        except (ValueError, RecursionError):
            raise FetchFailed("invalid") from None
        if not isinstance(page, dict) or not isinstance(page.get("resourceType"), str):
            raise FetchFailed("invalid")
        return page

    def _body(self, url: str, auth: requests.auth.AuthBase | None, until: float) -> bytes:
        """Read one page's bytes in the time left, its status checked and its size capped."""
        left = until - time.monotonic()
        if left <= 0:
            raise FetchFailed("deadline")
        timeout = (
            min(self.settings.fetch_connect_timeout_ms / 1000, left),
            min(self.settings.fetch_read_timeout_ms / 1000, left),
        )
        try:
            with self.session.get(url, auth=auth, timeout=timeout, stream=True) as response:
                _check_status(response.status_code)
                return self._read(response, until)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise FetchFailed(_cause(exc, until)) from None
        except AccessError as exc:
            log.warning("no backend token", extra={"fields": {"error": str(exc)}})
            raise FetchFailed("no-token") from None

    def _read(self, response: requests.Response, until: float) -> bytes:
        """Read the body as it arrives, giving up past the size limit or when the time is up."""
        limit = self.settings.max_body_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchFailed("too-large")
        body = bytearray()
        # read1 returns what one read of the socket gives, so a server that trickles bytes cannot hold
        # us past the deadline (a plain read waits for the whole chunk, each byte resetting the timeout).
        while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
            body += chunk
            if len(body) > limit:
                raise FetchFailed("too-large")
            if time.monotonic() > until:
                raise FetchFailed("deadline")
        return bytes(body)


class _SameOriginSession(requests.Session):
    """A session that follows a redirect only within the scheme, host and port it asked."""

    def get_redirect_target(self, resp):
        target = super().get_redirect_target(resp)
        if target is not None and url_origin(urljoin(resp.url, target)) != url_origin(resp.url):
            return None
        return target


class Bearer(requests.auth.AuthBase):
    """Send the EHR's access token (an auth object also keeps requests from reading ~/.netrc)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def reports_failure(outcome: dict) -> bool:
    """Say whether an OperationOutcome reports a failure (anything but warnings, or no issue at all)."""
    severities = {as_str(as_dict(issue).get("severity")) for issue in as_list(outcome.get("issue"))}
    return not severities or not severities <= IGNORED


def _check_status(status: int) -> None:
    if 200 <= status < 300:
        return
    if status < 400:
        raise FetchFailed("redirected", status)
    if status in (401, 403):
        raise FetchFailed("refused", status)
    if status in (404, 410):
        raise FetchFailed("not-found", status)
    raise FetchFailed("rejected" if status < 500 else "server-error", status)


def _cause(exc: Exception, until: float) -> str:
    if time.monotonic() >= until:
        return "deadline"
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError):
        return "timeout"
    if isinstance(exc, requests.TooManyRedirects):
        return "redirected"
    return "unreachable"


def _entries(page: dict, resource_type: str) -> list[tuple[dict, str | None]]:
    """Return the resources a read or search answered, refusing errors and resources of another type."""
    kind = page["resourceType"]
    if kind == resource_type:
        return [(page, None)]
    if kind == "OperationOutcome":
        raise FetchFailed("outcome" if reports_failure(page) else "wrong-type")
    if kind != "Bundle":
        raise FetchFailed("wrong-type")
    found = []
    for entry in as_list(page.get("entry")):
        resource = as_dict(as_dict(entry).get("resource"))
        if resource.get("resourceType") == resource_type:
            found.append((resource, as_str(entry.get("fullUrl"))))
        elif resource.get("resourceType") != "OperationOutcome":
            raise FetchFailed("wrong-type")
        elif reports_failure(resource):
            raise FetchFailed("outcome")
    return found


def _next_link(page: dict) -> str | None:
    for link in as_list(page.get("link")):
        if as_dict(link).get("relation") == "next":
            return as_str(link.get("url"))
    return None
