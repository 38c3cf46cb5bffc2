from __future__ import annotations

import polars as pl
import pytest

from orforge.core.concepts import ConceptTreeError
from orforge.core.records import SELECT_SPLITS
from orforge.outputs.concept_splits import assemble_select_splits, select_splits, split_counts
from tests.outputs.select_fixtures import LEAKED, hand_tree, make_questions


def members(splits: pl.DataFrame, target: str) -> set[tuple]:
    rows = splits.filter(pl.col("target_id") == target)
    return set(rows.select("split", "question_id", "concept_id", "relation", "distance").iter_rows())


def eval_rows(split, concept, relation, distance, skip=()):
    return {(split, f"{concept}-e{i}", concept, relation, distance) for i in range(2) if f"{concept}-e{i}" not in skip}


def test_membership_relations_and_distances_by_hand():
    tree = hand_tree()
    splits = select_splits(tree, make_questions(), ["mammals", "animals", "cats", "boats"], None, None, seed=0)
    assert dict(splits.schema) == SELECT_SPLITS
    assert set(splits["kind"].to_list()) == {"eval"}

    # mammals: own, descendants cats and dogs, sibling birds (minus the leaking question), ancestor animals.
    assert members(splits, "mammals") == (
        eval_rows("abstention", "mammals", "self", 0)
        | eval_rows("generalization", "cats", "descendant", 1)
        | eval_rows("generalization", "dogs", "descendant", 1)
        | eval_rows("specificity", "birds", "sibling", 2, skip={LEAKED})
        | eval_rows("specificity", "animals", "ancestor", 1)
    )
    # animals (a root): the whole subtree generalizes; its sibling is the other root; no ancestors.
    assert members(splits, "animals") == (
        eval_rows("abstention", "animals", "self", 0)
        | eval_rows("generalization", "mammals", "descendant", 1)
        | eval_rows("generalization", "cats", "descendant", 2)
        | eval_rows("generalization", "dogs", "descendant", 2)
        | eval_rows("generalization", "birds", "descendant", 1)
        | eval_rows("generalization", "owls", "descendant", 2)
        | eval_rows("specificity", "vehicles", "sibling", 2)
    )
    # cats (a leaf): no generalization split; sibling dogs, ancestors mammals and animals.
    assert members(splits, "cats") == (
        eval_rows("abstention", "cats", "self", 0)
        | eval_rows("specificity", "dogs", "sibling", 2)
        | eval_rows("specificity", "mammals", "ancestor", 1)
        | eval_rows("specificity", "animals", "ancestor", 2)
    )
    # boats: an only child; specificity is its parent alone.
    assert members(splits, "boats") == (
        eval_rows("abstention", "boats", "self", 0) | eval_rows("specificity", "vehicles", "ancestor", 1)
    )
    depths = dict(splits.select("target_id", "target_depth").unique().iter_rows())
    assert depths == {"mammals": 1, "animals": 0, "cats": 2, "boats": 1}
    # Rows come in target order as given, then split order.
    assert splits["target_id"].unique(maintain_order=True).to_list() == ["mammals", "animals", "cats", "boats"]
    first = splits.filter(pl.col("target_id") == "mammals")["split"].unique(maintain_order=True).to_list()
    assert first == ["abstention", "generalization", "specificity"]


def test_leaked_question_stays_where_it_is_the_target_and_can_be_kept():
    tree, questions = hand_tree(), make_questions()
    result = assemble_select_splits(tree, questions, ["mammals", "birds", "animals"], None, None, seed=0)
    rows = result.records.filter(pl.col("question_id") == LEAKED)
    # Kept as birds' own question and as a descendant of animals; dropped as mammals' sibling question.
    assert set(rows.select("target_id", "split").iter_rows()) == {("birds", "abstention"),
                                                                  ("animals", "generalization")}
    assert result.notes["leaked_rows_excluded"] == 1
    assert result.notes["leaked_rows_kept"] == 2
    everywhere = assemble_select_splits(tree, questions, ["mammals"], None, None, seed=0, exclude_leaked=())
    assert LEAKED in everywhere.records["question_id"].to_list()
    assert everywhere.notes["leaked_rows_excluded"] == 0
    nowhere = assemble_select_splits(tree, questions, ["animals"], None, None, seed=0,
                                     exclude_leaked=("generalization",))
    assert LEAKED not in nowhere.records["question_id"].to_list()


def test_train_kind_selects_the_training_questions():
    splits = select_splits(hand_tree(), make_questions(), ["mammals"], None, None, seed=0, kind="train")
    assert set(splits["question_id"].to_list()) == {"mammals-t0", "cats-t0", "dogs-t0", "birds-t0", "animals-t0"}
    assert set(splits["kind"].to_list()) == {"train"}


def test_seeded_samples_are_stable_balanced_and_bounded():
    tree, questions = hand_tree(), make_questions()
    a = select_splits(tree, questions, ["animals"], 5, 1, seed=7)
    shuffled = questions.sample(fraction=1.0, shuffle=True, seed=11)
    b = select_splits(tree, shuffled, ["animals"], 5, 1, seed=7)
    assert a.equals(b)
    gen = a.filter(pl.col("split") == "generalization")
    assert gen.height == 5
    assert gen["concept_id"].n_unique() == 5  # one question from each of the five descendants
    assert a.filter(pl.col("split") == "specificity").height == 1
    assert a.filter(pl.col("split") == "abstention").height == 2  # never sampled
    draws = {tuple(select_splits(tree, questions, ["animals"], 5, None, seed=s)["question_id"].to_list())
             for s in range(6)}
    assert len(draws) > 1  # the seed matters


def test_questions_outside_the_tree_are_counted_not_placed():
    extra = pl.DataFrame({"question_id": ["x1"], "concept_id": ["cats#boats"], "question": ["Cats on boats?"],
                          "kind": ["eval"]})
    questions = pl.concat([make_questions().select("question_id", "concept_id", "question", "kind"), extra])
    result = assemble_select_splits(hand_tree(), questions, ["cats"], None, None, seed=0)
    assert result.notes["questions_outside_tree"] == 1
    assert "x1" not in result.records["question_id"].to_list()


def test_bad_inputs():
    tree, questions = hand_tree(), make_questions()
    with pytest.raises(ConceptTreeError, match="'wolves'"):
        select_splits(tree, questions, ["wolves"], None, None, seed=0)
    with pytest.raises(ValueError, match="repeat question_id"):
        select_splits(tree, pl.concat([questions, questions.head(1)]), ["cats"], None, None, seed=0)
    with pytest.raises(ValueError, match="lack column"):
        select_splits(tree, questions.drop("kind"), ["cats"], None, None, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        select_splits(tree, questions, ["cats"], None, None, seed=0, exclude_leaked=("specifity",))


def test_split_counts():
    splits = select_splits(hand_tree(), make_questions(), ["mammals"], None, None, seed=0)
    counts = {(r["split"], r["relation"]): (r["n_questions"], r["n_concepts"])
              for r in split_counts(splits).iter_rows(named=True)}
    assert counts == {("abstention", "self"): (2, 1), ("generalization", "descendant"): (4, 2),
                      ("specificity", "ancestor"): (2, 1), ("specificity", "sibling"): (1, 1)}
