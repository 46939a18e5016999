"""The imnm-cds command: serve under gunicorn, evaluate files offline, replay fixtures, report feedback."""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import requests
from gunicorn.app.base import BaseApplication

from service import hooks
from service.config import ConfigError, Settings
from service.evaluate.pipeline import Evaluator
from service.fhir import parse_datetime
from service.outcome import ApiError, operation_outcome
from service.population import distributed, screen
from service.population.screen import ScreenError
from service.store.feedback import FeedbackStore, StoreError
from service.web import auth
from service.web.app import create_app

KEEPALIVE_FACTOR = 2  # connections a worker holds, per thread


def main(argv: list[str] | None = None) -> int:
    """Run the imnm-cds command line."""
    parser = argparse.ArgumentParser(prog="imnm-cds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service under gunicorn (gthread workers)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, help="default: IMNM_CDS_PORT, else 8080")
    serve.add_argument("--workers", type=int, help="default: IMNM_CDS_WORKERS, else 2")
    serve.add_argument("--threads", type=int, help="default: IMNM_CDS_THREADS, else 4")
    serve.add_argument(
        "--timeout", type=int, default=30, help="seconds before gunicorn restarts a stuck worker"
    )
    serve.add_argument(
        "--keepalive", type=int, default=5, help="seconds an idle connection is kept open for the next call"
    )

    evaluate = commands.add_parser(
        "evaluate", help="evaluate CDS Hooks requests or Bundles offline; print cards"
    )
    evaluate.add_argument("files", nargs="+", type=Path)

    replay = commands.add_parser(
        "replay", help="post every fixture to a server and diff against expected.json"
    )
    replay.add_argument("directory", type=Path)
    replay.add_argument(
        "--url", required=True, help="base URL of a running service, e.g. http://127.0.0.1:8080"
    )
    replay.add_argument("--timeout", type=float, default=10.0)

    report = commands.add_parser(
        "feedback-report",
        help="per rule and topic: cards issued, accepted, overridden, top override reasons",
    )
    report.add_argument("--json", action="store_true", help="print JSON, as GET /feedback/summary answers")

    population = commands.add_parser(
        "screen", help="evaluate every patient of a Bulk Data export (NDJSON); resumable"
    )
    population.add_argument("directory", type=Path, help="a folder of *.ndjson files, one resource per line")
    population.add_argument(
        "--out", type=Path, required=True, help="folder for results.ndjson and summary.json"
    )
    population.add_argument("--as-of", type=_as_of, help="evaluation time (FHIR dateTime); default now")
    population.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    population.add_argument("--no-progress", action="store_true", help="no progress bar")
    population.add_argument(
        "--dask",
        nargs="?",
        const="local",
        metavar="SCHEDULER",
        help="run on Dask: a local cluster, or the scheduler at this address (pip install '.[dask]')",
    )

    args = parser.parse_args(argv)
    commands_by_name = {
        "serve": run_serve,
        "evaluate": run_evaluate,
        "replay": run_replay,
        "screen": run_screen,
        "feedback-report": run_feedback_report,
    }
    try:
        return commands_by_name[args.command](args)
    except (ConfigError, ScreenError, StoreError, ApiError, requests.RequestException, OSError) as exc:
        print(f"imnm-cds: {exc}", file=sys.stderr)
        return 2


def run_serve(args) -> int:
    """Serve the app factory under gunicorn with threaded workers; bad settings stop it before any worker."""
    settings = Settings.from_env()
    auth.load_issuers(settings)  # a bad trusted-issuer file stops the start before any worker
    # An option given on the command line wins over its IMNM_CDS_ setting.
    port, workers, threads = (
        getattr(settings, name) if getattr(args, name) is None else getattr(args, name)
        for name in ("port", "workers", "threads")
    )

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", threads)
            # Keep-alive: a worker holds idle connections beyond its busy threads, up to as many again.
            # Bounded so, the first worker to wake cannot take every connection of a busy client and
            # leave the others idle (gunicorn's default, 1,000 each, did: measured, README "Speed").
            self.cfg.set("worker_connections", KEEPALIVE_FACTOR * threads)
            self.cfg.set("keepalive", args.keepalive)
            self.cfg.set("timeout", args.timeout)
            self.cfg.set("accesslog", None)
            # gunicorn's control socket would let any process of this user resize or stop the server,
            # and every instance of a user shares its one default path.
            self.cfg.set("control_socket_disable", True)

        def load(self):
            return frozen(create_app(settings))

    Server().run()
    return 0


def frozen(app):
    """Exempt everything loaded so far from garbage collection, then return the app."""
    # The knowledge, compiled rules and FHIR models live as long as the process. Left in the collector's
    # sight, every full collection scans them, and one during a large request held it up by ~70 ms.
    gc.collect()
    gc.freeze()
    return app


def run_evaluate(args) -> int:
    """Print each file's response: the document itself for one file, an object keyed by path for several."""
    evaluator = Evaluator(Settings.from_env())
    results, failed = {}, False
    for path in args.files:
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            now = datetime.now(UTC)
            if isinstance(body, dict) and body.get("resourceType") == "Bundle":
                evaluation = evaluator.bundle(body, now)
            else:
                hook = body.get("hook") if isinstance(body, dict) else None
                evaluation = evaluator.hook(hooks.service_for(hook), body, now)
            results[str(path)] = evaluation.response()
        except (OSError, ValueError) as exc:
            failed = True
            results[str(path)] = {"error": f"cannot read {path}: {type(exc).__name__}"}
        except ApiError as exc:
            failed = True
            results[str(path)] = {"status": exc.status, **operation_outcome(exc.issues)}
    output = next(iter(results.values())) if len(results) == 1 else results
    print(json.dumps(output, indent=2, ensure_ascii=False))
    return 1 if failed else 0


def run_screen(args) -> int:
    """Screen a population and print patients per card topic and indicator."""
    Settings.from_env()  # bad settings stop the screen before any worker starts
    try:
        if args.dask:
            scheduler = None if args.dask == "local" else args.dask
            as_of = args.as_of or datetime.now(UTC)
            summary = distributed.screen_on_dask(args.directory, args.out, as_of, scheduler, args.workers)
        else:
            summary = screen.screen(args.directory, args.out, args.as_of, args.workers, not args.no_progress)
    except KeyboardInterrupt:
        print("imnm-cds: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.table())
    if summary.run:
        run = summary.run
        print(
            f"this run: {run['patients']} patients in {run['seconds']} s ({run['perSecond']}/s)",
            file=sys.stderr,
        )
    return 0


def _as_of(text: str) -> datetime:
    moment = parse_datetime(text)
    if moment is None:
        raise argparse.ArgumentTypeError("must be a FHIR dateTime, e.g. 2024-06-01T12:00:00Z")
    return moment


def scenario_target(request: dict, base_url: str) -> str:
    """Return where a fixture request goes: a Bundle to /evaluate, a hook request to its service."""
    if request.get("resourceType") == "Bundle":
        return f"{base_url}/evaluate"
    return f"{base_url}/cds-services/{hooks.service_for(request.get('hook')).id}"


def run_replay(args) -> int:
    """Post each <scenario>/request.json and compare the answer with <scenario>/expected.json."""
    base = args.url.rstrip("/")
    scenarios = sorted(p.parent for p in args.directory.glob("*/request.json"))
    if not scenarios:
        print(f"no scenarios (*/request.json) under {args.directory}", file=sys.stderr)
        return 2
    different = 0
    with requests.Session() as http:
        for scenario in scenarios:
            request = json.loads((scenario / "request.json").read_text(encoding="utf-8"))
            expected = json.loads((scenario / "expected.json").read_text(encoding="utf-8"))
            response = http.post(scenario_target(request, base), json=request, timeout=args.timeout)
            try:
                actual = response.json()
            except ValueError:
                actual = {"non-json response": response.text[:500], "status": response.status_code}
            diff = list(
                difflib.unified_diff(
                    canonical(expected).splitlines(),
                    canonical(actual).splitlines(),
                    f"{scenario.name}/expected.json",
                    f"{scenario.name} (HTTP {response.status_code})",
                    lineterm="",
                )
            )
            if diff:
                different += 1
                print("\n".join(diff))
            print(f"{'DIFFERENT' if diff else 'same     '} {scenario.name}", file=sys.stderr)
    print(f"{len(scenarios) - different} same, {different} different", file=sys.stderr)
    return 1 if different else 0


def run_feedback_report(args) -> int:
    """Print what clinicians did with our cards, from the database IMNM_CDS_DATABASE_URL names."""
    store = FeedbackStore(Settings.from_env().database_url)
    try:
        summary = store.summary()
    finally:
        store.close()
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    rows = summary["rules"]
    rule = max([len("rule")] + [len(row["rule"]) for row in rows])
    topic = max([len("topic")] + [len(row["topic"]) for row in rows])
    line = f"{{:<{rule}}}  {{:<{topic}}}  {{:>8}}  {{:>6}}  {{:>8}}  {{:>10}}  {{}}"
    print(line.format("rule", "topic", "issued", "cards", "accepted", "overridden", "top override reasons"))
    for row in rows:
        reasons = ", ".join(f"{r['code']} ({r['count']})" for r in row["topOverrideReasons"])
        counts = (row["issued"], row["cards"], row["accepted"], row["overridden"])
        print(line.format(row["rule"], row["topic"], *counts, reasons).rstrip())
    unmatched = summary["unmatchedFeedback"]
    print(
        f"feedback on cards with no issue record: {unmatched['accepted']} accepted, "
        f"{unmatched['overridden']} overridden"
    )
    return 0


def canonical(document) -> str:
    """Render JSON the same way every time, so diffs show only real differences."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
