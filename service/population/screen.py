"""Screen a population from Bulk Data NDJSON: group by patient on disk, evaluate on every core, resume."""

from __future__ import annotations

import gc
import gzip
import json
import multiprocessing
import os
import re
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from service.config import Settings
from service.evaluate.pipeline import Evaluator
from service.facts.medications import MEDICATION_TYPES
from service.fhir import as_dict, as_str, half_surrogate, parse_time
from service.gather import prefetch
from service.outcome import ApiError, Issue, operation_outcome
from service.population import report

STAGE = "stage.sqlite"
RESULTS = "results.ndjson"
SUMMARY = "summary.json"
KEPT = frozenset({"Patient", *prefetch.SUBJECT})  # the types a rule can use; the rest is not staged
# Half of a UTF-16 surrogate pair, raw, stands for a byte that was not UTF-8 (read with surrogateescape).
RAW_SURROGATE = re.compile("[\ud800-\udfff]")
T = TypeVar("T")
BATCH = 20  # patients per task: large enough to amortise the hand-over, small enough to balance


class ScreenError(Exception):
    """The screen cannot start or continue as asked (the message says why and what to do)."""


@dataclass
class Summary:
    as_of: str
    patients: int = 0
    with_cards: int = 0
    errors: int = 0
    drug_not_exported: int = 0  # medication records naming a Medication the export left out
    cards: Counter = field(default_factory=Counter)  # (topic, indicator) → patients with such a card
    staged: dict = field(default_factory=dict)  # what loading found: resources by type, lines left out
    run: dict = field(default_factory=dict)  # this run: patients evaluated, seconds, per second
    export: dict = field(default_factory=dict)  # screening from a server: the export's time and errors

    def as_json(self) -> dict:
        """Return the summary as a JSON document."""
        return {
            "asOf": self.as_of,
            "patients": self.patients,
            "patientsWithCards": self.with_cards,
            "patientsWithErrors": self.errors,
            "medicationRecordsWithDrugNotExported": self.drug_not_exported,
            "patientsByCard": [
                {"topic": topic, "indicator": indicator, "patients": n}
                for (topic, indicator), n in sorted(self.cards.items())
            ],
            "staged": self.staged,
            "thisRun": self.run,
            **({"export": self.export} if self.export else {}),
        }

    def save(self, out: Path) -> None:
        """Write the summary to OUT/summary.json."""
        (out / SUMMARY).write_text(json.dumps(self.as_json(), indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        """Render patients per card topic and indicator as a plain-text table."""
        indicators = ("critical", "warning", "info")
        topics = sorted({topic for topic, _ in self.cards})
        width = max([len("topic"), *map(len, topics)])
        lines = [f"{'topic':<{width}}  " + "  ".join(f"{i:>8}" for i in indicators)]
        lines += [
            f"{topic:<{width}}  " + "  ".join(f"{self.cards[topic, i]:>8}" for i in indicators)
            for topic in topics
        ]
        lines.append(
            f"{self.patients} patients as of {self.as_of}: "
            f"{self.with_cards} with cards, {self.errors} not evaluated"
        )
        if self.drug_not_exported:
            lines.append(
                f"{self.drug_not_exported} medication records name a Medication the export left out:"
                " their drug is unknown"
            )
        return "\n".join(lines)


class Stage:
    """An SQLite file holding the population's resources by patient, so memory stays bounded."""

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS resources (patient TEXT NOT NULL, body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS medications (reference TEXT PRIMARY KEY, body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS patients (patient TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS done (patient TEXT PRIMARY KEY);
            """
        )

    def meta(self, key: str) -> str | None:
        """Return a stored setting of this screen."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Store a setting of this screen."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def load(self, files: list[Path]) -> dict:
        """Stage every resource a rule can use under its patient; skip if these files are already staged."""
        fingerprint = json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])
        if self.meta("input") == fingerprint:
            return json.loads(self.meta("staged") or "{}")
        if self.meta("input") is not None:
            raise ScreenError("the input files changed since this output was started; use a new --out")
        self.db.executescript(
            "DELETE FROM resources; DELETE FROM medications; DELETE FROM patients; DELETE FROM done;"
        )
        kept: Counter = Counter()
        left_out: Counter = Counter()
        for chunk in _batches(_rows(files, kept, left_out), 5000):
            self.db.executemany("INSERT INTO resources VALUES (?, ?)", [r for r in chunk if r[0]])
            # A Medication belongs to no patient: it is kept by reference, for the records naming it.
            self.db.executemany(
                "INSERT OR REPLACE INTO medications VALUES (?, ?)",
                [(f"Medication/{json.loads(line)['id']}", line) for patient, line in chunk if not patient],
            )
        self.db.executescript(
            """
            CREATE INDEX IF NOT EXISTS by_patient ON resources (patient);
            INSERT OR IGNORE INTO patients SELECT DISTINCT patient FROM resources;
            """
        )
        staged = {"resources": dict(sorted(kept.items())), "leftOut": dict(sorted(left_out.items()))}
        self.set_meta("staged", json.dumps(staged))
        self.set_meta("input", fingerprint)  # last: it marks the staging complete
        return staged

    def mark_done(self, patients: Iterable[str]) -> None:
        """Record patients whose results are already written."""
        self.db.execute("DELETE FROM done")
        self.db.executemany("INSERT OR IGNORE INTO done VALUES (?)", ((p,) for p in patients))
        self.db.commit()

    def count(self, table: str) -> int:
        """Count the rows of the patients or done table."""
        return self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 (fixed names)

    def pending(self, page: int = 1000) -> Iterator[str]:
        """Yield the patients without results, in order, a page at a time."""
        last = ""
        while True:
            ids = [
                row[0]
                for row in self.db.execute(
                    "SELECT patient FROM patients WHERE patient > ?"
                    " AND patient NOT IN (SELECT patient FROM done) ORDER BY patient LIMIT ?",
                    (last, page),
                )
            ]
            if not ids:
                return
            yield from ids
            last = ids[-1]


def _rows(files: list[Path], kept: Counter, left_out: Counter) -> Iterator[tuple[str, str]]:
    """Yield (patient, resource JSON) for each usable line of each file; count what is left out and why."""
    for path in files:
        # A byte that is not UTF-8 becomes a lone surrogate, so only its line is left out.
        opened = (gzip.open if path.suffix == ".gz" else open)(
            path, "rt", encoding="utf-8", errors="surrogateescape"
        )
        with opened as lines:
            for line in map(str.strip, lines):
                if not line:
                    continue
                patient, kind = attribute(line)
                if patient is None:
                    left_out[kind] += 1
                    continue
                kept[kind] += 1
                yield patient, line


def attribute(line: str) -> tuple[str | None, str]:  # noqa: PLR0911 (one return per reason)
    """Return the patient ("" for a Medication) and type of an NDJSON line, or None and why not used."""
    if RAW_SURROGATE.search(line):
        return None, "not UTF-8"
    try:
        resource = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not JSON"
    if half_surrogate(line, resource):
        return None, "not UTF-8"
    kind = as_str(as_dict(resource).get("resourceType"))
    if kind == "Medication":
        # About no patient: "" stages it apart, for the medication records that name it.
        return ("", kind) if as_str(resource.get("id")) else (None, "Medication without an id")
    if kind not in KEPT:
        return None, f"{kind or 'no resourceType'} (not used)"
    patient = patient_of(resource)
    if patient is None:
        return None, f"{kind} without a patient"
    return patient, kind


def patient_of(resource: dict) -> str | None:
    """Return the id of the patient a resource is about: its own id for a Patient, else its subject's."""
    if resource["resourceType"] == "Patient":
        return as_str(resource.get("id")) or None
    reference = as_str(as_dict(resource.get(prefetch.SUBJECT[resource["resourceType"]])).get("reference"))
    return prefetch.patient_id_of(reference) if reference else None


def input_files(directory: Path) -> list[Path]:
    """List the NDJSON files of a Bulk Data export (any names; .ndjson or .ndjson.gz)."""
    files = sorted([*directory.glob("*.ndjson"), *directory.glob("*.ndjson.gz")])
    if not files:
        raise ScreenError(f"no *.ndjson files in {directory}")
    return files


def recover(results: Path) -> Iterator[str]:
    """Drop a line cut short by an interruption, then yield the patients whose results are written."""
    if not results.exists():
        return
    with results.open("rb+") as handle:
        data_end = handle.seek(0, os.SEEK_END)
        if data_end:
            handle.seek(max(0, data_end - 1))
            if handle.read(1) != b"\n":
                handle.seek(0)
                complete = handle.read().rfind(b"\n") + 1
                handle.truncate(complete)
    with results.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["patient"]


def summarise(results: Iterable[Path], as_of: str) -> Summary:
    """Count patients per card topic and indicator over every result line written."""
    summary = Summary(as_of)
    for path in results:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue  # Dask writes a partition without patients as one empty line
                result = json.loads(line)
                summary.patients += 1
                summary.drug_not_exported += result.get("drugNotExported", 0)
                if "error" in result:
                    summary.errors += 1
                    continue
                kinds = {(c["source"]["topic"]["code"], c["indicator"]) for c in result["cards"]}
                summary.with_cards += bool(kinds)
                summary.cards.update(kinds)
    return summary


def evaluate_patient(evaluator: Evaluator, patient: str, resources: list[dict], as_of: datetime) -> dict:
    """Evaluate one patient's resources exactly as POST /evaluate would; a refusal becomes its result."""
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    try:
        evaluation = evaluator.bundle(bundle, as_of)
        ck = next((f for f in evaluation.facts.facts if f["id"] == "ck"), {}) if evaluation.facts else {}
        peak = round(ck["peak_x_uln"], 2) if ck.get("tested") else None  # for the report's distribution
        return {"patient": patient, "cards": evaluation.cards, "peakCkXUln": peak}
    except ApiError as exc:
        return {"patient": patient, "status": exc.status, "error": operation_outcome(exc.issues)}
    except Exception as exc:  # one patient's fault must not stop a population
        issue = Issue("exception", f"evaluation failed ({type(exc).__name__}); no advice was produced")
        return {"patient": patient, "status": 500, "error": operation_outcome([issue])}


_worker: dict = {}


def _start_worker(stage: str, as_of: str) -> None:
    _worker["evaluator"] = Evaluator(Settings.from_env())
    gc.collect()
    gc.freeze()  # what a worker keeps for its whole life need not be scanned by every collection
    _worker["db"] = sqlite3.connect(f"file:{stage}?mode=ro", uri=True)
    _worker["as_of"] = parse_time(as_of)


def _evaluate_batch(patients: list[str]) -> str:
    lines = []
    for patient in patients:
        rows = _worker["db"].execute(
            "SELECT body FROM resources WHERE patient = ? ORDER BY rowid", (patient,)
        )
        resources = [json.loads(body) for (body,) in rows]
        drugs, missing = medications_named(_worker["db"], resources)
        result = evaluate_patient(_worker["evaluator"], patient, resources + drugs, _worker["as_of"])
        lines.append(result_line({**result, "drugNotExported": missing} if missing else result))
    return "".join(lines)


def medications_named(db: sqlite3.Connection, resources: list[dict]) -> tuple[list[dict], int]:
    """Return the staged Medications a patient's records name, and how many records name one not staged."""
    found: dict[str, dict] = {}
    missing = 0
    for resource in resources:
        if resource["resourceType"] not in MEDICATION_TYPES:
            continue
        reference = as_str(as_dict(resource.get("medicationReference")).get("reference"))
        if not reference or reference.startswith("#"):
            continue  # a code of its own, or a contained Medication
        reference = "/".join(reference.rstrip("/").split("/")[-2:])  # an absolute URL names it too
        if reference not in found:
            row = db.execute("SELECT body FROM medications WHERE reference = ?", (reference,)).fetchone()
            if row is None:
                missing += 1
                continue
            found[reference] = json.loads(row[0])
    return list(found.values()), missing


def result_line(result: dict) -> str:
    """Return a result as one NDJSON line, in ASCII so that no text from the data can fail to be written."""
    return json.dumps(result) + "\n"


def screen(source: Path, out: Path, as_of: datetime | None, workers: int, progress: bool = True) -> Summary:
    """Evaluate every patient in a Bulk Data export; a second run resumes where the first stopped."""
    files = input_files(source)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stage(out / STAGE)
    as_of_text = _fixed_as_of(stage, as_of)
    staged = stage.load(files)
    stage.mark_done(recover(out / RESULTS))
    remaining = stage.count("patients") - stage.count("done")
    started = time.monotonic()
    evaluated = 0
    start = (str(stage.path), as_of_text)
    with (
        closing(_evaluated(_batches(stage.pending(), BATCH), workers, start)) as batches,
        (out / RESULTS).open("a", encoding="utf-8") as sink,
        tqdm(total=remaining, unit="patient", disable=not progress, smoothing=0.1) as bar,
    ):
        for lines, size in batches:
            sink.write(lines)
            sink.flush()
            evaluated += size
            bar.update(size)
        os.fsync(sink.fileno())
    seconds = time.monotonic() - started
    summary = summarise([out / RESULTS], as_of_text)
    summary.staged = staged
    summary.run = {
        "patients": evaluated,
        "seconds": round(seconds, 2),
        "perSecond": round(evaluated / seconds, 1) if seconds else None,
        "workers": workers,
    }
    summary.save(out)
    report.write([out / RESULTS], summary, out)
    return summary


def _evaluated(
    batches: Iterator[list[str]], workers: int, start: tuple[str, str]
) -> Iterator[tuple[str, int]]:
    """Yield each batch's result lines and size, in order, with at most a few batches in flight."""
    pool = _pool(workers, start)
    window: deque[tuple[Future, list[str]]] = deque()
    try:
        while True:
            while len(window) < 4 * workers and (batch := next(batches, None)):
                window.append((pool.submit(_evaluate_batch, batch), batch))
            if not window:
                return
            future, batch = window.popleft()
            try:
                lines = future.result()
            except BrokenProcessPool:
                # A worker died in native code (the rule engine is a C extension) and took the pool with
                # it: find the patient it dies on, then go on in a fresh pool with the batches in flight.
                pool.shutdown()
                lines = _one_by_one(batch, start)
                pool = _pool(workers, start)
                window = deque((pool.submit(_evaluate_batch, b), b) for _, b in window)
            yield lines, len(batch)
    finally:
        pool.shutdown(cancel_futures=True)


def _one_by_one(batch: list[str], start: tuple[str, str]) -> str:
    """Evaluate each patient of a batch alone; a patient whose evaluation kills its worker gets an error."""
    lines = []
    pool = None
    try:
        for patient in batch:
            pool = pool or _pool(1, start)
            try:
                lines.append(pool.submit(_evaluate_batch, [patient]).result())
            except BrokenProcessPool:
                pool.shutdown()
                pool = None
                issue = Issue("exception", "the evaluation crashed its process; no advice was produced")
                lines.append(
                    result_line({"patient": patient, "status": 500, "error": operation_outcome([issue])})
                )
    finally:
        if pool:
            pool.shutdown()
    return "".join(lines)


def _pool(workers: int, start: tuple[str, str]) -> ProcessPoolExecutor:
    """Start worker processes, each with its evaluator; stop the screen if they cannot start."""
    # Workers come from a fresh single-threaded server process, never forked from this one: a fork
    # taken while another thread holds a lock (logging, a pool, the allocator) can hang forever.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["service.population.screen"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=start)
    try:
        pool.submit(_evaluate_batch, []).result()
    except BrokenProcessPool:
        pool.shutdown()
        # Else every patient would be taken for one that kills its worker.
        raise ScreenError("the worker processes cannot start (the error is above)") from None
    return pool


def _fixed_as_of(stage: Stage, as_of: datetime | None) -> str:
    """Return the evaluation time of this screen: set by its first run, kept by every resumed run."""
    stored = stage.meta("asOf")
    if stored and as_of and parse_time(stored) != as_of:
        raise ScreenError(
            f"this output was started as of {stored}; resume without --as-of or use a new --out"
        )
    if stored:
        return stored
    chosen = (as_of or datetime.now(UTC)).isoformat()
    stage.set_meta("asOf", chosen)
    return chosen


def _batches(items: Iterator[T], size: int) -> Iterator[list[T]]:
    while batch := [item for _, item in zip(range(size), items, strict=False)]:
        yield batch
