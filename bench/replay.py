"""What the shared replay store adds to a call: verifying a token with it and without it, in process.

Usage: .venv/bin/python bench/replay.py [--runs 2000] [--database-url URL]

Signs --runs tokens (ES384) per side, then verifies them in alternating blocks of 100: with only the
process's own memory, and with the store (SQLite in a temporary file, or the database URL given,
e.g. postgresql://imnm_cds:imnm_cds@127.0.0.1:5432/imnm_cds_test, whose seen_tokens rows it leaves).
Prints p50/p95/p99 of each and the difference; saves bench/results/replay-<backend>-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, environment, percentiles, save, table

sys.path.insert(0, str(ROOT / "tests"))

import signing  # the tests' CDS client signs the tokens
from service.config import Settings
from service.store.replay import ReplayStore
from service.web.auth import Issuer, Verifier, signing_keys

AUDIENCE = "https://cds.example.org/cds-services/imnm-patient-view"
BLOCK = 100


def verifier(key: signing.SigningKey, store: ReplayStore | None) -> Verifier:
    keys = signing_keys(signing.jwks(key), strict=True)
    return Verifier(
        [Issuer(signing.ISSUER, keys=keys)],
        leeway_seconds=60,
        jwks_ttl_seconds=300,
        jwks_refetch_seconds=30,
        replay_capacity=100_000,
        replay_store=store,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--database-url", help="default: SQLite in a temporary file")
    args = parser.parse_args()
    key = signing.ec_key("bench")
    with tempfile.TemporaryDirectory() as temporary:
        url = args.database_url or f"sqlite:///{Path(temporary) / 'feedback.sqlite'}"
        url = Settings.from_env({}, database_url=url).database_url
        store = ReplayStore(url, timeout_seconds=1.0)
        sides = {"own memory only": verifier(key, None), "with the store": verifier(key, store)}
        tokens = {
            name: [signing.sign(key, signing.claims(AUDIENCE)) for _ in range(args.runs)] for name in sides
        }
        timings: dict[str, list[float]] = {name: [] for name in sides}
        for start in range(0, args.runs, BLOCK):
            for name, checker in sides.items():
                for token in tokens[name][start : start + BLOCK]:
                    began = time.perf_counter()
                    checker.verify(f"Bearer {token}", AUDIENCE)
                    timings[name].append((time.perf_counter() - began) * 1000)
        store.close()
    rows = {name: percentiles(values) for name, values in timings.items()}
    added = {
        p: round(rows["with the store"][p] - rows["own memory only"][p], 3) for p in ("p50", "p95", "p99")
    }
    backend = url.split(":", 1)[0].split("+")[0]
    print(table(rows))
    print(f"added by the store ({backend}): " + ", ".join(f"{p} {ms} ms" for p, ms in added.items()))
    results = {"environment": environment(), "backend": backend, "timings": rows, "addedMs": added}
    print(f"saved {save(f'replay-{backend}', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
