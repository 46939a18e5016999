"""The explanation page and the screen report in headless Chromium: what a clinician sees, nothing blocked."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import requests
from playwright.sync_api import sync_playwright

from conftest import FIXTURES, fixture_bundle
from rules import knowledge
from service.evaluate.cards import PRETEST, PROBABILITY, percent
from service.fhir import parse_time
from service.population import screen


def chromium() -> str:
    """Find Debian's Chromium; under CI a missing browser fails the run rather than skipping the tests."""
    path = shutil.which("chromium")
    if path is None:
        message = "Chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; .ci/run must install it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the screenshots are kept: IMNM_CDS_SCREENSHOTS, else the test run's temporary folder."""
    chosen = os.environ.get("IMNM_CDS_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def bundle_of(name: str) -> tuple[dict, str]:
    return fixture_bundle(FIXTURES / name)


class Opened:
    def __init__(self, page, cards: list[dict], problems: list[str]):
        self.page, self.cards, self.problems = page, cards, problems

    def alts(self) -> list[str]:
        return self.page.eval_on_selector_all("img", "images => images.map(i => i.alt)")


def open_page(browser, server: str, name: str, screenshots: Path) -> Opened:
    """Post a fixture to /evaluate as a browser asking for HTML; record every console message and failure."""
    bundle, as_of = bundle_of(name)
    url = f"{server}/evaluate?asOf={as_of}"
    cards = requests.post(url, json=bundle, timeout=30).json()["cards"]
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
    # A navigation is a GET: turn it into the POST a client makes, answered by the real server.
    page.route(
        url,
        lambda route: route.continue_(
            method="POST",
            post_data=json.dumps(bundle),
            headers={**route.request.headers, "Content-Type": "application/json"},
        ),
    )
    response = page.goto(url)
    assert response.status == 200 and response.headers["content-type"].startswith("text/html")
    assert "img-src data:" in response.headers["content-security-policy"]
    page.wait_for_load_state("load")
    shot = screenshots / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    return Opened(page, cards, problems)


def assert_clean(opened: Opened) -> None:
    """Nothing blocked by the policy, nothing failed, every chart drawn, the stylesheet applied."""
    assert opened.problems == []
    drawn = opened.page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth)")
    assert drawn and all(drawn)
    border = opened.page.eval_on_selector("h2", "h => getComputedStyle(h).borderBottomStyle")
    assert border == "solid"  # only explain.css sets it


def assert_cards(opened: Opened) -> None:
    """Each card the service gave has its section: summary, rules, evidence and sources."""
    articles = opened.page.locator("article.card")
    assert articles.count() == len(opened.cards) > 0
    for index, card in enumerate(opened.cards):
        text = articles.nth(index).inner_text()
        assert card["summary"] in text
        for rule in card["extension"]["imnm-cds.rules"]:
            assert rule in text
        for reference in card["extension"]["imnm-cds.evidence"]:
            assert reference in text
        assert card["source"]["label"] in text
        assert re.search(r"(verified|partly verified|not verified|set locally)", text)


def ck_values(bundle: dict) -> list[str]:
    """Return the CK values of a Bundle as the page writes them (U/L, thousands separated)."""
    return [
        f"{e['resource']['valueQuantity']['value']:,.0f} U/L"
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and any(c.get("code") == "2157-6" for c in e["resource"]["code"].get("coding", []))
    ]


def test_toxic_resolving_shows_the_curve_falling_with_the_expected_half_life(browser, server, screenshots):
    opened = open_page(browser, server, "statin-toxic-resolving", screenshots)
    assert_clean(opened)
    assert_cards(opened)
    course = next(alt for alt in opened.alts() if alt.startswith("CK over time"))
    half_life = knowledge.load().value("statin.ck-half-life")
    assert f"half-life of {half_life:g} days" in course
    values = ck_values(bundle_of("statin-toxic-resolving")[0])
    assert values and all(v in course for v in values)
    assert "last statin dose" in course


def test_autoimmune_persisting_shows_the_observed_half_life_against_the_toxic_one(
    browser, server, screenshots
):
    opened = open_page(browser, server, "statin-persistent-ck", screenshots)
    assert_clean(opened)
    assert_cards(opened)
    course = next(alt for alt in opened.alts() if alt.startswith("CK over time"))
    assert re.search(r"observed half-life \d+\.\d days", course)
    values = ck_values(bundle_of("statin-persistent-ck")[0])
    assert len(values) >= 3 and all(v in course for v in values)
    assert any(c["source"]["topic"]["code"] == "statin-autoimmune-pattern" for c in opened.cards)


def test_worked_example_shows_the_probability_ladder(browser, server, screenshots):
    opened = open_page(browser, server, "bundle-worked-example", screenshots)
    assert_clean(opened)
    assert_cards(opened)
    suspicion = next(c for c in opened.cards if PROBABILITY in c["extension"])
    pretest, posttest = percent(suspicion["extension"][PRETEST]), percent(suspicion["extension"][PROBABILITY])
    ladder = opened.page.locator("#ladder").inner_text()
    assert f"{pretest} → {posttest}" in ladder
    ladder_alt = next(alt for alt in opened.alts() if alt.startswith("Probability of IMNM"))
    assert f"pre-test {pretest}" in ladder_alt and f"post-test {posttest}" in ladder_alt
    assert "likelihood ratio" in ladder_alt
    assert "Cancer screening" in opened.page.locator("#screening").inner_text()


def test_the_screen_report_opens_with_its_charts(browser, screenshots, tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    lines = []
    for name in ("statin-toxic-resolving", "statin-persistent-ck", "worked-example-hmgcr-positive"):
        lines += [json.dumps(e["resource"]) for e in bundle_of(name)[0]["entry"]]
    (source / "all.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    screen.screen(source, tmp_path / "out", parse_time("2024-06-01T12:00:00Z"), 1, progress=False)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text))
    page.goto((tmp_path / "out" / "report.html").as_uri())
    page.screenshot(path=str(screenshots / "report.png"), full_page=True)
    assert problems == []
    alts = page.eval_on_selector_all("img", "images => images.map(i => i.alt)")
    assert any(alt.startswith("Peak CK × ULN across 3 patients") for alt in alts)
    review = page.locator("#first-title").inner_text()
    text = page.locator("main").inner_text()
    assert all(patient in text for patient in ("fx-toxic", "fx-persist", "fx-worked"))
    assert "Review first (3 of 3 patients with a card)" in review
