"""Property-based: any valid-shaped record maps to facts the engine takes, or to InvalidData, never a crash.

Hypothesis draws patients, Observations (CK, antibodies and panels, TSH, FVC, exam findings),
Conditions, medication records (statins and immunosuppressants: requests, statements,
administrations), biopsy reports and the evaluation time from the edges of what FHIR allows: dates in
years 1 and 9999 with ±14:00 offsets, zero, negative, tiny and huge quantities, any status, units the
service knows and does not. Runs are derandomized, so CI always tries the same examples.
"""

from __future__ import annotations

import base64
import functools
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_severity import fvc
from test_statin import statement

from conftest import ck, condition, hook_request
from rules import knowledge as knowledge_module
from service import facts
from service.evaluate import cards
from service.evaluate.engine import MAX_PROPERTIES, _check_fact
from service.fhir import Resource, parse_time

LOINC, SNOMED, RXNORM, UCUM = (
    "http://loinc.org",
    "http://snomed.info/sct",
    "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://unitsofmeasure.org",
)
PROPERTIES = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The engine's own limit is 255 properties per fact, nested leaves and the sid it adds included.
ENGINE_PROPERTY_LIMIT = 255


@functools.cache
def knowledge():
    return knowledge_module.load()


def codes(*valuesets: str) -> list[tuple[str, str]]:
    """Every (system, code) of these value sets, sorted, so draws are reproducible."""
    return sorted({pair for name in valuesets for pair in knowledge().valueset(name).codes})


ANTIBODY_SETS = [f"anti-{n}" for n in ("hmgcr", "srp", "jo1", "pl7", "mda5", "tif1g", "pmscl")]
FINDING_SETS = ["proximal-weakness", "myalgia", "dysphagia", "weight-loss", "dermatomyositis-rash"]
CONDITION_SETS = [
    "diagnosis-imnm",
    "diagnosis-polymyositis",
    "diagnosis-dermatomyositis",
    "malignancy",
    "interstitial-lung-disease",
    "hypothyroidism",
    "proximal-weakness",
]
DRUG_SETS = ["glucocorticoids", "methotrexate", "ivig", "rituximab", "statin-low-intensity"]


def often(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """Draw mostly from the common strategy, and one time in four from the rare one."""
    return st.integers(0, 3).flatmap(lambda n: rare if n == 0 else common)


# Dates: mostly within a year or so of each other (so results, doses and onsets interact), and
# otherwise anywhere in FHIR's range, with the offsets that push an instant past year 1 or 9999.
AROUND = date(2024, 1, 1)
days = often(
    st.integers(-400, 400).map(lambda n: AROUND + timedelta(days=n)),
    st.one_of(
        st.sampled_from([date(1, 1, 1), date(999, 12, 31), date(1000, 1, 1), date(8999, 12, 31)]),
        st.sampled_from([date(9000, 1, 1), date(9999, 12, 31)]),
        st.dates(),
    ),
)
offsets = st.sampled_from(["Z", "+00:00", "+14:00", "-14:00", "+05:30", "-12:00"])


@st.composite
def fhir_dates(draw) -> str:
    """A FHIR date: mostly a full date, sometimes only a year or a month."""
    day = draw(days).isoformat()
    return draw(often(st.just(day), st.sampled_from([day[:4], day[:7]])))


@st.composite
def fhir_datetimes(draw) -> str:
    """A FHIR dateTime: a date, or a full instant with an offset."""
    if draw(st.booleans()):
        return draw(fhir_dates())
    hour, minute = draw(st.integers(0, 23)), draw(st.integers(0, 59))
    return f"{draw(days).isoformat()}T{hour:02d}:{minute:02d}:00{draw(offsets)}"


numbers = often(
    st.one_of(st.integers(0, 50_000), st.floats(min_value=0, max_value=50_000)),
    st.one_of(
        st.sampled_from([0, 0.0, -1, 1e-300, 5e-324, 1e300, 1.7e308, 2**53, 2**63]),
        st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False),
    ),
)
units = often(
    st.sampled_from(["U/L", "U/L", "IU/L", "%", "U"]),
    st.sampled_from(["µkat/L", "nkat/L", "mU/mL", "mg/dL", "U/mL"]),
)


@st.composite
def quantities(draw) -> dict:
    unit = draw(units)
    quantity = {"value": draw(numbers), "unit": unit, "system": UCUM}
    quantity["code"] = unit
    if not draw(st.integers(0, 4)):
        quantity["comparator"] = draw(st.sampled_from(["<", "<=", ">=", ">"]))
    return quantity


def concept(pairs: list[tuple[str, str]], texts: list[str]) -> st.SearchStrategy[dict]:
    """A CodeableConcept: a known coding, a text the value sets read, or both."""
    coding = st.sampled_from(pairs).map(lambda p: {"coding": [{"system": p[0], "code": p[1]}]})
    text = st.sampled_from(texts).map(lambda t: {"text": t})
    both = st.tuples(coding, text).map(lambda ct: {**ct[0], **ct[1]})
    return st.one_of(coding, text, both)


interpretations = st.sampled_from(["POS", "NEG", "IND", "H", "N", "L", "A", "weird"]).map(
    lambda code: [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": code}
            ]
        }
    ]
)
result_values = often(
    quantities().map(lambda q: {"valueQuantity": q}),
    st.one_of(
        st.sampled_from(["positive", "negative", "equivocal", "weak positive", "n/a"]).map(
            lambda t: {"valueString": t}
        ),
        st.booleans().map(lambda b: {"valueBoolean": b}),
        st.just({"dataAbsentReason": {"text": "not done"}}),
        st.just({}),
    ),
)
reference_ranges = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "low": quantities().map(lambda q: {k: v for k, v in q.items() if k != "comparator"}),
            "high": quantities().map(lambda q: {k: v for k, v in q.items() if k != "comparator"}),
        },
    ).filter(bool),
    max_size=2,
)
observation_statuses = often(
    st.just("final"),
    st.sampled_from(
        ["amended", "corrected", "appended", "preliminary", "registered", "cancelled", "entered-in-error"]
    ),
)


def effective() -> st.SearchStrategy[dict]:
    return often(
        fhir_datetimes().map(lambda d: {"effectiveDateTime": d}),
        st.one_of(
            st.tuples(fhir_datetimes(), fhir_datetimes()).map(
                lambda se: {"effectivePeriod": {"start": se[0], "end": se[1]}}
            ),
            st.just({}),
        ),
    )


@st.composite
def observations(draw, index: int) -> dict:
    kind = draw(often(st.just("ck"), st.sampled_from(["antibody", "panel", "tsh", "fvc", "finding"])))
    code = {
        "ck": concept(codes("ck-total", "ck-mb"), ["CK", "Creatine kinase", "CK-MB", "CPK total"]),
        "antibody": concept(codes(*ANTIBODY_SETS), ["anti-HMGCR", "Anti-SRP antibody", "Jo-1", "anti-MDA5"]),
        "panel": st.just({"text": "Myositis panel"}),
        "tsh": concept(codes("tsh"), ["TSH"]),
        "fvc": concept(codes("fvc-percent-predicted"), ["FVC % predicted"]),
        "finding": concept(codes(*FINDING_SETS), ["proximal muscle weakness", "dysphagia", "myalgia"]),
    }[kind]
    resource = {
        "resourceType": "Observation",
        "id": f"obs-{index}",
        "status": draw(observation_statuses),
        "code": draw(code),
        "subject": {"reference": "Patient/p1"},
        **draw(effective()),
        **draw(result_values),
    }
    if draw(st.booleans()):
        resource["issued"] = draw(fhir_datetimes().filter(lambda d: "T" in d))
    if draw(st.booleans()):
        resource["interpretation"] = draw(interpretations)
    ranges = draw(reference_ranges)
    if ranges:
        resource["referenceRange"] = ranges
    if kind == "panel":
        resource["component"] = draw(
            st.lists(
                st.tuples(concept(codes(*ANTIBODY_SETS), ["anti-HMGCR", "PL-7"]), result_values).map(
                    lambda cv: {"code": cv[0], **cv[1]}
                ),
                min_size=1,
                max_size=3,
            )
        )
    return resource


@st.composite
def conditions(draw, index: int) -> dict:
    resource = {
        "resourceType": "Condition",
        "id": f"cond-{index}",
        "subject": {"reference": "Patient/p1"},
        "code": draw(concept(codes(*CONDITION_SETS), ["IMNM", "dermatomyositis", "cancer", "weakness"])),
    }
    for name, system, values in (
        (
            "clinicalStatus",
            "condition-clinical",
            ["active", "recurrence", "inactive", "remission", "resolved"],
        ),
        (
            "verificationStatus",
            "condition-ver-status",
            ["confirmed", "refuted", "provisional", "unconfirmed"],
        ),
    ):
        if draw(st.booleans()):
            url = f"http://terminology.hl7.org/CodeSystem/{system}"
            resource[name] = {"coding": [{"system": url, "code": draw(st.sampled_from(values))}]}
    onset = draw(
        st.sampled_from(["onsetDateTime", "onsetPeriod", "recordedDate", None]),
    )
    if onset == "onsetPeriod":
        resource[onset] = {"start": draw(fhir_datetimes())}
    elif onset:
        resource[onset] = draw(fhir_datetimes())
    if resource.get("clinicalStatus", {}).get("coding", [{}])[0].get("code") == "refuted":
        resource.pop("clinicalStatus")  # refuted conditions carry none (FHIR con-5)
    return resource


@st.composite
def medication_records(draw, index: int) -> dict:
    kind = draw(st.sampled_from(["MedicationRequest", "MedicationStatement", "MedicationAdministration"]))
    drug = draw(
        often(
            concept(
                codes("statin-ingredients", "statin-high-intensity"), ["atorvastatin", "simvastatin 40 mg"]
            ),
            concept(codes(*DRUG_SETS), ["prednisone", "IVIG", "methotrexate"]),
        )
    )
    resource = {
        "resourceType": kind,
        "id": f"med-{index}",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": drug,
    }
    if kind == "MedicationRequest":
        resource["status"] = draw(
            st.sampled_from(["active", "on-hold", "completed", "stopped", "draft", "cancelled", "unknown"])
        )
        resource["intent"] = "order"
        if draw(st.booleans()):
            resource["authoredOn"] = draw(fhir_datetimes())
        dispense = {}
        if draw(st.booleans()):
            dispense["validityPeriod"] = {"end": draw(fhir_datetimes())}
        if draw(st.booleans()):
            dispense["expectedSupplyDuration"] = {
                "value": draw(numbers),
                "unit": "days",
                "system": UCUM,
                "code": draw(st.sampled_from(["d", "wk", "mo", "a", "h"])),
            }
        if draw(st.booleans()):
            dispense["numberOfRepeatsAllowed"] = draw(st.integers(0, 10**6))
        if dispense:
            resource["dispenseRequest"] = dispense
    elif kind == "MedicationStatement":
        resource["status"] = draw(
            st.sampled_from(["active", "on-hold", "completed", "stopped", "intended", "entered-in-error"])
        )
        resource |= draw(effective())
    else:
        resource["status"] = draw(st.sampled_from(["completed", "in-progress", "stopped", "not-done"]))
        moment = draw(effective().filter(bool))
        resource |= moment
    return resource


@st.composite
def biopsy_reports(draw, index: int) -> dict:
    text = draw(
        st.sampled_from(
            [
                "Muscle biopsy: necrotic fibres, sparse inflammation, MHC-I not upregulated.",
                "Muscle biopsy. No necrosis; perifascicular atrophy present but no rimmed vacuoles.",
                "muscle biopsy: macrophages invading fibres\n\u202econtrol chars\u0000",
            ]
        )
    )
    report = {
        "resourceType": "DiagnosticReport",
        "id": f"rep-{index}",
        "status": draw(st.sampled_from(["final", "amended", "preliminary"])),
        "code": {"text": "Muscle biopsy pathology report"},
        "subject": {"reference": "Patient/p1"},
        **draw(effective()),
    }
    if draw(st.booleans()):
        report["conclusion"] = text
    else:
        report["presentedForm"] = [
            {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}
        ]
    return report


@st.composite
def records(draw) -> list[dict]:
    """A patient and up to a dozen clinical resources about them."""
    patient = {"resourceType": "Patient", "id": "p1"}
    if draw(st.booleans()):
        patient["gender"] = draw(st.sampled_from(["female", "male", "other", "unknown"]))
    if draw(st.booleans()):
        patient["birthDate"] = draw(fhir_dates())
    makers = often(
        st.sampled_from([observations, observations, medication_records]),
        st.sampled_from([conditions, biopsy_reports]),
    )
    chosen = draw(st.lists(makers, min_size=1, max_size=12))
    return [patient, *(draw(make(index)) for index, make in enumerate(chosen))]


@st.composite
def statin_episodes(draw) -> list[dict]:
    """A statin stopped on some day and CK results around it: what the kinetics are computed from."""
    stop = draw(days)
    statin = {
        "resourceType": "MedicationStatement",
        "id": "statin",
        "status": draw(st.sampled_from(["completed", "stopped"])),
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"text": "atorvastatin 80 mg"},
        "effectivePeriod": {"start": "2020-01-01", "end": stop.isoformat()},
    }
    results = []
    for index, offset in enumerate(draw(st.lists(st.integers(-40, 200), min_size=1, max_size=6))):
        try:
            when = (stop + timedelta(days=offset)).isoformat()
        except OverflowError:
            continue
        value = draw(often(st.integers(0, 20_000), numbers))
        results.append(
            {
                "resourceType": "Observation",
                "id": f"ck-{index}",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "2157-6"}]},
                "subject": {"reference": "Patient/p1"},
                "effectiveDateTime": when,
                "valueQuantity": {"value": value, "unit": "U/L", "system": UCUM, "code": "U/L"},
                "referenceRange": [{"high": {"value": draw(numbers), "unit": "U/L"}}],
            }
        )
    return [{"resourceType": "Patient", "id": "p1"}, statin, *results]


# "Now" is the request's arrival, or an asOf the service could read (parse_time; else a 400).
nows = st.one_of(
    st.just(datetime(2024, 6, 1, 12, tzinfo=UTC)),
    fhir_datetimes().map(parse_time).filter(lambda moment: moment is not None),
)


def check_facts(fact_set: facts.FactSet) -> None:
    """Assert what the engine needs: few flat properties, checked values, unique colliding-free ids."""
    ids: set[int] = set()
    for fact in fact_set.facts:
        assert len(fact) < MAX_PROPERTIES < ENGINE_PROPERTY_LIMIT
        _check_fact(fact, ids)  # raises EngineError on anything the engine would choke on
        assert fact["id"] in fact_set.basis


@PROPERTIES
@given(resources=st.one_of(records(), statin_episodes()), now=nows)
def test_any_record_maps_to_facts_the_engine_takes_or_to_invalid_data(evaluator, resources, now):
    gathered = [Resource(data, location=f"entry[{i}]") for i, data in enumerate(resources)]
    try:
        fact_set = facts.build(
            evaluator.knowledge, gathered, now=now, available=frozenset({"Patient", "MedicationRequest"})
        )
    except facts.InvalidData as exc:
        assert exc.problems and all(p.problems for p in exc.problems)
        return
    check_facts(fact_set)
    outcome = evaluator.engine.evaluate(fact_set.facts)
    for card in cards.build(evaluator.knowledge, outcome, fact_set, "p1", frozenset(knowledge_module.TOPICS)):
        assert len(card["summary"]) < knowledge_module.SUMMARY_LIMIT


@PROPERTIES
@given(resources=records())
def test_the_same_record_in_any_order_gives_the_same_facts(evaluator, resources):
    now = datetime(2024, 6, 1, 12, tzinfo=UTC)
    forward = [Resource(data) for data in resources]
    try:
        first = facts.build(evaluator.knowledge, forward, now=now, available=frozenset())
    except facts.InvalidData:
        return
    again = facts.build(evaluator.knowledge, list(reversed(forward)), now=now, available=frozenset())
    assert again.facts == first.facts


# What these properties found, kept as plain examples.

NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)


def facts_of(evaluator, *resources) -> dict:
    built = facts.build(evaluator.knowledge, [Resource(r) for r in resources], now=NOW, available=frozenset())
    check_facts(built)
    return {fact["id"]: fact for fact in built.facts} | {"notes": built.notes}


def test_on_a_statin_with_myalgia_and_no_ck_the_card_asks_for_one(client):
    # Once a 500: the card's template was given the CK multiple of a CK never measured (None).
    request = hook_request(resources=[condition("c1", text="myalgia"), statement("active", end=None)])
    response = client.post("/cds-services/imnm-patient-view", json=request)
    assert response.status_code == 200
    assert "no recent CK" in response.get_json()["cards"][0]["summary"]


def test_a_ck_of_zero_before_makes_the_next_one_rising(evaluator):
    # Once a ZeroDivisionError: the trend divided by the earlier CK's multiple of the ULN.
    found = facts_of(evaluator, ck("a", 0, "2024-05-01T08:00:00Z"), ck("b", 300, "2024-05-10T08:00:00Z"))
    assert found["ck"]["trend"] == "rising"


def test_a_peak_of_zero_after_a_statin_gives_a_capped_ratio(evaluator):
    # Once a ZeroDivisionError: the expected curve from a peak of 0 is 0 everywhere.
    stopped = statement("completed", end="2024-04-01")
    found = facts_of(
        evaluator, stopped, ck("a", 0, "2024-04-02T08:00:00Z"), ck("b", 0, "2024-04-03T08:00:00Z")
    )
    assert found["ck-kinetics"]["expected_ratio"] == 1.0


def test_a_supply_longer_than_the_calendar_has_no_known_end(evaluator):
    # Once an OverflowError: the start plus a supply of 10^12 years.
    order = {
        "resourceType": "MedicationRequest",
        "id": "mr",
        "status": "completed",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"text": "simvastatin 20 mg"},
        "authoredOn": "2024-01-01",
        "dispenseRequest": {"expectedSupplyDuration": {"value": 1e12, "code": "a", "system": UCUM}},
    }
    statin = facts_of(evaluator, order)["statin"]
    assert statin["exposure"] == "past" and statin["stop_known"] is False  # the start, as a guess


def test_a_ck_beyond_what_floats_hold_is_not_used(evaluator):
    # Once a 500: a reference range of 5e-324 U/L made the multiple of the ULN infinite.
    found = facts_of(evaluator, ck("a", 3000, high=5e-324))
    assert found["ck"]["tested"] is False
    assert any("not a possible activity" in note for note in found["notes"])


@pytest.mark.parametrize(
    "moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:00:00-14:00", "0999-12-31", "9000"]
)
def test_moments_at_the_edge_of_the_calendar_are_undated(moment):
    # Once an OverflowError: the offset carried the instant past the calendar, or arithmetic did later.
    assert parse_time(moment) is None


def test_a_reference_range_beyond_what_floats_hold_is_not_used(evaluator):
    # Once a 500: 1e307 µkat/L is past the float range in U/L, so the ULN was infinite.
    found = facts_of(evaluator, ck("a", 61.5, unit="ukat/L", high=1e307))
    assert found["ck"]["tested"] is False
    assert any("not a possible activity" in note for note in found["notes"])


def test_fvc_values_at_the_edge_of_the_float_range_give_a_finite_decline(evaluator):
    # Once a 500: a fall from 1.7e308 to -1.7e308 is past the float range.
    found = facts_of(
        evaluator, fvc("a", 1.7e308, "2024-05-01T08:00:00Z"), fvc("b", -1.7e308, "2024-05-20T08:00:00Z")
    )
    assert found["fvc"]["latest_pct"] == 1.7e308 and found["fvc"]["decline"] == 0.0
    assert any("Observation/b" in note and "not a possible" in note for note in found["notes"])
