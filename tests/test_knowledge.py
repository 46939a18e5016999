"""The knowledge in rules/: every value cited, value sets valid and matched right, overrides checked."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest

from rules import knowledge
from rules.knowledge import TOPICS, KnowledgeError, service_request

RULES = Path(knowledge.__file__).parent


def test_every_parameter_cites_a_known_source(knowledge):
    assert knowledge.parameters
    for param in knowledge.parameters.values():
        assert param.source.id in knowledge.sources
        assert param.source.verification in ("verified", "partial", "unverified")


def test_unverified_values_are_marked_so(knowledge):
    assert knowledge.param("imnm.pretest.high-ck").source.verification == "unverified"
    assert knowledge.param("imnm.panel.statin.false-srp").source.id == "review-placeholder"


def test_the_default_knowledge_holds_the_worked_example(knowledge):
    assert knowledge.value("imnm.pretest.high-ck") == 0.20
    assert knowledge.value("imnm.panel.statin.hmgcr") == 0.75
    assert knowledge.value("imnm.panel.statin.false-hmgcr") == 0.05


def test_every_value_set_code_carries_a_verification_level_a_to_c():
    paths = sorted((RULES / "valuesets").glob("*.json"))
    assert paths
    for path in paths:
        data = json.loads(path.read_text())
        for include in data.get("compose", {}).get("include", []):
            levels = [e["valueCode"] for c in include.get("concept", []) for e in c["extension"]]
            levels += [e["valueCode"] for e in include.get("extension", [])]
            assert levels and set(levels) <= {"A", "B", "C"}, path.name


@pytest.mark.parametrize(
    ("valueset", "system", "code", "expected"),
    [
        ("dysphagia", "http://hl7.org/fhir/sid/icd-10-cm", "R13.12", True),
        ("dysphagia", "http://hl7.org/fhir/sid/icd-10-cm", "R1319", True),
        ("dysphagia", "http://hl7.org/fhir/sid/icd-10-cm", "R13.0", False),
        ("malignancy", "http://hl7.org/fhir/sid/icd-10-cm", "C34.90", True),
        ("malignancy", "http://hl7.org/fhir/sid/icd-10-cm", "C97", False),
        ("malignancy", "http://hl7.org/fhir/sid/icd-10-cm", "D03.9", False),
        ("proximal-weakness", "http://snomed.info/sct/900000000000207008", "249939004", True),
        ("proximal-weakness", "http://snomed.info/sct", "249942005", False),
        ("ck-total", "urn:oid:2.16.840.1.113883.6.1", "2157-6", True),
        ("statin-ingredients", "http://www.whocc.no/atc", "C10AA05", True),
        ("statin-ingredients", "http://www.whocc.no/atc", "C10AX09", False),
        ("anti-srp", "http://loinc.org", "33921-8", True),
        ("anti-srp", None, None, False),
    ],
)
def test_value_set_code_matching(knowledge, valueset, system, code, expected):
    assert knowledge.valueset(valueset).has_code(system, code) is expected


@pytest.mark.parametrize(
    ("valueset", "text", "expected"),
    [
        ("anti-hmgcr", "HMG-CoA reductase Ab", True),
        ("anti-srp", "Anti-SRP antibody", True),
        ("anti-srp", "Serum prostate marker", False),
        ("ck-total", "CK total", True),
        ("ck-total", "CK-MB", False),
        ("ck-total", "CPK MB isoenzyme", False),
        ("dermatomyositis-rash", "heliotrope rash", True),
    ],
)
def test_value_set_text_fallback(knowledge, valueset, text, expected):
    assert knowledge.valueset(valueset).has_text(text) is expected


def test_orders_are_valid_service_requests_and_code_only_verified_codes(knowledge):
    for order in knowledge.orders.values():
        for single in order.items or ([order] if order.text else []):
            model = MedicationRequest if single.medication else ServiceRequest
            model.model_validate(service_request(single, "Patient/p1"))
        if order.coding is not None:
            levels = [
                vs.codes.get((order.coding["system"], order.coding["code"]))
                for vs in knowledge.valuesets.values()
            ]
            assert {"A", "B"} & set(levels), order.key


def test_every_card_cites_sources_with_urls_and_has_a_known_topic(knowledge):
    assert knowledge.cards
    for card in knowledge.cards.values():
        assert card.source.url and all(link.url for link in card.links)
        assert card.topic in TOPICS


def test_a_local_override_replaces_a_value_and_names_who_set_it(tmp_path):
    path = tmp_path / "local.toml"
    path.write_text('[imnm.pretest.high-ck]\nvalue = 0.3\nsource = "Myositis clinic 2026-03"\n')
    loaded = knowledge.load(path)
    param = loaded.param("imnm.pretest.high-ck")
    assert param.value == 0.3 and param.source.verification == "local"
    assert param.source.label == "Myositis clinic 2026-03"


def test_wording_quotes_the_values_in_force(tmp_path):
    path = tmp_path / "local.toml"
    path.write_text(
        '[statin.persistence-window]\nvalue = 21\nsource = "Lipid clinic 2026-03"\n'
        '[statin.bands.moderate]\nvalue = 5\nsource = "Lipid clinic 2026-03"\n'
        '[cancer.window]\nvalue = 1000\nsource = "Myositis clinic 2026-03"\n'
    )
    shipped, local = knowledge.load(), knowledge.load(path)
    assert "within 2 weeks of the last dose" in shipped.cards["sams-high"].detail
    assert "within 3 weeks of the last dose" in local.cards["sams-high"].detail
    assert "(under 4×)" in shipped.cards["sams-mild"].summary
    assert "(under 5×)" in local.cards["sams-mild"].summary
    assert "raised 1,000 days either side of myositis onset" in local.cards["cancer-screening"].detail
    assert local.param("cancer.factors.cancer-near-onset").attributes["label"] == (
        "cancer diagnosed within 1,000 days of onset"
    )
    assert local.quote("statin.persistence-window") == "3 weeks"
    assert "[[" not in json.dumps([card.summary + card.detail for card in local.cards.values()])


def test_summaries_are_measured_with_the_values_in_force(tmp_path):
    copy = tmp_path / "rules"
    shutil.copytree(RULES, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    cards = copy / "cards.toml"
    # Padded to 139 characters at the widest with the shipped band of 4: a band of 4.5 takes it to 141.
    cards.write_text(cards.read_text().replace("exercise; recheck CK", "exercise; recheck CK" + "." * 35, 1))
    assert knowledge.load(root=copy).cards["sams-mild"]
    path = tmp_path / "local.toml"
    path.write_text('[statin.bands.moderate]\nvalue = 4.5\nsource = "Lipid clinic 2026-03"\n')
    with pytest.raises(KnowledgeError, match="card sams-mild: summary may reach 141"):
        knowledge.load(path, root=copy)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[imnm.pretest.high-ck]\nvalue = 1.5\nsource = "x"\n',
            "outside the allowed range",
        ),
        ("[imnm.pretest.high-ck]\nvalue = 0.3\n", "a value and a source"),
        ('[imnm.pretest.nothing]\nvalue = 0.3\nsource = "x"\n', "no such parameter"),
        ('[labs.ck.default-uln.male]\nvalue = "high"\nsource = "x"\n', "expected a float"),
        ("not toml [", "overrides"),
    ],
)
def test_bad_overrides_fail_the_start(tmp_path, text, problem):
    path = tmp_path / "local.toml"
    path.write_text(text)
    with pytest.raises(KnowledgeError, match=problem):
        knowledge.load(path)


@pytest.mark.parametrize(
    ("file", "old", "new", "problem"),
    [
        ("imnm.toml", 'source = "enmc-2017"', 'source = "nobody"', "not in sources.toml"),
        (
            "imnm.toml",
            'context = "statin on record"',
            'context = "statin on record"\nprevalence = 0.1',
            "outside a cited parameter",
        ),
        ("imnm.toml", "[ck.raised]\nvalue = 1.0", "[ck.raised]\nlimit = 3\nvalue = 1.0", "only words"),
        ("cards.toml", "Refer to neuromuscular", "Refer to neuromuscular " + "x" * 60, "summary may reach"),
        (
            "cards.toml",
            'suggestions = ["referral-neuromuscular"]',
            'suggestions = ["transplant"]',
            "unknown order",
        ),
        ("orders.toml", 'verification = "B"', 'verification = "C"', "level A or B"),
        ("reports.toml", "rimmed\\s+vacuol", "rimmed(", "regular expression"),
        ("valuesets/anti-srp.json", '"valueCode": "B"', '"valueCode": "X"', "verification level"),
        ("valuesets/anti-srp.json", '"status": "active"', '"status": 7', "not a valid FHIR R4 ValueSet"),
        (
            "cards.toml",
            "raised [[cancer.window]] either side",
            "raised [[cancer.windows]] either side",
            "not a parameter",
        ),
        ("orders.toml", "over [[statin.bands.very-high]]x", "over [[statin.bands.very-high]x", "unclosed"),
        ("cancer.toml", "age [[cancer.older-onset]]", "age [[cancer.factors.male]]", "only a number"),
        ("statin.toml", 'display = "weeks"', 'display = "fortnights"', "display takes"),
        (
            "indicators.toml",
            '"imnm-severe" = "critical"',
            '"imnm-severe" = "urgent"',
            "names no card or indicator",
        ),
        (
            "indicators.toml",
            '"imnm-severe" = "critical"',
            '"imnm-sever" = "critical"',
            "names no card or indicator",
        ),
        ("indicators.toml", '"imnm-workup" = "info"', "", "no indicator for the cards imnm-workup"),
    ],
)
def test_inconsistent_knowledge_fails_the_start(tmp_path, file, old, new, problem):
    copy = tmp_path / "rules"
    shutil.copytree(RULES, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    target = copy / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    with pytest.raises(KnowledgeError, match=problem):
        knowledge.load(root=copy)


def test_the_shipped_knowledge_loads_from_a_copy(tmp_path):
    copy = tmp_path / "rules"
    shutil.copytree(RULES, copy)
    assert knowledge.load(root=copy).cards.keys() == knowledge.load().cards.keys()


def test_every_concept_and_antibody_the_rules_match_on_is_one_the_facts_assert():
    from service.facts.clinical import CONCEPTS
    from service.facts.labs import ANTIBODIES

    source = "".join(path.read_text() for path in RULES.glob("*.py"))
    matched = {
        "clinical": set(re.findall(r'clinical\("([\w-]+)"\)', source)),
        "antibody": set(re.findall(r'antibody\("([\w-]+)"\)', source)),
    }
    assert matched["clinical"] and matched["antibody"]
    assert matched["clinical"] <= set(CONCEPTS), matched["clinical"] - set(CONCEPTS)
    assert matched["antibody"] <= set(ANTIBODIES), matched["antibody"] - set(ANTIBODIES)


def test_the_indicator_table_sets_every_card_and_each_situation_a_rule_tells_apart(tmp_path):
    shipped = knowledge.load()
    assert {key: card.indicator for key, card in shipped.cards.items()} == {
        key: value for key, value in shipped.indicators.items() if "." not in key
    }
    assert shipped.indicator("cancer-screening.panel-missing") == "warning"
    with pytest.raises(KnowledgeError, match=r"no indicator for 'cancer-screening\.later'"):
        shipped.indicator("cancer-screening.later")
    copy = tmp_path / "rules"
    shutil.copytree(RULES, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    table = copy / "indicators.toml"
    table.write_text(
        table.read_text().replace(
            '"mda5-red-flag.without-ild" = "warning"', '"mda5-red-flag.without-ild" = "info"'
        )
    )
    assert knowledge.load(root=copy).indicator("mda5-red-flag.without-ild") == "info"
