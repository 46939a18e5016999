"""Screening straight from a FHIR server (sekmet): SMART Backend Services, Bulk Data $export, --since."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_screen import AS_OF, fixture_patients, results, write_export

from conftest import CLI, FHIR_TOKEN, ROOT, ck, condition, sekmet, store
from service.fhir import parse_time
from service.gather import backend, bulk
from service.population import ehr

CLIENT_ID = "imnm-cds-population"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("client") / "client.pem"
    path.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    return path


def renamed(pid: str, resources: list[dict]) -> list[dict]:
    """Give a fixture patient's resources ids of their own, as one server holds every patient."""
    names = {}
    for index, resource in enumerate(resources):
        if resource["resourceType"] != "Patient":
            new = f"{pid}-{resource['resourceType'].lower()}-{index}"
            if "id" in resource:
                names[f'"{resource["resourceType"]}/{resource["id"]}"'] = (
                    f'"{resource["resourceType"]}/{new}"'
                )
            resource["id"] = new
    text = json.dumps(resources)
    for old, new in names.items():
        text = text.replace(old, new)
    return json.loads(text)


def generated() -> dict[str, list[dict]]:
    """Patients whose drugs are named by reference: one to a Medication on the server, one to none."""
    statin = {
        "resourceType": "Medication",
        "id": "bulk-atorvastatin",
        "code": {
            "coding": [{"system": RXNORM, "code": "617311", "display": "atorvastatin 40 MG Oral Tablet"}]
        },
    }
    patients = {}
    for pid, drug in (
        ("bulk-on-statin", "Medication/bulk-atorvastatin"),
        ("bulk-unknown-drug", "Medication/gone"),
    ):
        patients[pid] = [
            {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1961-03-02"},
            ck(f"{pid}-ck", 7800, patient=pid, when="2024-05-01T08:00:00Z"),
            condition(f"{pid}-weak", "249939004", patient=pid),
            {
                "resourceType": "MedicationStatement",
                "id": f"{pid}-med",
                "status": "active",
                "medicationReference": {"reference": drug},
                "subject": {"reference": f"Patient/{pid}"},
                "effectivePeriod": {"start": "2022-01-01"},
            },
        ]
    patients["bulk-normal"] = [
        {"resourceType": "Patient", "id": "bulk-normal", "gender": "male", "birthDate": "1970-01-01"},
        ck("bulk-normal-ck", 120, patient="bulk-normal"),
        condition("bulk-normal-weak", "249939004", patient="bulk-normal"),
    ]
    patients["bulk-on-statin"].append(statin)
    return patients


@pytest.fixture(scope="module")
def population() -> dict[str, list[dict]]:
    patients = {pid: renamed(pid, resources) for pid, resources in fixture_patients().items()}
    return {**patients, **generated()}


@pytest.fixture(scope="module")
def ehr_server(tmp_path_factory, key_file, population):
    """sekmet with Bulk Data, a token endpoint that knows our client by its JWK Set, and the population."""
    jwks = backend.ClientKey.load(key_file).jwks()
    scopes = "system/*.rs system/GuidanceResponse.cu system/DetectedIssue.cu"
    auth = {
        "types": ["bearer", "smart"],
        "tokens": [FHIR_TOKEN],
        "smart_clients": [{"client_id": CLIENT_ID, "jwks": jwks, "scopes": scopes}],
        # sekmet wants system/*.rs for the status and file URLs, which name no resource type: the
        # per-type scopes SMART asks a client to request cannot pass, so the token's scopes are not checked.
        "enforce_scopes": False,
    }
    settings = {"server_auth": auth, "simulator": {"enabled": False, "delay_seconds": 0}}
    with sekmet(tmp_path_factory.mktemp("ehr"), **settings) as base:
        store(base, [r for resources in population.values() for r in resources])
        yield base


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)


def screen_command(base: str, key: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = ["screen", "--fhir", base, "--client-id", CLIENT_ID, "--key", str(key), "--out", str(out)]
    command += ["--workers", "1", "--no-progress", *extra]
    return run(*command)


@pytest.fixture(scope="module")
def first_screen(ehr_server, key_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first")
    done = screen_command(ehr_server, key_file, out, "--as-of", AS_OF, "--post-results", ehr_server)
    assert done.returncode == 0, done.stderr
    assert FHIR_TOKEN not in done.stderr and "eyJ" not in done.stderr + done.stdout  # no token, no JWT
    return out


def test_a_screen_from_the_server_gives_what_a_screen_of_the_same_resources_from_files_gives(
    first_screen, population, ehr_server, key_file, tmp_path
):
    source = write_export(tmp_path / "files", population)
    from_files = tmp_path / "from-files"
    done = run(
        "screen", str(source), "--out", str(from_files), "--as-of", AS_OF, "--workers", "1", "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    expected, actual = results(from_files / "results.ndjson"), results(first_screen / "results.ndjson")
    assert set(actual) == set(population)
    assert actual == expected
    assert any(row.get("cards") for row in actual.values())
    # The export leaves the Medication out (outside the Patient compartment); it is fetched, so the statin
    # is known. The drug named by a Medication the server does not have is counted.
    assert "statin-muscle-symptoms" in topics(actual["bulk-on-statin"])
    summary = json.loads((first_screen / "summary.json").read_text())
    assert (
        summary["medicationRecordsWithDrugNotExported"] == 1 == actual["bulk-unknown-drug"]["drugNotExported"]
    )
    assert summary["export"]["errorsReported"] == 0
    job = json.loads((first_screen / "export" / "job.json").read_text())
    assert job["deleted"] and job["manifest"]["requiresAccessToken"] is True
    # Run again: the same job, nothing downloaded or screened again, the same results.
    again = screen_command(ehr_server, key_file, first_screen, "--as-of", AS_OF)
    assert again.returncode == 0, again.stderr
    assert json.loads((first_screen / "export" / "job.json").read_text()) == job
    assert json.loads((first_screen / "summary.json").read_text())["thisRun"]["patients"] == 0
    assert results(first_screen / "results.ndjson") == actual


def topics(row: dict) -> set[str]:
    return {card["source"]["topic"]["code"] for card in row.get("cards", [])}


def test_results_are_posted_as_fhir_once_and_posting_again_adds_nothing(first_screen, ehr_server, key_file):
    rows = results(first_screen / "results.ndjson")
    cards = sum(len(row.get("cards", [])) for row in rows.values())
    headers = {"Authorization": f"Bearer {FHIR_TOKEN}"}

    def count() -> int:
        answer = requests.get(f"{ehr_server}/GuidanceResponse?_summary=count", headers=headers, timeout=30)
        return answer.json()["total"]

    assert count() == cards > 0
    (first_screen / ehr.POSTED).unlink()
    client = backend.BackendClient(CLIENT_ID, backend.ClientKey.load(key_file))
    token = client.auth(ehr_server, {"GuidanceResponse", "DetectedIssue"}, write=True)
    posted = ehr.post_results(
        bulk.BulkClient(client.session, ehr_server, token), first_screen, parse_time(AS_OF)
    )
    assert posted == sum(1 for row in rows.values() if row.get("cards"))
    assert count() == cards


def test_since_applies_the_changes_and_screens_again_only_the_patient_they_touch(
    first_screen, ehr_server, key_file, population, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(first_screen, out)
    before = results(out / "results.ndjson")
    assert "imnm-suspected" not in topics(before["bulk-normal"])
    since = datetime.now(UTC).replace(microsecond=0)
    time.sleep(1.1)  # the server compares lastUpdated with _since as text, to the second
    store(ehr_server, [ck("bulk-normal-ck", 9800, patient="bulk-normal")])
    done = screen_command(ehr_server, key_file, out, "--since", since.isoformat().replace("+00:00", "Z"))
    assert done.returncode == 0, done.stderr
    after = results(out / "results.ndjson")
    assert set(after) == set(before)
    assert {pid for pid in after if after[pid] != before[pid]} == {"bulk-normal"}
    assert "imnm-suspected" in topics(after["bulk-normal"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["thisRun"]["patients"] == 1
    exported = [
        json.loads(line) for f in (out / "export").glob("*.ndjson") for line in f.read_text().splitlines()
    ]
    cks = [r for r in exported if r.get("id") == "bulk-normal-ck"]
    assert [r["valueQuantity"]["value"] for r in cks] == [9800]


def test_since_is_refused_without_a_whole_export(ehr_server, key_file, tmp_path):
    done = screen_command(ehr_server, key_file, tmp_path, "--since", "2024-01-01T00:00:00Z")
    assert done.returncode == 2
    assert "--since needs a whole export" in done.stderr


def test_our_assertion_names_the_token_endpoint_expires_within_five_minutes_and_is_used_once(
    key_file, tmp_path
):
    for private, alg in (
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS384"),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
    ):
        path = tmp_path / f"{alg}.pem"
        path.write_bytes(pem(private))
        key = backend.ClientKey.load(path)
        client = backend.BackendClient(CLIENT_ID, key)
        first, second = (client.assertion("https://ehr.example.org/token") for _ in range(2))
        header = jwt.get_unverified_header(first)
        assert header["alg"] == alg and header["kid"] == key.public_jwk()["kid"]
        claims = [
            jwt.decode(t, private.public_key(), algorithms=[alg], audience="https://ehr.example.org/token")
            for t in (first, second)
        ]
        assert claims[0]["iss"] == claims[0]["sub"] == CLIENT_ID
        assert 0 < claims[0]["exp"] - time.time() <= 300
        assert claims[0]["jti"] != claims[1]["jti"]


@pytest.mark.parametrize(
    ("client_id", "key", "message"),
    [
        ("someone-else", None, "the token endpoint refused client 'someone-else' (HTTP 401: invalid_client"),
        (CLIENT_ID, "other", "client_assertion verification failed"),
    ],
)
def test_a_refused_client_gets_a_clear_message_and_exit_3(
    ehr_server, key_file, tmp_path, client_id, key, message
):
    if key:
        key_file = tmp_path / "other.pem"
        key_file.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    done = run(
        "screen",
        "--fhir",
        ehr_server,
        "--client-id",
        client_id,
        "--key",
        str(key_file),
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 3
    assert message in done.stderr
    assert "eyJ" not in done.stderr


def test_an_export_refused_or_a_bad_key_gets_a_clear_message(ehr_server, key_file, tmp_path):
    done = screen_command(ehr_server, key_file, tmp_path / "out", "--group", "no-such-group")
    assert done.returncode == 3
    assert "the server refused the export kick-off (HTTP 404" in done.stderr
    (tmp_path / "bad.pem").write_text("not a key")
    done = screen_command(ehr_server, tmp_path / "bad.pem", tmp_path / "out2")
    assert done.returncode == 2
    assert "is not an unencrypted PEM private key" in done.stderr


def test_jwks_prints_the_public_key_set_to_register(key_file):
    done = run("screen", "--jwks", "--key", str(key_file))
    assert done.returncode == 0, done.stderr
    (jwk,) = json.loads(done.stdout)["keys"]
    assert jwk["kty"] == "RSA" and jwk["alg"] == "RS384" and "d" not in jwk and jwk["kid"]


class FaultyProxy:
    """A loopback proxy in front of the FHIR server that answers some requests wrongly, on purpose."""

    def __init__(self, target: str):
        self.target = target.rsplit("/fhir", 1)[0]
        self.faults: list[list] = []  # [method, path part, what to do, times left]
        self.seen: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self, "GET")

            def do_DELETE(self):
                proxy.handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, method: str, part: str, what: str, times: int = 1) -> None:
        self.faults.append([method, part, what, times])

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        self.seen.append((method, handler.path))
        fault = next((f for f in self.faults if f[0] == method and f[1] in handler.path and f[3]), None)
        if fault:
            fault[3] -= 1
        what = fault[2] if fault else None
        if what in ("429", "500", "401"):
            body = json.dumps(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "exception", "diagnostics": "job failed"}],
                }
            ).encode()
            handler.send_response(int(what))
            handler.send_header("Retry-After", "1")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        headers = {
            k: v for k, v in handler.headers.items() if k.lower() in ("authorization", "accept", "prefer")
        }
        answer = requests.request(method, self.target + handler.path, headers=headers, timeout=30)
        body = answer.content
        if ".well-known" not in handler.path:
            body = body.replace(self.target.encode(), self.base.rsplit("/fhir", 1)[0].encode())
        handler.send_response(answer.status_code)
        for name in ("Content-Type", "Content-Location", "Retry-After", "X-Progress"):
            if name in answer.headers:
                handler.send_header(
                    name, answer.headers[name].replace(self.target, self.base.rsplit("/fhir", 1)[0])
                )
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2] if what == "truncate" else body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(ehr_server):
    faulty = FaultyProxy(ehr_server)
    yield faulty
    faulty.close()


def exporter(proxy: FaultyProxy, key_file: Path, waits: list[float], max_wait: float = 60) -> bulk.BulkClient:
    client = backend.BackendClient(CLIENT_ID, backend.ClientKey.load(key_file))
    token = client.auth(proxy.base, set(ehr.TYPES))
    return bulk.BulkClient(
        client.session, proxy.base, token, bulk.Limits(max_wait=max_wait), sleep=waits.append
    )


def test_polling_honours_429_and_retry_after_and_a_truncated_download_is_fetched_again(
    proxy, key_file, tmp_path
):
    waits: list[float] = []
    proxy.fail("GET", "bulk-status", "429", times=2)
    proxy.fail("GET", "bulk-files", "truncate", times=1)
    job = bulk.BulkClient.export(exporter(proxy, key_file, waits), tmp_path, ["Patient", "Observation"])
    assert waits[:2] == [1.0, 1.0]
    assert sum(1 for _, path in proxy.seen if "bulk-files" in path) == 3  # one file twice: it came cut
    for index, entry in enumerate(job["manifest"]["output"]):
        lines = (tmp_path / f"{entry['type']}-{index}.ndjson").read_text().splitlines()
        assert len(lines) == entry["count"] and all(
            json.loads(line)["resourceType"] == entry["type"] for line in lines
        )
    assert ("DELETE" in {method for method, _ in proxy.seen}) and job["deleted"]


def test_a_failed_job_and_a_download_that_stays_cut_are_reported(proxy, key_file, tmp_path):
    proxy.fail("GET", "bulk-status", "500", times=1)
    with pytest.raises(bulk.ExportError, match=r"the export failed \(HTTP 500: exception job failed\)"):
        exporter(proxy, key_file, []).export(tmp_path / "failed", ["Patient"])
    proxy.fail("GET", "bulk-files", "truncate", times=10)
    with pytest.raises(bulk.ExportError, match="cannot download the Patient export file"):
        exporter(proxy, key_file, []).export(tmp_path / "cut", ["Patient"])


def test_the_wait_is_bounded_and_a_rerun_resumes_the_same_job_and_files(proxy, key_file, tmp_path):
    proxy.fail("GET", "bulk-status", "429", times=3)
    with pytest.raises(bulk.ExportError, match="still running after 2 s; run the same command again"):
        exporter(proxy, key_file, [], max_wait=2).export(tmp_path, ["Patient", "Observation"])
    proxy.fail("GET", "Patient.ndjson", "truncate", times=10)  # the Patient file cannot be had
    with pytest.raises(bulk.ExportError, match="cannot download the Patient"):
        exporter(proxy, key_file, []).export(tmp_path, ["Patient", "Observation"])
    proxy.faults.clear()
    seen = len(proxy.seen)
    job = exporter(proxy, key_file, []).export(tmp_path, ["Patient", "Observation"])
    again = [path for _, path in proxy.seen[seen:]]
    assert not any("$export" in path for path in again)  # no second kick-off
    assert [path.rsplit("/", 1)[-1] for path in again if "bulk-files" in path] == ["Patient.ndjson"]
    assert sorted(job["done"]) == ["Observation-0.ndjson", "Patient-1.ndjson"]


def test_a_token_refused_before_its_time_is_renewed_once(proxy, key_file, tmp_path):
    waits: list[float] = []
    exporting = exporter(proxy, key_file, waits)
    asked = []
    exporting.session.hooks["response"].append(
        lambda r, *a, **k: asked.append(r.url) if r.url.endswith("/auth/token") else None
    )
    proxy.fail("GET", "bulk-status", "401", times=1)
    exporting.export(tmp_path, ["Patient"])
    assert len(asked) == 2
    # SMART v2 scopes, one per type read, as the server advertises permission-v2.
    assert exporting.auth.scope().split() == [f"system/{kind}.rs" for kind in ehr.TYPES]


def test_changes_replace_their_resources_deleted_ones_go_and_every_patient_touched_is_named(tmp_path):
    whole, changes = tmp_path / "export", tmp_path / "since-2024"
    old = {
        "Observation": [
            ck("a-ck", 100, patient="a"),
            ck("b-ck", 100, patient="b"),
            ck("c-ck", 100, patient="c"),
        ],
        "MedicationStatement": [
            {
                "resourceType": "MedicationStatement",
                "id": "d-med",
                "status": "active",
                "medicationReference": {"reference": "Medication/drug"},
                "subject": {"reference": "Patient/d"},
            }
        ],
    }
    write_export(whole, {"all": [r for rs in old.values() for r in rs]})
    write_export(
        changes, {"new": [ck("a-ck", 9000, patient="a"), {"resourceType": "Medication", "id": "drug"}]}
    )
    delete = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": "Observation/b-ck"}}],
    }
    (changes / "deleted").mkdir()
    (changes / "deleted" / "Bundle-0.ndjson").write_text(json.dumps(delete) + "\n")
    assert ehr.apply_changes(whole, changes) == {"a", "b", "d"}
    lines = [json.loads(line) for f in whole.glob("*.ndjson") for line in f.read_text().splitlines()]
    assert sorted((r["id"], r.get("valueQuantity", {}).get("value")) for r in lines) == [
        ("a-ck", 9000),
        ("c-ck", 100),
        ("d-med", None),
        ("drug", None),
    ]
    # Applying the same changes again (a run cut short) changes nothing and names the same patients.
    assert ehr.apply_changes(whole, changes) == {"a", "b", "d"}
    assert len([line for f in whole.glob("*.ndjson") for line in f.read_text().splitlines()]) == 4
