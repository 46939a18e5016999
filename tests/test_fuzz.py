"""Schema-driven fuzzing (schemathesis) of every operation in /openapi.json, in process through WSGI.

Valid and invalid requests are generated from the document: no answer may be a 5xx, every answer
must conform to the document (status, media type, body schema, headers), a request the document
rules out must be refused with a 4xx, and every 4xx must be a FHIR OperationOutcome. The run is
derandomized and bounded, so CI tries the same cases every time, and each operation's test fails if
it ran too few. With JWT verification on, requests without a token get 401 and nothing else.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from fhir.resources.R4B.operationoutcome import OperationOutcome
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.config import Settings
from service.web import openapi
from service.web.auth import NO_JWT_PATHS

EXAMPLES = 20  # per operation and mode, besides the boundary cases schemathesis derives from the schema
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
# What the document states in words but JSON Schema cannot: resources are valid FHIR R4 (their types and
# elements, by the FHIR specification) about the one patient in context. A request the schema allows
# may be refused for these, and only these.
BEYOND_THE_SCHEMA = (
    "is not valid FHIR R4",
    "is not a FHIR R4 resource type",
    "belongs to a different patient",
    "holds more than one patient",
)
REFUSALS = ["400", "401", "403", "404", "405", "406", "412", "413", "415"]
# A request the document allows is never refused as bad input (400, 413, 415); it may still find its
# data missing (412: a required prefetch key neither sent nor fetchable) or a server busy.
ACCEPTANCES = ["2xx", "401", "403", "404", "412", "5xx"]


@schemathesis.check
def valid_requests_are_accepted(ctx, response, case):
    """Schemathesis's positive data acceptance, but for refusals the document leaves to FHIR R4."""
    if response.status_code == 400 and all(
        any(reason in issue.get("diagnostics", "") for reason in BEYOND_THE_SCHEMA)
        for issue in response.json()["issue"]
    ):
        return None
    return positive_data_acceptance(ctx, response, case)


@schemathesis.check
def failures_are_operation_outcomes(ctx, response, case):
    """Every 4xx and 5xx is a FHIR OperationOutcome, whatever the document says of that status."""
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/fhir+json"), response.status_code
        OperationOutcome.model_validate(response.json())


REPLACED = [positive_data_acceptance]
ADDED = [valid_requests_are_accepted, failures_are_operation_outcomes]


def fuzzed(examples: int, boundaries: bool = True):
    """The service's document as the tests run it (test_openapi checks it is the one served), set up."""
    loaded = schemathesis.openapi.from_dict(openapi.document(Settings()))
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=examples
    )
    loaded.config.phases.coverage.enabled = boundaries
    loaded.config.checks.negative_data_rejection.expected_statuses = REFUSALS
    loaded.config.checks.positive_data_acceptance.expected_statuses = ACCEPTANCES
    return loaded


schema = fuzzed(EXAMPLES)
# Without a token nothing is read past the Authorization header: a few cases of each operation do.
schema_without_token = fuzzed(10, boundaries=False)


@pytest.fixture
def cases():
    """Count the cases one operation's test runs; when it ends, fail if it ran too few."""
    counted: Counter = Counter()
    yield counted
    assert counted, "no cases ran"
    for label, n in counted.items():
        # A GET without parameters has few distinct cases; a body has many, and without a token
        # only a few are sent.
        wanted = EXAMPLES if label.startswith("POST") and "no token" not in label else 1
        assert n >= wanted, (label, n)


@schema.parametrize()
@FUZZ
def test_every_operation_holds_under_fuzzing(app, cases, case):
    cases[case.operation.label] += 1
    case.call_and_validate(app=app, excluded_checks=REPLACED, additional_checks=ADDED)


@schema.include(path="/evaluate").parametrize()
@FUZZ
def test_evaluate_as_fhir_holds_under_fuzzing(app, cases, case):
    cases[f"{case.operation.label} (Accept: application/fhir+json)"] += 1
    case.call_and_validate(
        app=app,
        headers={"Accept": "application/fhir+json"},
        excluded_checks=REPLACED,
        additional_checks=ADDED,
    )


@schema_without_token.parametrize()
@FUZZ
def test_without_a_token_every_protected_operation_answers_401(auth_app, cases, case):
    cases[f"{case.operation.label} (JWT on, no token)"] += 1
    response = case.call(app=auth_app)
    # Open without a token: health, metrics (403 unless allowed), and CORS preflights (schemathesis also
    # tries other methods).
    if case.operation.path not in NO_JWT_PATHS and response.request.method != "OPTIONS":
        assert response.status_code == 401, (response.request.method, response.request.url)
        assert response.headers["www-authenticate"] == ["Bearer"]
    case.validate_response(response, checks=[failures_are_operation_outcomes])
