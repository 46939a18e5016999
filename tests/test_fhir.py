"""The one rule for invalid input, element by element: what we read must be valid; the rest is ignored."""

from __future__ import annotations

import re

import pytest
from fhir.resources.R4B import get_fhir_model_class

from conftest import ROOT
from service.fhir import DRAFT_ORDER, READ, InvalidResource, Resource, validate

SUBJECT = {"reference": "Patient/p1"}
DRUG = {"text": "atorvastatin 40 MG Oral Tablet"}
# The smallest valid resource of each kind in the table.
VALID = {
    "Patient": {"resourceType": "Patient", "id": "p1"},
    "Observation": {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "CK"},
        "subject": SUBJECT,
    },
    "Condition": {"resourceType": "Condition", "code": {"text": "myositis"}, "subject": SUBJECT},
    "AllergyIntolerance": {
        "resourceType": "AllergyIntolerance",
        "code": {"text": "atorvastatin"},
        "patient": SUBJECT,
    },
    "DiagnosticReport": {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "muscle biopsy"},
        "subject": SUBJECT,
    },
    "MedicationRequest": {
        "resourceType": "MedicationRequest",
        "status": "stopped",
        "intent": "order",
        "subject": SUBJECT,
        "medicationCodeableConcept": DRUG,
    },
    "MedicationStatement": {
        "resourceType": "MedicationStatement",
        "status": "completed",
        "subject": SUBJECT,
        "medicationCodeableConcept": DRUG,
    },
    "MedicationAdministration": {
        "resourceType": "MedicationAdministration",
        "status": "completed",
        "subject": SUBJECT,
        "medicationCodeableConcept": DRUG,
        "effectiveDateTime": "2024-01-01",
    },
    "MedicationDispense": {
        "resourceType": "MedicationDispense",
        "status": "completed",
        "medicationCodeableConcept": DRUG,
    },
    "Medication": {"resourceType": "Medication"},
    "Procedure": {
        "resourceType": "Procedure",
        "status": "completed",
        "code": {"text": "Colonoscopy"},
        "subject": SUBJECT,
    },
    "ServiceRequest": {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"text": "CT chest abdomen pelvis"},
        "subject": SUBJECT,
    },
}
VALID[DRAFT_ORDER] = {**VALID["MedicationRequest"], "status": "draft"}
SECRET = "SECRET-VALUE-42"
MALFORMED = {"malformed": SECRET}  # wrong for every element: no list, primitive or datatype takes it


def model_of(kind: str) -> type:
    return get_fhir_model_class(VALID[kind]["resourceType"])


def reads(kind: str, name: str) -> bool:
    """Tell from the table alone whether a JSON member is read: name, or a choice of name[x]."""
    return any(
        name == e or (e.endswith("[x]") and re.fullmatch(re.escape(e[:-3]) + "[A-Z][A-Za-z]*", name))
        for e in READ[kind]
    )


CASES = [
    (kind, name)
    for kind in READ
    for name in model_of(kind).elements_sequence()
    if name not in ("resourceType", "fhir_comments")
]
READ_ELEMENTS = {element for elements in READ.values() for element in elements}
READ_CASES = [case for case in CASES if reads(*case)]
UNREAD_CASES = [case for case in CASES if not reads(*case)]


def without_choices(data: dict, element: str) -> dict:
    """Drop the other choices of the choice element a member belongs to: one choice may be given."""
    choice = next(
        (
            e
            for e in READ_ELEMENTS
            if e.endswith("[x]") and re.fullmatch(re.escape(e[:-3]) + "[A-Z]\\w*", element)
        ),
        None,
    )
    if choice is None:
        return data
    return {name: value for name, value in data.items() if not name.startswith(choice[:-3])}


def check(kind: str, data: dict) -> list[tuple[str, str]]:
    return validate(Resource(data, location="test"), None if kind in model_names() else kind)


def model_names() -> set[str]:
    return {data["resourceType"] for data in VALID.values()} - {DRAFT_ORDER}


def test_every_element_of_the_table_is_an_element_of_r4():
    for kind, elements in READ.items():
        names = model_of(kind).elements_sequence()
        for element in elements:
            assert any(
                reads(kind, name) and (name == element or element.endswith("[x]")) for name in names
            ), (
                kind,
                element,
            )


def test_the_minimal_resources_are_valid():
    for kind, data in VALID.items():
        assert check(kind, data) == []


@pytest.mark.parametrize(("kind", "element"), READ_CASES, ids=[f"{k}.{e}" for k, e in READ_CASES])
def test_a_malformed_element_we_read_makes_the_resource_invalid(kind, element):
    with pytest.raises(InvalidResource) as raised:
        check(kind, {**without_choices(VALID[kind], element), element: MALFORMED})
    paths = [path for path, _ in raised.value.problems]
    assert paths and all(path.split(".")[0] == element for path in paths), paths
    assert SECRET not in repr(raised.value.problems)


@pytest.mark.parametrize(("kind", "element"), UNREAD_CASES, ids=[f"{k}.{e}" for k, e in UNREAD_CASES])
def test_a_malformed_element_we_do_not_read_is_ignored_and_named(kind, element):
    ignored = check(kind, {**VALID[kind], element: MALFORMED})
    assert ignored and {path.split(".")[0] for path, _ in ignored} == {element}
    assert SECRET not in repr(ignored)


@pytest.mark.parametrize(("kind", "element"), READ_CASES, ids=[f"{k}.{e}" for k, e in READ_CASES])
def test_null_in_an_element_we_read_is_invalid(kind, element):
    with pytest.raises(InvalidResource, match="not valid FHIR R4"):
        check(kind, {**VALID[kind], element: None})


def test_null_in_an_element_we_do_not_read_is_ignored():
    assert check("Observation", {**VALID["Observation"], "note": None}) == [
        ("note", "null is not allowed in FHIR JSON")
    ]


@pytest.mark.parametrize(
    ("kind", "missing"),
    [
        ("MedicationRequest", "intent"),
        ("MedicationRequest", "subject"),
        ("Observation", "code"),
        ("Observation", "status"),
        ("Condition", "subject"),
        (DRAFT_ORDER, "intent"),
        (DRAFT_ORDER, "status"),
    ],
)
def test_a_required_element_missing_is_ignored_and_named_read_or_not(kind, missing):
    data = {name: value for name, value in VALID[kind].items() if name != missing}
    assert [path for path, _ in check(kind, data)] == [missing]


def test_a_malformed_element_we_do_not_read_hides_no_problem_in_one_we_read():
    # The model stops checking across elements at a malformed one: a second medication[x] must still count.
    data = {**VALID["MedicationRequest"], "category": MALFORMED, "medicationReference": {"reference": "#m"}}
    with pytest.raises(InvalidResource) as raised:
        check("MedicationRequest", data)
    assert raised.value.problems == [("medication[x]", "only one choice of medication[x] may be given")]


def test_the_sandboxs_draft_is_read_for_its_drug_and_its_object_category_ignored():
    draft = {
        **VALID[DRAFT_ORDER],
        "category": {"coding": [{"code": "community"}]},
        "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}],
    }
    del draft["intent"]
    assert sorted(path for path, _ in check(DRAFT_ORDER, draft)) == ["category", "intent"]


def test_a_contained_medication_is_read_like_any_medication():
    contained = {"resourceType": "Medication", "id": "m", "code": DRUG, "manufacturer": MALFORMED}
    data = {**VALID["MedicationStatement"], "contained": [contained]}
    del data["medicationCodeableConcept"]
    data["medicationReference"] = {"reference": "#m"}
    assert [path for path, _ in check("MedicationStatement", data)] == ["contained.0.manufacturer.malformed"]
    data["contained"] = [{**contained, "code": MALFORMED}]
    with pytest.raises(InvalidResource):
        check("MedicationStatement", data)


def test_a_contained_resource_of_no_known_type_is_invalid_not_a_crash():
    data = {**VALID["MedicationRequest"], "contained": [{"resourceType": "Nonsense", "id": "x"}]}
    with pytest.raises(InvalidResource):
        check("MedicationRequest", data)


def test_the_readme_shows_the_table():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| ((?:`[^`]+`(?:, )?)+) \|$", text, re.MULTILINE)
    assert {kind: tuple(re.findall(r"`([^`]+)`", cells)) for kind, cells in rows} == dict(READ)
