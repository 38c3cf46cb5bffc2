"""Abstention techniques on a hand-made tree: the messages each technique builds, where few-shot examples come
from (train questions of the right relations, never the eval question), determinism per seed, and what a target
endpoint receives."""

from __future__ import annotations

import hashlib

import polars as pl
import pytest

from orforge.generators.techniques import (
    ANSWER_MARKER,
    TEMPLATES,
    fewshot_examples,
    technique_requests,
    technique_template_sha256,
    techniques,
)
from tests.generators.tree_fixture import make_tree

TREE = make_tree()
# Two train questions and one eval question per concept; the text says whose they are.
QUESTIONS = pl.DataFrame(
    [{"question_id": f"{c}-{kind}{i}", "concept_id": c, "question": f"A {kind} question {i} about {c}?",
      "kind": kind} for c in TREE.ids() for kind, n in (("train", 2), ("eval", 1)) for i in range(n)])


def split_rows(target: str, concepts: list[str]) -> pl.DataFrame:
    """A target's split rows: the eval question of each listed concept."""
    return (QUESTIONS.filter((pl.col("kind") == "eval") & pl.col("concept_id").is_in(concepts))
            .with_columns(pl.lit(target).alias("target_id")))


WATER = split_rows("water-bodies", ["water-bodies", "rivers", "cities", "places"])


def test_the_registry_and_template_hashes():
    assert techniques() == ("none", "instructed", "instructed_fewshot")
    assert technique_template_sha256("none") is None
    assert technique_template_sha256("instructed") == hashlib.sha256(
        (TEMPLATES / "technique_instructed.md").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="unknown technique"):
        technique_requests(WATER, "shout", TREE, QUESTIONS, "ABSTAIN", 0)


def test_none_sends_the_question_alone():
    requests = technique_requests(WATER, "none", TREE, QUESTIONS, "ABSTAIN", seed=3)
    assert [r.messages for r in requests] == [({"role": "user", "content": q},) for q in WATER["question"]]
    assert [r.item_id for r in requests] == [f"water-bodies/{q}" for q in WATER["question_id"]]
    assert {r.sample_index for r in requests} == {3}


def test_instructed_names_the_concept_its_place_and_the_token():
    requests = technique_requests(WATER, "instructed", TREE, QUESTIONS, "NOPE", seed=0)
    system, user = requests[0].messages
    assert system["role"] == "system" and user == {"role": "user", "content": WATER["question"][0]}
    assert "about Water bodies (within Places)" in system["content"]
    assert "every kind of Water bodies" in system["content"]
    assert "reply with exactly NOPE and nothing else" in system["content"]
    assert "ABSTAIN" not in system["content"]
    root = technique_requests(split_rows("places", ["places"]), "instructed", TREE, QUESTIONS, "ABSTAIN", 0)
    assert "about Places (a top-level topic)" in root[0].messages[0]["content"]


def exchanges(request) -> list[tuple[str, str]]:
    """(example question, reply) pairs between the system message and the real question."""
    turns = request.messages[1:-1]
    assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    return [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]


def test_fewshot_examples_come_from_train_questions_of_each_relation():
    answers = {"cities-train0": "Tokyo, Delhi and Shanghai are the largest.",
               "cities-train1": "Tokyo, Delhi and Shanghai are the largest."}
    requests = technique_requests(WATER, "instructed_fewshot", TREE, QUESTIONS, "ABSTAIN", seed=7, answers=answers)
    first = exchanges(requests[0])
    # Same exchanges for every question of the target.
    assert all(exchanges(r) == first for r in requests)
    owner = {q: c for q, c in zip(QUESTIONS["question"], QUESTIONS["concept_id"])}
    kind = {q: k for q, k in zip(QUESTIONS["question"], QUESTIONS["kind"])}
    by_concept = {owner[q]: reply for q, reply in first}
    assert all(kind[q] == "train" for q, _ in first)  # never an eval question
    assert not {q for q, _ in first} & set(WATER["question"])
    # target and one descendant (rivers or lakes) abstain; a sibling (cities), the ancestor (places) and one
    # concept from another root's subtree (products...) are answered.
    assert by_concept.pop("water-bodies") == "ABSTAIN"
    descendant = [c for c in by_concept if c in ("rivers", "lakes")]
    assert len(descendant) == 1 and by_concept.pop(descendant[0]) == "ABSTAIN"
    assert by_concept.pop("cities") == "Tokyo, Delhi and Shanghai are the largest."  # from answers
    assert by_concept.pop("places") == ANSWER_MARKER
    (unrelated, reply), = by_concept.items()
    assert unrelated in ("products", "vehicles", "bicycles", "cars") and reply == ANSWER_MARKER
    # The instruction is there and the real question comes last.
    assert "about Water bodies" in requests[0].messages[0]["content"]
    assert requests[0].messages[-1] == {"role": "user", "content": WATER["question"][0]}


def test_fewshot_is_deterministic_for_a_seed_and_varies_across_seeds():
    def picks(seed):
        return [e.question_id for e in fewshot_examples(TREE, "water-bodies", pool(), "ABSTAIN", seed)]

    assert picks(1) == picks(1)
    assert len({tuple(picks(s)) for s in range(8)}) > 1
    # Row order of the train frame does not matter.
    shuffled = technique_requests(WATER, "instructed_fewshot", TREE, QUESTIONS.reverse(), "ABSTAIN", seed=1)
    assert [r.messages for r in shuffled] == [r.messages for r in technique_requests(
        WATER, "instructed_fewshot", TREE, QUESTIONS, "ABSTAIN", seed=1)]


def pool():
    from orforge.generators.techniques import _train_pool

    return _train_pool(QUESTIONS)


def test_missing_relations_are_left_out():
    leaf = {e.relation for e in fewshot_examples(TREE, "rivers", pool(), "ABSTAIN", 0)}
    assert leaf == {"target", "sibling", "ancestor", "unrelated"}  # a leaf has no descendant
    root = {e.relation: e.concept_id for e in fewshot_examples(TREE, "places", pool(), "ABSTAIN", 0)}
    assert "ancestor" not in root and root["sibling"] == "products"
    assert root["unrelated"] in ("vehicles", "bicycles", "cars")


def test_an_example_equal_to_the_real_question_is_dropped_for_that_request():
    examples = fewshot_examples(TREE, "water-bodies", pool(), "ABSTAIN", 0)
    target_example = next(e for e in examples if e.relation == "target")
    rows = pl.DataFrame({"target_id": ["water-bodies"], "question_id": [target_example.question_id],
                         "question": [target_example.question]})
    request, = technique_requests(rows, "instructed_fewshot", TREE, QUESTIONS, "ABSTAIN", seed=0)
    assert len(exchanges(request)) == len(examples) - 1
    assert target_example.question not in [q for q, _ in exchanges(request)]


def test_the_endpoint_receives_the_turns_as_built(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: "ABSTAIN"
    requests = technique_requests(WATER[:1], "instructed_fewshot", TREE, QUESTIONS, "ABSTAIN", seed=2)
    result, = llm_hub.model(make_spec(), "target").generate(requests)
    assert result.ok and result.text == "ABSTAIN" and result.request.item_id == requests[0].item_id
    sent = fake_server.chat_requests[0]
    assert sent.messages == [dict(m) for m in requests[0].messages]
    assert sent.body["seed"] == 2 and "response_format" not in sent.body
