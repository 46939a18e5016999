"""Hostile inputs (tests/hostile/manifest.toml) get their expected status at every endpoint, never a 5xx.

In process for the whole corpus, null put in every place of a valid body in turn, and over HTTP to
gunicorn for what the transport changes: a 50 MB body (declared and chunked) and a body cut short.
"""

from __future__ import annotations

import gc
import json
import socket
import tomllib
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError
from test_app import assert_outcome

from conftest import AS_OF, WEAKNESS, ck, condition, hook_request, load, scenarios

HOSTILE = Path(__file__).parent / "hostile"
MANIFEST = tomllib.loads((HOSTILE / "manifest.toml").read_text(encoding="utf-8"))["case"]
FHIR = {"Accept": "application/fhir+json"}
MEGABYTE = 1 << 20
ENDPOINTS = {
    "patient-view": ("/cds-services/imnm-patient-view", {}),
    "order-select": ("/cds-services/imnm-statin-order-select", {}),
    "order-sign": ("/cds-services/imnm-statin-order-sign", {}),
    "feedback": ("/cds-services/imnm-patient-view/feedback", {}),
    "evaluate": ("/evaluate", {}),
    "evaluate-fhir": ("/evaluate", FHIR),
    "evaluate-html": ("/evaluate", {"Accept": "text/html"}),
}
FEEDBACK = {
    "feedback": [
        {
            "card": "5a922250-289d-5cfd-ba14-6e988844f855",
            "outcome": "overridden",
            "outcomeTimestamp": "2024-06-01T12:00:00Z",
            "overrideReason": {
                "reason": {"system": "urn:example", "code": "seen", "display": "Seen"},
                "userComment": "seen by neurology",
            },
        },
        {
            "card": "5a922250-289d-5cfd-ba14-6e988844f855",
            "outcome": "accepted",
            "outcomeTimestamp": "2024-06-01T12:01:00Z",
            "acceptedSuggestions": [{"id": "c3db09ee-2925-534f-8ae3-99401fb2c3c8"}],
        },
    ]
}


def ck_results(count: int) -> list[dict]:
    return [
        ck(f"ck{i}", 100 + i % 5000, f"2024-{1 + i % 5:02d}-{1 + i % 28:02d}T08:00:00Z") for i in range(count)
    ]


def bundle(resources: list[dict]) -> dict:
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01"}
    entries = [{"resource": r} for r in (patient, *resources)]
    return {"resourceType": "Bundle", "type": "collection", "timestamp": AS_OF, "entry": entries}


def generated(name: str) -> bytes:
    """The bodies too large to commit."""
    if name == "fifty-megabytes":
        request = hook_request()
        request["extension"]["padding"] = "x" * (50 * MEGABYTE)
        return json.dumps(request).encode()
    if name == "ten-thousand-deep":
        return b'{"hook": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    if name == "ten-thousand-observations":
        return json.dumps(hook_request(resources=ck_results(10_000))).encode()
    if name == "ten-thousand-observations-bundle":
        return json.dumps(bundle(ck_results(10_000))).encode()
    raise ValueError(name)


def cases() -> list[tuple[dict, str]]:
    return [(case, endpoint) for case in MANIFEST for endpoint in ENDPOINTS]


@pytest.fixture(scope="module")
def bodies() -> dict[str, bytes]:
    return {
        case["name"]: (HOSTILE / case["file"]).read_bytes() if "file" in case else generated(case["generate"])
        for case in MANIFEST
    }


def expected_status(case: dict, endpoint: str) -> int:
    if endpoint == "evaluate-html":
        endpoint = "evaluate"  # the page is refused, or drawn, exactly when the cards are
    return case["expect"].get(endpoint, case["expect"]["*"])


@pytest.mark.parametrize(
    ("case", "endpoint"), cases(), ids=[f"{case['name']}-{endpoint}" for case, endpoint in cases()]
)
def test_hostile_input_gets_its_status(client, bodies, case, endpoint):
    path, headers = ENDPOINTS[endpoint]
    response = client.post(path, data=bodies[case["name"]], content_type="application/json", headers=headers)
    status = expected_status(case, endpoint)
    if status >= 400:
        assert_outcome(response, status)
    else:
        assert response.status_code == status, response.get_data(as_text=True)[:500]


def test_the_manifest_names_every_file_and_endpoint():
    named = {case["file"] for case in MANIFEST if "file" in case}
    assert named == {p.name for p in HOSTILE.glob("*.json")} - {"null-everywhere.json"}
    for case in MANIFEST:
        assert set(case["expect"]) <= {*ENDPOINTS, "*"} and "*" in case["expect"]


def test_the_card_says_a_ck_value_that_is_no_number_was_not_used(client, bodies):
    # The string CK alone leaves no usable CK and so no card; a second, numeric CK makes one.
    request = json.loads(bodies["ck-value-as-string"])
    request["prefetch"]["labs"]["entry"].append({"resource": ck("ck2", 3000, "2024-05-02T08:00:00Z")})
    response = client.post(ENDPOINTS["patient-view"][0], json=request)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    cards = response.get_json()["cards"]
    assert cards
    for card in cards:
        assert (
            "CK result Observation/ck1 has a value that is not a number and was not used." in card["detail"]
        )


def test_invalid_fhir_leaves_nothing_behind(client, bodies):
    # pydantic-core holds a validator's exception where the garbage collector cannot see it; raised in
    # its handler, our InvalidResource closed a cycle through it that kept each request (52 KB) forever.
    for _ in range(20):
        assert_outcome(
            client.post(
                ENDPOINTS["patient-view"][0], data=bodies["huge-exponent"], content_type="application/json"
            ),
            400,
        )
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, ValidationError)]


# Null everywhere: every value of a valid body, one at a time, replaced by null.
NULL_BASES = {
    "patient-view": hook_request(resources=[ck("ck1", 3000), condition("w1", WEAKNESS)]),
    "order-select": load(
        next(p for p in scenarios() if p.name == "order-select-after-autoimmune-pattern") / "request.json"
    ),
    "feedback": FEEDBACK,
    "evaluate": bundle([ck("ck1", 3000), condition("w1", WEAKNESS)]),
}
NULL_BASES["patient-view"]["hookInstance"] = "0b9c0d6e-6b6f-4b39-9d46-1f1d5e2f3a01"


def paths(value, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document, as the keys and indexes that lead to it."""
    children = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    )
    found = []
    for key, child in children:
        found += [(*prefix, key), *paths(child, (*prefix, key))]
    return found


def shown(path: tuple) -> str:
    """A place as FHIRPath-like text, e.g. prefetch.labs.entry[0].resource.status."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).lstrip(".")


def with_null(document, path: tuple):
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = None
    return copy


def test_null_in_every_place_gets_the_recorded_status(client):
    recorded = json.loads((HOSTILE / "null-everywhere.json").read_text(encoding="utf-8"))
    answered = {}
    for endpoint, base in NULL_BASES.items():
        path, headers = ENDPOINTS[endpoint]
        answered[endpoint] = {}
        for where in paths(base):
            response = client.post(path, json=with_null(base, where), headers=headers)
            assert response.status_code < 500, (endpoint, shown(where), response.get_data(as_text=True)[:500])
            if response.status_code >= 400:
                assert_outcome(response, response.status_code)
            answered[endpoint][shown(where)] = response.status_code
    assert answered == recorded


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_50_mb_body_over_http_gets_413(server, bodies, chunked):
    body = bodies["50-mb-body"]
    data = (body[i : i + MEGABYTE] for i in range(0, len(body), MEGABYTE)) if chunked else body
    response = requests.post(
        f"{server}/cds-services/imnm-patient-view",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"
    assert requests.get(f"{server}/health/ready", timeout=10).status_code == 200


def test_a_body_shorter_than_declared_leaves_the_server_serving(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /cds-services/imnm-patient-view HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"hook": "patient-view"'
        )
    request = hook_request(resources=[ck("ck1", 3000), condition("w1", WEAKNESS)])
    response = requests.post(f"{server}/cds-services/imnm-patient-view", json=request, timeout=30)
    assert response.status_code == 200 and len(response.json()["cards"]) == 1
