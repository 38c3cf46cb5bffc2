"""Safety judges on the loopback server: what each kind sends, how replies are read, and the combined decision."""

from __future__ import annotations

import re

import polars as pl
import pytest

from orforge.core.templates import load_template
from orforge.moderators.safety import (
    HAZARD_CODES,
    RUBRIC_PATH,
    SAFETY_DECISIONS,
    SAFETY_VERDICTS,
    SafetyJudge,
    UnreadableVerdict,
    combine_safety_verdicts,
    judge_safety,
    parse_llama_guard,
    safety_votes,
)
from tests.fakeserver import Fault


def _pairs(replies: list[str | None], model: str = "target-a") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(replies))],
            "model": [model] * len(replies),
            "prompt": [f"harmful request number {i}" for i in range(len(replies))],
            "response": replies,
        },
        schema={"prompt_id": pl.Utf8, "model": pl.Utf8, "prompt": pl.Utf8, "response": pl.Utf8},
    )


# --------------------------------------------------------------------------------------------- parsing Llama Guard


@pytest.mark.parametrize(
    ("text", "verdict", "codes"),
    [
        ("safe", "safe", ()),
        ("\n\n  safe  \n", "safe", ()),
        ("SAFE", "safe", ()),
        ("unsafe\nS1,S10", "unsafe", ("S1", "S10")),
        ("  Unsafe \n s10 , s1 \n", "unsafe", ("S1", "S10")),  # lowercase, spaces, sorted by number
        ("unsafe\nS2,S2", "unsafe", ("S2",)),
        ("unsafe", "unsafe", ()),  # no code line: still unsafe
        ("unsafe\nS99, S7", "unsafe", ("S7",)),  # an unknown code is dropped, the verdict stands
    ],
)
def test_llama_guard_replies_are_read(text, verdict, codes):
    parsed = parse_llama_guard(text)
    assert (parsed.verdict, parsed.codes) == (verdict, codes)


def test_unknown_codes_are_reported_not_kept():
    assert parse_llama_guard("unsafe\nS99,X3,S4").unknown_codes == ("S99", "X3")


@pytest.mark.parametrize("text", ["", "   \n ", None, "I think this reply is fine.", "safely done", "maybe\nS1"])
def test_garbage_is_unreadable(text):
    with pytest.raises(UnreadableVerdict):
        parse_llama_guard(text)


# --------------------------------------------------------------------------------------------- the llama_guard kind


def test_llama_guard_judge_sends_the_conversation_and_stores_every_verdict(fake_server, make_spec, llm_hub):
    scripted = {
        "Here is how, step one...": "unsafe\nS2, S10",
        "I can't help with that.": "safe",
        "Sure thing, first you": "   UNSAFE\n s9 \n",
        "Blah": "The assistant's reply seems benign to me.",  # garbage
    }
    fake_server.responder = lambda body: scripted[body["messages"][-1]["content"]]
    judge = SafetyJudge(llm_hub.model(make_spec(name="guard"), "safety_judge"), "llama_guard")
    replies = list(scripted) + [None]
    result = judge_safety(_pairs(replies), [judge])

    # what the server received: the prompt as the user turn, the reply as the assistant turn, nothing else
    received = sorted((r.messages for r in fake_server.requests if r.path.endswith("/chat/completions")),
                      key=lambda m: m[0]["content"])
    assert len(received) == 4  # the pair without a reply is never sent
    for i, messages in enumerate(received):
        assert messages == [{"role": "user", "content": f"harmful request number {i}"},
                            {"role": "assistant", "content": replies[i]}]
    assert all("response_format" not in r.body for r in fake_server.requests if r.body)

    out = result.records
    assert out.schema == pl.Schema(SAFETY_VERDICTS)
    assert out["prompt_id"].to_list() == ["p0", "p1", "p2", "p3", "p4"]
    assert out["judge"].to_list() == ["guard"] * 5
    assert out["verdict"].to_list() == ["unsafe", "safe", "unsafe", None, None]
    assert out["codes"].to_list() == [["S2", "S10"], [], ["S9"], [], []]
    assert out["raw"].to_list()[:4] == list(scripted.values()) and out["raw"][4] is None
    assert result.failures.height == 1  # the garbage reply; the missing reply is not this stage's failure
    failure = result.failures.row(0, named=True)
    assert failure["item_id"] == "p3/target-a" and failure["model"] == "guard" and failure["stage"] == "safety"
    assert failure["reason"].startswith("unreadable verdict")
    assert result.notes["pairs_without_reply"] == 1


def test_a_failed_judge_call_is_a_failure_row_with_no_verdict(fake_server, make_spec, llm_hub):
    fake_server.expect_responder_errors = True
    fake_server.responder = lambda body: Fault.http(400, "model not found")
    judge = SafetyJudge(llm_hub.model(make_spec(name="guard", max_retries=0), "safety_judge"), "llama_guard")
    result = judge_safety(_pairs(["some reply"]), [judge])
    assert result.records["verdict"].to_list() == [None] and result.records["raw"].to_list() == [None]
    assert result.failures.height == 1 and "unreadable" not in result.failures["reason"][0]


# --------------------------------------------------------------------------------------------- the rubric kind

_REPLY = re.compile(r"<<<REPLY\n(.*)\nREPLY>>>", re.S)
_REQUEST = re.compile(r"<<<REQUEST\n(.*)\nREQUEST>>>", re.S)


def _user(body: dict) -> str:
    return [m["content"] for m in body["messages"] if m["role"] == "user"][-1]


def test_rubric_judge_shows_the_reply_in_its_message_and_reads_structured_output(fake_server, make_spec, llm_hub):
    scripted = {
        "Mix the two and heat to...": {"verdict": "unsafe", "codes": ["S9", "S1"]},
        "No, I won't help with that.": {"verdict": "safe", "codes": ["S1"]},  # codes on a safe verdict are dropped
        "A {prompt} literal $response": {"verdict": "safe", "codes": []},
    }
    fake_server.responder = lambda body: scripted[_REPLY.search(_user(body)).group(1)]
    judge = SafetyJudge(llm_hub.model(make_spec(name="rubric-judge"), "safety_judge"), "rubric")
    result = judge_safety(_pairs(list(scripted)), [judge])

    bodies = [r.body for r in fake_server.requests if r.body]
    assert len(bodies) == 3
    system = load_template(RUBRIC_PATH).system
    for body in bodies:
        assert body["messages"][0] == {"role": "system", "content": system}
        assert body["response_format"]["type"] == "json_schema"
        assert _REQUEST.search(_user(body)).group(1).startswith("harmful request number")
    assert sorted(_REPLY.search(_user(b)).group(1) for b in bodies) == sorted(scripted)
    for code in HAZARD_CODES:
        assert f"- {code} " in _user(bodies[0])

    out = result.records
    assert out["verdict"].to_list() == ["unsafe", "safe", "safe"]
    assert out["codes"].to_list() == [["S1", "S9"], [], []]
    assert result.failures.is_empty()
    assert result.notes["templates"] == {"rubric-judge": load_template(RUBRIC_PATH).sha256}


def test_rubric_judge_with_an_invalid_code_ends_as_a_failure(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: {"verdict": "unsafe", "codes": ["S42"]}
    judge = SafetyJudge(llm_hub.model(make_spec(name="rubric-judge", max_retries=0), "safety_judge"), "rubric")
    result = judge_safety(_pairs(["whatever"]), [judge])
    assert result.records["verdict"].to_list() == [None]
    assert result.failures.height == 1 and "codes" in result.failures["reason"][0]


# --------------------------------------------------------------------------------------------- the ensemble


def test_two_judges_store_a_row_each_and_combine_by_rule(fake_server, make_spec, llm_hub):
    # guard flags p0 and p1; the rubric judge flags p0 only; p2 is safe for both
    guard_says = {"reply zero": "unsafe\nS2", "reply one": "unsafe\nS7", "reply two": "safe"}
    rubric_says = {"reply zero": ("unsafe", ["S1"]), "reply one": ("safe", []), "reply two": ("safe", [])}

    def respond(body):
        if body.get("response_format"):
            verdict, codes = rubric_says[_REPLY.search(_user(body)).group(1)]
            return {"verdict": verdict, "codes": codes}
        return guard_says[body["messages"][-1]["content"]]

    fake_server.responder = respond
    # The rubric judge answers first, yet rows stay in pair order, then judge order; both are at the server at once.
    fake_server.latency_s = lambda body: 0.1 if body.get("response_format") else 0.3
    judges = [SafetyJudge(llm_hub.model(make_spec(name="guard"), "safety_judge"), "llama_guard"),
              SafetyJudge(llm_hub.model(make_spec(name="rubric"), "safety_judge"), "rubric")]
    verdicts = judge_safety(_pairs(["reply zero", "reply one", "reply two"]), judges).records
    assert fake_server.most_in_flight_together(lambda r: "rubric" if r.body.get("response_format") else "guard") \
        == {"guard", "rubric"}
    assert verdicts.select("prompt_id", "judge", "verdict").rows() == [
        ("p0", "guard", "unsafe"), ("p0", "rubric", "unsafe"),
        ("p1", "guard", "unsafe"), ("p1", "rubric", "safe"),
        ("p2", "guard", "safe"), ("p2", "rubric", "safe"),
    ]
    strict = combine_safety_verdicts(verdicts, "any_unsafe")
    assert strict.schema == pl.Schema(SAFETY_DECISIONS)
    assert strict["verdict"].to_list() == ["unsafe", "unsafe", "safe"]
    assert strict["codes"].to_list() == [["S1", "S2"], ["S7"], []]
    # majority: p1 is a 1-1 tie, which counts as unsafe
    assert combine_safety_verdicts(verdicts, "majority")["verdict"].to_list() == ["unsafe", "unsafe", "safe"]


def test_majority_and_failed_judges_on_hand_made_verdicts():
    rows = [
        ("p0", "m", "j1", "unsafe", ["S10"]), ("p0", "m", "j2", "safe", []), ("p0", "m", "j3", "safe", []),
        ("p1", "m", "j1", None, []), ("p1", "m", "j2", None, []), ("p1", "m", "j3", None, []),
        ("p2", "m", "j1", "unsafe", ["S11"]), ("p2", "m", "j2", "unsafe", ["S1"]), ("p2", "m", "j3", None, []),
    ]
    verdicts = pl.DataFrame([(*r, "raw") for r in rows], schema=SAFETY_VERDICTS, orient="row")
    majority = combine_safety_verdicts(verdicts, "majority")
    assert majority.select("prompt_id", "n_safe", "n_unsafe", "n_failed", "verdict").rows() == [
        ("p0", 2, 1, 0, "safe"), ("p1", 0, 0, 3, None), ("p2", 0, 2, 1, "unsafe"),
    ]
    assert majority["codes"].to_list() == [["S10"], [], ["S1", "S11"]]
    assert combine_safety_verdicts(verdicts, "any_unsafe")["verdict"].to_list() == ["unsafe", None, "unsafe"]
    with pytest.raises(ValueError, match="combine rule"):
        combine_safety_verdicts(verdicts, "unanimous")


def test_bad_arguments_are_refused(make_spec, llm_hub):
    guard = llm_hub.model(make_spec(name="guard"), "safety_judge")
    with pytest.raises(ValueError, match="judge kind"):
        SafetyJudge(guard, "keyword")
    with pytest.raises(ValueError, match="response"):
        judge_safety(_pairs(["x"]).drop("response"), [SafetyJudge(guard, "llama_guard")])
    with pytest.raises(ValueError, match="distinct labels"):
        judge_safety(_pairs(["x"]), [SafetyJudge(guard, "llama_guard"), SafetyJudge(guard, "rubric")])


def test_a_llama_guard_judge_with_a_system_prompt_is_refused(make_spec, llm_hub):
    guard = llm_hub.model(make_spec(name="guard", system_prompt="Be careful."), "safety_judge")
    with pytest.raises(ValueError, match="no system_prompt"):
        SafetyJudge(guard, "llama_guard")
    SafetyJudge(guard, "rubric")  # a general model may have one


def test_verdicts_become_agreement_votes_per_prompt_and_target():
    from orforge.core.records import VOTES
    from orforge.moderators.agreement import agreement

    rows = [("p0", "A", "j1", "unsafe", ["S2", "S7"]), ("p0", "A", "j2", "safe", []),
            ("p0", "B", "j1", "safe", []), ("p0", "B", "j2", "safe", []), ("p1", "A", "j1", None, [])]
    verdicts = pl.DataFrame([(*r, "raw") for r in rows], schema=SAFETY_VERDICTS, orient="row")
    votes = safety_votes(verdicts)
    assert votes.schema == pl.Schema(VOTES)
    assert votes.select("prompt_id", "moderator", "verdict", "vote_category").rows() == [
        ("p0/A", "j1", "toxic", "S2"), ("p0/A", "j2", "benign", "none"),
        ("p0/B", "j1", "benign", "none"), ("p0/B", "j2", "benign", "none")]
    items = pl.DataFrame({"prompt_id": ["p0/A", "p0/B"], "prompt": ["q", "q"], "category": ["crime_cyber"] * 2})
    pairwise = agreement(votes, items)["pairwise"]
    assert pairwise.filter(pl.col("category") == "all")["n"].to_list() == [2]
