"""Realistic patient-view requests of any size: CK series, antibodies, conditions, medications, other labs.

Each request is a different patient with different values (a seed picks them), so nothing a process
remembers from one request makes the next cheaper. About a fifth of the resources can matter to a
rule (CK, antibodies, TSH, FVC, muscle findings, statins, immunosuppressants); the rest are the
everyday labs, problems and prescriptions of a chart.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

AS_OF = datetime(2024, 6, 1, 12, tzinfo=UTC)
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

# Everyday labs no rule reads: (LOINC, display, unit, low, high).
OTHER_LABS = [
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 133, 147),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.3, 5.2),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 180),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.5, 1.6),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 10, 17),
    ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L", 8, 120),
    ("1920-8", "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L", 8, 140),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 120, 280),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.8, 9.5),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 3.5, 12),
]
OTHER_CONDITIONS = [
    ("38341003", "Hypertensive disorder"),
    ("44054006", "Diabetes mellitus type 2"),
    ("55822004", "Hyperlipidemia"),
    ("195967001", "Asthma"),
    ("35489007", "Depressive disorder"),
]
MUSCLE_CONDITIONS = [("249939004", "Proximal muscle weakness"), ("68962001", "Myalgia")]
OTHER_DRUGS = [("860975", "metformin 500 MG Oral Tablet"), ("197361", "amlodipine 5 MG Oral Tablet")]
STATINS = [("617311", "atorvastatin 40 MG Oral Tablet"), ("859751", "rosuvastatin calcium 20 MG Oral Tablet")]


def request(resources: int, seed: int) -> dict:
    """Return a patient-view request whose prefetch holds this many resources."""
    rng = random.Random(seed)
    pid = f"bench-{seed}"
    maker = _Maker(rng, pid)
    relevant = max(3, resources // 5)
    labs = [maker.ck(i) for i in range(max(1, relevant // 2))]
    labs += [maker.antibody("93493-5", "HMGCR Antibody, IgG"), maker.tsh()]
    conditions = [maker.condition(*rng.choice(MUSCLE_CONDITIONS)) for _ in range(max(1, relevant // 8))]
    statements = [maker.statement(*rng.choice(STATINS)) for _ in range(max(1, relevant // 10))]
    spirometry = [maker.fvc(i) for i in range(max(1, relevant // 20))]
    filled = 1 + len(labs) + len(conditions) + len(statements) + len(spirometry)
    others = max(0, resources - filled)
    conditions += [maker.condition(*rng.choice(OTHER_CONDITIONS)) for _ in range(others // 8)]
    prescriptions = [maker.prescription(*rng.choice(OTHER_DRUGS)) for _ in range(others // 8)]
    labs += [maker.other_lab() for _ in range(others - 2 * (others // 8))]
    prefetch = {
        "patient": maker.patient(),
        "labs": _searchset(labs),
        "conditions": _searchset(conditions),
        "medicationStatements": _searchset(statements),
        "medicationRequests": _searchset(prescriptions),
        "spirometry": _searchset(spirometry),
    }
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.UUID(int=rng.getrandbits(128))),
        "context": {"userId": "Practitioner/bench", "patientId": pid},
        "extension": {"imnm-cds.asOf": AS_OF.isoformat()},
        "prefetch": prefetch,
    }


class _Maker:
    def __init__(self, rng: random.Random, pid: str):
        self.rng, self.pid, self.count = rng, pid, 0

    def _id(self, kind: str) -> str:
        self.count += 1
        return f"{kind}-{self.count}"

    def _when(self, days_back: int) -> str:
        moment = AS_OF - timedelta(days=days_back, minutes=self.rng.randrange(1440))
        return moment.isoformat().replace("+00:00", "Z")

    def patient(self) -> dict:
        born = 1940 + self.rng.randrange(60)
        return {
            "resourceType": "Patient",
            "id": self.pid,
            "gender": self.rng.choice(["female", "male"]),
            "birthDate": f"{born}-{1 + self.rng.randrange(12):02d}-{1 + self.rng.randrange(28):02d}",
        }

    def _lab(self, code: str, display: str, days_back: int, **value) -> dict:
        return {
            "resourceType": "Observation",
            "id": self._id("obs"),
            "status": "final",
            "category": [{"coding": [{"system": CATEGORY, "code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
            "subject": {"reference": f"Patient/{self.pid}"},
            "effectiveDateTime": self._when(days_back),
            **value,
        }

    def _quantity(self, value: float, unit: str, low: float, high: float) -> dict:
        return {
            "valueQuantity": {"value": round(value, 1), "unit": unit, "system": UCUM, "code": unit},
            "referenceRange": [{"low": {"value": low, "unit": unit}, "high": {"value": high, "unit": unit}}],
        }

    def ck(self, i: int) -> dict:
        value = self.rng.choice([self.rng.uniform(40, 300), self.rng.uniform(300, 15000)])
        return self._lab(
            "2157-6",
            "Creatine kinase [Enzymatic activity/volume] in Serum or Plasma",
            30 * i + self.rng.randrange(30),
            **self._quantity(value, "U/L", 39, 308),
        )

    def antibody(self, code: str, display: str) -> dict:
        answer = self.rng.choice([("10828004", "Positive"), ("260385009", "Negative")])
        value = {
            "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": answer[0], "display": answer[1]}]}
        }
        return self._lab(code, display, self.rng.randrange(200), **value)

    def tsh(self) -> dict:
        value = self.rng.uniform(0.5, 12)
        return self._lab(
            "3016-3",
            "Thyrotropin [Units/volume] in Serum or Plasma",
            self.rng.randrange(300),
            **self._quantity(value, "m[IU]/L", 0.4, 4.0),
        )

    def fvc(self, i: int) -> dict:
        observation = self._lab("19872-1", "FVC measured/predicted", 90 * i + self.rng.randrange(90))
        observation["category"] = [{"coding": [{"system": CATEGORY, "code": "procedure"}]}]
        observation["valueQuantity"] = {
            "value": self.rng.randrange(55, 105),
            "unit": "%",
            "system": UCUM,
            "code": "%",
        }
        return observation

    def other_lab(self) -> dict:
        code, display, unit, low, high = self.rng.choice(OTHER_LABS)
        value = self.rng.uniform(low * 0.8, high * 1.2)
        return self._lab(code, display, self.rng.randrange(1500), **self._quantity(value, unit, low, high))

    def condition(self, code: str, display: str) -> dict:
        return {
            "resourceType": "Condition",
            "id": self._id("cond"),
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
            "subject": {"reference": f"Patient/{self.pid}"},
            "onsetDateTime": self._when(self.rng.randrange(2000)),
        }

    def statement(self, code: str, display: str) -> dict:
        start = self.rng.randrange(200, 2000)
        return {
            "resourceType": "MedicationStatement",
            "id": self._id("ms"),
            "status": "active",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{self.pid}"},
            "effectivePeriod": {"start": self._when(start)},
        }

    def prescription(self, code: str, display: str) -> dict:
        return {
            "resourceType": "MedicationRequest",
            "id": self._id("mr"),
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{self.pid}"},
            "authoredOn": self._when(self.rng.randrange(1500)),
        }


def _searchset(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
