"""Transport retries, re-asks of bad replies, recorded failures, fail-fast 4xx and the circuit breaker."""

from __future__ import annotations

import socket

import pytest
from pydantic import BaseModel

from orforge.llm.hub import MAX_REASKS, REASK_TEMPERATURE, LLMHub
from orforge.llm.types import CircuitOpenError, LLMRequest
from tests.fakeserver import Fault

SLACK_S = 0.05  # timer and scheduling slack when checking that a Retry-After wait was honoured


class Label(BaseModel):
    label: str
    confidence: float


def ask(n: int = 1, **kw) -> list[LLMRequest]:
    return [LLMRequest.chat(f"classify item {i}", response_model=Label, item_id=f"item-{i}", **kw) for i in range(n)]


# -- transport faults: the openai client retries them ------------------------------------------------------------
@pytest.mark.parametrize(
    "fault",
    [Fault.rate_limited(retry_after=1.0), Fault.server_error(), Fault.unavailable(retry_after=0.3), Fault.reset()],
    ids=lambda f: f.kind,
)
def test_transport_faults_are_retried(fault, fake_server, make_spec, llm_hub):
    fake_server.fail_next(fault)
    result = llm_hub.model(make_spec(max_retries=2), "m").generate(ask())[0]
    assert result.ok, result.error
    assert result.parsed == Label(label="x", confidence=0.0)
    sent = fake_server.chat_requests
    assert [r.fault for r in sent] == [fault.kind, None]
    assert sent[0].body == sent[1].body  # a transport retry is the same request
    if fault.retry_after is not None:
        assert sent[1].time - sent[0].time >= fault.retry_after - SLACK_S


def test_timeout_is_retried(fake_server, make_spec, llm_hub):
    fake_server.fail_next(Fault.delay(2.0))
    result = llm_hub.model(make_spec(timeout_s=0.5, max_retries=2), "m").generate(ask())[0]
    assert result.ok, result.error
    sent = fake_server.chat_requests
    assert [r.fault for r in sent] == ["delay", None]
    assert sent[1].time - sent[0].time >= 0.5 - SLACK_S  # the client waited its timeout, not the server's delay


def test_a_timeout_that_persists_is_recorded_with_the_timeout_in_the_reason(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: Fault.delay(5.0)
    result = llm_hub.model(make_spec(timeout_s=0.3, max_retries=0), "m").generate(ask())[0]
    assert not result.ok
    assert result.error.startswith("timeout after 0.3s")
    assert len(fake_server.chat_requests) == 1


def test_random_faults_all_recover_and_every_fault_costs_one_extra_request(fake_server, make_spec, llm_hub):
    quick = 0.02  # Retry-After keeps the client's backoff short
    fake_server.random_faults(
        0.25,
        [Fault.rate_limited(quick), Fault.unavailable(quick), Fault("server_error", 500, "boom", quick),
         Fault.reset()],
        seed=7,
    )
    results = llm_hub.model(make_spec(max_retries=6, max_concurrency=4), "m").generate(ask(30))
    assert [r.ok for r in results] == [True] * 30
    sent = fake_server.chat_requests
    faulted = sum(r.fault is not None for r in sent)
    assert faulted > 0
    assert len(sent) == 30 + faulted


def test_always_500_ends_as_a_failure_after_max_retries_plus_one_attempts(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: Fault.server_error("the GPU caught fire")
    result = llm_hub.model(make_spec(max_retries=2), "m").generate(ask())[0]
    assert not result.ok and result.text is None
    assert "HTTP 500" in result.error and "the GPU caught fire" in result.error
    assert result.request.item_id == "item-0"
    assert len(fake_server.chat_requests) == 2 + 1
    assert llm_hub.usage_rows()[0]["failures"] == 1


@pytest.mark.parametrize("status", [400, 404, 422])
def test_other_4xx_fail_fast_with_the_server_message(status, fake_server, make_spec, llm_hub):
    message = f"model 'fake-model' cannot do that (status {status})"
    fake_server.responder = lambda body: Fault.http(status, message)
    result = llm_hub.model(make_spec(max_retries=5), "m").generate(ask())[0]
    assert not result.ok
    assert f"HTTP {status}" in result.error and message in result.error
    assert len(fake_server.chat_requests) == 1


# -- bad replies: the hub re-asks --------------------------------------------------------------------------------
BAD_REPLIES = {
    "invalid_json": (Fault.invalid_json(), "invalid JSON"),
    "truncated": (Fault.truncated(), "truncated: finish_reason=length"),
    "empty_choices": (Fault.empty_choices(), "empty choices"),
}


@pytest.mark.parametrize("kind", list(BAD_REPLIES))
def test_a_bad_reply_is_asked_again_with_a_new_seed(kind, fake_server, make_spec, llm_hub):
    fault, _ = BAD_REPLIES[kind]
    fake_server.fail_next(fault)
    result = llm_hub.model(make_spec(), "m").generate(ask(sample_index=2))[0]
    assert result.ok, result.error
    assert result.attempts == 2
    first, second = fake_server.chat_requests
    assert first.fault == kind and second.fault is None
    assert first.body["seed"] == 2 and first.body["temperature"] == 0.0
    assert second.body["seed"] != 2 and second.body["temperature"] == REASK_TEMPERATURE
    assert second.body["messages"] == first.body["messages"]


@pytest.mark.parametrize("kind", list(BAD_REPLIES))
def test_a_reply_that_stays_bad_is_a_recorded_failure_and_not_cached(kind, fake_server, make_spec, cache_path):
    fault, reason = BAD_REPLIES[kind]
    fake_server.responder = lambda body: fault if "item 2" in body["messages"][-1]["content"] else {
        "label": "benign", "confidence": 0.9}
    requests = ask(4)
    with LLMHub(cache_path) as hub:
        results = hub.model(make_spec(), "m").generate(requests)
    assert [r.ok for r in results] == [True, True, False, True]
    bad = results[2]
    assert bad.error.startswith(reason), bad.error
    assert bad.attempts == 1 + MAX_REASKS
    assert bad.request.item_id == "item-2"
    assert all(r.parsed == Label(label="benign", confidence=0.9) for r in results if r.ok)
    assert sum("item 2" in r.last_user for r in fake_server.chat_requests) == 1 + MAX_REASKS
    assert len({r.body["seed"] for r in fake_server.chat_requests if "item 2" in r.last_user}) == 1 + MAX_REASKS

    # The failure was not cached: a rerun asks again for it, and only for it.
    fake_server.reset()
    with LLMHub(cache_path) as hub:
        again = hub.model(make_spec(), "m").generate(requests)
    assert [r.ok for r in again] == [True] * 4
    assert [r.cached for r in again] == [True, True, False, True]
    assert [r.last_user for r in fake_server.chat_requests] == ["classify item 2"]


def test_a_reply_failing_the_schema_is_asked_again(fake_server, make_spec, llm_hub):
    replies = iter([{"label": "benign"}, {"label": "benign", "confidence": 0.5}])
    fake_server.responder = lambda body: next(replies)
    result = llm_hub.model(make_spec(), "m").generate(ask())[0]
    assert result.ok and result.attempts == 2 and result.parsed.confidence == 0.5


def test_a_reply_failing_the_schema_every_time_names_the_field(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: {"label": "benign"}
    result = llm_hub.model(make_spec(), "m").generate(ask())[0]
    assert not result.ok
    assert result.error.startswith("schema mismatch: confidence")


# -- the circuit breaker -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_endpoint_opens_the_circuit(make_spec, llm_hub):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    llm = llm_hub.model(make_spec(base_url=dead, max_retries=0), "moderator")
    with pytest.raises(CircuitOpenError, match=r"127\.0\.0\.1:\d+/v1 \(fake-model\)") as err:
        llm.generate(ask(30))
    assert "connection error" in str(err.value)


def test_sporadic_failures_do_not_open_the_circuit(fake_server, make_spec, llm_hub):
    fake_server.responder = lambda body: (
        Fault.http(400, "prompt too long") if body["messages"][-1]["content"].endswith("0") else {
            "label": "l", "confidence": 1.0}
    )
    results = llm_hub.model(make_spec(), "m").generate(ask(40))  # items 0, 10, 20, 30 fail
    assert [i for i, r in enumerate(results) if not r.ok] == [0, 10, 20, 30]
    assert all("prompt too long" in results[i].error for i in (0, 10, 20, 30))
