"""The explanation page for every fixture: drawn from the evaluation, each card in it, the same each time."""

from __future__ import annotations

import json
import re

import pytest

from conftest import FIXTURES, fixture_bundle, scenarios
from service.cli import main


@pytest.mark.parametrize("path", scenarios(), ids=lambda p: p.name)
def test_every_fixture_has_a_page_with_each_of_its_cards(client, path):
    bundle, as_of = fixture_bundle(path)
    cards = client.post(f"/evaluate?asOf={as_of}", json=bundle)
    page = client.post(f"/evaluate?asOf={as_of}", json=bundle, headers={"Accept": "text/html"})
    assert page.status_code == cards.status_code
    if cards.status_code != 200:
        return
    html = page.get_data(as_text=True)
    shown = cards.get_json()["cards"]
    assert html.count('<article id="card-') == len(shown)
    for card in shown:
        assert card["uuid"] and card["source"]["label"].replace("&", "&amp;") in html
    assert "<script" not in html and "style=" not in html  # the policy would block both
    ck = [e for e in bundle["entry"] if "2157-6" in json.dumps(e["resource"].get("code", {}))]
    if ck:
        assert re.search(r'alt="CK over time on a log scale; \d+ CK results?', html)
    second = client.post(f"/evaluate?asOf={as_of}", json=bundle, headers={"Accept": "text/html"})
    assert second.get_data(as_text=True) == html


def test_evaluate_writes_the_page_and_its_stylesheet_beside_it(tmp_path, capsys):
    out = tmp_path / "page.html"
    request = FIXTURES / "bundle-worked-example" / "request.json"
    assert main(["evaluate", "--html", str(out), str(request)]) == 0
    printed = json.loads(capsys.readouterr().out)
    html = out.read_text(encoding="utf-8")
    assert '<link rel="stylesheet" href="explain.css">' in html
    assert (tmp_path / "explain.css").read_text(encoding="utf-8").startswith("/*")
    assert html.count('<article id="card-') == len(printed[str(request)]["cards"]) > 0
    assert "Probability of IMNM" in html


def test_evaluate_explains_one_file_at_a_time(tmp_path, capsys):
    request = str(FIXTURES / "bundle-worked-example" / "request.json")
    assert main(["evaluate", "--html", str(tmp_path / "page.html"), request, request]) == 2
    assert "one file" in capsys.readouterr().err
    assert not (tmp_path / "page.html").exists()


def observation(id_: str, loinc: str, when: str, value: float, unit: str) -> dict:
    return {
        "resource": {
            "resourceType": "Observation",
            "id": id_,
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "subject": {"reference": "Patient/p"},
            "effectiveDateTime": when,
            "valueQuantity": {
                "value": value,
                "unit": unit,
                "system": "http://unitsofmeasure.org",
                "code": unit,
            },
        }
    }


def test_values_no_record_should_hold_are_drawn_at_the_edge_and_written_as_they_are(client):
    statin = {
        "resourceType": "MedicationStatement",
        "id": "s",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "medicationCodeableConcept": {"text": "atorvastatin 40 mg tablet"},
        "effectivePeriod": {"start": "2023-01-01", "end": "2023-12-30"},
    }
    entries = [
        {"resource": {"resourceType": "Patient", "id": "p"}},
        {"resource": statin},
        *(observation(f"ck{d}", "2157-6", f"2024-01-0{d}", 1e308, "U/L") for d in (1, 2, 3)),
        observation("fvc", "19872-1", "2024-01-02", 1e308, "%"),
    ]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    page = client.post("/evaluate?asOf=2024-06-01T00:00:00Z", json=bundle, headers={"Accept": "text/html"})
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "3 CK results" in html and "FVC % predicted: 1e+308%" in html
