"""Read every corpus sentence from published and written reports; each feature must come out as expected."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from service.facts import biopsy

CORPUS = tomllib.loads((Path(__file__).parent / "reports" / "corpus.toml").read_text())["sentence"]
FEATURES = {
    "pathology": (
        "necrosis",
        "sparse_inflammation",
        "macrophages",
        "mac_deposition",
        "mhc1_upregulation",
        "endomysial_invasion",
        "perifascicular_atrophy",
        "rimmed_vacuoles",
        "regeneration",
        "consistent_with_imnm",
        "dystrophic",
    ),
    "mri": ("stir_oedema", "fatty_replacement"),
}


def read(knowledge, kind: str, text: str) -> dict[str, str]:
    """Return every feature of this kind of report as the reader finds it in one sentence."""
    found = biopsy.read_features(knowledge, text) if kind == "pathology" else {}
    return {name: found.get(name, "unknown") for name in FEATURES[kind]}


def expected(entry: dict) -> dict[str, str]:
    return {name: entry["expect"].get(name, "unknown") for name in FEATURES[entry["kind"]]}


def test_the_corpus_is_big_enough_and_cites_its_published_sentences():
    assert len(CORPUS) >= 80
    published = [e for e in CORPUS if e["source"] != "written"]
    assert len(published) >= 30 and all("http" in e["source"] or "doi" in e["source"] for e in published)
    for entry in CORPUS:
        assert set(entry["expect"]) <= set(FEATURES[entry["kind"]]), entry["text"]


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{i:03d}-{e['covers']}" for i, e in enumerate(CORPUS)])
def test_each_sentence_reads_as_a_clinician_reads_it(knowledge, entry):
    assert read(knowledge, entry["kind"], entry["text"]) == expected(entry), entry["text"]
