"""Realistic patient-view requests of any size: CK series, antibodies, conditions, medications, other labs.

Each request is a different patient with different values (a seed picks them), so nothing a process
remembers from one request makes the next cheaper. About a fifth of the resources can matter to a
rule (CK, antibodies, TSH, FVC, muscle findings, statins, immunosuppressants); the rest are the
everyday labs, problems and prescriptions of a chart. Every request also carries three narrative
reports (a muscle biopsy, a thigh MRI and a chest CT, 15-40 sentences each, in conclusion or a
plain-text presentedForm), some of whose sentences are drawn per patient.
"""

from __future__ import annotations

import base64
import random
import uuid
from datetime import UTC, datetime, timedelta

AS_OF = datetime(2024, 6, 1, 12, tzinfo=UTC)
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
REPORT_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0074"

# Narrative reports as pathologists and radiologists write them: fixed lines, then a few drawn per patient.
BIOPSY = [
    "SURGICAL PATHOLOGY REPORT",
    "Specimen: skeletal muscle, right vastus lateralis, open biopsy",
    "Clinical information: proximal weakness and raised CK; anti-HMGCR requested",
    "Gross description: a tan-red strip of muscle measuring "
    "1.5 x 0.6 x 0.4 cm, oriented and frozen in isopentane.",
    "Frozen sections were stained with H&E, modified Gomori trichrome, "
    "NADH-TR, SDH, COX and acid phosphatase.",
    "Fibre size variation is mild, with scattered small round atrophic fibres.",
    "Internalised nuclei are seen in fewer than 3% of fibres.",
    "There are numerous necrotic fibres at different stages of necrosis, some with myophagocytosis.",
    "Scattered basophilic regenerating fibres are present.",
    "Inflammatory cells are sparse and confined to the perimysium.",
    "CD8+ T cells are not seen surrounding or invading non-necrotic fibres.",
    "Perifascicular atrophy is absent.",
    "Rimmed vacuoles are not identified.",
    "No ragged-red fibres are seen on trichrome.",
    "Oxidative enzyme stains show no cytochrome oxidase-negative fibres.",
    "There is no increase in endomysial connective tissue.",
    "Immunohistochemistry: MHC class I shows diffuse faint sarcolemmal upregulation, "
    "including on non-necrotic fibres.",
    "C5b-9 (MAC): sarcolemmal deposition on scattered non-necrotic fibres",
    "CD68 immunostaining shows macrophages within necrotic fibres.",
    "Dystrophin, sarcoglycan and dysferlin immunostaining is preserved.",
    "Acid phosphatase shows activity only within necrotic fibres.",
    "Electron microscopy was not performed.",
]
BIOPSY_DRAWN = [
    "Rimmed vacuoles: absent",
    "Necrotic fibres: approximately 5% of fibres",
    "Inflammation: minimal",
    "Endomysial invasion: not seen",
    "Capillary density appears normal.",
    "Possible rare rimmed vacuoles.",
    "No significant inflammation, necrosis present.",
    "A prior biopsy in 2019 was reported as normal.",
]
BIOPSY_CLOSING = "Diagnosis: Necrotizing myopathy, consistent with immune-mediated necrotizing myopathy."
MRI = [
    "MRI BOTH THIGHS WITHOUT CONTRAST",
    "Clinical indication: proximal weakness, raised CK; assess for myositis.",
    "Technique: axial and coronal T1-weighted and STIR sequences of both thighs from the hips to the knees.",
    "Comparison: none.",
    "There is symmetric STIR hyperintensity of the vastus lateralis, "
    "vastus intermedius and adductor muscles.",
    "The oedema is most marked in the adductor magnus bilaterally.",
    "The hamstrings show milder patchy STIR hyperintensity.",
    "The sartorius and gracilis are spared.",
    "T1-weighted images show no fatty replacement of the thigh muscles.",
    "Muscle bulk is preserved.",
    "There is no fascial oedema.",
    "Subcutaneous oedema is noted around the distal thighs.",
    "No intramuscular collection or mass is seen.",
    "The femora show normal marrow signal.",
    "The hip and knee joints are unremarkable within the field of view.",
    "Impression: active symmetric myositis of the thighs without chronic fatty replacement.",
]
MRI_DRAWN = [
    "If a repeat muscle biopsy is considered, the vastus lateralis is the best site.",
    "Fatty replacement cannot be excluded in the left semimembranosus.",
    "No change in the extent of STIR hyperintensity compared with the prior study.",
    "Muscle oedema: bilateral vastus lateralis and vastus intermedius",
    "T1: fatty atrophy of both medial gastrocnemii",
]
CT = [
    "CT CHEST, ABDOMEN AND PELVIS WITH INTRAVENOUS CONTRAST",
    "Clinical indication: myositis; cancer screening.",
    "Technique: axial images from the lung apices to the symphysis pubis after intravenous contrast.",
    "Comparison: chest radiograph from last year.",
    "The lungs are clear, with no nodule or consolidation.",
    "There is mild dependent atelectasis at both bases.",
    "There is no pleural or pericardial effusion.",
    "No mediastinal, hilar or axillary lymphadenopathy.",
    "The heart is normal in size.",
    "The liver, spleen, pancreas and adrenal glands are unremarkable.",
    "The kidneys enhance symmetrically without hydronephrosis.",
    "There is no free fluid or free gas.",
    "The bowel is of normal calibre.",
    "The bladder and pelvic organs are unremarkable.",
    "No suspicious osseous lesion.",
    "The paraspinal and gluteal muscles are symmetric.",
    "Impression: no evidence of malignancy in the chest, abdomen or pelvis.",
]

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
    filled = 4 + len(labs) + len(conditions) + len(statements) + len(spirometry)
    others = max(0, resources - filled)
    conditions += [maker.condition(*rng.choice(OTHER_CONDITIONS)) for _ in range(others // 8)]
    prescriptions = [maker.prescription(*rng.choice(OTHER_DRUGS)) for _ in range(others // 8)]
    labs += [maker.other_lab() for _ in range(others - 2 * (others // 8))]
    prefetch = {
        "patient": maker.patient(),
        "reports": _searchset(maker.reports()),
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

    def _report(self, category: str, code: str, display: str, days_back: int, lines: list[str]) -> dict:
        return {
            "resourceType": "DiagnosticReport",
            "id": self._id("dr"),
            "status": "final",
            "category": [{"coding": [{"system": REPORT_CATEGORY, "code": category}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
            "subject": {"reference": f"Patient/{self.pid}"},
            "effectiveDateTime": self._when(days_back),
            "conclusion": "\n".join(lines),
        }

    def reports(self) -> list[dict]:
        """Return a muscle biopsy (text attached), a thigh MRI and a chest CT, each 15-40 sentences."""
        biopsy = self._report(
            "SP",
            "11529-5",
            "Surgical pathology study",
            self.rng.randrange(30, 120),
            [*BIOPSY, *self.rng.sample(BIOPSY_DRAWN, 4), BIOPSY_CLOSING],
        )
        text = biopsy.pop("conclusion").encode()
        biopsy["presentedForm"] = [{"contentType": "text/plain", "data": base64.b64encode(text).decode()}]
        mri = self._report(
            "RAD",
            "26235-2",
            "MR Thigh - bilateral",
            self.rng.randrange(1, 60),
            [*MRI, *self.rng.sample(MRI_DRAWN, 3)],
        )
        ct = self._report("RAD", "72254-6", "CT Chest and Abdomen and Pelvis W contrast IV", 20, CT)
        return [biopsy, mri, ct]


def _searchset(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
