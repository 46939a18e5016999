"""Each way a FHIR server can fail gives a defined answer in time: a 412 for required data, else unknown."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from conftest import FIXTURES, authorised, load
from service.gather.fhirclient import REASONS
from service.hooks import PATIENT_VIEW
from service.web.app import create_app

SERVICE = "/cds-services/imnm-patient-view"
SCENARIO = FIXTURES / "worked-example-hmgcr-positive"
TOKEN = "fault-token-8d1f"
PAGE_LIMIT = 100_000  # IMNM_CDS_MAX_BODY_BYTES in these tests
EMPTY = {"resourceType": "Bundle", "type": "searchset", "entry": []}
# Bound but never listening, so nothing else can take its port and every connection to it is refused.
CLOSED = socket.socket()
CLOSED.bind(("127.0.0.1", 0))
CLOSED_PORT = CLOSED.getsockname()[1]
ERROR = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}


class FaultyServer(ThreadingHTTPServer):
    """A loopback FHIR server that answers each resource type as a test tells it to, and notes each call."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server_port}/fhir"
        self.faults: dict = {}
        self.calls: list[dict] = []
        self.released = threading.Event()

    def handle_error(self, request, client_address):
        pass  # the client hanging up on a trickle or an endless body is the point of those faults


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse shows
    disable_nagle_algorithm = True  # else headers and body wait on each other's ACK (40 ms a call)

    def do_GET(self):
        self.server.calls.append(
            {"path": self.path, "headers": dict(self.headers), "port": self.client_address[1]}
        )
        resource_type = urlsplit(self.path).path.split("/")[2]
        self.server.faults.get(resource_type, answer(EMPTY))(self)

    def send(self, status: int, body: bytes, **extra):
        self.send_response(status)
        headers = {"Content-Type": "application/fhir+json", "Content-Length": str(len(body))}
        headers.update({name.replace("_", "-"): value for name, value in extra.items()})
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def answer(resource, status: int = 200, **headers):
    return lambda h: h.send(status, json.dumps(resource).encode(), **headers)


def raw(body: bytes):
    return lambda h: h.send(200, body)


def hang(h):
    h.server.released.wait(30)


def trickle(h):
    """Send headers, then a byte at a time, never finishing within any deadline."""
    h.send_response(200)
    h.send_header("Content-Type", "application/fhir+json")
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(b" ")
    while not h.server.released.wait(0.02):
        h.wfile.write(b" ")
        h.wfile.flush()


def endless(h):
    """Stream a body without a length, larger than any page we accept."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    block = b" " * 65536
    for _ in range(PAGE_LIMIT // len(block) + 4):
        h.wfile.write(block)


def searchset(*resources, next_url: str | None = None) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def redirect_to(where):
    return lambda h: h.send(302, b"", Location=where(h))


def elsewhere(h, path: str | None = None) -> str:
    """The same server by another name, so another origin."""
    return f"http://localhost:{h.server.server_port}{path or h.path}"


def labs(scenario=SCENARIO) -> dict:
    return load(scenario / "request.json")["prefetch"]["labs"]


CONDITION = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/fx-worked"}}
# fault, the reason it is reported under
FAULTS = {
    "401": (answer(ERROR, 401), "refused"),
    "403": (answer(ERROR, 403), "refused"),
    "404": (answer(ERROR, 404), "not-found"),
    "400": (answer(ERROR, 400), "rejected"),
    "500": (answer(ERROR, 500), "server-error"),
    "503": (answer(ERROR, 503), "server-error"),
    "timeout": (hang, "timeout"),
    "invalid-json": (raw(b'{"resourceType": "Bundle", "entry": ['), "invalid"),
    "not-a-resource": (raw(b"[1, 2, 3]"), "invalid"),
    "empty-body": (raw(b""), "invalid"),
    "wrong-type": (answer(searchset(CONDITION)), "wrong-type"),
    "operation-outcome": (answer(ERROR), "outcome"),
    "outcome-in-searchset": (answer(searchset(ERROR)), "outcome"),
    "huge-declared": (lambda h: h.send(200, b"{}", Content_Length=str(PAGE_LIMIT * 10)), "too-large"),
    "huge-streamed": (endless, "too-large"),
    "redirect-elsewhere": (redirect_to(elsewhere), "redirected"),
    "next-elsewhere": (lambda h: answer(searchset(next_url=elsewhere(h)))(h), "elsewhere"),
    "endless-pages": (lambda h: answer(searchset(next_url=h.server.base + h.path[5:]))(h), "too-many"),
}
# Which key a fault hits: a required one (labs, patient) or an optional one (reports).
FAULT_TYPE = {"labs": "Observation", "patient": "Patient", "reports": "DiagnosticReport"}


@pytest.fixture(scope="module", autouse=True)
def closed_port():
    """Hold CLOSED_PORT while this module's tests run; close its socket after."""
    with CLOSED:
        yield


@pytest.fixture(scope="module")
def server():
    server = FaultyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def faulty(server):
    server.faults.clear()
    server.calls.clear()
    return server


def fetching_client(server, **settings):
    config = {
        "fhir_servers": f"{server.base} http://127.0.0.1:{CLOSED_PORT}/fhir",
        "fhir_allow_http": True,
        "max_body_bytes": PAGE_LIMIT,
        "fetch_read_timeout_ms": 300,
        "fetch_budget_ms": 5000,
        "deadline_ms": 8000,
        "fetch_max_pages": 3,
        **settings,
    }
    return create_app(config).test_client()


@pytest.fixture(scope="module")
def client(server):
    return fetching_client(server)


@pytest.fixture(scope="module")
def hurried(server):
    """A service whose fetch budget runs out long before a read times out."""
    return fetching_client(server, fetch_budget_ms=300, deadline_ms=10_000, fetch_read_timeout_ms=10_000)


def request_fetching(base: str, *keys: str) -> dict:
    """The scenario's request with every key sent but these, which are to be fetched from base."""
    request = load(SCENARIO / "request.json")
    prefetch = {key.key: EMPTY for key in PATIENT_VIEW.prefetch} | request["prefetch"]
    request["prefetch"] = {k: v for k, v in prefetch.items() if k not in keys}
    return authorised(request, base, TOKEN)


def sent_instead(client, request: dict, **prefetch) -> dict:
    """The answer when the client sends these keys itself (and no others) and names no FHIR server."""
    alone = {k: v for k, v in request.items() if k not in ("fhirServer", "fhirAuthorization")}
    alone["prefetch"] = {**request["prefetch"], **prefetch}
    return client.post(SERVICE, json=alone).get_json()


@pytest.mark.parametrize("key", ["labs", "patient"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_on_required_data_is_a_412_naming_the_key(client, faulty, fault, key):
    behaviour, reason = FAULTS[fault]
    faulty.faults[FAULT_TYPE[key]] = behaviour
    response = client.post(SERVICE, json=request_fetching(faulty.base, key))
    assert response.status_code == 412
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == [f"prefetch.{key}"]
    assert REASONS[reason] in issue["diagnostics"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_on_optional_data_leaves_it_unknown(client, faulty, fault):
    faulty.faults["DiagnosticReport"] = FAULTS[fault][0]
    request = request_fetching(faulty.base, "reports")
    response = client.post(SERVICE, json=request)
    assert response.get_json() == sent_instead(client, request)


def test_a_refused_connection_is_a_412(client):
    response = client.post(SERVICE, json=request_fetching(f"http://127.0.0.1:{CLOSED_PORT}/fhir", "labs"))
    assert response.status_code == 412
    assert REASONS["unreachable"] in response.get_json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("behaviour", [hang, trickle], ids=["silent", "trickling"])
def test_when_the_budget_is_spent_the_answer_uses_what_came_in(hurried, faulty, behaviour, caplog):
    caplog.set_level(logging.INFO)
    faulty.faults["DiagnosticReport"] = behaviour
    request = request_fetching(faulty.base, "reports")
    assert hurried.post(SERVICE, json=request).get_json() == sent_instead(hurried, request)
    faulty.faults["Observation"] = behaviour
    request = request_fetching(faulty.base, "labs", "reports")
    response = hurried.post(SERVICE, json=request)
    # A client cannot send labs as unknown; no facts but statin exposure tell unknown from none.
    assert response.get_json() == sent_instead(hurried, request, labs=None)
    evaluated = [r.fields for r in caplog.records if r.getMessage() == "evaluated"]
    assert [e.get("ranOut") for e in evaluated] == ["gather", None, "gather", None]  # fetching, then not
    fetched = [r.fields for r in caplog.records if r.getMessage() == "fetched"]
    assert fetched[-1]["keys"]["labs"]["failed"] == "deadline"


@pytest.mark.parametrize(("origin", "status"), [("same", 200), ("other", 412)])
def test_a_redirect_is_followed_only_within_the_origin(client, faulty, origin, status):
    def moved(h):
        path = h.path.replace("/Observation", "/Moved/Observation")
        return path if origin == "same" else elsewhere(h, path)

    faulty.faults["Observation"] = redirect_to(moved)
    faulty.faults["Moved"] = answer(labs())
    request = request_fetching(faulty.base, "labs")
    response = client.post(SERVICE, json=request)
    assert response.status_code == status
    followed = [urlsplit(c["path"]).path for c in faulty.calls]
    if origin == "same":
        assert response.get_json() == sent_instead(client, request, labs=labs())
        assert followed == ["/fhir/Observation", "/fhir/Moved/Observation"]
    else:
        assert followed == ["/fhir/Observation"]


def test_data_about_another_patient_is_refused(client, faulty):
    other = dict(CONDITION, subject={"reference": "Patient/someone-else"})
    faulty.faults["Condition"] = answer(searchset(other))
    response = client.post(SERVICE, json=request_fetching(faulty.base, "conditions"))
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["fetched.conditions.entry[0].resource"]


@pytest.mark.parametrize(
    ("settings", "base"),
    [
        ({}, "http://127.0.0.1:{port}/elsewhere"),
        ({}, "http://user:secret@127.0.0.1:{port}/fhir"),
        ({}, "http://127.0.0.1:{port}/fhir?tenant=1"),
        ({"fhir_allow_http": False}, "http://127.0.0.1:{port}/fhir"),
        ({}, "http://127.0.0.1:{port}/fhir/../elsewhere"),
        ({}, "http://127.0.0.1:{port}/fhir/%2E%2E/elsewhere"),
    ],
    ids=["not-listed", "credentials", "query", "http-not-allowed", "dot-segments", "encoded-dot-segments"],
)
def test_a_server_not_allowed_is_never_contacted(server, faulty, settings, base):
    client = fetching_client(server, **settings)
    request = request_fetching(base.format(port=server.server_port), "labs")
    response = client.post(SERVICE, json=request)
    assert response.status_code == 403
    assert response.get_json()["issue"][0]["expression"] == ["fhirServer"]
    assert faulty.calls == []
    request["prefetch"]["labs"] = labs()  # nothing to fetch: the server named does not matter
    assert client.post(SERVICE, json=request).status_code == 200


def test_the_token_goes_with_each_call_cookies_never_and_connections_are_reused(client, faulty):
    faulty.faults["Observation"] = answer(labs(), Set_Cookie="session=from-the-first-call")
    for _ in range(2):
        assert client.post(SERVICE, json=request_fetching(faulty.base, "labs")).status_code == 200
    assert [c["headers"].get("Authorization") for c in faulty.calls] == [f"Bearer {TOKEN}"] * 2
    assert [c["headers"].get("Cookie") for c in faulty.calls] == [None, None]
    assert faulty.calls[0]["port"] == faulty.calls[1]["port"]


def test_context_values_are_encoded_in_the_query(client, faulty):
    request = request_fetching(faulty.base, "labs", "patient")
    request["context"]["patientId"] = "a b&c/d"
    client.post(SERVICE, json=request)
    paths = sorted(c["path"] for c in faulty.calls)
    assert paths == [
        "/fhir/Observation?patient=a%20b%26c%2Fd&category=laboratory",
        "/fhir/Patient/a%20b%26c%2Fd",
    ]
