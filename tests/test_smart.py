"""The SMART app launch: from the EHR's launch to the explanation page, and each way it is refused."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask, Response, redirect
from flask import request as incoming
from playwright.sync_api import sync_playwright
from test_browser import chromium
from werkzeug.serving import make_server

from conftest import FHIR_TOKEN, HOOK_SCENARIOS, authorised, free_port, load, resources_of, serve, store
from service.config import ConfigError, Settings
from service.web import smart
from service.web.app import create_app

CLIENT_ID = "imnm-cds-app"
PUBLIC = "https://localhost"
SCENARIO = next(s for s in HOOK_SCENARIOS if s.name == "seropositive-hmgcr")


class Ehr:
    """An EHR's authorization server on loopback, in front of the FHIR server (sekmet) it guards.

    It issues a code for a PKCE S256 challenge, then a token naming the patient for the matching verifier,
    and passes FHIR reads on with the FHIR server's token. `misbehave` makes its FHIR side answer another
    patient's resources ("other-patient") or fail ("fail").
    """

    def __init__(self, fhir: str, patient: str):
        self.fhir, self.patient, self.misbehave = fhir, patient, None
        self.codes: dict[str, dict] = {}
        app = Flask("ehr")
        app.add_url_rule("/fhir/.well-known/smart-configuration", "config", self.configuration)
        app.add_url_rule("/authorize", "authorize", self.authorize)
        app.add_url_rule("/token", "token", self.token, methods=["POST"])
        app.add_url_rule("/fhir/<path:path>", "fhir", self.read)
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.root = f"http://127.0.0.1:{self.server.server_port}"
        self.base = f"{self.root}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def configuration(self):
        return {"authorization_endpoint": f"{self.root}/authorize", "token_endpoint": f"{self.root}/token"}

    def authorize(self):
        args = incoming.args
        assert args["response_type"] == "code" and args["client_id"] == CLIENT_ID
        assert args["code_challenge_method"] == "S256" and args["aud"] == self.base
        code = f"code-{len(self.codes)}"
        self.codes[code] = {"challenge": args["code_challenge"], "scope": args["scope"]}
        return redirect(f"{args['redirect_uri']}?code={code}&state={args['state']}")

    def token(self):
        form = incoming.form
        issued = self.codes.pop(form.get("code"), None)
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if issued is None or base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != issued["challenge"]:
            return {"error": "invalid_grant"}, 400
        return {
            "access_token": "ehr-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": issued["scope"],
            "patient": self.patient,
        }

    def read(self, path: str):
        if incoming.headers.get("Authorization") != "Bearer ehr-token":
            return Response(status=401)
        if self.misbehave == "fail":
            return Response(status=500)
        query = incoming.query_string.decode()
        if self.misbehave == "other-patient" and not path.startswith("Patient"):
            query = query.replace(f"patient={self.patient}", "patient=someone-else")
        answer = requests.get(
            f"{self.fhir}/{path}?{query}", headers={"Authorization": f"Bearer {FHIR_TOKEN}"}, timeout=10
        )
        # Links (a searchset's next page) point at the EHR's base, not at the server behind it.
        content = answer.content.replace(self.fhir.encode(), self.base.encode())
        return Response(content, answer.status_code, mimetype="application/fhir+json")


@pytest.fixture(scope="module")
def ehr(fhir_server):
    request = load(SCENARIO / "request.json")
    patient = request["context"]["patientId"]
    resources = [r for value in request["prefetch"].values() for r in resources_of(value)]
    store(fhir_server, resources)
    # Someone else's labs, for the FHIR server that answers with them.
    store(
        fhir_server,
        [
            dict(r, id=f"else-{r['id']}", subject={"reference": "Patient/someone-else"})
            for r in resources
            if r["resourceType"] == "Observation"
        ],
    )
    double = Ehr(fhir_server, patient)
    yield double
    double.server.shutdown()


def settings_for(ehr: Ehr, tmp_path, **extra) -> Settings:
    key = tmp_path / "state.key"
    key.write_text("k" * 48)
    return Settings.from_env(
        {},
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        public_url=PUBLIC,
        smart_client_id=CLIENT_ID,
        smart_redirect_url=f"{PUBLIC}/smart/redirect",
        smart_state_key_file=key,
        smart_frame_ancestors="https://ehr.example.org",
        fhir_servers=ehr.base,
        fhir_allow_http="true",
        deadline_ms=30000,
        fetch_budget_ms=20000,
        fetch_connect_timeout_ms=5000,
        fetch_read_timeout_ms=10000,
        **extra,
    )


@pytest.fixture(scope="module")
def smart_app(ehr, tmp_path_factory):
    return create_app(settings_for(ehr, tmp_path_factory.mktemp("smart")))


@pytest.fixture
def browser(smart_app, ehr):
    ehr.misbehave = None
    return smart_app.test_client()


def launch(browser, ehr, card: str = "") -> Response:
    """Launch from the EHR and come back with the code: the answer of the redirect endpoint."""
    started = browser.get(
        "/smart/launch", query_string={"iss": ehr.base, "launch": "xyz", "card": card}, base_url=PUBLIC
    )
    assert started.status_code == 302, started.text
    authorized = requests.get(started.headers["Location"], allow_redirects=False, timeout=10)
    assert authorized.status_code == 302
    back = urlsplit(authorized.headers["Location"])
    assert back.path == "/smart/redirect"
    return browser.get(f"/smart/redirect?{back.query}", base_url=PUBLIC)


def test_the_launch_opens_the_explanation_of_the_patients_cards(smart_app, browser, ehr):
    hook = load(SCENARIO / "request.json")
    hook.pop("extension", None)  # evaluated now, as the launch is
    hook["prefetch"] = {}
    call = authorised(hook, ehr.base, token="ehr-token")
    cards = smart_app.test_client().post("/cds-services/imnm-patient-view", json=call)
    assert "cards" in cards.get_json(), cards.get_json()
    cards = cards.get_json()["cards"]
    assert cards
    rule = cards[-1]["extension"]["imnm-cds.rules"][0]
    started = time.perf_counter()
    page = launch(browser, ehr, card=rule)
    print(f"redirect to rendered page: {1000 * (time.perf_counter() - started):.0f} ms")
    assert page.status_code == 200, page.text
    text = html.unescape(page.text)
    for card in cards:
        assert card["summary"] in text
    assert "Read from the EHR's FHIR server as of" in text
    assert f'href="#card-{len(cards)}"' in page.text and "Go to the card you opened" in text
    assert page.headers["Content-Security-Policy"] == (
        "default-src 'none'; img-src data:; style-src 'self'; frame-ancestors https://ehr.example.org"
    )
    assert "X-Frame-Options" not in page.headers
    assert "ehr-token" not in page.text
    stylesheet = browser.get("/smart/explain.css", base_url=PUBLIC)
    assert stylesheet.status_code == 200 and stylesheet.mimetype == "text/css"


def test_a_card_not_in_the_record_says_the_draft_order_is_not_on_the_server(browser, ehr):
    page = launch(browser, ehr, card="statin.rechallenge_after_autoimmune_pattern")
    assert page.status_code == 200
    assert "the draft order is not on the FHIR server" in page.text
    assert "Go to the card you opened" not in page.text


def test_the_state_cookie_is_signed_secure_and_short_lived(browser, ehr):
    started = browser.get("/smart/launch", query_string={"iss": ehr.base, "launch": "xyz"}, base_url=PUBLIC)
    cookie = started.headers["Set-Cookie"]
    for attribute in (
        "Secure",
        "HttpOnly",
        "SameSite=None",
        "Path=/smart/",
        f"Max-Age={smart.STATE_MINUTES * 60}",
    ):
        assert attribute in cookie
    asked = parse_qs(urlsplit(started.headers["Location"]).query)
    assert asked["code_challenge_method"] == ["S256"] and asked["launch"] == ["xyz"]
    assert set(asked["scope"][0].split()) >= {"launch", "openid", "fhirUser", "patient/Observation.read"}
    assert asked["state"][0] not in cookie  # signed, and the state is not readable from the URL alone


def refused(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.mimetype == "text/html"
    assert words in html.unescape(response.text)
    assert "X-Frame-Options" not in response.headers


def test_a_wrong_state_is_refused(browser, ehr):
    browser.get("/smart/launch", query_string={"iss": ehr.base, "launch": "xyz"}, base_url=PUBLIC)
    refused(browser.get("/smart/redirect?code=code-0&state=forged", base_url=PUBLIC), 400, "does not belong")


def test_an_expired_state_cookie_is_refused(browser, ehr, monkeypatch):
    started = browser.get("/smart/launch", query_string={"iss": ehr.base, "launch": "xyz"}, base_url=PUBLIC)
    state = parse_qs(urlsplit(started.headers["Location"]).query)["state"][0]
    later = time.time() + smart.STATE_MINUTES * 60 + 5
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later)
    refused(browser.get(f"/smart/redirect?code=c&state={state}", base_url=PUBLIC), 400, "longer than")


def test_an_altered_or_missing_state_cookie_is_refused(browser):
    refused(browser.get("/smart/redirect?code=c&state=s", base_url=PUBLIC), 400, "no launch")
    browser.set_cookie(smart.COOKIE, "altered", domain="localhost", path="/smart/")
    refused(browser.get("/smart/redirect?code=c&state=s", base_url=PUBLIC), 400, "altered")


def test_an_iss_not_allowed_is_refused_before_anything_is_contacted(browser):
    answer = browser.get("/smart/launch?iss=https://elsewhere.example.org/fhir&launch=x", base_url=PUBLIC)
    refused(answer, 403, "not one this service may use")


def test_resources_of_another_patient_are_refused(browser, ehr):
    ehr.misbehave = "other-patient"
    refused(launch(browser, ehr), 400, "belongs to a different patient")


def test_a_failing_fhir_server_is_a_clear_page(browser, ehr):
    ehr.misbehave = "fail"
    refused(launch(browser, ehr), 412, "the FHIR server failed (HTTP 500)")


def test_cards_link_to_the_app_only_when_it_is_configured(smart_app, client):
    hook = load(SCENARIO / "request.json")
    plain = client.post("/cds-services/imnm-patient-view", json=hook).get_json()["cards"]
    linked = smart_app.test_client().post("/cds-services/imnm-patient-view", json=hook).get_json()["cards"]
    assert plain and all(link["type"] != "smart" for c in plain for link in c.get("links", ()))
    for card in linked:
        rule = card["extension"]["imnm-cds.rules"][0]
        (link,) = [link for link in card["links"] if link["type"] == "smart"]
        assert link["url"] == f"{PUBLIC}/smart/launch?card={rule}"
        assert json.loads(link["appContext"]) == {"card": rule}


def test_the_app_refuses_to_start_without_a_signing_key():
    with pytest.raises(ConfigError, match="IMNM_CDS_SMART_STATE_KEY_FILE"):
        Settings.from_env({}, smart_client_id=CLIENT_ID, public_url=PUBLIC, smart_redirect_url=PUBLIC + "/r")


def test_the_launch_in_chromium_from_the_ehr_to_the_card(ehr, tmp_path):
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    key = tmp_path / "state.key"
    key.write_text("s" * 48)
    environ = {
        "IMNM_CDS_PUBLIC_URL": public,
        "IMNM_CDS_SMART_CLIENT_ID": CLIENT_ID,
        "IMNM_CDS_SMART_REDIRECT_URL": f"{public}/smart/redirect",
        "IMNM_CDS_SMART_STATE_KEY_FILE": str(key),
        "IMNM_CDS_FHIR_SERVERS": ehr.base,
        "IMNM_CDS_FHIR_ALLOW_HTTP": "true",
        "IMNM_CDS_DEADLINE_MS": "30000",
        "IMNM_CDS_FETCH_BUDGET_MS": "20000",
        "IMNM_CDS_FETCH_CONNECT_TIMEOUT_MS": "5000",
        "IMNM_CDS_FETCH_READ_TIMEOUT_MS": "10000",
    }
    ehr.misbehave = None
    process, url = serve(tmp_path / "stderr.log", port, **environ)
    try:
        hook = load(SCENARIO / "request.json")
        cards = requests.post(f"{url}/cds-services/imnm-patient-view", json=hook, timeout=30).json()["cards"]
        (link,) = [link for link in cards[-1]["links"] if link["type"] == "smart"]
        problems: list[str] = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page()
            page.on("console", lambda message: problems.append(message.text))
            page.on("requestfailed", lambda failed: problems.append(failed.url))
            # The EHR opens the card's link with iss and launch added.
            answer = page.goto(f"{link['url']}&iss={ehr.base}&launch=xyz", timeout=60000)
            assert answer.status == 200 and urlsplit(page.url).path == "/smart/redirect"
            assert "Go to the card you opened" in page.inner_text("header")
            page.click("p.opened a")
            assert urlsplit(page.url).fragment.startswith("card-")
            assert page.eval_on_selector("article.opened", "e => getComputedStyle(e).display") == "block"
            page.screenshot(path=str(tmp_path / "launched.png"), full_page=True)
            browser.close()
        assert problems == []
    finally:
        process.terminate()
        process.wait(30)
