"""The API key reaches the server and nowhere else: not the cache file, not logs, not the terminal."""

from __future__ import annotations

import logging
import secrets

from orforge.llm.hub import LLMHub
from orforge.llm.types import LLMRequest
from tests.fakeserver import Fault


def cache_bytes(cache_path) -> bytes:
    files = sorted(cache_path.parent.glob(cache_path.name + "*"))
    assert files, "no cache files found"
    return b"".join(p.read_bytes() for p in files)


def test_api_key_reaches_the_server_but_never_the_cache_logs_or_terminal(fake_server, make_spec, cache_path,
                                                                         monkeypatch, caplog, capsys):
    key = "sk-orforge-test-" + secrets.token_hex(16)
    monkeypatch.setenv("ORFORGE_TEST_API_KEY", key)
    caplog.set_level(logging.DEBUG)
    fake_server.responder = lambda body: (
        Fault.http(401, "invalid key for this model") if "unauthorised" in body["messages"][-1]["content"]
        else "the answer is " + body["messages"][-1]["content"]
    )
    fake_server.fail_next(Fault.unavailable(retry_after=0.05))  # a retry, so the retry path logs too
    spec = make_spec(api_key_env="ORFORGE_TEST_API_KEY")
    requests = [LLMRequest.chat(f"question {i}") for i in range(3)] + [LLMRequest.chat("unauthorised question")]

    with LLMHub(cache_path) as hub:
        results = hub.model(spec, "moderator").generate(requests)
        while_open = cache_bytes(cache_path)  # the WAL holds the fresh rows while the hub is open
    after_close = cache_bytes(cache_path)

    assert [r.ok for r in results] == [True, True, True, False]
    assert key not in results[3].error
    sent = fake_server.chat_requests
    assert len(sent) == 5
    assert {r.headers.get("Authorization") for r in sent} == {f"Bearer {key}"}

    for blob in (while_open, after_close):
        assert key.encode() not in blob
        assert key[-12:].encode() not in blob
    assert b"the answer is question 1" in while_open + after_close  # we did read the files the answers went to

    assert caplog.records, "expected DEBUG records from the client; the log check would prove nothing"
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert key not in logged and key[-12:] not in logged
    out, err = capsys.readouterr()
    assert key not in out and key not in err


def test_without_api_key_env_no_real_key_is_sent(fake_server, make_spec, llm_hub, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-ambient-environment")
    llm_hub.model(make_spec(), "m").generate([LLMRequest.chat("hello")])
    assert fake_server.chat_requests[0].headers["Authorization"] == "Bearer not-needed"
