"""Export resources with FHIR Bulk Data $export into a folder: kick off, wait, download, delete; resumable."""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import requests

from service.fhir import as_dict, as_list, as_str
from service.gather.backend import AccessError, ServerToken

log = logging.getLogger(__name__)

JOB = "job.json"
TIMEOUT = (5, 60)  # connect, read (seconds)
NDJSON = ("application/fhir+ndjson", "application/ndjson", "application/x-ndjson", "text/plain")
FIRST_WAIT, LONGEST_WAIT = 1.0, 60.0  # polling interval when the server suggests none: doubling, capped
TRIES = 3  # attempts per file; a cut or failed download is fetched again from its start


class ExportError(Exception):
    """The export cannot be had as asked (the message says why; it never holds a token or patient data)."""


@dataclass(frozen=True)
class Limits:
    max_wait: float = 3600.0  # seconds the export may take, counted over every run that waits for it
    max_file_bytes: int = 4 * 2**30


class BulkClient:
    """Talk Bulk Data to one FHIR server: a session, the server's base, and how to authorise."""

    def __init__(
        self,
        session: requests.Session,
        base: str,
        auth: ServerToken | None,
        limits: Limits = Limits(),
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.session = session
        self.base = base.rstrip("/")
        self.auth = auth
        self.limits = limits
        self.sleep = sleep

    def export(
        self,
        folder: Path,
        types: list[str],
        *,
        group: str | None = None,
        since: str | None = None,
        type_filters: tuple[str, ...] = (),
    ) -> dict:
        """Export into folder (an NDJSON file per output entry); return the job record; resume one begun."""
        folder.mkdir(parents=True, exist_ok=True)
        job = _read_job(folder)
        if job is None:
            job = {"status": self._kick_off(types, group, since, type_filters), "waited": 0.0, "done": []}
            _write_job(folder, job)
        if "manifest" not in job:
            job["manifest"] = self._wait(job, folder)
            _write_job(folder, job)
        manifest = job["manifest"]
        private = bool(manifest.get("requiresAccessToken"))
        for kind, entries in (("output", "output"), ("deleted", "deleted"), ("error", "error")):
            for index, entry in enumerate(_entries(manifest, entries)):
                # Only the output lies at the top: the folder reads as the export itself.
                name = f"{'' if kind == 'output' else kind + '/'}{entry['type']}-{index}.ndjson"
                if name not in job["done"]:
                    (folder / name).parent.mkdir(exist_ok=True)
                    self._download(entry, folder / name, private)
                    job["done"].append(name)
                    _write_job(folder, job)
        if not job.get("deleted"):
            self._delete(job["status"])
            job["deleted"] = True
            _write_job(folder, job)
        return job

    def read_by_id(self, kind: str, ids: list[str], page: int = 50) -> list[dict]:
        """Search one type by _id, a page of ids at a time; return the resources the server has."""
        found = []
        for start in range(0, len(ids), page):
            query = urlencode({"_id": ",".join(ids[start : start + page]), "_count": page})
            url: str | None = f"{self.base}/{kind}?{query}"
            while url:
                response = self._call("GET", url, headers=_accept("application/fhir+json"))
                bundle = _json(response)
                if response.status_code != 200 or not isinstance(bundle, dict):
                    raise ExportError(f"cannot search {kind} by id ({_outcome(response)})")
                resources = (as_dict(entry).get("resource") for entry in as_list(bundle.get("entry")))
                found += [r for r in resources if isinstance(r, dict) and r.get("resourceType") == kind]
                links = [as_dict(link) for link in as_list(bundle.get("link"))]
                url = next(
                    (as_str(link.get("url")) for link in links if link.get("relation") == "next"), None
                )
                if url and _origin(url) != _origin(self.base):
                    raise ExportError(f"the server sent the next page of a search to {_origin(url)}")
        return found

    def transaction(self, bundle: dict) -> None:
        """Post a transaction Bundle to the server's base; refuse anything but 200."""
        response = self._call("POST", self.base, json=bundle, headers=_accept("application/fhir+json"))
        if response.status_code != 200:
            raise ExportError(f"the server refused a results transaction ({_outcome(response)})")

    def _kick_off(
        self, types: list[str], group: str | None, since: str | None, filters: tuple[str, ...]
    ) -> str:
        path = f"Group/{group}/$export" if group else "Patient/$export"
        query = {"_type": ",".join(types), **({"_since": since} if since else {})}
        if filters:
            query["_typeFilter"] = ",".join(filters)
        headers = {**_accept("application/fhir+json"), "Prefer": "respond-async"}
        if filters:
            headers["Prefer"] += ", handling=strict"  # a server that cannot filter must say so, not ignore it
        response = self._call("GET", f"{self.base}/{path}?{urlencode(query)}", headers=headers)
        status = response.headers.get("Content-Location")
        if response.status_code != 202 or not status:
            raise ExportError(f"the server refused the export kick-off ({_outcome(response)})")
        self._same_origin(status, "status")
        return status

    def _wait(self, job: dict, folder: Path) -> dict:
        """Poll the job until its manifest comes, honouring Retry-After and 429, within max_wait in all."""
        interval = FIRST_WAIT
        while True:
            response = self._call("GET", job["status"], headers=_accept("application/json"))
            if response.status_code == 200:
                manifest = _json(response)
                if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                    raise ExportError("the export finished without a manifest listing its output")
                return manifest
            if response.status_code in (404, 410):
                raise ExportError(
                    f"the export job is gone from the server ({_outcome(response)}); "
                    f"remove {folder} to start another export"
                )
            if response.status_code not in (202, 429):
                raise ExportError(f"the export failed ({_outcome(response)})")
            wait = _retry_after(response) or interval
            interval = min(interval * 2, LONGEST_WAIT)
            left = self.limits.max_wait - job["waited"]
            if left <= 0:
                raise ExportError(
                    f"the export is still running after {job['waited']:.0f} s; run the same command "
                    "again to keep waiting for it"
                )
            wait = min(wait, left)
            self.sleep(wait)
            job["waited"] += wait
            _write_job(folder, job)

    def _download(self, entry: dict, path: Path, private: bool) -> None:
        url = entry["url"]
        same = self._same_origin(url, "file", strict=False)
        if private and not same:
            raise ExportError("an export file needs our token but is on another server; it is not sent there")
        last = ""
        for attempt in range(TRIES):
            if attempt:
                self.sleep(2.0**attempt)
            try:
                lines = self._fetch_file(url, path, private)
            except requests.RequestException as exc:
                last = f"the download was cut ({type(exc).__name__})"
                continue
            except _Retry as retry:
                last = str(retry)
                continue
            count = entry.get("count")
            if isinstance(count, int) and count != lines:
                last = f"the file has {lines} resources where the manifest says {count}"
                continue
            return
        raise ExportError(f"cannot download the {entry['type']} export file: {last}")

    def _fetch_file(self, url: str, path: Path, private: bool) -> int:
        """Stream a file to path (via a .part file), within the size cap; return its line count."""
        headers = {**_accept("application/fhir+ndjson"), "Accept-Encoding": "gzip"}
        with self._call("GET", url, headers=headers, stream=True, authorise=private) as response:
            if response.status_code == 429 or response.status_code >= 500:
                self.sleep(_retry_after(response) or FIRST_WAIT)
                raise _Retry(f"the file server answered HTTP {response.status_code}")
            if response.status_code != 200:
                raise ExportError(f"cannot download an export file ({_outcome(response)})")
            kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if kind not in NDJSON:
                raise ExportError(f"an export file came as {kind or 'no type'}, not NDJSON")
            declared = response.headers.get("Content-Length", "")
            cap = self.limits.max_file_bytes
            if declared.isdigit() and int(declared) > cap:
                raise ExportError(f"an export file is larger than the limit of {cap} bytes")
            part = path.with_suffix(".part")
            size = lines = 0
            last = b"\n"
            with part.open("wb") as sink:
                for chunk in response.iter_content(1 << 16):  # gzip is undone as it streams
                    size += len(chunk)
                    if size > cap:
                        raise ExportError(f"an export file is larger than the limit of {cap} bytes")
                    sink.write(chunk)
                    lines += chunk.count(b"\n")
                    last = chunk[-1:] or last
                sink.flush()
                os.fsync(sink.fileno())
            lines += last != b"\n"
            part.replace(path)
            return lines

    def _delete(self, status: str) -> None:
        """Tell the server it may drop the job and its files; a refusal only costs it disk."""
        try:
            response = self._call("DELETE", status, headers=_accept("application/json"))
            if response.status_code >= 300:
                log.warning("export job not deleted: HTTP %s", response.status_code)
        except (requests.RequestException, ExportError) as exc:
            log.warning("export job not deleted: %s", type(exc).__name__)

    def _call(self, method: str, url: str, *, authorise: bool = True, **kwargs) -> requests.Response:
        """Send one request; a token refused before its time is renewed and the request sent once more."""
        for fresh in (False, True):
            auth = self.auth if authorise else None
            try:
                response = self.session.request(
                    method, url, auth=auth, timeout=TIMEOUT, allow_redirects=False, **kwargs
                )
            except AccessError as exc:
                raise ExportError(str(exc)) from None
            except requests.RequestException as exc:
                if kwargs.get("stream"):
                    raise
                raise ExportError(f"cannot reach {_origin(url)}: {type(exc).__name__}") from None
            if response.status_code == 401 and auth is not None and not fresh:
                response.close()
                auth.renew()
                continue
            return response
        return response

    def _same_origin(self, url: str, what: str, strict: bool = True) -> bool:
        same = _origin(url) == _origin(self.base)
        if strict and not same:
            raise ExportError(f"the server sent the export {what} to another server ({_origin(url)})")
        return same


class _Retry(Exception):
    """A download failed in a way that asking again may mend."""


def _entries(manifest: dict, key: str) -> list[dict]:
    entries = manifest.get(key) or []
    named = (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("type", "url")) for e in entries)
    if not isinstance(entries, list) or not all(named):
        raise ExportError(f"the export manifest's {key} is not a list of files with a type and a url")
    return entries


def _read_job(folder: Path) -> dict | None:
    path = folder / JOB
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _write_job(folder: Path, job: dict) -> None:
    part = folder / f"{JOB}.part"
    part.write_text(json.dumps(job, indent=1), encoding="utf-8")
    part.replace(folder / JOB)  # a crash leaves the old record or the new one, never half of one


def _accept(kind: str) -> dict:
    return {"Accept": kind}


def _json(response: requests.Response):
    try:
        return response.json()
    except ValueError:
        return None


def _outcome(response: requests.Response) -> str:
    """Say what a refusal was: its status and the first issue's code and diagnostics, cut short."""
    body = _json(response)
    issues = body.get("issue") if isinstance(body, dict) else None
    first = issues[0] if isinstance(issues, list) and issues and isinstance(issues[0], dict) else {}
    said = " ".join(str(first.get(k, ""))[:200] for k in ("code", "diagnostics")).strip()
    return f"HTTP {response.status_code}{': ' + said if said else ''}"


def _retry_after(response: requests.Response) -> float | None:
    """Return Retry-After in seconds (given as seconds or as an HTTP date), or None."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
