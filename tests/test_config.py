"""Settings: read from IMNM_CDS_* variables, checked at start-up, documented in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT
from service.config import ConfigError, Settings
from service.hooks import PATIENT_VIEW
from service.web.app import create_app


def test_defaults_and_environment():
    assert Settings.from_env({}).engine_sessions == 32
    settings = Settings.from_env({"IMNM_CDS_ENGINE_SESSIONS": "8", "IMNM_CDS_LOG_LEVEL": "debug"})
    assert settings.engine_sessions == 8 and settings.log_level == "DEBUG"
    fetching = Settings.from_env(
        {
            "IMNM_CDS_FHIR_SERVERS": "https://ehr.example.org/fhir/, https://other.example.org",
            "IMNM_CDS_FHIR_ALLOW_HTTP": "true",
            "IMNM_CDS_PREFETCH_FAILURE": "OMIT",
        }
    )
    assert fetching.fhir_servers == ("https://ehr.example.org/fhir", "https://other.example.org")
    assert fetching.fhir_allow_http and fetching.prefetch_failure == "omit"


@pytest.mark.parametrize(
    "environ",
    [
        {"IMNM_CDS_ENGINE_SESSIONS": "2000"},
        {"IMNM_CDS_ENGINE_SESSIONS": "many"},
        {"IMNM_CDS_MAX_BODY_BYTES": "10"},
        {"IMNM_CDS_LOG_LEVEL": "LOUD"},
        {"IMNM_CDS_KNOWLEDGE_OVERRIDES": "/no/such/file.toml"},
        {"IMNM_CDS_DATABASE_URL": "mysql://cds@db/feedback"},
        {"IMNM_CDS_DATABASE_URL": "sqlite://"},
        {"IMNM_CDS_DATABASE_URL": "feedback.sqlite"},
        {"IMNM_CDS_FHIR_SERVERS": "https://ehr.example.org/fhir ftp://files.example.org"},
        {"IMNM_CDS_FHIR_SERVERS": "https://user:secret@ehr.example.org/fhir"},
        {"IMNM_CDS_FHIR_SERVERS": "https://ehr.example.org:99999/fhir"},
        {"IMNM_CDS_FHIR_ALLOW_HTTP": "perhaps"},
        {"IMNM_CDS_PREFETCH_FAILURE": "ignore"},
        {"IMNM_CDS_FETCH_BUDGET_MS": "500"},  # not less than the deadline (400)
    ],
)
def test_bad_settings_refuse_to_start(environ):
    with pytest.raises(ConfigError, match=next(iter(environ))):
        Settings.from_env(environ)


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        (
            "IMNM_CDS_DEADLINE_MS",
            "IMNM_CDS_DEADLINE_MS: 'abc' is not a number; give a whole number from 50 to 60000",
        ),
        (
            "IMNM_CDS_ENGINE_WAIT_SECONDS",
            "IMNM_CDS_ENGINE_WAIT_SECONDS: 'abc' is not a number; give a number from 0.0 to 60.0",
        ),
    ],
)
def test_a_bad_number_names_the_variable_and_the_expected_form(variable, message):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({variable: "abc"})
    assert str(refused.value) == message
    with pytest.raises(ConfigError, match=re.escape(f"{variable}: '99999999' is out of range; give a")):
        Settings.from_env({variable: "99999999"})


def test_a_misspelt_variable_names_the_closest_setting():
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"IMNM_CDS_DEADLINE_MSS": "300"})
    assert str(refused.value) == "IMNM_CDS_DEADLINE_MSS is not a setting; did you mean IMNM_CDS_DEADLINE_MS?"
    with pytest.raises(ConfigError, match="IMNM_CDS_COLOUR is not a setting; see the README's settings"):
        Settings.from_env({"IMNM_CDS_COLOUR": "blue"})
    # The test suite's own variables are not settings of the service.
    assert Settings.from_env({"IMNM_CDS_TEST_POSTGRES_URL": "postgresql://x@y/z"}).deadline_ms == 400


def test_production_lists_every_missing_setting_at_once():
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"IMNM_CDS_PRODUCTION": "true", "IMNM_CDS_FHIR_ALLOW_HTTP": "true"})
    assert str(refused.value).splitlines() == [
        "IMNM_CDS_PRODUCTION=true refuses to start until these are set:",
        "  IMNM_CDS_AUTH=jwt (IMNM_CDS_AUTH=off is development mode)",
        "  IMNM_CDS_TRUSTED_ISSUERS=<JSON file of the trusted CDS clients>",
        "  IMNM_CDS_PUBLIC_URL=<https URL clients call this service at>",
        "  IMNM_CDS_FHIR_ALLOW_HTTP=false (plain-http FHIR servers are for development)",
    ]


def test_a_postgresql_url_is_used_through_psycopg_3():
    settings = Settings.from_env({"IMNM_CDS_DATABASE_URL": "postgresql://cds:secret@db:5432/feedback"})
    assert settings.database_url == "postgresql+psycopg://cds:secret@db:5432/feedback"


def test_create_app_checks_its_config_too():
    with pytest.raises(ConfigError):
        create_app({"engine_sessions": 0})
    with pytest.raises(ConfigError, match="unknown settings"):
        create_app({"colour": "blue"})


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for variable, _, _ in Settings.documentation():
        assert f"`{variable}`" in readme, variable


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- test-command -->\s*```(?:sh|bash)?\n(.+?)\n```", readme, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci
    assert Path(ROOT / ".ci" / "run").stat().st_mode & 0o111


def test_by_default_every_patient_view_key_is_fetched_at_once():
    # One key after another, a FHIR server 25 ms away already takes a call past the fetch budget.
    assert Settings.from_env({}).fetch_threads == len(PATIENT_VIEW.prefetch)
