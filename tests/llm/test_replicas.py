"""Several replicas behind one role (`base_url` as a list), against two or three real loopback servers."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
import yaml
from typer.testing import CliRunner

from orforge.core.config import ConfigError, ModelSpec, parse_config
from orforge.flows.cli import app
from orforge.llm.hub import LLMHub
from orforge.llm.replicas import BUSY, DOWN, replica_fault
from orforge.llm.types import BackendError, CircuitOpenError, LLMRequest
from tests.conftest import FAKE_MODEL
from tests.fakeserver import Fault, FakeServer
from tests.flows.pipeline import write_config

DEAD_URL = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: connection refused at once


@pytest.fixture
def servers():
    """`servers(n, latency_s=...)` -> n started FakeServers, stopped after the test."""
    started: list[FakeServer] = []

    def start(n: int, latency_s: float = 0.0) -> list[FakeServer]:
        for _ in range(n):
            started.append(FakeServer(latency_s=latency_s, models=[FAKE_MODEL]).start())
        return started[-n:]

    yield start
    for server in started:
        server.stop()
    for server in started:
        assert not server.responder_errors, server.responder_errors


def replicated(urls: list[str] | str, **overrides) -> ModelSpec:
    fields = {"backend": "openai", "base_url": urls, "model": FAKE_MODEL, "timeout_s": 10.0, "max_retries": 1,
              **overrides}
    return ModelSpec(**fields)


def url(server: FakeServer) -> str:
    return server.url + "/v1"


def prompts(n: int, tag: str = "") -> list[LLMRequest]:
    return [LLMRequest.chat(f"Question {tag}{i}: is this harmful?") for i in range(n)]


def rows_by_url(hub: LLMHub) -> dict[str, dict]:
    return {row["url"]: row for row in hub.replica_rows()}


# -- routing --------------------------------------------------------------------------------------------------------
def test_requests_go_to_the_replica_with_the_fewest_in_flight(servers, llm_hub):
    slow, fast = servers(1, latency_s=1.5) + servers(1)
    results = llm_hub.model(replicated([url(slow), url(fast)], max_concurrency=2), "moderator").generate(prompts(30))
    assert all(r.ok for r in results)
    n_slow, n_fast = len(slow.chat_requests), len(fast.chat_requests)
    assert n_slow + n_fast == 30
    # Both start empty, so both get work; afterwards the slow one holds its two slots 1.5 s each while the fast
    # one frees its slots at once. Round robin would give 15 and 15.
    assert 2 <= n_slow and 2 * n_slow < n_fast, (n_slow, n_fast)
    rows = rows_by_url(llm_hub)
    assert rows[url(slow)]["requests"] == n_slow and rows[url(fast)]["requests"] == n_fast
    assert not any(row["taken_out"] or row["failures"] for row in rows.values())


def test_max_concurrency_is_a_cap_per_replica(servers, llm_hub):
    a, b = servers(2, latency_s=0.2)
    results = llm_hub.model(replicated([url(a), url(b)], max_concurrency=3), "moderator").generate(prompts(24))
    assert all(r.ok for r in results)
    # Each server saw exactly its own cap at once: 6 in flight in all, never more than 3 on one.
    assert a.max_in_flight == 3 and b.max_in_flight == 3
    assert [row["peak_in_flight"] for row in llm_hub.replica_rows()] == [3, 3]


def test_two_roles_on_the_same_replicas_share_each_replicas_cap(servers, llm_hub):
    a, b = servers(2, latency_s=0.2)
    spec = replicated([url(a), url(b)], max_concurrency=2)
    other = spec.model_copy(update={"system_prompt": "second moderator", "name": "mod-2"})
    batches = {"first": prompts(10, "x"), "second": prompts(10, "y")}
    threads = [threading.Thread(target=llm_hub.model(s, role).generate, args=(batches[role],))
               for s, role in ((spec, "first"), (other, "second"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(a.chat_requests) + len(b.chat_requests) == 20
    assert a.max_in_flight == 2 and b.max_in_flight == 2
    assert len(llm_hub.replica_rows()) == 2  # one row per replica, whichever role used it


def test_replica_rows_other_hubs_report_are_summed_per_replica(servers, llm_hub, tmp_path):
    # What flows.runner does with the rows a Dask or Ray worker's hub ships back with each task.
    a, b = servers(2)
    spec = replicated([url(a), url(b)], max_concurrency=2)
    assert all(r.ok for r in llm_hub.model(spec, "moderator").generate(prompts(4, "own")))
    workers = [LLMHub(tmp_path / f"worker-{i}.sqlite") for i in range(2)]
    try:
        worker_specs = [spec, replicated([url(a), url(b), DEAD_URL], max_concurrency=2)]
        early = []
        for i, (hub, worker_spec) in enumerate(zip(workers, worker_specs, strict=True)):
            assert all(r.ok for r in hub.model(worker_spec, "moderator").generate(prompts(3, f"w{i}-first")))
            early.append(hub.replica_rows())
            assert all(r.ok for r in hub.model(worker_spec, "moderator").generate(prompts(5, f"w{i}-then")))
        own = rows_by_url(llm_hub)
        for i, hub in enumerate(workers):
            llm_hub.add_replica_rows(f"worker-{i}", hub.replica_rows())
            llm_hub.add_replica_rows(f"worker-{i}", early[i])  # an older total arriving late changes nothing
        rows = rows_by_url(llm_hub)
        assert list(rows) == [url(a), url(b), DEAD_URL]  # the hub's own replicas first
        assert rows[url(a)]["requests"] == len(a.chat_requests) and rows[url(b)]["requests"] == len(b.chat_requests)
        assert len(a.chat_requests) + len(b.chat_requests) == 4 + 8 + 8
        for u in (url(a), url(b)):
            assert rows[u]["peak_in_flight"] == own[u]["peak_in_flight"] + sum(
                rows_by_url(hub)[u]["peak_in_flight"] for hub in workers)
        assert rows[DEAD_URL]["taken_out"] and "connection error" in rows[DEAD_URL]["why"]
        assert rows[DEAD_URL]["requests"] == rows_by_url(workers[1])[DEAD_URL]["requests"] >= 1
        assert not rows[url(a)]["taken_out"] and rows[url(a)]["why"] is None
    finally:
        for hub in workers:
            hub.close()


# -- dead replicas --------------------------------------------------------------------------------------------------
def test_a_replica_stopped_mid_run_is_taken_out_and_the_others_answer_everything(servers, llm_hub):
    doomed, a, b = servers(3, latency_s=0.05)
    reached = threading.Event()
    counted = []

    def count_then_die(body: dict) -> str:
        counted.append(1)
        if len(counted) == 5:
            reached.set()
        return "an answer from the doomed replica"

    doomed.responder = count_then_die
    stopper = threading.Thread(target=lambda: reached.wait(30) and doomed.stop())
    stopper.start()
    spec = replicated([url(doomed), url(a), url(b)], max_concurrency=2)
    results = llm_hub.model(spec, "moderator").generate(prompts(60))
    stopper.join()

    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    rows = rows_by_url(llm_hub)
    assert rows[url(doomed)]["taken_out"] and "connection error" in rows[url(doomed)]["why"]
    assert not rows[url(a)]["taken_out"] and not rows[url(b)]["taken_out"]
    # What the doomed one answered before it stopped plus what the others answered is every request.
    answered_by_doomed = sum(1 for r in results if r.text == "an answer from the doomed replica")
    assert 5 <= answered_by_doomed <= 15  # it stopped a few answers after its fifth, far from its share of 20
    assert len(a.chat_requests) + len(b.chat_requests) == 60 - answered_by_doomed
    assert rows[url(a)]["requests"] == len(a.chat_requests) and rows[url(b)]["requests"] == len(b.chat_requests)
    assert rows[url(doomed)]["failures"] >= 1


def test_an_unreachable_replica_is_taken_out_at_once(servers, llm_hub):
    (live,) = servers(1)
    results = llm_hub.model(replicated([DEAD_URL, url(live)], max_retries=0), "moderator").generate(prompts(20))
    assert all(r.ok for r in results)
    assert len(live.chat_requests) == 20
    rows = rows_by_url(llm_hub)
    # Refused at once: only what was sent before the first refusal came back (at most its cap of 8) went there.
    assert rows[DEAD_URL]["taken_out"] and 1 <= rows[DEAD_URL]["requests"] == rows[DEAD_URL]["failures"] <= 8


def test_a_failing_replica_is_taken_out_by_its_breaker_and_its_requests_go_elsewhere(servers, llm_hub):
    broken, healthy = servers(2)
    broken.random_faults(1.0, ["server_error"])
    spec = replicated([url(broken), url(healthy)], max_concurrency=2, max_retries=0)
    results = llm_hub.model(spec, "moderator").generate(prompts(40))
    assert all(r.ok for r in results)  # each 500 was asked again on the healthy replica
    rows = rows_by_url(llm_hub)
    assert rows[url(broken)]["taken_out"] and "of its last" in rows[url(broken)]["why"]
    # The breaker trips at 10 failures; at most the requests already in flight there fail after that.
    assert 10 <= len(broken.chat_requests) <= 12
    assert len(healthy.chat_requests) == 40


def test_a_client_error_is_not_sent_to_another_replica(servers, llm_hub):
    a, b = servers(2)
    a.fail_next(Fault.http(400, "this request is malformed"))
    results = llm_hub.model(replicated([url(a), url(b)]), "moderator").generate(prompts(1))
    assert not results[0].ok and "malformed" in results[0].error
    assert len(a.chat_requests) == 1 and b.chat_requests == []  # a 4xx would be the same on every replica
    assert not any(row["taken_out"] for row in llm_hub.replica_rows())


def test_the_endpoint_fails_only_when_every_replica_is_out(llm_hub):
    llm = llm_hub.model(replicated([DEAD_URL, "http://127.0.0.1:7/v1"], max_retries=0), "moderator")
    with pytest.raises(CircuitOpenError, match="every replica of fake-model is out") as info:
        llm.generate(prompts(5))
    assert DEAD_URL in str(info.value) and "127.0.0.1:7" in str(info.value)
    assert all(row["taken_out"] for row in llm_hub.replica_rows())


# -- the cache and the key ------------------------------------------------------------------------------------------
def test_the_cache_key_does_not_depend_on_the_replicas(servers, cache_path):
    a, b, c = servers(3)
    requests = prompts(12)
    with LLMHub(cache_path) as hub:
        first = hub.model(replicated([url(a), url(b)]), "moderator").generate(requests)
    assert len(a.chat_requests) + len(b.chat_requests) == 12 and a.chat_requests and b.chat_requests
    assert replicated([url(a), url(b)]).answer_key() == replicated(url(c)).answer_key()
    for base_url in (url(c), [url(c)], [url(c), url(a)]):
        with LLMHub(cache_path) as hub:
            again = hub.model(replicated(base_url), "moderator").generate(requests)
        assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in first]
    assert c.chat_requests == [] and len(a.chat_requests) + len(b.chat_requests) == 12


def test_one_key_variable_for_every_replica_and_never_in_the_summary(servers, llm_hub, monkeypatch):
    a, b = servers(2, latency_s=0.05)
    monkeypatch.setenv("ORFORGE_TEST_REPLICA_KEY", "sk-replica-secret-123")
    spec = replicated([url(a), url(b)], api_key_env="ORFORGE_TEST_REPLICA_KEY", max_concurrency=1)
    llm = llm_hub.model(spec, "moderator")
    assert all(r.ok for r in llm.generate(prompts(6)))
    sent = a.chat_requests + b.chat_requests
    assert a.chat_requests and b.chat_requests
    assert all(r.headers["Authorization"] == "Bearer sk-replica-secret-123" for r in sent)
    assert "sk-replica-secret" not in repr(llm_hub.replica_rows()) + llm.backend.endpoint()


# -- the config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, expected", [
    ({"base_url": []}, "base_url: the list of replica URLs is empty"),
    ({"base_url": ["http://a:8000/v1", "http://b:8000/v1", "http://a:8000/v1/"]}, "listed twice"),
    ({"backend": "local", "base_url": ["http://a:8000/v1", "http://b:8000/v1"]}, "needs backend 'openai'"),
    ({"backend": "vllm", "base_url": ["http://a:8000/v1"]}, "needs backend 'openai'"),
])
def test_bad_replica_lists_are_config_errors_naming_the_field(tmp_path, change, expected):
    raw = yaml.safe_load(write_config(tmp_path, "http://127.0.0.1:9/v1").read_text())
    raw["moderation"]["moderators"][1].update(change)
    with pytest.raises(ConfigError, match="moderation.moderators.1: base_url: ") as info:
        parse_config(raw, "config.yaml")
    assert expected in str(info.value)

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["build", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "moderation.moderators.1" in lines[0], result.output
    assert sorted(tmp_path.rglob("*")) == before


def test_a_single_url_stays_a_single_endpoint(fake_server, make_spec, llm_hub):
    llm = llm_hub.model(make_spec(), "moderator")
    assert all(r.ok for r in llm.generate(prompts(3)))
    assert llm_hub.replica_rows() == [] and llm.backend.endpoint() == f"{fake_server.url}/v1 ({FAKE_MODEL})"


def test_models_check_pings_every_replica(servers, tmp_path):
    a, b = servers(2)
    raw = yaml.safe_load(write_config(tmp_path, url(a)).read_text())
    raw["moderation"]["moderators"][0]["base_url"] = [url(a), url(b)]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["models", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert len(b.chat_requests) == 1  # the second replica of mod-0 was pinged too
    assert len(a.chat_requests) == 8  # seeds, rewrites, 3 moderators (mod-0's first replica), 3 panel members


def _backend_error_from(cause: BaseException) -> BackendError:
    """A BackendError raised the way a backend raises it: inside the handler of the client's exception."""
    try:
        try:
            raise cause
        except Exception as e:
            raise BackendError(f"failed: {e}") from None
    except BackendError as e:
        return e


def _connection_error(under: BaseException) -> openai.APIConnectionError:
    request = httpx.Request("POST", "http://replica/v1/chat/completions")
    try:
        raise under
    except BaseException as e:
        try:
            raise openai.APIConnectionError(request=request) from e
        except openai.APIConnectionError as wrapped:
            return wrapped


def _status_error(status: int) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://replica/v1/chat/completions")
    return openai.APIStatusError("error", response=httpx.Response(status, request=request), body=None)


@pytest.mark.parametrize("cause, fault", [
    (lambda: _connection_error(httpx.ConnectError("connection refused")), DOWN),  # the httpx transport
    (lambda: _connection_error(ConnectionRefusedError(111, "refused")), DOWN),
    (lambda: _connection_error(httpx.RemoteProtocolError("server disconnected")), BUSY),  # a dropped connection
    (lambda: openai.APITimeoutError(request=httpx.Request("POST", "http://replica/v1")), BUSY),
    (lambda: _status_error(503), BUSY),
    (lambda: _status_error(429), BUSY),
    (lambda: _status_error(400), None),
    (lambda: ValueError("malformed response"), None),
])
def test_errors_are_told_apart_whatever_the_transport(cause, fault):
    assert replica_fault(_backend_error_from(cause())) == fault
