from __future__ import annotations

import json

import polars as pl
import pytest

from orforge.core.concepts import ConceptTree, ConceptTreeError
from orforge.outputs.concept_splits import select_splits
from orforge.outputs.select_export import (
    DPO_PAIRS,
    SFT_ROWS,
    dpo_pairs,
    read_data_json,
    select_data,
    sft_rows,
    select_files,
)
from tests.outputs.select_fixtures import hand_tree, make_questions

REPLY = "ABSTAIN"


def test_data_json_entries():
    data = select_data(hand_tree(), make_questions())
    assert list(data) == hand_tree().ids()
    assert data["cats"] == {
        "concept": "cats",
        "name": "Cats",
        "context": {"names": ["Animals", "Mammals"], "ids": ["animals", "mammals"]},
        "queries": ["eval question 0 about Cats?", "eval question 1 about Cats?"],
        "extra_queries": ["train question 0 about Cats?"],
    }
    assert data["animals"]["context"] == {"names": [], "ids": []}


def _written(folder, files: dict[str, str]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in files.items():
        paths[name] = folder / name
        paths[name].write_text(text)
    return paths


def _no_training():
    return pl.DataFrame(schema=SFT_ROWS), pl.DataFrame(schema=DPO_PAIRS)


def test_release_files_round_trip(tmp_path):
    tree, questions = hand_tree(), make_questions()
    paths = _written(tmp_path, select_files(tree, questions, *_no_training()))
    assert set(paths) == {"tree.yaml", "data.json", "taxonomy_plus.json", "sft.jsonl", "dpo.jsonl"}
    assert ConceptTree.load(paths["tree.yaml"]).tree_hash() == tree.tree_hash()
    back_tree, back_questions = read_data_json(paths["data.json"])
    assert back_tree.tree_hash() == tree.tree_hash()
    assert back_tree.ids() == tree.ids()
    original = set(questions.select("concept_id", "kind", "question", "sample_index").iter_rows())
    assert set(back_questions.select("concept_id", "kind", "question", "sample_index").iter_rows()) == original
    assert back_questions["question_id"].n_unique() == back_questions.height
    assert ConceptTree.load(paths["taxonomy_plus.json"]).tree_hash() == tree.tree_hash()
    # Writing what we read gives the same file again.
    again = _written(tmp_path / "again", select_files(back_tree, back_questions, *_no_training()))
    assert json.loads(again["data.json"].read_text()) == json.loads(paths["data.json"].read_text())


def test_reads_a_data_json_whose_ancestors_appear_only_in_contexts():
    raw = {"rivers": {"concept": "rivers", "name": "Rivers",
                      "context": {"names": ["Places", "Water bodies"], "ids": ["places", "water_bodies"]},
                      "queries": ["How long is the Nile?"], "extra_queries": []}}
    tree, questions = read_data_json(raw)
    assert tree.ancestors("rivers") == ["water_bodies", "places"]
    assert tree.get("water_bodies").name == "Water bodies"
    assert questions.select("concept_id", "kind", "question").rows() == [("rivers", "eval", "How long is the Nile?")]


def test_contradicting_contexts_are_an_error():
    raw = {"a": {"name": "A", "context": {"names": ["X"], "ids": ["x"]}},
           "b": {"name": "B", "context": {"names": ["Y", "A"], "ids": ["y", "a"]}}}
    with pytest.raises(ConceptTreeError, match="'a' has two different parents"):
        read_data_json(raw)


def _train_splits():
    return select_splits(hand_tree(), make_questions(), ["mammals"], None, None, seed=0, kind="train")


def _answers(skip=()):
    ids = ["mammals-t0", "cats-t0", "dogs-t0", "birds-t0", "animals-t0"]
    return pl.DataFrame({"question_id": [q for q in ids if q not in skip],
                         "answer": [f"answer to {q}" for q in ids if q not in skip]})


def test_sft_rows_abstain_below_and_answer_beside():
    result = sft_rows(_train_splits(), hand_tree(), _answers(skip={"birds-t0", "cats-t0"}), REPLY)
    assert dict(result.records.schema) == SFT_ROWS
    got = {(r["question_id"], r["relation"], r["response"], r["behaviour"])
           for r in result.records.iter_rows(named=True)}
    assert got == {
        ("mammals-t0", "self", REPLY, "abstain"),
        ("cats-t0", "descendant", REPLY, "abstain"),  # no answer needed to abstain
        ("dogs-t0", "descendant", REPLY, "abstain"),
        ("animals-t0", "ancestor", "answer to animals-t0", "answer"),
    }
    assert result.notes["dropped_no_answer"] == 1  # birds-t0: a sibling question with no answer
    assert set(result.records["target_id"].to_list()) == {"mammals"}
    assert set(result.records["target_name"].to_list()) == {"Mammals"}
    assert result.records.filter(pl.col("question_id") == "cats-t0")["prompt"][0] == "train question 0 about Cats?"


def test_dpo_pairs_are_opposites():
    result = dpo_pairs(_train_splits(), hand_tree(), _answers(skip={"dogs-t0"}), REPLY)
    assert dict(result.records.schema) == DPO_PAIRS
    got = {r["question_id"]: (r["chosen"], r["rejected"], r["chosen_behaviour"])
           for r in result.records.iter_rows(named=True)}
    assert got == {
        "mammals-t0": (REPLY, "answer to mammals-t0", "abstain"),
        "cats-t0": (REPLY, "answer to cats-t0", "abstain"),
        "birds-t0": ("answer to birds-t0", REPLY, "answer"),
        "animals-t0": ("answer to animals-t0", REPLY, "answer"),
    }
    assert result.notes["dropped_no_answer"] == 1


def test_training_data_ignores_eval_rows_and_refuses_bad_answers():
    both = pl.concat([_train_splits(), select_splits(hand_tree(), make_questions(), ["mammals"], None, None, 0)])
    result = sft_rows(both, hand_tree(), _answers(), REPLY)
    assert result.notes["eval_rows_ignored"] == 9
    assert result.records.height == 5
    doubled = pl.concat([_answers(), _answers().head(1)])
    with pytest.raises(ValueError, match="repeat question_id"):
        dpo_pairs(_train_splits(), hand_tree(), doubled, REPLY)
    with pytest.raises(ValueError, match="blank"):
        sft_rows(_train_splits(), hand_tree(), _answers(), " ")


def test_training_files_as_jsonl(tmp_path):
    sft = sft_rows(_train_splits(), hand_tree(), _answers(), REPLY).records
    dpo = dpo_pairs(_train_splits(), hand_tree(), _answers(), REPLY).records
    paths = _written(tmp_path, select_files(hand_tree(), make_questions(), sft, dpo))
    assert pl.read_ndjson(paths["sft.jsonl"]).select(sft.columns).equals(sft)
    lines = [json.loads(line) for line in paths["dpo.jsonl"].read_text().splitlines()]
    assert len(lines) == dpo.height == 5
    assert set(lines[0]) == set(DPO_PAIRS)
