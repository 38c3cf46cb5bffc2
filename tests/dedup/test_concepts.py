"""Concept-question checks with the real MiniLM: near duplicates removed within a concept only, and questions that
fit a sibling or the parent as well as their own concept flagged, on hand-written questions whose answer is
obvious."""

from __future__ import annotations

import polars as pl
import pytest

from orforge.dedup.concepts import concept_label, dedup_within, flag_leaks
from orforge.dedup.embed import Embedder
from tests.generators.tree_fixture import concepts_frame, make_tree

TREE = make_tree()


@pytest.fixture(scope="module")
def embedder():
    with Embedder() as e:
        yield e


def test_near_duplicates_are_dropped_within_a_concept_only(embedder):
    questions = pl.DataFrame({
        "question_id": ["q1", "q2", "q3", "q4", "q5"],
        "concept_id": ["rivers", "rivers", "rivers", "lakes", "rivers"],
        "question": ["How long is the Nile river?", "How long is the river Nile?",
                     "Which river flows through Paris?",
                     "How long is the Nile river?",  # the same words under another concept: not a duplicate
                     "How long is the Nile River"],
    })
    out = dedup_within(questions, "concept_id", "question", 0.9, embedder)
    assert out.columns == [*questions.columns, "kept", "duplicate_of", "similarity"]
    assert out["question_id"].to_list() == ["q1", "q2", "q3", "q4", "q5"]  # order kept
    assert out["kept"].to_list() == [True, False, True, True, False]
    assert out["duplicate_of"].to_list() == [None, "q1", None, None, "q1"]
    assert out["similarity"][1] >= 0.9 and out["similarity"][0] is None


def test_dedup_within_rejects_missing_columns(embedder):
    with pytest.raises(ValueError, match="'question_id'"):
        dedup_within(pl.DataFrame({"concept_id": ["a"], "question": ["b"]}), "concept_id", "question", 0.9,
                     embedder)


QUESTIONS = pl.DataFrame({
    "question_id": [f"q{i}" for i in range(8)],
    "concept_id": ["rivers", "rivers", "rivers", "lakes", "cars", "cars", "cars", "cities"],
    "question": [
        "How long is the Nile river?",  # its own concept
        "Which river flows through Paris?",  # its own concept
        "What is the largest lake in Africa?",  # about the sibling, lakes
        "Which lake is the deepest in the world?",  # its own concept
        "What is the best way to maintain a car engine?",  # its own concept (close to vehicles, within 0.05)
        "How do I fix a flat tire on my bike?",  # about the sibling, bicycles
        "What should I check when buying a used vehicle?",  # about the parent, vehicles
        "What is the population of Tokyo?",  # its own concept
    ],
})


def test_questions_that_fit_a_sibling_or_the_parent_are_flagged(embedder):
    out = flag_leaks(QUESTIONS, concepts_frame(TREE), embedder, margin=0.02)
    assert out["question_id"].to_list() == QUESTIONS["question_id"].to_list()
    assert out["leak_flag"].to_list() == [False, False, True, False, False, True, True, False]
    assert out["leak_with"].to_list() == [None, None, "lakes", None, None, "bicycles", "vehicles", None]
    flagged = out.filter(pl.col("leak_flag"))
    assert flagged["leak_similarity"].null_count() == 0
    assert out.filter(~pl.col("leak_flag"))["leak_similarity"].null_count() == 5


def test_a_wider_margin_flags_a_question_close_to_its_parent(embedder):
    # The car-engine question is a little closer to Cars than to Vehicles: kept at margin 0.02, flagged when the
    # margin says "as close within 0.05" (QuestionsConfig.leak_margin's default).
    wide = flag_leaks(QUESTIONS, concepts_frame(TREE), embedder, margin=0.05)
    assert wide["leak_flag"][4] is True and wide["leak_with"][4] == "vehicles"
    strict = flag_leaks(QUESTIONS, concepts_frame(TREE), embedder, margin=0.0)
    assert strict["leak_flag"].sum() <= 3


def test_a_lone_root_has_no_rivals_and_is_never_flagged(embedder):
    tree = pl.DataFrame({"concept_id": ["places"], "name": ["Places"], "parent_id": [None]},
                        schema={"concept_id": pl.Utf8, "name": pl.Utf8, "parent_id": pl.Utf8})
    out = flag_leaks(pl.DataFrame({"concept_id": ["places"], "question": ["Where is Rome?"]}), tree, embedder, 0.05)
    assert out["leak_flag"].to_list() == [False]


def test_labels_carry_the_ancestor_path_and_bad_input_is_an_error(embedder):
    assert concept_label("Rivers", ["Places", "Water bodies"]) == "Rivers (Places > Water bodies)"
    assert concept_label("Places", []) == "Places"
    with pytest.raises(ValueError, match="not in the tree"):
        flag_leaks(pl.DataFrame({"concept_id": ["oceans"], "question": ["How deep is the Pacific?"]}),
                   concepts_frame(TREE), embedder, 0.05)
