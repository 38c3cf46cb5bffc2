"""The loopback server itself: it is the ground truth of the llm/ tests, so it gets its own checks."""

from __future__ import annotations

import enum
import json
import urllib.error
import urllib.request
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.fakeserver import Fault, FakeServer, minimal_instance, request_schema


def post(server: FakeServer, body: dict, auth: str = "Bearer k", timeout: float = 5) -> tuple[int, dict, dict]:
    req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "Authorization": auth})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def chat(text: str, **kw) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **kw}


class Colour(enum.Enum):
    red = "red"
    blue = "blue"


class Inner(BaseModel):
    words: list[str] = Field(min_length=2)
    count: int = Field(ge=3)


class Outer(BaseModel):
    kind: Literal["a", "b"]
    colour: Colour
    note: str | None
    ratio: float = Field(gt=0.5)
    flag: bool
    inner: Inner
    many: list[Inner]
    mapping: dict[str, int]
    name: str = Field(min_length=4)


def test_minimal_instance_validates_against_the_pydantic_schema():
    value = minimal_instance(Outer.model_json_schema())
    parsed = Outer.model_validate(value)
    assert parsed.kind == "a" and parsed.colour is Colour.red and len(parsed.many) == 1


def test_default_reply_follows_the_schema_of_either_dialect(fake_server):
    schema = Inner.model_json_schema()
    for fmt in ({"type": "json_schema", "json_schema": {"name": "Inner", "schema": schema}},
                {"type": "json_object", "schema": schema}):
        assert request_schema({"response_format": fmt}) == schema
        status, _, body = post(fake_server, chat("hi", response_format=fmt))
        assert status == 200
        Inner.model_validate_json(body["choices"][0]["message"]["content"])
    status, _, body = post(fake_server, chat("hi"))
    assert body["choices"][0]["message"]["content"] == "This is a plain answer from the fake model."


def test_usage_counts_words(fake_server):
    fake_server.responder = lambda body: "one two three four"
    _, _, body = post(fake_server, {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": "a b c"}]})
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert body["choices"][0]["finish_reason"] == "stop"


def test_records_requests_with_headers_and_faults(fake_server):
    fake_server.fail_next(Fault.rate_limited(retry_after=2.5))
    status, headers, body = post(fake_server, chat("first"), auth="Bearer secret-1")
    assert status == 429 and headers["Retry-After"] == "2.5" and "rate limit" in body["error"]["message"]
    post(fake_server, chat("second"))
    first, second = fake_server.chat_requests
    assert (first.fault, first.headers["Authorization"], first.last_user) == ("rate_limited", "Bearer secret-1",
                                                                               "first")
    assert (second.fault, second.last_user) == (None, "second")
    assert second.time >= first.time


def test_responder_faults_and_error_statuses(fake_server):
    fake_server.responder = lambda body: Fault.http(404, "no such model") if "404" in body["messages"][0][
        "content"] else Fault.empty_choices()
    status, _, body = post(fake_server, chat("please 404"))
    assert status == 404 and body["error"]["message"] == "no such model"
    status, _, body = post(fake_server, chat("anything else"))
    assert status == 200 and body["choices"] == []


def test_truncated_and_invalid_replies(fake_server):
    fake_server.responder = lambda body: {"answer": "a fairly long answer to cut in half"}
    fake_server.fail_next(Fault.truncated())
    fake_server.fail_next(Fault.invalid_json())
    _, _, cut = post(fake_server, chat("x"))
    _, _, bad = post(fake_server, chat("x"))
    assert cut["choices"][0]["finish_reason"] == "length"
    for reply in (cut, bad):
        with pytest.raises(json.JSONDecodeError):
            json.loads(reply["choices"][0]["message"]["content"])


def test_random_faults_are_reproducible_with_a_seed():
    def run(seed: int) -> list[str | None]:
        with FakeServer() as server:
            server.random_faults(0.5, ["server_error", "rate_limited", "empty_choices"], seed=seed)
            for i in range(20):
                post(server, chat(str(i)))
            return [r.fault for r in server.chat_requests]

    first = run(3)
    assert first == run(3)
    assert 0 < sum(f is not None for f in first) < 20
    assert first != run(4)


def test_reset_forgets_script_and_records(fake_server):
    fake_server.responder = lambda body: "scripted"
    fake_server.fail_next(Fault.server_error(), times=3)
    post(fake_server, chat("x"))
    fake_server.reset()
    status, _, body = post(fake_server, chat("x"))
    assert status == 200 and body["choices"][0]["message"]["content"] != "scripted"
    assert len(fake_server.requests) == 1


def test_models_endpoint(fake_server):
    with urllib.request.urlopen(fake_server.url + "/v1/models", timeout=5) as resp:
        data = json.loads(resp.read())
    assert [m["id"] for m in data["data"]] == ["fake-model"]
    assert fake_server.requests[-1].method == "GET"


def test_a_raising_responder_is_a_400_and_is_reported(fake_server):
    fake_server.expect_responder_errors = True
    fake_server.responder = lambda body: 1 / 0
    status, _, body = post(fake_server, chat("x"))
    assert status == 400 and "ZeroDivisionError" in body["error"]["message"]
    assert fake_server.responder_errors == ["ZeroDivisionError: division by zero"]


def test_stop_cancels_a_delayed_reply_and_closes_the_port():
    server = FakeServer().start()
    server.fail_next(Fault.delay(30))
    with pytest.raises(OSError):  # the client gives up first; the handler is still sleeping
        post(server, chat("x"), timeout=0.3)
    assert len(server._handlers) == 1
    server.stop()
    assert not server._handlers
    with pytest.raises(OSError):
        post(server, chat("x"), timeout=2)
