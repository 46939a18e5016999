"""The imnm-cds command: serve under gunicorn, evaluate files offline, replay fixtures, report feedback."""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gunicorn.app.base import BaseApplication

from rules import knowledge
from service import hooks, logs, metrics
from service.config import ConfigError, Settings
from service.evaluate import explain, guidance
from service.evaluate.pipeline import Evaluation, Evaluator
from service.fhir import parse_datetime
from service.gather import backend, bulk
from service.outcome import ApiError, Issue, operation_outcome
from service.population import distributed, ehr, screen
from service.population.screen import ScreenError
from service.store.feedback import FeedbackStore, StoreError
from service.web import auth
from service.web.app import create_app

KEEPALIVE_FACTOR = 2  # connections a worker holds, per thread
OFFLINE_DEADLINE_MS = 60_000


def main(argv: list[str] | None = None) -> int:
    """Run the imnm-cds command line."""
    parser = argparse.ArgumentParser(prog="imnm-cds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, about: str) -> argparse.ArgumentParser:
        # Every flag's help shows its default.
        return commands.add_parser(name, help=about, description=about, formatter_class=DefaultsShown)

    serve = command("serve", "run the service under gunicorn (gthread workers)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, help="port to listen on (default: IMNM_CDS_PORT, else 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default: IMNM_CDS_WORKERS, else 2)")
    serve.add_argument("--threads", type=int, help="threads per worker (default: IMNM_CDS_THREADS, else 4)")
    serve.add_argument(
        "--timeout", type=int, default=30, help="seconds before gunicorn restarts a stuck worker"
    )
    serve.add_argument(
        "--keepalive",
        type=int,
        default=5,
        metavar="SECONDS",
        help="seconds an idle connection is kept open for the next call",
    )

    evaluate = command(
        "evaluate", "evaluate CDS Hooks requests or Bundles offline; print the answers by file"
    )
    evaluate.add_argument(
        "files", nargs="+", help="JSON files: CDS Hooks requests or FHIR Bundles; - reads standard input"
    )
    evaluate.add_argument(
        "--as-of", type=_as_of, help="evaluation time (FHIR dateTime), as /evaluate?asOf=; default now"
    )
    evaluate.add_argument(
        "--hook",
        default="patient-view",
        choices=[s.hook for s in hooks.SERVICES.values()],
        metavar="HOOK",
        help="the hook a Bundle is evaluated for: patient-view, order-select or order-sign (/evaluate?hook=)",
    )
    evaluate.add_argument(
        "--fhir",
        action="store_true",
        help="answer FHIR resources (a transaction Bundle), not cards, as Accept: application/fhir+json",
    )
    evaluate.add_argument(
        "--html", type=Path, metavar="OUT.html", help="also write the explanation page (one file only)"
    )

    replay = command("replay", "post every fixture to a server and diff against expected.json")
    replay.add_argument("directory", type=Path, help="a folder of <scenario>/request.json and expected.json")
    replay.add_argument(
        "--url", required=True, help="base URL of a running service, e.g. http://127.0.0.1:8080"
    )
    replay.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    replay.add_argument(
        "--jwt-key",
        type=Path,
        help="PEM private key (RSA or EC) to sign each call with, for IMNM_CDS_AUTH=jwt",
    )
    replay.add_argument("--issuer", help="the iss of the signed calls: a trusted issuer of the service")
    replay.add_argument("--kid", help="the key id its JWK Set publishes the key under")

    report = command(
        "feedback-report", "per rule and topic: cards issued, accepted, overridden, top override reasons"
    )
    report.add_argument("--json", action="store_true", help="print JSON, as GET /feedback/summary answers")

    command("knowledge-report", "list the engineering defaults in rules/ for the clinical owner to review")

    population = command(
        "screen", "evaluate every patient of a Bulk Data export (NDJSON files, or a FHIR server); resumable"
    )
    population.add_argument(
        "directory", type=Path, nargs="?", help="a folder of *.ndjson files, one resource per line"
    )
    server = population.add_argument_group("straight from a FHIR server (Bulk Data, SMART Backend Services)")
    server.add_argument("--fhir", metavar="BASE", help="the FHIR server's base URL, instead of a folder")
    server.add_argument("--group", metavar="ID", help="export Group/ID's patients (default: every patient)")
    server.add_argument("--client-id", help="this service's client_id at the server's token endpoint")
    server.add_argument("--key", type=Path, help="the client's private key (PEM: RSA, or EC P-384)")
    server.add_argument(
        "--jwks", action="store_true", help="print the JWK Set to register for --key, and exit"
    )
    server.add_argument(
        "--since", type=_instant, metavar="T", help="apply the changes since T to the last export in --out"
    )
    server.add_argument(
        "--post-results", metavar="BASE", help="write each patient's results as FHIR to this server"
    )
    server.add_argument(
        "--export-wait", type=float, default=3600.0, help="seconds to wait for the export, at most"
    )
    population.add_argument("--out", type=Path, help="folder for results.ndjson and summary.json")
    population.add_argument("--as-of", type=_as_of, help="evaluation time (FHIR dateTime); default now")
    population.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)"
    )
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
        "knowledge-report": run_knowledge_report,
    }
    try:
        return commands_by_name[args.command](args)
    except (ConfigError, ScreenError, StoreError, ApiError, requests.RequestException, OSError) as exc:
        print(f"imnm-cds: {exc}", file=sys.stderr)
        return 2


class DefaultsShown(argparse.HelpFormatter):
    """Show a flag's default after its help, unless it has none or the help already says it."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=40)  # the longest flag with its value still fits

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def run_knowledge_report(args) -> int:
    """Print each parameter set as an engineering default: its key, value, unit and note."""
    loaded = knowledge.load(Settings.from_env().knowledge_overrides)
    for param in loaded.for_review():
        line = f"{param.key} = {param.value!r} {param.unit}".rstrip()
        print(line + (f"  # {param.note}" if param.note else ""))
    return 0


def run_serve(args) -> int:
    """Serve the app factory under gunicorn with threaded workers; bad settings stop it before any worker."""
    settings = Settings.from_env()
    auth.load_issuers(settings)  # a bad trusted-issuer file stops the start before any worker
    # An option given on the command line wins over its IMNM_CDS_ setting.
    port, workers, threads = (
        getattr(settings, name) if getattr(args, name) is None else getattr(args, name)
        for name in ("port", "workers", "threads")
    )
    FeedbackStore(settings.database_url).close()  # so does a database that cannot be opened
    metrics.share_between_processes()  # before any worker forks and makes its metrics

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
            self.cfg.set("logconfig_dict", logs.gunicorn_config())
            self.cfg.set("child_exit", lambda _arbiter, worker: metrics.process_gone(worker.pid))

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
    """Print an object of each file's answer by path; name each file that failed, and why, on stderr."""
    if args.html and len(args.files) > 1:
        print("imnm-cds: --html explains one file at a time", file=sys.stderr)
        return 2
    # Offline, nobody waits on the answer: the deadline of a hook call would only make it depend on load.
    evaluator = Evaluator(Settings.from_env(deadline_ms=OFFLINE_DEADLINE_MS))
    results, failed = {}, False
    for name in args.files:
        try:
            evaluation, results[name] = _evaluate_file(evaluator, name, args)
            if args.html:
                explain.write(evaluator.knowledge, evaluation, args.html)
        except CliInputError as exc:
            failed = True
            print(f"imnm-cds: {name}: {exc}", file=sys.stderr)
            results[name] = operation_outcome([Issue("structure", str(exc))])
        except ApiError as exc:
            failed = True
            reasons = "; ".join(issue.diagnostics for issue in exc.issues)
            print(f"imnm-cds: {name}: refused ({exc.status}): {reasons}", file=sys.stderr)
            results[name] = operation_outcome(exc.issues)
    print(json.dumps(results, indent=2, ensure_ascii=False))
    return 1 if failed else 0


class CliInputError(ValueError):
    """A file given to evaluate cannot be read as JSON."""


def _evaluate_file(evaluator: Evaluator, name: str, args) -> tuple[Evaluation, dict]:
    """Evaluate one file (or standard input) as /evaluate or the hook's service would answer it."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        body = json.loads(text)
    except OSError as exc:
        raise CliInputError(f"cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CliInputError("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CliInputError(f"not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    now = datetime.now(UTC)
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        as_of = args.as_of.isoformat() if args.as_of else None
        evaluation = evaluator.bundle(body, now, as_of, args.hook)
        service = hooks.service_for(args.hook)
    else:
        service = hooks.service_for(body.get("hook") if isinstance(body, dict) else None)
        evaluation = evaluator.hook(service, body, args.as_of or now)
    if args.fhir:
        results = guidance.bundle(evaluation.cards, evaluation.patient_id, service.id, evaluation.now)
        return evaluation, results
    return evaluation, evaluation.response()


def run_screen(args) -> int:
    """Screen a population and print patients per card topic and indicator."""
    Settings.from_env()  # bad settings stop the screen before any worker starts
    if args.jwks:
        print(json.dumps(_key(args).jwks(), indent=2))
        return 0
    if (args.directory is None) == (args.fhir is None):
        raise ScreenError("screen a folder of NDJSON files or a FHIR server (--fhir BASE), one of them")
    if args.directory and (args.group or args.since or args.post_results):
        raise ScreenError("--group, --since and --post-results go with --fhir")
    _required(args, "out")
    try:
        if args.fhir:
            summary = _screen_from_server(args)
        elif args.dask:
            scheduler = None if args.dask == "local" else args.dask
            as_of = args.as_of or datetime.now(UTC)
            summary = distributed.screen_on_dask(args.directory, args.out, as_of, scheduler, args.workers)
        else:
            summary = screen.screen(args.directory, args.out, args.as_of, args.workers, not args.no_progress)
    except KeyboardInterrupt:
        print("imnm-cds: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except ServerRefused as exc:
        print(f"imnm-cds: {exc}", file=sys.stderr)
        return 3
    print(summary.table())
    if summary.export:
        export = summary.export
        print(
            f"export: {export['seconds']} s, {export['errorsReported']} errors reported by the server",
            file=sys.stderr,
        )
    if summary.run:
        run = summary.run
        print(
            f"this run: {run['patients']} patients in {run['seconds']} s ({run['perSecond']}/s)",
            file=sys.stderr,
        )
    return 0


def _screen_from_server(args) -> screen.Summary:
    """Export from the FHIR server as a backend client, then screen; the server's refusals exit with 3."""
    client = backend.BackendClient(_required(args, "client_id"), _key(args))
    limits = bulk.Limits(max_wait=args.export_wait)
    read = {*ehr.TYPES, *(["Group"] if args.group else [])}  # a Group export reads the Group
    source = bulk.BulkClient(client.session, args.fhir, client.auth(args.fhir, read), limits)
    results = None
    if args.post_results:
        token = client.auth(args.post_results, {"GuidanceResponse", "DetectedIssue"}, write=True)
        results = bulk.BulkClient(client.session, args.post_results, token, limits)
    try:
        return ehr.screen_from_server(
            source,
            args.out,
            args.as_of,
            args.workers,
            progress=not args.no_progress,
            group=args.group,
            since=args.since,
            results_server=results,
        )
    except (backend.AccessError, bulk.ExportError) as exc:
        raise ServerRefused(str(exc)) from None


class ServerRefused(Exception):
    """The FHIR server refused or failed what the screen asked of it."""


def _key(args) -> backend.ClientKey:
    try:
        return backend.ClientKey.load(_required(args, "key"))
    except backend.AccessError as exc:
        raise ScreenError(str(exc)) from None


def _required(args, name: str):
    value = getattr(args, name)
    if value is None:
        raise ScreenError(f"--{name.replace('_', '-')} is needed here")
    return value


def _instant(text: str) -> str:
    moment = parse_datetime(text)
    if moment is None or "T" not in text:
        raise argparse.ArgumentTypeError("must be a FHIR instant, e.g. 2024-06-01T12:00:00Z")
    return text


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
    if urlsplit(base).scheme not in ("http", "https"):
        print(f"imnm-cds: --url {args.url} needs a scheme, e.g. http://{args.url}", file=sys.stderr)
        return 2
    sign = _signer(args)
    scenarios = sorted(p.parent for p in args.directory.glob("*/request.json"))
    if not scenarios:
        print(f"no scenarios (*/request.json) under {args.directory}", file=sys.stderr)
        return 2
    different = 0
    with requests.Session() as http:
        for scenario in scenarios:
            request = json.loads((scenario / "request.json").read_text(encoding="utf-8"))
            expected = json.loads((scenario / "expected.json").read_text(encoding="utf-8"))
            target = scenario_target(request, base)
            try:
                response = http.post(target, json=request, timeout=args.timeout, headers=sign(target))
            except requests.ConnectionError:
                print(
                    f"imnm-cds: nothing answers at {base}: is the service running there (imnm-cds serve)?",
                    file=sys.stderr,
                )
                return 2
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


def _signer(args):
    """Return a function giving each call's headers: a JWT signed for its URL with --jwt-key, or none."""
    if args.jwt_key is None:
        return lambda _url: {}
    if not args.issuer:
        raise ConfigError("--jwt-key needs --issuer, the iss the service trusts")
    try:
        key = serialization.load_pem_private_key(args.jwt_key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"--jwt-key {args.jwt_key}: not a PEM private key without a password") from None
    # The pair CDS Hooks 2.0 recommends, one for each key type.
    algorithm = "ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS384"
    header = {"typ": "JWT", **({"kid": args.kid} if args.kid else {})}

    def headers(url: str) -> dict:
        now = int(time.time())
        claims = {"iss": args.issuer, "aud": url, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
        return {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm=algorithm, headers=header)}"}

    return headers


def run_feedback_report(args) -> int:
    """Print what clinicians did with our cards, from the database IMNM_CDS_DATABASE_URL names."""
    store = FeedbackStore(Settings.from_env().database_url, create=False)
    print(f"feedback from {store.name}", file=sys.stderr)
    try:
        summary = store.summary()
    finally:
        store.close()
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    rows = summary["rules"]
    # Knowledge first: rates under one version of the rules are not pooled with another's.
    names = ("knowledge", "rule", "topic")
    widths = [max([len(name)] + [len(row[name] or "-") for row in rows]) for name in names]
    line = "  ".join(f"{{:<{width}}}" for width in widths) + "  {:>8}  {:>6}  {:>8}  {:>10}  {}"
    print(line.format(*names, "issued", "cards", "accepted", "overridden", "top override reasons"))
    for row in rows:
        reasons = ", ".join(f"{r['code']} ({r['count']})" for r in row["topOverrideReasons"])
        counts = (row["issued"], row["cards"], row["accepted"], row["overridden"])
        print(line.format(*(row[name] or "-" for name in names), *counts, reasons).rstrip())
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
