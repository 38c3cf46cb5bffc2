"""Concept questions against the loopback server: ancestor context in the prompt, eval/train split, exact dedup,
the call budget, lineage columns, content-hash ids and failures."""

from __future__ import annotations

import hashlib

import polars as pl
import pytest

from orforge.core.records import QUESTIONS
from orforge.core.select_config import QuestionsConfig
from orforge.core.templates import load_template
from orforge.generators.questions import TEMPLATE, QuestionPlan, generate_questions, question_id
from tests.fakeserver import Fault, request_schema
from tests.generators.tree_fixture import concepts_frame, context_of, make_tree

TREE = make_tree()
TEMPLATE_SHA256 = hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()


def concepts(*ids: str) -> pl.DataFrame:
    return concepts_frame(TREE).filter(pl.col("concept_id").is_in(list(ids)))


def topic_of(body: dict) -> str:
    user = body["messages"][-1]["content"]
    return user.split("Topic: ", 1)[1].split("\n", 1)[0]


RIVER_REPLIES = {
    0: ["How long is the Nile river?", "Which river flows through the most countries?"],
    # the first repeats call 0 up to case and punctuation; it must not count
    1: ["how long is the nile river", "Why do rivers meander across flat land?"],
    2: ["What is the deepest river in the world?", "Where does the Danube start?"],
}
LAKE_REPLIES = {
    0: ["What is the largest freshwater lake by volume?", "Why are some lakes salty?"],
    1: ["How are glacial lakes formed?", "Which lake is the deepest on Earth?"],
}


def scripted(body: dict) -> dict:
    replies = {"Rivers": RIVER_REPLIES, "Lakes": LAKE_REPLIES}[topic_of(body)]
    return {"questions": replies[body["seed"]]}


def test_questions_carry_context_split_into_eval_then_train_and_drop_exact_duplicates(fake_server, make_spec,
                                                                                        llm_hub):
    fake_server.responder = scripted
    plan = QuestionPlan(eval_per_concept=2, train_per_concept=2, per_call=2)
    llm = llm_hub.model(make_spec(name="q-gen"), "questions")
    result = generate_questions(concepts("rivers", "lakes"), context_of(TREE), plan, llm)

    # Wave 1: ceil(4/2) = 2 calls per concept, together; rivers lost one to a duplicate, so wave 2 asks once more.
    calls = sorted((topic_of(r.body), r.body["seed"]) for r in fake_server.chat_requests)
    assert calls == [("Lakes", 0), ("Lakes", 1), ("Rivers", 0), ("Rivers", 1), ("Rivers", 2)]
    q = result.records
    assert q.schema == pl.Schema(QUESTIONS)
    rivers = q.filter(pl.col("concept_id") == "rivers")
    assert rivers["question"].to_list() == ["How long is the Nile river?", "Which river flows through the most "
                                            "countries?", "Why do rivers meander across flat land?",
                                            "What is the deepest river in the world?"]
    assert rivers["kind"].to_list() == ["eval", "eval", "train", "train"]
    assert rivers["sample_index"].to_list() == [0, 0, 1, 2]
    assert q.filter(pl.col("concept_id") == "lakes")["kind"].to_list() == ["eval", "eval", "train", "train"]
    assert rivers["ancestor_ids"].to_list()[0] == ["water-bodies", "places"]
    assert set(q["model"]) == {"q-gen"} and set(q["template_sha256"]) == {TEMPLATE_SHA256}
    assert q["leak_flag"].null_count() == q.height and q["leak_with"].null_count() == q.height
    assert q["question_id"].n_unique() == 8
    assert result.failures.is_empty()
    assert result.notes == {"question_calls": 5}

    # What the server got: the template's system text, the ancestor path, instances, siblings to stay away from.
    template = load_template(TEMPLATE)
    river_prompt = next(r for r in fake_server.chat_requests if topic_of(r.body) == "Rivers")
    assert river_prompt.messages[0] == {"role": "system", "content": template.system}
    user = river_prompt.last_user
    assert "Places > Water bodies > Rivers" in user
    assert "within Places, Water bodies" in user
    assert "Some well-known examples of Rivers: Nile, Danube." in user
    assert "must not be about: Lakes." in user
    assert "Write 2 different questions about Rivers" in user
    assert request_schema(river_prompt.body)["properties"]["questions"]["maxItems"] == 2
    lake_prompt = next(r for r in fake_server.chat_requests if topic_of(r.body) == "Lakes").last_user
    assert "examples of Lakes" not in lake_prompt and "must not be about: Rivers." in lake_prompt


def test_a_root_concept_names_its_sibling_roots_and_has_no_ancestors(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: {"questions": ["What are the biggest tourist places in Europe?"]}
    # The SELECT config object works as the spec; it samples (temperature 1) unless the model spec says otherwise.
    spec = QuestionsConfig(model=make_spec(), eval_per_concept=1, train_per_concept=0, per_call=1)
    result = generate_questions(concepts("places", "products"), context_of(TREE), spec,
                                llm_hub.model(spec.model, "questions"))
    assert [r.body["temperature"] for r in fake_server.chat_requests] == [1.0, 1.0]
    user = next(r.last_user for r in fake_server.chat_requests if topic_of(r.body) == "Places")
    assert "(broadest first): Places\n" in user and "within general knowledge" in user
    assert "must not be about: Products." in user
    assert result.records["ancestor_ids"].to_list() == [[], []]
    # The same text under two concepts is two questions.
    assert result.records["question_id"].n_unique() == 2


@pytest.mark.parametrize("max_calls, expected_calls", [(2, 2), (None, 9)])
def test_repeated_duplicates_stop_at_the_call_budget(max_calls, expected_calls, fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: {"questions": ["How long is the Nile river?"]}
    plan = QuestionPlan(eval_per_concept=2, train_per_concept=1, per_call=1, max_calls_per_concept=max_calls)
    result = generate_questions(concepts("rivers"), context_of(TREE), plan, llm_hub.model(make_spec(), "questions"))
    # The default budget is 3 x the calls needed if every call delivered in full: 3 x ceil((2 + 1) / 1) = 9.
    assert sorted(r.body["seed"] for r in fake_server.chat_requests) == list(range(expected_calls))
    assert result.records["question"].to_list() == ["How long is the Nile river?"]
    assert result.notes["question_budget_exhausted"] == {"rivers": {"wanted": 3, "got": 1,
                                                                    "calls": expected_calls}}


def test_ids_are_content_hashes_and_a_failed_call_is_a_failure_row(fake_server, make_spec, llm_hub):
    def respond(body):
        if body["seed"] == 0:
            return Fault.http(400, "model not found")
        return {"questions": ["  What is the longest river in Asia? ", "Which rivers cross the equator twice?"]}

    fake_server.responder = respond
    plan = QuestionPlan(eval_per_concept=1, train_per_concept=1, per_call=2, max_calls_per_concept=3)
    result = generate_questions(concepts("rivers"), context_of(TREE), plan,
                                llm_hub.model(make_spec(name="q-gen"), "questions"))
    assert result.records["question"].to_list() == ["What is the longest river in Asia?",
                                                    "Which rivers cross the equator twice?"]
    assert result.records["question_id"][0] == question_id("rivers", "what is the longest river in asia")
    assert result.records["question_id"][0] == "3de2939d53e1cd91"  # pinned: ids must not drift across releases
    row = result.failures.row(0, named=True)
    assert (row["stage"], row["model"], row["item_id"]) == ("questions", "q-gen", "rivers#0")
    assert "HTTP 400" in row["reason"]


def test_missing_columns_are_an_error():
    with pytest.raises(ValueError, match="ancestor_ids"):
        generate_questions(concepts("rivers").drop("ancestor_ids"), {}, QuestionPlan(), llm=None)
