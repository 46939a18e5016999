"""Screen a population straight from a FHIR server: patients per second end to end, export against screen.

A real FHIR server (sekmet) runs on loopback with Bulk Data and a SMART Backend Services token endpoint
that knows a client key made here. The population of bench/screen.py (carebundle patients with myositis
data) is loaded into it, then `imnm-cds screen --fhir` runs as a separate process: token, kick-off,
polling, download, staging, screening. Run from the repository root:

    .venv/bin/pip install -e '.[bench,test]' && .venv/bin/python bench/bulk_screen.py [--size 1000]

Results go to bench/results/bulk-screen-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from screen import population

from common import ROOT, environment, save

sys.path.insert(0, str(ROOT / "tests"))
from conftest import FHIR_TOKEN, sekmet
from service.gather.backend import ClientKey

CLIENT_ID = "imnm-cds-bench"


def load(base: str, export: Path, per_transaction: int = 2000) -> int:
    """Put every resource of an export on the server under its own id; return how many."""
    lines = [line for path in sorted(export.glob("*.ndjson")) for line in path.read_text().splitlines()]
    with requests.Session() as http:
        for start in range(0, len(lines), per_transaction):
            entries = []
            for line in lines[start : start + per_transaction]:
                resource = json.loads(line)
                url = f"{resource['resourceType']}/{resource['id']}"
                entries.append({"resource": resource, "request": {"method": "PUT", "url": url}})
            answer = http.post(
                base,
                json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                headers={"Authorization": f"Bearer {FHIR_TOKEN}"},
                timeout=600,
            )
            answer.raise_for_status()
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args()
    export = population(args.size)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        key = work / "client.pem"
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        auth = {
            "types": ["bearer", "smart"],
            "tokens": [FHIR_TOKEN],
            "smart_clients": [
                {"client_id": CLIENT_ID, "jwks": ClientKey.load(key).jwks(), "scopes": "system/*.rs"}
            ],
            "enforce_scopes": False,  # sekmet wants system/*.rs for status and file URLs (see the tests)
        }
        settings = {"server_auth": auth, "simulator": {"enabled": False, "delay_seconds": 0}}
        (work / "sekmet").mkdir()
        with sekmet(work / "sekmet", **settings) as base:
            started = time.monotonic()
            resources = load(base, export)
            print(
                f"loaded {resources} resources into sekmet in {time.monotonic() - started:.0f} s", flush=True
            )
            out = work / "out"
            command = [
                sys.executable,
                "-m",
                "service.cli",
                "screen",
                "--fhir",
                base,
                "--client-id",
                CLIENT_ID,
            ]
            command += [
                "--key",
                str(key),
                "--out",
                str(out),
                "--as-of",
                "2024-06-01T12:00:00Z",
                "--no-progress",
            ]
            started = time.monotonic()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            seconds = time.monotonic() - started
            if done.returncode:
                raise SystemExit(f"screen failed: {done.stderr[-2000:]}")
            summary = json.loads((out / "summary.json").read_text())
    exported, screened = summary["export"]["seconds"], summary["thisRun"]["seconds"]
    result = {
        "environment": environment(),
        "patients": args.size,
        "resources": resources,
        "seconds": round(seconds, 1),
        "patientsPerSecond": round(args.size / seconds, 1),
        "exportSeconds": exported,
        "screenSeconds": screened,
        "exportShare": round(exported / seconds, 2),
        "screenShare": round(screened / seconds, 2),
        "summary": summary,
    }
    print(done.stdout)
    rate, export_share, screen_share = (
        result[k] for k in ("patientsPerSecond", "exportShare", "screenShare")
    )
    print(
        f"{args.size} patients from sekmet in {result['seconds']} s: {rate} patients/s; export {exported} s"
        f" ({export_share:.0%}), screen {screened} s ({screen_share:.0%}), the rest staging and start-up"
    )
    print(f"saved {save('bulk-screen', result)}")


if __name__ == "__main__":
    main()
