"""Population screening speed and peak memory for synthetic populations of 1,000 and 10,000 patients.

Usage: .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/screen.py [--sizes 1000,10000] [--dask]

Patients come from carebundle (deterministic US Core records: labs, conditions, prescriptions,
encounters) with CK series, myositis antibodies, muscle symptoms and statins added to some of them,
written as a Bulk Data export (one NDJSON file per resource type) under bench/.populations/ and
reused on later runs. Each population is screened by `imnm-cds screen` in a fresh output folder,
while the resident memory of the whole process tree is sampled: patients per second, wall time and
peak memory (largest single process, and the tree's total). Results go to bench/results/screen-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

from common import ROOT, environment, save

POPULATIONS = ROOT / "bench" / ".populations"
PROFILES = ["healthy", "hypertension", "type2_diabetes", "ckd_stage3", "anaemia"]
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def population(size: int) -> Path:
    """Return a Bulk Data export of this many patients, generating it the first time."""
    directory = POPULATIONS / f"patients-{size}"
    if (directory / "complete").exists():
        return directory
    from carebundle import generate_bundle  # only the generator needs it

    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, object] = {}
    started = time.monotonic()
    for index in range(size):
        bundle = generate_bundle(
            profile=PROFILES[index % len(PROFILES)],
            seed=index,
            sex="F" if index % 2 else "M",
            reference_date=date(2024, 6, 1),
            index=index,
        ).model_dump(mode="json", exclude_none=True)
        for resource in as_bulk(bundle, random.Random(index)):
            kind = resource["resourceType"]
            if kind not in files:
                files[kind] = (directory / f"{kind}.ndjson").open("w")
            files[kind].write(json.dumps(resource) + "\n")
        if index % 1000 == 999:
            print(f"  generated {index + 1} patients in {time.monotonic() - started:.0f} s", flush=True)
    for handle in files.values():
        handle.close()
    (directory / "complete").touch()
    return directory


def as_bulk(bundle: dict, rng: random.Random) -> list[dict]:
    """Give a transaction Bundle's resources ids and relative references, and add myositis data."""
    names = {}
    resources = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        resource["id"] = entry["fullUrl"].rsplit(":", 1)[-1]
        names[entry["fullUrl"]] = f"{resource['resourceType']}/{resource['id']}"
        resources.append(resource)
    _rewrite(resources, names)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    return resources + myositis_data(patient["id"], rng)


def _rewrite(node, names: dict[str, str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str) and node["reference"] in names:
            node["reference"] = names[node["reference"]]
        for value in node.values():
            _rewrite(value, names)
    elif isinstance(node, list):
        for value in node:
            _rewrite(value, names)


def myositis_data(pid: str, rng: random.Random) -> list[dict]:
    """Add what the rules read: for most patients a normal CK; for some, a myopathy picture."""
    subject = {"reference": f"Patient/{pid}"}
    roll = rng.random()
    peak = 150 if roll > 0.15 else rng.choice([900, 2500, 6000, 12000])
    added = []
    for i in range(rng.randrange(1, 5)):
        value = max(40, round(peak * rng.uniform(0.6, 1.1)))
        added.append(
            {
                "resourceType": "Observation",
                "id": f"{pid}-ck-{i}",
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "laboratory",
                            }
                        ]
                    }
                ],
                "code": {"coding": [{"system": LOINC, "code": "2157-6", "display": "Creatine kinase"}]},
                "subject": subject,
                "effectiveDateTime": f"2024-0{1 + i}-1{rng.randrange(10)}T08:00:00Z",
                "valueQuantity": {
                    "value": value,
                    "unit": "U/L",
                    "system": "http://unitsofmeasure.org",
                    "code": "U/L",
                },
                "referenceRange": [{"high": {"value": 200, "unit": "U/L"}}],
            }
        )
    if roll < 0.15:
        added.append(
            {
                "resourceType": "Condition",
                "id": f"{pid}-weak",
                "code": {
                    "coding": [{"system": SNOMED, "code": "249939004", "display": "Proximal muscle weakness"}]
                },
                "subject": subject,
                "onsetDateTime": "2024-02-01",
            }
        )
    if roll < 0.08:
        answer = ("10828004", "Positive") if roll < 0.04 else ("260385009", "Negative")
        added.append(
            {
                "resourceType": "Observation",
                "id": f"{pid}-hmgcr",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "93493-5", "display": "HMGCR Antibody, IgG"}]},
                "subject": subject,
                "effectiveDateTime": "2024-05-02T08:00:00Z",
                "valueCodeableConcept": {
                    "coding": [{"system": SNOMED, "code": answer[0], "display": answer[1]}]
                },
            }
        )
    if roll < 0.3:
        added.append(
            {
                "resourceType": "MedicationStatement",
                "id": f"{pid}-statin",
                "status": "active" if roll < 0.2 else "stopped",
                "medicationCodeableConcept": {
                    "coding": [
                        {"system": RXNORM, "code": "617311", "display": "atorvastatin 40 MG Oral Tablet"}
                    ]
                },
                "subject": subject,
                "effectivePeriod": {"start": "2021-01-01", **({} if roll < 0.2 else {"end": "2024-02-15"})},
            }
        )
    return added


def tree_rss_mib(root: int) -> tuple[float, float]:
    """Return (total, largest) resident memory of a process and its descendants, in MiB."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                status = (entry / "status").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            rss[int(entry.name)] = kib / 1024
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier += children
    sizes = [rss.get(pid, 0.0) for pid in tree]
    return sum(sizes), max(sizes, default=0.0)


def screen(export: Path, out: Path, dask: bool) -> dict:
    """Run `imnm-cds screen` on an export, sampling the memory of its process tree."""
    command = [sys.executable, "-m", "service.cli", "screen", str(export), "--out", str(out)]
    command += ["--as-of", "2024-06-01T12:00:00Z", "--no-progress", *(["--dask"] if dask else [])]
    peaks = {"total": 0.0, "largest": 0.0}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, largest = tree_rss_mib(process.pid)
            peaks["total"], peaks["largest"] = max(peaks["total"], total), max(peaks["largest"], largest)
            done.wait(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"screen failed: {stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "seconds": round(seconds, 1),
        "peakMiB": {k: round(v, 1) for k, v in peaks.items()},
        "table": stdout,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="patients in each population, comma-separated")
    parser.add_argument(
        "--dask", action="store_true", help="also screen each population on a local Dask cluster"
    )
    parser.add_argument(
        "--generate-only", action="store_true", help="write the populations (NDJSON) and print where; no run"
    )
    args = parser.parse_args()
    results = {"environment": environment(), "populations": {}}
    for size in map(int, args.sizes.split(",")):
        export = population(size)
        if args.generate_only:
            print(export)
            continue
        lines = sum(1 for f in export.glob("*.ndjson") for _ in f.open())
        megabytes = sum(f.stat().st_size for f in export.glob("*.ndjson")) / 2**20
        print(f"\n{size} patients: {lines} resources, {megabytes:.0f} MB of NDJSON")
        row = {"resources": lines, "megabytes": round(megabytes, 1)}
        for engine in ["local", *(["dask"] if args.dask else [])]:
            out = POPULATIONS / f"out-{size}-{engine}"
            if out.exists():
                shutil.rmtree(out)
            result = screen(export, out, engine == "dask")
            result["patientsPerSecond"] = round(size / result["seconds"], 1)
            row[engine] = result
            print(result["table"])
            print(
                f"{engine}: {result['seconds']} s, {result['patientsPerSecond']} patients/s, peak memory "
                f"{result['peakMiB']['largest']} MiB in one process, {result['peakMiB']['total']} MiB in all"
            )
        results["populations"][str(size)] = row
    if not args.generate_only:
        print(f"saved {save('screen', results)}")


if __name__ == "__main__":
    main()
