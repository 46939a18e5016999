"""Check a CDS Hooks 2.0 feedback request: what the user did with each card, and when."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from service.outcome import ApiError, Issue

OUTCOMES = ("accepted", "overridden")
# RFC 3339 section 5.6 date-time: the offset is required (the spec asks for UTC; others are converted).
# Years 1000-8999 and no leap second: what a calendar date can be converted to UTC from.
RFC3339 = re.compile(r"^[1-8]\d{3}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:[0-5]\d(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
MAX_ISSUES = 50


@dataclass(frozen=True)
class Coding:
    system: str
    code: str
    display: str | None = None


@dataclass(frozen=True)
class Feedback:
    """What one user did with one card, and when."""

    card: str  # the card's uuid, lower case, without urn:uuid:
    outcome: str
    outcome_at: datetime  # UTC
    accepted_suggestions: tuple[str, ...] = ()
    reason: Coding | None = None
    comment: str | None = None


def parse(body) -> list[Feedback]:
    """Check a feedback body; a 400 ApiError names every bad field, e.g. feedback[3].outcome."""
    if not isinstance(body, dict):
        raise ApiError(400, Issue("structure", "the request body must be a JSON object"))
    items = body.get("feedback")
    if not isinstance(items, list):
        raise ApiError(400, Issue("required", "feedback must be an array of feedback items", "feedback"))
    issues: list[Issue] = []
    parsed = [_item(value, f"feedback[{i}]", issues) for i, value in enumerate(items)]
    if issues:
        raise ApiError(400, *issues[:MAX_ISSUES])
    return parsed


def _item(value, where: str, issues: list[Issue]) -> Feedback | None:
    if not isinstance(value, dict):
        issues.append(Issue("structure", "a feedback item must be a JSON object", where))
        return None
    before = len(issues)
    card = _uuid(value.get("card"), f"{where}.card", "the uuid of a card this service returned", issues)
    outcome = value.get("outcome")
    if outcome is None:
        issues.append(Issue("required", "outcome is required: accepted or overridden", f"{where}.outcome"))
    elif outcome not in OUTCOMES:
        issues.append(Issue("value", "outcome must be accepted or overridden", f"{where}.outcome"))
    moment = _timestamp(value.get("outcomeTimestamp"), f"{where}.outcomeTimestamp", issues)
    if outcome not in OUTCOMES:
        return None  # what else an item needs depends on its outcome
    suggestions = _suggestions(
        value.get("acceptedSuggestions"), outcome, f"{where}.acceptedSuggestions", issues
    )
    reason, comment = _override(value.get("overrideReason"), outcome, f"{where}.overrideReason", issues)
    if len(issues) > before:
        return None
    return Feedback(card, outcome, moment, suggestions, reason, comment)


def _uuid(value, where: str, what: str, issues: list[Issue]) -> str | None:
    if value is None:
        issues.append(Issue("required", f"{where.rsplit('.', 1)[-1]} is required: {what}", where))
        return None
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))  # also reads the urn:uuid: form
        except ValueError:
            pass
    issues.append(Issue("value", f"must be a UUID: {what}", where))
    return None


def _timestamp(value, where: str, issues: list[Issue]) -> datetime | None:
    if value is None:
        issues.append(Issue("required", "outcomeTimestamp is required (RFC 3339, UTC)", where))
        return None
    try:
        if not isinstance(value, str) or not RFC3339.match(value):
            raise ValueError
        return datetime.fromisoformat(value.upper()).astimezone(UTC)
    except (ValueError, OverflowError):  # an offset can carry year 1 or 9999 past the calendar
        issues.append(Issue("value", "outcomeTimestamp must be an RFC 3339 date-time with an offset", where))
        return None


def _suggestions(value, outcome, where: str, issues: list[Issue]) -> tuple[str, ...]:
    if outcome != "accepted":
        if value is not None:
            issues.append(Issue("business-rule", "acceptedSuggestions is only for accepted cards", where))
        return ()
    if not isinstance(value, list) or not value:
        issues.append(
            Issue("required", "an accepted card needs acceptedSuggestions: [{id: suggestion uuid}]", where)
        )
        return ()
    ids = []
    for i, suggestion in enumerate(value):
        if not isinstance(suggestion, dict):
            issues.append(Issue("structure", "each accepted suggestion is {id: uuid}", f"{where}[{i}]"))
            continue
        ids.append(_uuid(suggestion.get("id"), f"{where}[{i}].id", "the uuid of the suggestion", issues))
    return tuple(sorted(set(filter(None, ids))))


def _override(value, outcome, where: str, issues: list[Issue]) -> tuple[Coding | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        issues.append(Issue("structure", "overrideReason must be a JSON object", where))
        return None, None
    if outcome == "accepted":
        issues.append(Issue("business-rule", "overrideReason is only for overridden cards", where))
        return None, None
    reason, comment = value.get("reason"), value.get("userComment")
    if reason is None and comment is None:
        issues.append(
            Issue("required", "overrideReason needs a reason (a Coding), a userComment or both", where)
        )
    if comment is not None and not _text(comment):
        issues.append(Issue("value", "userComment must be non-empty text", f"{where}.userComment"))
    if reason is None:
        return None, comment
    if not isinstance(reason, dict):
        issues.append(
            Issue("structure", "reason must be a Coding {system, code, display}", f"{where}.reason")
        )
        return None, comment
    for name in ("system", "code"):
        if not _text(reason.get(name)):
            issues.append(Issue("required", f"a Coding needs a {name}", f"{where}.reason.{name}"))
    if "display" in reason and not _text(reason["display"]):
        issues.append(Issue("value", "display must be non-empty text", f"{where}.reason.display"))
    return Coding(reason.get("system"), reason.get("code"), reason.get("display")), comment


def _text(value) -> bool:
    # NUL is no text, and PostgreSQL cannot store it in a text column.
    return isinstance(value, str) and bool(value.strip()) and "\x00" not in value
