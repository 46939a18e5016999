"""Read every corpus sentence from published and written reports; each feature must come out as expected."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from service.facts import context

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
    found = context.read(knowledge, kind, text)
    return {name: found.get(name, "unknown") for name in FEATURES[kind]}


def expected(entry: dict) -> dict[str, str]:
    return {name: entry["expect"].get(name, "unknown") for name in FEATURES[entry["kind"]]}


def test_the_corpus_is_big_enough_and_cites_its_published_sentences():
    assert len(CORPUS) >= 80
    published = [e for e in CORPUS if e["source"] != "written"]
    assert len(published) >= 30 and all(
        re.search(r"https?://|doi|PMID|\b(19|20)\d\d\b", e["source"]) for e in published
    )
    for entry in CORPUS:
        assert set(entry["expect"]) <= set(FEATURES[entry["kind"]]), entry["text"]


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{i:03d}-{e['covers']}" for i, e in enumerate(CORPUS)])
def test_each_sentence_reads_as_a_clinician_reads_it(knowledge, entry):
    assert read(knowledge, entry["kind"], entry["text"]) == expected(entry), entry["text"]
