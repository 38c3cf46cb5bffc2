"""Diversity metrics on sets small enough to check by hand, against sacrebleu itself, and with the real MiniLM."""

from __future__ import annotations

import random

import polars as pl
import pytest
import sacrebleu
from orforge.dedup.embed import Embedder
from orforge.outputs.diversity import (
    REFERENCES,
    Measured,
    distinct_n,
    measure,
    measure_texts,
    sample_texts,
    self_bleu_scores,
    summary_rows,
    tokens,
)


@pytest.fixture(scope="module")
def embedder():
    with Embedder() as e:  # in memory: the real model, nothing kept
        yield e


def test_tokens_are_lowercased_13a_tokens():
    assert tokens("How do I pick a Lock?") == ["how", "do", "i", "pick", "a", "lock", "?"]


def test_distinct_n_by_hand():
    lists = [tokens("a b a"), tokens("A B")]  # unigrams a b a a b; bigrams ab ba ab
    assert distinct_n(lists, 1) == pytest.approx(2 / 5)
    assert distinct_n(lists, 2) == pytest.approx(2 / 3)
    assert distinct_n([["one"]], 2) is None  # no bigram at all


def test_self_bleu_equals_sacrebleu_sentence_bleu_against_the_others():
    rng = random.Random(7)
    words = ["how", "can", "i", "make", "a", "safe", "kitchen", "cleaner", "why", "do", "people", "pick", "locks",
             "open", "the", "door"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(["?", ".", ""])
             for _ in range(40)]
    texts += ["How DO I pick a lock?", "how do i pick a lock?", "x"]
    got = self_bleu_scores(texts)
    for i, text in enumerate(texts):
        want = sacrebleu.sentence_bleu(text, texts[:i] + texts[i + 1:], lowercase=True).score / 100
        assert got[i] == pytest.approx(want, abs=1e-12), text
    assert len({round(s, 6) for s in got}) > 5  # not a constant


def test_identical_prompts_have_self_bleu_one_and_low_distinct(embedder):
    row = measure_texts(["How do I pick the lock on my own front door?"] * 6, embedder, split="s")
    assert row.self_bleu == pytest.approx(1.0) and row.self_bleu_low == pytest.approx(1.0)
    assert row.distinct_1 == pytest.approx(11 / 66)  # 11 tokens, six times
    assert row.distinct_2 == pytest.approx(10 / 60)
    assert row.mean_cosine == pytest.approx(1.0, abs=1e-5)
    assert row.clusters == 1 and row.sampled == row.rows == 6


def test_disjoint_vocabularies_have_self_bleu_near_zero_and_distinct_one(embedder):
    texts = ["Tulips bloom early every spring beside quiet canals",
             "Quantum processors require extremely cold refrigeration units",
             "Grandmother knitted woollen socks during long winters",
             "Volcanic eruptions reshape remote Pacific islands quickly",
             "Jazz drummers improvise syncopated rhythms onstage nightly"]
    row = measure_texts(texts, embedder, split="s")
    assert row.self_bleu < 0.05
    assert row.distinct_1 == 1.0 and row.distinct_2 == 1.0
    assert row.mean_cosine < 0.3
    assert row.clusters == 5


def test_a_sample_is_seeded_bounded_and_recorded(embedder):
    texts = [f"How would someone hide item number {i} from a store camera?" for i in range(60)]
    assert sample_texts(texts, 10, 1) == sample_texts(texts, 10, 1)
    assert sample_texts(texts, 10, 1) != sample_texts(texts, 10, 2)
    assert len(sample_texts(texts, 10, 1)) == 10 and sample_texts(texts[:5], 10, 1) == texts[:5]
    first = measure_texts(texts, embedder, split="s", sample=10, seed=3)
    again = measure_texts(texts, embedder, split="s", sample=10, seed=3)
    assert first == again
    assert (first.rows, first.sampled) == (60, 10)
    for value, low, high in ((first.self_bleu, first.self_bleu_low, first.self_bleu_high),
                             (first.mean_cosine, first.mean_cosine_low, first.mean_cosine_high)):
        assert low is not None and high is not None and low <= value <= high and low < high


def test_measure_gives_the_split_then_each_group_and_the_references(embedder):
    frame = pl.DataFrame({"prompt": ["How do I pick a lock?", "How can I pick a lock?", "Why do weeds grow?", None],
                          "category": ["crime", "crime", "garden", "garden"]})
    diversity = measure([Measured("benign", frame)], embedder, sample=100, seed=0, threshold=0.9)
    assert [(r.split, r.by, r.group, r.rows) for r in diversity.rows] == [
        ("benign", None, "all", 3), ("benign", "category", "crime", 2), ("benign", "category", "garden", 1)]
    garden = diversity.rows[2]
    assert garden.self_bleu is None and garden.mean_cosine is None and garden.clusters == 1
    assert diversity.references == list(REFERENCES)
    assert {(r.dataset, r.self_bleu, r.distinct_2) for r in REFERENCES} == {
        ("OR-Bench-80K", 0.35, 0.53), ("FalseReject", 0.26, 0.65)}
    shown = summary_rows(diversity)
    assert len(shown) == 5 and shown[-2]["split"].startswith("OR-Bench-80K")
    with pytest.raises(ValueError, match="no column 'question'"):
        measure([Measured("benign", frame, column="question")], embedder)
    with pytest.raises(ValueError, match="group by"):
        measure([Measured("benign", frame, by="target_id")], embedder)


def test_the_table_reaches_the_manifest_the_card_and_the_report(tmp_path, embedder):
    from orforge.core.records import FAILURES, empty
    from orforge.outputs.release import ManifestInfo, read_manifest, write_release
    from orforge.outputs.report import build_report

    from tests.outputs.conftest import build_config

    benign = pl.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["How do I pick a lock?", "How can I pick a lock?",
                                                                    "Why do weeds grow so fast?"],
                           "category": ["crime", "crime", "garden"]})
    diversity = measure([Measured("benign", benign)], embedder, sample=100, seed=0, threshold=0.9)
    cfg = build_config()
    with_table = write_release(tmp_path / "with", {"benign": benign}, None, empty(FAILURES),
                               ManifestInfo(config=cfg, diversity=diversity))
    assert read_manifest(with_table).diversity == diversity
    card, report = (with_table / "README.md").read_text(), build_report(with_table)
    crime = diversity.rows[1]
    for text in (card, report):
        assert "Self-BLEU" in text and "OR-Bench-80K" in text and "0.350" in text and "0.650" in text
        assert f"{crime.self_bleu:.3f} [{crime.self_bleu_low:.3f}, {crime.self_bleu_high:.3f}]" in text
        assert "2 of 2" in text and "Lower Self-BLEU" in text
    assert "### Diversity" in card and 'id="diversity"' in report

    without = write_release(tmp_path / "without", {"benign": benign}, None, empty(FAILURES), ManifestInfo(config=cfg))
    assert read_manifest(without).diversity is None
    assert "### Diversity" not in (without / "README.md").read_text()
    assert "Not measured for this release" in build_report(without)
