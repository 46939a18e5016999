"""Answer every failure as a FHIR OperationOutcome that names what was wrong, and nothing else."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    code: str  # FHIR issue-type: invalid, structure, required, value, not-found, not-supported, ...
    diagnostics: str
    expression: str | None = None
    severity: str = "error"


class ApiError(Exception):
    """A request we refuse, with the HTTP status, the issues to report and a reason code safe to log."""

    def __init__(self, status: int, *issues: Issue, reason: str | None = None):
        super().__init__(issues[0].diagnostics if issues else str(status))
        self.status = status
        self.issues = issues
        self.reason = reason or _reason(issues)


def error(
    status: int, code: str, diagnostics: str, expression: str | None = None, reason: str | None = None
) -> ApiError:
    """Build an ApiError with a single issue."""
    return ApiError(status, Issue(code, diagnostics, expression), reason=reason)


def _reason(issues) -> str:
    """Name what was wrong by where it was (feedback[3].outcome -> feedback[].outcome), else its code."""
    if not issues:
        return "unknown"
    first = issues[0]
    return re.sub(r"\[\d+\]", "[]", first.expression)[:100] if first.expression else first.code


def operation_outcome(issues) -> dict:
    """Return an OperationOutcome resource for these issues."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": issue.severity,
                "code": issue.code,
                "diagnostics": issue.diagnostics,
                **({"expression": [issue.expression]} if issue.expression else {}),
            }
            for issue in issues
        ],
    }
