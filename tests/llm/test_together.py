"""`generate_together`: several models' batches in flight at once on one hub, each job's results in its own order,
and a job that fails the run (a tripped breaker) failing the call without leaving the other jobs running."""

from __future__ import annotations

import asyncio
import socket

import pytest

from orforge.llm.hub import LLMHub, generate_together
from orforge.llm.types import CircuitOpenError, LLMRequest

MODELS = ("A", "B", "C")


def who(body: dict) -> str:
    """Which of the three specs sent a request: its system prompt is "You are model X." """
    return body["messages"][0]["content"].removeprefix("You are model ").removesuffix(".")


def specs_on_one_endpoint(make_spec, cap: int) -> list:
    """Three specs on the same endpoint (one cap shared by all three), told apart by their system prompt."""
    return [make_spec(name=f"model-{m}", system_prompt=f"You are model {m}.", max_concurrency=cap) for m in MODELS]


def asks(n: int) -> list[LLMRequest]:
    return [LLMRequest.chat(f"question {i}", item_id=f"q{i}") for i in range(n)]


def echo(body: dict) -> str:
    return f"{who(body)} answers {body['messages'][-1]['content']}"


@pytest.mark.parametrize("together", [True, False], ids=["together", "one-after-another"])
def test_every_model_is_in_flight_at_once_only_when_asked_together(together, fake_server, make_spec, llm_hub):
    """The cap (12) holds all three batches of 4: together, all three models have requests at the server at one
    moment; asked one after another (what the stages did before), never more than one model does."""
    fake_server.responder, fake_server.latency_s = echo, 0.3
    models = [llm_hub.model(s, "moderator") for s in specs_on_one_endpoint(make_spec, cap=12)]
    if together:
        answers = generate_together([(m, asks(4)) for m in models])
    else:
        answers = [m.generate(asks(4)) for m in models]
    assert [[r.text for r in results] for results in answers] == [
        [f"{m} answers question {i}" for i in range(4)] for m in MODELS]
    overlap = fake_server.most_in_flight_together(lambda r: who(r.body))
    if together:
        assert overlap == set(MODELS)
    else:
        assert len(overlap) == 1
    assert fake_server.max_in_flight == (12 if together else 4)


def test_the_shared_cap_still_holds(fake_server, make_spec, llm_hub):
    fake_server.responder, fake_server.latency_s = echo, 0.05
    models = [llm_hub.model(s, "moderator") for s in specs_on_one_endpoint(make_spec, cap=5)]
    answers = generate_together([(m, asks(6)) for m in models])
    assert all(r.ok for results in answers for r in results)
    assert fake_server.max_in_flight == 5


def test_results_keep_job_and_request_order_whatever_order_replies_come_in(fake_server, make_spec, llm_hub):
    """Replies are made to arrive backwards (the last model's last question first); empty jobs, repeats within a job
    and answers from the cache keep their places too."""
    fake_server.responder = echo
    fake_server.latency_s = lambda body: (0.02 * (3 - MODELS.index(who(body)))
                                          + 0.01 * (5 - int(body["messages"][-1]["content"].split()[-1])))
    a, b, c = [llm_hub.model(s, "m") for s in specs_on_one_endpoint(make_spec, cap=32)]
    assert generate_together([(b, asks(2))])[0][1].text == "B answers question 1"  # now in the cache
    sent_before = len(fake_server.chat_requests)
    repeated = [*asks(3), asks(1)[0]]
    answers = generate_together([(a, asks(5)), (c, []), (b, asks(3)), (c, repeated)])
    assert [[(r.request.item_id, r.text, r.cached) for r in results] for results in answers] == [
        [(f"q{i}", f"A answers question {i}", False) for i in range(5)],
        [],
        [(f"q{i}", f"B answers question {i}", i < 2) for i in range(3)],
        [(f"q{i}", f"C answers question {i}", False) for i in (0, 1, 2, 0)],
    ]
    assert len(fake_server.chat_requests) - sent_before == 5 + 1 + 3  # B's two were cached, C's repeat sent once
    arrival = [(who(r.body), r.last_user) for r in sorted(fake_server.chat_requests[sent_before:],
                                                           key=lambda r: r.replied)]
    in_job_order = [("A", f"question {i}") for i in range(5)] + [("B", "question 2")] + [
        ("C", f"question {i}") for i in range(3)]
    assert sorted(arrival) == sorted(in_job_order) and arrival != in_job_order  # replies came in another order


def test_models_of_two_hubs_cannot_be_asked_together(fake_server, make_spec, llm_hub, tmp_path):
    with LLMHub(tmp_path / "other.sqlite") as other, pytest.raises(ValueError, match="same LLMHub"):
        generate_together([(llm_hub.model(make_spec(), "m"), asks(1)), (other.model(make_spec(), "m"), asks(1))])
    assert fake_server.chat_requests == []
    assert generate_together([]) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tripped_breaker_fails_the_call_and_stops_the_other_jobs(fake_server, make_spec, llm_hub):
    """One job's endpoint is dead: its breaker trips and CircuitOpenError reaches the caller while the other job's
    slow requests are still at the server; nothing of either job is left running on the hub's loop."""
    fake_server.latency_s = 5.0  # longer than the dead endpoint takes to trip its breaker
    dead = llm_hub.model(make_spec(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0), "moderator")
    slow = llm_hub.model(make_spec(name="slow", max_concurrency=8), "moderator")
    with pytest.raises(CircuitOpenError, match="connection error"):
        generate_together([(slow, asks(8)), (dead, asks(30))])

    async def still_running() -> list:
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run_coroutine_threadsafe(still_running(), llm_hub.loop).result(10) == []
    assert len(fake_server.chat_requests) == 8 and all(r.replied is None for r in fake_server.chat_requests)
    assert llm_hub.usage[("moderator", "slow")].requests == 0  # cancelled before any answer came back
    fake_server.latency_s = 0.0
    assert all(r.ok for r in slow.generate(asks(2)))  # the hub and the live endpoint carry on
