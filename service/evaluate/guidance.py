"""Express cards as FHIR R4: a transaction of GuidanceResponses, their RequestGroups and DetectedIssues."""

from __future__ import annotations

import uuid
from datetime import datetime

from service.evaluate.cards import (
    EVIDENCE,
    NAMESPACE,
    PRETEST,
    PROBABILITY,
    RISK_TIER,
    RULES,
    patient_reference,
)

EXTENSION = "urn:imnm-cds:StructureDefinition:"
URI = "urn:ietf:rfc:3986"
ACTION_TYPE = "http://terminology.hl7.org/CodeSystem/action-type"
ACTION = {"create": "create", "delete": "remove"}
# DetectedIssue.severity for the card indicators that warn; info cards raise no issue.
ISSUE_SEVERITY = {"critical": "high", "warning": "moderate"}


def bundle(cards: list[dict], patient_id: str, service_id: str, now: datetime) -> dict:
    """Return a transaction Bundle an integration engine can post as is; posting it again adds nothing."""
    entries = []
    for card in cards:
        entries.append(guidance_response(card, patient_id, service_id, now))
        if card["indicator"] in ISSUE_SEVERITY:
            entries.append(detected_issue(card, patient_id, now))
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "timestamp": now.isoformat(),
        "entry": [_entry(resource) for resource in entries],
    }


def guidance_response(card: dict, patient_id: str, service_id: str, now: datetime) -> dict:
    """Return one card as a GuidanceResponse; its suggestions, if any, as a contained RequestGroup."""
    source = card["source"]
    extension = card["extension"]
    resource = {
        "resourceType": "GuidanceResponse",
        "identifier": [_identifier(card["uuid"])],
        "moduleUri": f"urn:imnm-cds:cds-service:{service_id}",
        "status": "success",
        "subject": subject(patient_id),
        "occurrenceDateTime": now.isoformat(),
        "reasonCode": [{"coding": [source["topic"]], "text": card["summary"]}],
        "note": [{"text": f"**{card['summary']}**\n\n{card['detail']}"}],
        "extension": [
            {"url": f"{EXTENSION}card-indicator", "valueCode": card["indicator"]},
            {
                "url": f"{EXTENSION}card-source",
                "valueRelatedArtifact": {
                    "type": "citation",
                    "display": source["label"],
                    "url": source["url"],
                },
            },
            *({"url": f"{EXTENSION}rule", "valueString": rule} for rule in extension[RULES]),
            *(
                {"url": f"{EXTENSION}{name}", "valueDecimal": extension[key]}
                for key, name in (
                    (PROBABILITY, "probability"),
                    (PRETEST, "pretest-probability"),
                )
                if key in extension
            ),
            *(
                [{"url": f"{EXTENSION}risk-tier", "valueCode": extension[RISK_TIER]}]
                if RISK_TIER in extension
                else []
            ),
        ],
    }
    if extension[EVIDENCE]:
        resource["reasonReference"] = [_reference(ref) for ref in extension[EVIDENCE]]
    if card.get("suggestions"):
        group, proposals = request_group(card, patient_id, now)
        # Contained resources may not nest, so the proposals sit beside the group.
        resource["contained"] = [group, *proposals]
        resource["result"] = {"reference": f"#{group['id']}"}
    return resource


def request_group(card: dict, patient_id: str, now: datetime) -> tuple[dict, list[dict]]:
    """Return a card's suggestions as a RequestGroup, one action each, and the resources they propose."""
    proposals: list[dict] = []
    actions = []
    for suggestion in card["suggestions"]:
        steps = []
        for action in suggestion["actions"]:
            step = {
                "description": action["description"],
                "type": {"coding": [{"system": ACTION_TYPE, "code": ACTION[action["type"]]}]},
            }
            if "resource" in action:
                proposals.append({**action["resource"], "id": f"proposal-{len(proposals) + 1}"})
                step["resource"] = {"reference": f"#{proposals[-1]['id']}"}
            elif "resourceId" in action:
                step["resource"] = _reference(action["resourceId"])
            steps.append(step)
        actions.append(
            {
                "id": suggestion["uuid"],
                "title": suggestion["label"],
                "action": steps,
                "groupingBehavior": "logical-group",
                "selectionBehavior": "all",
            }
        )
    group = {
        "resourceType": "RequestGroup",
        "id": "suggestions",
        "status": "draft",
        "intent": "proposal",
        "subject": subject(patient_id),
        "authoredOn": now.isoformat(),
        "action": actions,
    }
    return group, proposals


def detected_issue(card: dict, patient_id: str, now: datetime) -> dict:
    """Return a warning or critical card as a preliminary DetectedIssue a clinician has yet to act on."""
    resource = {
        "resourceType": "DetectedIssue",
        "identifier": [_identifier(str(uuid.uuid5(NAMESPACE, f"{card['uuid']}/issue")))],
        "status": "preliminary",
        "code": {"coding": [card["source"]["topic"]], "text": card["summary"]},
        "severity": ISSUE_SEVERITY[card["indicator"]],
        "patient": subject(patient_id),
        "identifiedDateTime": now.isoformat(),
        "detail": card["summary"],
        "reference": card["source"]["url"],
    }
    if card["extension"][EVIDENCE]:
        resource["implicated"] = [_reference(ref) for ref in card["extension"][EVIDENCE]]
    return resource


def subject(patient_id: str) -> dict:
    """Reference the patient, by identifier where the Bundle named it only by a urn."""
    return _reference(patient_reference(patient_id))


def _reference(ref: str) -> dict:
    # A urn:uuid named an entry of the posted Bundle; it would not resolve in the engine's store.
    if ref.startswith("urn:"):
        return {"identifier": {"system": URI, "value": ref}}
    return {"reference": ref}


def _identifier(value: str) -> dict:
    return {"system": URI, "value": value if value.startswith("urn:") else f"urn:uuid:{value}"}


def _entry(resource: dict) -> dict:
    # The id is the deterministic uuid, and PUT creates or replaces it: posting twice adds nothing.
    full_url = resource["identifier"][0]["value"]
    resource = {
        "resourceType": resource["resourceType"],
        "id": full_url.removeprefix("urn:uuid:"),
        **resource,
    }
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
    }
