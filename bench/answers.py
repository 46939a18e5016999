"""Record every fixture's and every hostile input's answer (status, media type, body), or compare two records.

    python bench/answers.py record OUT.json
    python bench/answers.py compare BEFORE.json AFTER.json [--ignore-error-positions]

Answers come from the app in process (no JWT, a throwaway SQLite database), so a record depends only on
the code and rules/. Hostile bodies that tests generate at run time (tens of megabytes) are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ROOT / "tests" / "hostile"
ENDPOINTS = {
    "patient-view": ("/cds-services/imnm-patient-view", {}),
    "order-select": ("/cds-services/imnm-statin-order-select", {}),
    "order-sign": ("/cds-services/imnm-statin-order-sign", {}),
    "feedback": ("/cds-services/imnm-patient-view/feedback", {}),
    "evaluate": ("/evaluate", {}),
    "evaluate-fhir": ("/evaluate", {"Accept": "application/fhir+json"}),
}
# Positions inside JSON parser messages ("line 1 column 5 (char 4)") may move with another parser.
POSITION = re.compile(r"(line|column|char|position|offset)\s*\d+", re.IGNORECASE)


def answer(response) -> dict:
    body = response.get_data(as_text=True)
    with contextlib.suppress(ValueError):
        body = json.loads(body)
    return {"status": response.status_code, "type": response.mimetype, "body": body}


def record() -> dict:
    """Post every fixture to its target and every committed hostile body to every endpoint."""
    sys.path.insert(0, str(ROOT))
    os.environ["IMNM_CDS_DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp()}/feedback.sqlite"
    from service.cli import scenario_target
    from service.web.app import create_app

    client = create_app().test_client()
    answers = {}
    for request_file in sorted((ROOT / "fhir_fixtures").glob("*/request.json")):
        request = json.loads(request_file.read_text(encoding="utf-8"))
        response = client.post(scenario_target(request, ""), json=request)
        answers[f"fixture/{request_file.parent.name}"] = answer(response)
    manifest = tomllib.loads((HOSTILE / "manifest.toml").read_text(encoding="utf-8"))["case"]
    for case in manifest:
        if "file" not in case:
            continue
        body = (HOSTILE / case["file"]).read_bytes()
        for endpoint, (path, headers) in ENDPOINTS.items():
            response = client.post(path, data=body, headers={"Content-Type": "application/json", **headers})
            answers[f"hostile/{case['name']}/{endpoint}"] = answer(response)
    return answers


def without_positions(value):
    if isinstance(value, str):
        return POSITION.sub(r"\1 N", value)
    if isinstance(value, list):
        return [without_positions(v) for v in value]
    if isinstance(value, dict):
        return {k: without_positions(v) for k, v in value.items()}
    return value


def compare(before: dict, after: dict, ignore_positions: bool) -> list[str]:
    """Name every answer that differs, or is only in one record."""
    differences = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if ignore_positions:
            a, b = without_positions(a), without_positions(b)
        if a != b:
            differences.append(key)
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("record", help="record the answers of this checkout")
    out.add_argument("out", type=Path, help="the JSON file to write")
    diff = commands.add_parser("compare", help="compare two records; exit 1 on any difference")
    diff.add_argument("before", type=Path)
    diff.add_argument("after", type=Path)
    diff.add_argument("--ignore-error-positions", action="store_true", help="let parser positions move")
    args = parser.parse_args()
    if args.command == "record":
        answers = record()
        args.out.write_text(json.dumps(answers, indent=1, sort_keys=True, ensure_ascii=False))
        print(f"{len(answers)} answers recorded in {args.out}")
        return 0
    before, after = (json.loads(p.read_text(encoding="utf-8")) for p in (args.before, args.after))
    differences = compare(before, after, args.ignore_error_positions)
    for key in differences:
        print(f"differs: {key}")
    print(f"{len(before)} before, {len(after)} after, {len(differences)} differ")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
