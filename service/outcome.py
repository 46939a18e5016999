"""Answer every failure as a FHIR OperationOutcome that names what was wrong, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    code: str  # FHIR issue-type: invalid, structure, required, value, not-found, not-supported, ...
    diagnostics: str
    expression: str | None = None
    severity: str = "error"


class ApiError(Exception):
    """A request we refuse, with the HTTP status and the issues to report."""

    def __init__(self, status: int, *issues: Issue):
        super().__init__(issues[0].diagnostics if issues else str(status))
        self.status = status
        self.issues = issues


def error(status: int, code: str, diagnostics: str, expression: str | None = None) -> ApiError:
    """Build an ApiError with a single issue."""
    return ApiError(status, Issue(code, diagnostics, expression))


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
