"""The hub against the loopback server: cache, samples, dialects, system prompts, accounting, concurrency."""

from __future__ import annotations

import json
import threading
from typing import Literal

from pydantic import BaseModel

from orforge.llm.dialects import schema_instruction
from orforge.llm.hub import LLMHub
from orforge.llm.types import LLMRequest


class Verdict(BaseModel):
    label: Literal["benign", "toxic"]
    reason: str
    scores: list[int]


def verdict_requests(n: int, **kw) -> list[LLMRequest]:
    return [LLMRequest.chat(f"Is prompt number {i} harmful?", response_model=Verdict, **kw) for i in range(n)]


# -- the cache ----------------------------------------------------------------------------------------------------
def test_rerun_is_served_from_the_cache_without_reaching_any_server(fake_server, make_spec, cache_path):
    fake_server.responder = lambda body: {"label": "toxic", "reason": body["messages"][-1]["content"],
                                          "scores": [len(body["messages"][-1]["content"])]}
    spec = make_spec()
    requests = verdict_requests(5)
    with LLMHub(cache_path) as hub:
        first = hub.model(spec, "moderator").generate(requests)
    assert [r.ok for r in first] == [True] * 5
    assert not any(r.cached for r in first)
    assert len(fake_server.chat_requests) == 5
    assert first[3].parsed == Verdict(label="toxic", reason="Is prompt number 3 harmful?", scores=[27])

    # A new hub on the same file, and the server gone: every answer comes from the cache, nothing is sent.
    fake_server.stop()
    with LLMHub(cache_path) as hub:
        second = hub.model(spec, "moderator").generate(requests)
        rows = hub.usage_rows()
    assert [r.ok for r in second] == [True] * 5
    assert all(r.cached and r.attempts == 0 for r in second)
    assert [r.text for r in second] == [r.text for r in first]
    assert [r.parsed for r in second] == [r.parsed for r in first]
    assert rows == [{"role": "moderator", "model": "fake-model", "requests": 0, "cached": 5, "failures": 0,
                     "prompt_tokens": 0, "completion_tokens": 0}]


def test_cache_key_ignores_the_endpoint_address_but_not_the_model(fake_server, make_spec, cache_path):
    requests = verdict_requests(2)
    with LLMHub(cache_path) as hub:
        hub.model(make_spec(), "moderator").generate(requests)
    assert len(fake_server.chat_requests) == 2
    with LLMHub(cache_path) as hub:
        # Same model behind another URL (the port changes between runs): still cached.
        moved = hub.model(make_spec(base_url=fake_server.url.replace("127.0.0.1", "localhost") + "/v1"), "moderator")
        assert all(r.cached for r in moved.generate(requests))
        assert len(fake_server.chat_requests) == 2
        # Another model or another temperature: asked again.
        assert not any(r.cached for r in hub.model(make_spec(model="other-model"), "moderator").generate(requests))
        assert not any(r.cached for r in hub.model(make_spec(temperature=0.5), "moderator").generate(requests))
    assert len(fake_server.chat_requests) == 6
    assert {r.body["model"] for r in fake_server.chat_requests} == {"fake-model", "other-model"}


def test_identical_requests_in_one_batch_are_sent_once(fake_server, make_spec, llm_hub):
    same = LLMRequest.chat("the very same prompt")
    results = llm_hub.model(make_spec(), "seeds").generate([same, same, same])
    assert [r.ok for r in results] == [True, True, True]
    assert len({r.text for r in results}) == 1
    assert len(fake_server.chat_requests) == 1


def test_sample_indices_are_distinct_requests_and_distinct_cache_entries(fake_server, make_spec, llm_hub,
                                                                         cache_path):
    fake_server.responder = lambda body: f"answer drawn with seed {body['seed']}"
    llm = llm_hub.model(make_spec(temperature=1.0), "rewrites")
    requests = [LLMRequest.chat("rewrite this prompt", sample_index=i) for i in range(3)]
    results = llm.generate(requests)
    assert [r.text for r in results] == [f"answer drawn with seed {i}" for i in range(3)]
    sent = fake_server.chat_requests
    assert sorted(r.body["seed"] for r in sent) == [0, 1, 2]
    assert llm_hub.cache.stats()["entries"] == 3

    again = llm.generate(requests)
    assert [r.text for r in again] == [r.text for r in results]
    assert all(r.cached for r in again)
    assert len(fake_server.chat_requests) == 3
    # A new sample index is a new request.
    assert not llm.generate([LLMRequest.chat("rewrite this prompt", sample_index=3)])[0].cached
    assert fake_server.chat_requests[-1].body["seed"] == 3


# -- request shape ------------------------------------------------------------------------------------------------
def test_json_schema_dialect_sends_the_schema_in_response_format(fake_server, make_spec, llm_hub):
    result = llm_hub.model(make_spec(structured_output="json_schema"), "m").generate(verdict_requests(1))[0]
    assert result.ok and result.parsed == Verdict(label="benign", reason="x", scores=[0])
    body = fake_server.chat_requests[0].body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Verdict", "schema": Verdict.model_json_schema()},
    }
    assert body["messages"] == [{"role": "user", "content": "Is prompt number 0 harmful?"}]


def test_json_object_dialect_sends_the_schema_inside_json_object(fake_server, make_spec, llm_hub):
    result = llm_hub.model(make_spec(structured_output="json_object"), "m").generate(verdict_requests(1))[0]
    assert result.ok and result.parsed.label == "benign"
    body = fake_server.chat_requests[0].body
    assert body["response_format"] == {"type": "json_object", "schema": Verdict.model_json_schema()}


def test_none_dialect_puts_the_schema_in_the_prompt_and_parses_leniently(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: 'Sure! {"label": "toxic", "reason": "r", "scores": [1, 2]} Hope it helps.'
    result = llm_hub.model(make_spec(structured_output="none"), "m").generate(verdict_requests(1))[0]
    assert result.ok, result.error
    assert result.parsed == Verdict(label="toxic", reason="r", scores=[1, 2])
    body = fake_server.chat_requests[0].body
    assert "response_format" not in body
    last = body["messages"][-1]
    assert last["role"] == "user"
    assert last["content"] == "Is prompt number 0 harmful?" + schema_instruction(Verdict.model_json_schema())
    assert json.dumps(Verdict.model_json_schema()) in last["content"]


def test_strict_dialects_reject_prose_around_json_but_accept_a_fence(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: (
        '```json\n{"label": "toxic", "reason": "r", "scores": []}\n```' if "fenced" in body["messages"][-1]["content"]
        else 'Sure! {"label": "toxic", "reason": "r", "scores": []}'
    )
    fenced, prose = llm_hub.model(make_spec(), "m").generate([
        LLMRequest.chat("fenced please", response_model=Verdict),
        LLMRequest.chat("prose please", response_model=Verdict),
    ])
    assert fenced.ok and fenced.parsed.scores == []
    assert not prose.ok and prose.error.startswith("invalid JSON")


def test_plain_requests_send_no_response_format_in_any_dialect(fake_server, make_spec, llm_hub):
    for dialect in ("json_schema", "json_object", "none"):
        result = llm_hub.model(make_spec(structured_output=dialect), "m").generate([LLMRequest.chat("hello")])[0]
        assert result.ok and result.text == "This is a plain answer from the fake model."
    assert len(fake_server.chat_requests) == 1  # the dialect does not enter the key of a plain request
    assert "response_format" not in fake_server.chat_requests[0].body
    assert fake_server.chat_requests[0].body["messages"] == [{"role": "user", "content": "hello"}]


def test_sampling_parameters_and_extra_body_reach_the_server(fake_server, make_spec, llm_hub):
    spec = make_spec(temperature=0.3, max_tokens=77, extra={"top_k": 5, "repetition_penalty": 1.1})
    llm_hub.model(spec, "m").generate([LLMRequest.chat("hello", sample_index=4)])
    body = fake_server.chat_requests[0].body
    assert (body["model"], body["temperature"], body["max_tokens"], body["seed"]) == ("fake-model", 0.3, 77, 4)
    assert (body["top_k"], body["repetition_penalty"]) == (5, 1.1)


def test_spec_system_prompt_is_prepended(fake_server, make_spec, llm_hub):
    llm = llm_hub.model(make_spec(system_prompt="You are a careful annotator."), "moderator")
    llm.generate([LLMRequest.chat("first"), LLMRequest.chat("second", system="Answer in French.")])
    by_user = {r.messages[-1]["content"]: r.messages for r in fake_server.chat_requests}
    assert by_user["first"] == [
        {"role": "system", "content": "You are a careful annotator."},
        {"role": "user", "content": "first"},
    ]
    assert by_user["second"] == [
        {"role": "system", "content": "You are a careful annotator.\n\nAnswer in French."},
        {"role": "user", "content": "second"},
    ]


# -- accounting ---------------------------------------------------------------------------------------------------
def test_usage_counts_requests_cache_hits_failures_and_tokens(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: "alpha beta gamma"  # 3 completion tokens (the server counts words)
    spec = make_spec(name="writer")
    seeds = llm_hub.model(spec, "seeds")
    requests = [LLMRequest.chat(f"prompt {i}") for i in range(3)]  # 2 prompt tokens each
    progress: list[int] = []
    results = seeds.generate(requests, on_progress=lambda n, usage: progress.append(n))
    assert sum(progress) == 3
    assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in results] == [(2, 3, "stop")] * 3
    seeds.generate(requests)  # all cached

    fake_server.responder = lambda body: "not json"
    judge = llm_hub.model(spec, "judge")
    failed = judge.generate([LLMRequest.chat("judge this one", response_model=Verdict)])[0]
    assert not failed.ok and failed.attempts == 3

    assert llm_hub.usage_rows() == [
        {"role": "judge", "model": "writer", "requests": 3, "cached": 0, "failures": 1,
         "prompt_tokens": 3 * 3, "completion_tokens": 3 * 2},
        {"role": "seeds", "model": "writer", "requests": 3, "cached": 3, "failures": 0,
         "prompt_tokens": 6, "completion_tokens": 9},
    ]


# -- concurrency --------------------------------------------------------------------------------------------------
def test_server_never_sees_more_than_max_concurrency(fake_server, make_spec, llm_hub):
    fake_server.latency_s = 0.05
    results = llm_hub.model(make_spec(max_concurrency=4), "m").generate(
        [LLMRequest.chat(f"prompt {i}") for i in range(40)]
    )
    assert all(r.ok for r in results)
    assert len(fake_server.chat_requests) == 40
    assert fake_server.max_in_flight == 4


def test_roles_on_one_endpoint_share_its_cap(fake_server, make_spec, llm_hub):
    fake_server.latency_s = 0.05
    spec = make_spec(max_concurrency=3)
    moderator, judge = llm_hub.model(spec, "moderator"), llm_hub.model(spec.model_copy(update={"name": "j"}), "judge")
    out: dict[str, list] = {}

    def run(name, llm):
        out[name] = llm.generate([LLMRequest.chat(f"{name} prompt {i}") for i in range(15)])

    threads = [threading.Thread(target=run, args=a) for a in (("moderator", moderator), ("judge", judge))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.ok for rs in out.values() for r in rs) and len(out) == 2
    assert len(fake_server.chat_requests) == 30
    assert fake_server.max_in_flight == 3


# -- lifecycle ----------------------------------------------------------------------------------------------------
def test_close_is_clean_and_idempotent(fake_server, make_spec, cache_path):
    hub = LLMHub(cache_path)
    assert hub.model(make_spec(), "m").generate([LLMRequest.chat("hello")])[0].ok
    hub.close()
    assert not hub._thread.is_alive()
    hub.close()  # a second close is a no-op


def test_close_without_any_model(cache_path):
    LLMHub(cache_path).close()
