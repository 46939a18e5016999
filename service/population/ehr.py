"""Screen a population straight from an EHR: a Bulk Data export (whole, or the changes since a time)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from service.evaluate import guidance
from service.facts.medications import MEDICATION_TYPES
from service.fhir import as_dict, as_list, as_str, parse_time
from service.gather.bulk import BulkClient
from service.hooks import PATIENT_VIEW
from service.population import screen
from service.population.screen import KEPT, RESULTS, ScreenError, Summary, attribute

EXPORT = "export"  # the whole export, kept so that later runs can apply changes to it
TYPES = sorted(KEPT | {"Medication"})  # what a rule reads, and the drugs medication records name
PATIENTS = "patients.json"  # in a changes folder: every patient a change touches
COMPLETE = "complete"  # in the whole export's folder: every file is in
APPLIED = "applied"  # in a changes folder: the changes are in the whole export, their patients forgotten
NAMED = "Medication-named.ndjson"  # in the whole export: Medications fetched because records name them
POSTED = "posted.txt"  # patients whose results the results server has


def screen_from_server(
    server: BulkClient,
    out: Path,
    as_of: datetime | None,
    workers: int,
    *,
    progress: bool = True,
    group: str | None = None,
    since: str | None = None,
    results_server: BulkClient | None = None,
) -> Summary:
    """Export, then screen every patient; since a time, again only each patient a change touches."""
    out.mkdir(parents=True, exist_ok=True)
    whole = out / EXPORT
    started = time.monotonic()
    if since is None:
        server.export(whole, TYPES, group=group)
        (whole / COMPLETE).touch()
        folder = whole
    else:
        if not (whole / COMPLETE).exists():
            raise ScreenError(f"--since needs a whole export in {out}: run once without --since first")
        folder = out / f"since-{re.sub(r'[^0-9A-Za-z]+', '-', since).strip('-')}"
        server.export(folder, TYPES, group=group, since=since)
        if not (folder / APPLIED).exists():
            forget(out, apply_changes(whole, folder))
            (folder / APPLIED).touch()
    add_named_medications(server, whole)
    exported = time.monotonic() - started
    summary = screen.screen(whole, out, as_of, workers, progress)
    errors = sum(1 for f in sorted((folder / "error").glob("*.ndjson")) for _ in _read(f))
    summary.export = {"seconds": round(exported, 2), "errorsReported": errors}
    if results_server is not None:
        summary.export["patientsPosted"] = post_results(results_server, out, parse_time(summary.as_of))
    summary.save(out)
    return summary


def apply_changes(whole: Path, changes: Path) -> set[str]:
    """Put changed resources into the whole export and take deleted ones out; return the patients touched."""
    changed = _by_key(sorted(changes.glob("*.ndjson")))
    deleted = _deleted(sorted((changes / "deleted").glob("*.ndjson")))
    gone = set(changed) | deleted
    saved = changes / PATIENTS
    if saved.exists():  # a run cut short after the export files were rewritten: they no longer know
        touched = set(json.loads(saved.read_text(encoding="utf-8")))
    else:
        touched = {attribute(line)[0] for line in changed.values()} - {None, ""}
        medications = {key for key in gone if key.startswith("Medication/")}
        for path in sorted(whole.glob("*.ndjson")):
            for line in _read(path):
                key = _key(line)
                if key in gone or any(f'"{m}"' in line for m in medications):
                    touched.add(attribute(line)[0])
        touched -= {None, ""}
        saved.write_text(json.dumps(sorted(touched)), encoding="utf-8")
    for path in sorted(whole.glob("*.ndjson")):
        if not path.name.startswith(f"{changes.name}-"):
            _replace(path, (line for line in _read(path) if _key(line) not in gone))
    for kind in sorted({key.split("/")[0] for key in changed}):
        lines = [line for key, line in changed.items() if key.startswith(f"{kind}/")]
        _replace(whole / f"{changes.name}-{kind}.ndjson", lines)
    return touched


def add_named_medications(server: BulkClient, whole: Path) -> None:
    """Fetch the Medications that exported medication records name and the export left out."""
    have, named = set(), set()
    for path in sorted(whole.glob("*.ndjson")):
        for line in _read(path):
            resource = as_dict(_json(line))
            if resource.get("resourceType") == "Medication":
                have.add(as_str(resource.get("id")))
            elif resource.get("resourceType") in MEDICATION_TYPES:
                reference = as_str(as_dict(resource.get("medicationReference")).get("reference")) or ""
                if reference.startswith("Medication/"):
                    named.add(reference.removeprefix("Medication/"))
    missing = sorted(named - have)
    if missing:
        # Patient-level exports may leave out what lies outside the Patient compartment, as drugs do.
        fetched = server.read_by_id("Medication", missing)
        if fetched:  # else the export, and so the stage, stays as it is for a resumed run
            _replace(whole / NAMED, [*_read_if(whole / NAMED), *(json.dumps(r) for r in fetched)])


def forget(out: Path, patients: set[str]) -> None:
    """Drop these patients' results (and posted marks) and the stage, so the next screen does them again."""
    for name in (RESULTS, POSTED):
        path = out / name
        if path.exists():
            _replace(path, (line for line in _read(path) if _patient_of_line(line, name) not in patients))
    for suffix in ("", "-wal", "-shm"):
        (out / f"{screen.STAGE}{suffix}").unlink(missing_ok=True)


def post_results(server: BulkClient, out: Path, now: datetime) -> int:
    """Write each patient's cards as FHIR (GuidanceResponse, DetectedIssue) to a server; return how many."""
    posted_path = out / POSTED
    posted = set(_read_if(posted_path))
    count = 0
    with (out / RESULTS).open(encoding="utf-8") as results, posted_path.open("a", encoding="utf-8") as marks:
        for line in results:
            result = json.loads(line)
            if result["patient"] in posted or not result.get("cards"):
                continue
            bundle = guidance.bundle(result["cards"], result["patient"], PATIENT_VIEW.id, now)
            server.transaction(bundle)  # PUT by deterministic ids: sending one again changes nothing
            marks.write(result["patient"] + "\n")
            marks.flush()
            count += 1
    return count


def _by_key(paths: list[Path]) -> dict[str, str]:
    return {key: line for path in paths for line in _read(path) if (key := _key(line))}


def _deleted(paths: list[Path]) -> set[str]:
    """Read the Type/id of each resource a Bulk Data `deleted` file (Bundles of DELETE requests) names."""
    keys = set()
    for path in paths:
        for line in _read(path):
            for entry in as_list(as_dict(_json(line)).get("entry")):
                url = as_str(as_dict(as_dict(entry).get("request")).get("url")) or ""
                if url.count("/") >= 1:
                    keys.add("/".join(url.rstrip("/").split("/")[-2:]))
    return keys


def _key(line: str) -> str | None:
    resource = as_dict(_json(line))
    kind, id_ = as_str(resource.get("resourceType")), as_str(resource.get("id"))
    return f"{kind}/{id_}" if kind and id_ else None


def _json(line: str):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _patient_of_line(line: str, name: str) -> str:
    return json.loads(line)["patient"] if name == RESULTS else line


def _read(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="surrogateescape") as lines:
        yield from (line for line in map(str.strip, lines) if line)


def _read_if(path: Path) -> Iterator[str]:
    return _read(path) if path.exists() else iter(())


def _replace(path: Path, lines: Iterable[str]) -> None:
    """Write lines to path whole or not at all."""
    part = path.with_name(path.name + ".part")
    with part.open("w", encoding="utf-8", errors="surrogateescape") as sink:
        sink.writelines(line + "\n" for line in lines)
    part.replace(path)
