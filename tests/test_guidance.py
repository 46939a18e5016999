"""FHIR-native results: cards as GuidanceResponse, RequestGroup and DetectedIssue, valid FHIR R4."""

from __future__ import annotations

import pytest
import requests
from fhir.resources.R4B.bundle import Bundle

from conftest import FHIR_TOKEN, load, scenarios, store

FHIR = {"Accept": "application/fhir+json"}
WORKED = next(p for p in scenarios() if p.name == "bundle-worked-example")


def as_bundle(request: dict) -> dict:
    """Put a hook request's prefetched resources into one collection Bundle."""
    entries = []
    for value in request["prefetch"].values():
        if value is not None:
            inner = value.get("entry", []) if value["resourceType"] == "Bundle" else [{"resource": value}]
            entries += [{"resource": e["resource"]} for e in inner]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def both(client, bundle: dict, query: str = "") -> tuple[list[dict], dict]:
    cards = client.post(f"/evaluate{query}", json=bundle).get_json()["cards"]
    response = client.post(f"/evaluate{query}", json=bundle, headers=FHIR)
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    return cards, response.get_json()


def of_type(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.mark.parametrize(
    "scenario",
    [p for p in scenarios() if (load(p / "request.json").get("prefetch") or {}).get("patient")],
    ids=lambda p: p.name,
)
def test_every_card_becomes_valid_fhir_with_its_reasons_and_suggestions(client, scenario):
    request = load(scenario / "request.json")
    as_of = request["extension"]["imnm-cds.asOf"]
    cards, results = both(client, as_bundle(request), f"?asOf={as_of}")
    Bundle.model_validate(results)  # every resource, contained ones too, is valid R4
    assert results["type"] == "transaction"
    guidance = of_type(results, "GuidanceResponse")
    issues = of_type(results, "DetectedIssue")
    assert [g["identifier"][0]["value"] for g in guidance] == [f"urn:uuid:{c['uuid']}" for c in cards]
    assert len(issues) == sum(c["indicator"] in ("warning", "critical") for c in cards)
    for card, response in zip(cards, guidance, strict=True):
        assert response["reasonCode"][0]["coding"][0] == card["source"]["topic"]
        assert card["detail"] in response["note"][0]["text"]
        cited = [r.get("reference") or r["identifier"]["value"] for r in response.get("reasonReference", [])]
        assert cited == card["extension"]["imnm-cds.evidence"]
        rules = [e["valueString"] for e in response["extension"] if e["url"].endswith(":rule")]
        assert rules == card["extension"]["imnm-cds.rules"]
        group = next((c for c in response.get("contained", []) if c["resourceType"] == "RequestGroup"), None)
        if card.get("suggestions"):
            assert response["result"]["reference"] == f"#{group['id']}"
            assert [a["title"] for a in group["action"]] == [s["label"] for s in card["suggestions"]]
            proposals = {f"#{c['id']}" for c in response["contained"] if c["resourceType"] != "RequestGroup"}
            linked = {
                s["resource"]["reference"] for a in group["action"] for s in a["action"] if "resource" in s
            }
            assert proposals <= linked
        else:
            assert group is None and "result" not in response
    for entry in results["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}" == resource["identifier"][0]["value"]
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}


def test_severity_maps_to_the_detected_issue(client):
    request = load(next(p for p in scenarios() if p.name == "severity-mda5-with-ild") / "request.json")
    cards, results = both(client, as_bundle(request), "?asOf=2024-06-01T12:00:00Z")
    severities = sorted(i["severity"] for i in of_type(results, "DetectedIssue"))
    expected = sorted(
        {"critical": "high", "warning": "moderate"}[c["indicator"]] for c in cards if c["indicator"] != "info"
    )
    assert severities == expected and "high" in severities


def test_a_patient_known_only_by_fullurl_is_referenced_by_identifier(client):
    bundle = load(WORKED / "request.json")
    cards, results = both(client, bundle)
    proposed = [
        a["resource"]["subject"] for c in cards for s in c.get("suggestions", []) for a in s["actions"]
    ]
    assert proposed and all(p == {"reference": bundle["entry"][0]["fullUrl"]} for p in proposed)
    subjects = [e["resource"].get("subject") or e["resource"]["patient"] for e in results["entry"]]
    by_full_url = {"identifier": {"system": "urn:ietf:rfc:3986", "value": bundle["entry"][0]["fullUrl"]}}
    assert subjects and all(subject == by_full_url for subject in subjects)


def test_the_same_input_gives_the_same_resources(client):
    bundle = load(WORKED / "request.json")
    assert both(client, bundle)[1] == both(client, bundle)[1]


@pytest.mark.parametrize(
    ("accept", "status", "kind"),
    [
        (None, 200, "cards"),
        ("application/json", 200, "cards"),
        ("*/*", 200, "cards"),
        ("application/fhir+json", 200, "Bundle"),
        ("application/fhir+json, application/json;q=0.5", 200, "Bundle"),
        ("text/html", 200, "page"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", 200, "page"),  # what a browser sends
        ("image/png", 406, "OperationOutcome"),
    ],
)
def test_content_negotiation_on_evaluate(client, accept, status, kind):
    headers = {"Accept": accept} if accept else {}
    response = client.post("/evaluate", json=load(WORKED / "request.json"), headers=headers)
    assert response.status_code == status
    if response.mimetype == "text/html":
        assert kind == "page" and b"Why these cards" in response.data
        return
    body = response.get_json()
    assert (body.get("resourceType") or "cards") == kind


def test_a_fhir_server_takes_the_results_and_posting_them_again_creates_nothing(client, fhir_server):
    request = load(
        next(p for p in scenarios() if p.name == "severity-refractory-on-treatment") / "request.json"
    )
    bundle = as_bundle(request)
    store(fhir_server, [e["resource"] for e in bundle["entry"]])
    _, results = both(client, bundle, "?asOf=2024-06-01T12:00:00Z")
    headers = {"Authorization": f"Bearer {FHIR_TOKEN}"}
    patient = request["context"]["patientId"]

    def written() -> dict[str, int]:
        return {
            kind: requests.get(f"{fhir_server}/{kind}?patient={patient}", headers=headers, timeout=10)
            .json()
            .get("total", 0)
            for kind in ("GuidanceResponse", "DetectedIssue")
        }

    for attempt in range(2):
        answer = requests.post(fhir_server, json=results, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text[:2000]
        assert written() == {
            "GuidanceResponse": len(of_type(results, "GuidanceResponse")),
            "DetectedIssue": len(of_type(results, "DetectedIssue")),
        }, attempt
    stored = requests.get(
        f"{fhir_server}/GuidanceResponse?patient={patient}", headers=headers, timeout=10
    ).json()
    escalation = next(
        e["resource"]
        for e in stored["entry"]
        if e["resource"]["reasonCode"][0]["coding"][0]["code"] == "treatment-escalation"
    )
    assert escalation["subject"]["reference"].endswith(f"Patient/{patient}")
    assert any(c["resourceType"] == "RequestGroup" for c in escalation["contained"])
