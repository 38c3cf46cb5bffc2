"""A real OpenAI-compatible HTTP server on loopback, scriptable from tests.

It runs an aiohttp app in its own thread with its own event loop, on a free port of 127.0.0.1, and serves
`POST /v1/chat/completions` and `GET /v1/models`. Tests talk to it through the real openai client (via `llm/`)
and then assert on what it received:

    server = FakeServer().start()
    server.responder = lambda body: {"verdict": "benign"}      # or a string, or a Fault
    server.fail_next(Fault.rate_limited(retry_after=1))         # the next request gets a 429
    ... run the code under test against server.url + "/v1" ...
    assert server.requests[0].headers["Authorization"] == "Bearer ..."
    assert server.max_in_flight <= 4
    assert server.most_in_flight_together(lambda r: r.body["model"]) == {"a", "b"}  # both models' requests at once
    server.stop()

Without a responder the server answers with a minimal valid instance of the request's JSON schema when
`response_format` carries one, and with plain text otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

FAULT_KINDS = (
    "rate_limited",  # 429 with Retry-After
    "server_error",  # 500
    "unavailable",  # 503 with Retry-After
    "reset",  # the connection is closed without any response
    "delay",  # the reply comes after `delay_s` (longer than the client's timeout)
    "truncated",  # half of the reply, finish_reason "length"
    "invalid_json",  # a 200 whose content is not JSON
    "empty_choices",  # a 200 with `choices: []`
    "http_error",  # any status with an OpenAI-style error body (e.g. 400 "model not found")
)


@dataclass(frozen=True)
class Fault:
    """One way for a request to go wrong. Build with the class methods; `kind` is one of FAULT_KINDS."""

    kind: str
    status: int = 500
    message: str = "fake server error"
    retry_after: float | None = None
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {FAULT_KINDS}")

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0) -> Fault:
        return cls("rate_limited", 429, "rate limit reached, slow down", retry_after)

    @classmethod
    def server_error(cls, message: str = "internal server error") -> Fault:
        return cls("server_error", 500, message)

    @classmethod
    def unavailable(cls, retry_after: float = 0.2) -> Fault:
        return cls("unavailable", 503, "model is loading", retry_after)

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset")

    @classmethod
    def delay(cls, delay_s: float) -> Fault:
        return cls("delay", delay_s=delay_s)

    @classmethod
    def truncated(cls) -> Fault:
        return cls("truncated")

    @classmethod
    def invalid_json(cls) -> Fault:
        return cls("invalid_json")

    @classmethod
    def empty_choices(cls) -> Fault:
        return cls("empty_choices")

    @classmethod
    def http(cls, status: int, message: str) -> Fault:
        return cls("http_error", status, message)

    @classmethod
    def of_kind(cls, kind: str) -> Fault:
        """A fault of `kind` with the defaults of its class method (delay: 30 s, i.e. past any test timeout)."""
        if kind == "delay":
            return cls.delay(30.0)
        if kind == "http_error":
            return cls.http(400, "bad request")
        return getattr(cls, kind)()


@dataclass
class RecordedRequest:
    """What the server received: method, path, parsed JSON body (None for GET), headers, arrival time."""

    method: str
    path: str
    body: dict | None
    headers: dict[str, str]
    time: float  # time.monotonic() at arrival
    fault: str | None = None  # the fault kind served, if any
    replied: float | None = None  # time.monotonic() when the server was done with it; None while in flight

    @property
    def messages(self) -> list[dict]:
        return (self.body or {}).get("messages", [])

    @property
    def last_user(self) -> str:
        users = [m.get("content", "") for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


Reply = str | dict | list | Fault
Responder = Callable[[dict], Reply]
Latency = float | Callable[[dict], float]  # seconds before each reply, or a function of the request body


def request_schema(body: dict) -> dict | None:
    """The JSON schema a chat request asks for through `response_format` (json_schema or json_object form)."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")
    if fmt.get("type") == "json_object":
        return fmt.get("schema")
    return None


def minimal_instance(schema: dict, root: dict | None = None) -> Any:
    """A small value that validates against `schema`: strings "x", one array item, the first enum value..."""
    root = root if root is not None else schema
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return minimal_instance(target, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            options = schema[combinator]
            # Prefer a non-null branch so Optional fields carry a value.
            chosen = next((o for o in options if o.get("type") != "null"), options[0])
            return minimal_instance(chosen, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        return {name: minimal_instance(sub, root) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        item = schema.get("items") or {"type": "string"}
        count = max(1, schema.get("minItems", 1))
        return [minimal_instance(item, root) for _ in range(count)]
    if kind == "string":
        return "x" * max(1, schema.get("minLength", 1))
    if kind in ("integer", "number"):
        value = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "x"


def default_responder(body: dict) -> Reply:
    schema = request_schema(body)
    if schema is not None:
        return minimal_instance(schema)
    return "This is a plain answer from the fake model."


def _words(text: str | None) -> int:
    return len((text or "").split())


class FakeServer:
    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency_s: Latency = 0.0,
        models: Iterable[str] = ("fake-model",),
        shutdown_timeout_s: float = 0.5,
    ):
        self.responder: Responder | None = responder
        self.latency_s: Latency = latency_s
        self.models = list(models)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._lock = threading.Lock()
        self._queued: collections.deque[Fault] = collections.deque()
        self._random_rate = 0.0
        self._random_kinds: tuple[Fault, ...] = ()
        self._rng = random.Random(0)
        self._requests: list[RecordedRequest] = []
        self._responder_errors: list[str] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._completion_ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task] = set()
        self.port: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> FakeServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-openai-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # port 0: the OS picked a free one

    def stop(self) -> None:
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
            loop.close()

    async def _stop(self) -> None:
        # Handlers still sleeping (delay faults the client gave up on) are cancelled, not waited for.
        for task in list(self._handlers):
            task.cancel()
        await self._runner.cleanup()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT (append "/v1" for an OpenAI base_url)."""
        return f"http://127.0.0.1:{self.port}"

    # -- scripting ----------------------------------------------------------------------------------------------
    def fail_next(self, fault: Fault, times: int = 1) -> None:
        """The next `times` chat requests (in arrival order) get `fault`, before any random faults."""
        with self._lock:
            self._queued.extend([fault] * times)

    def random_faults(self, rate: float, kinds: Iterable[str | Fault] = ("server_error",), seed: int = 0) -> None:
        """Each chat request independently fails with probability `rate`, with a kind drawn from `kinds`."""
        with self._lock:
            self._random_rate = rate
            self._random_kinds = tuple(k if isinstance(k, Fault) else Fault.of_kind(k) for k in kinds)
            self._rng = random.Random(seed)

    def reset(self) -> None:
        """Forget scripted faults, the responder, latency and everything recorded."""
        with self._lock:
            self.responder = None
            self.latency_s = 0.0
            self._queued.clear()
            self._random_rate = 0.0
            self._random_kinds = ()
            self._requests.clear()
            self._responder_errors.clear()
            self._max_in_flight = self._in_flight

    # -- what was received --------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (chat and models), in arrival order; a copy."""
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    @property
    def max_in_flight(self) -> int:
        """The most chat requests the server was handling at the same moment."""
        with self._lock:
            return self._max_in_flight

    def most_in_flight_together(self, group: Callable[[RecordedRequest], str]) -> set[str]:
        """The largest set of groups (`group(request)`, e.g. which model sent it) that had chat requests in flight
        at one same moment."""
        chats = self.chat_requests
        best: set[str] = set()
        for r in chats:  # what is in flight only grows when a request arrives
            now = {group(o) for o in chats if o.time <= r.time and (o.replied is None or o.replied > r.time)}
            best = now if len(now) > len(best) else best
        return best

    @property
    def responder_errors(self) -> list[str]:
        """Exceptions raised by the responder (each answered with a 400 so the client fails fast)."""
        with self._lock:
            return list(self._responder_errors)

    # -- handlers -----------------------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        with self._lock:
            self._requests.append(RecordedRequest("GET", request.path, None, dict(request.headers), time.monotonic()))
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fakeserver"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    def _pick_fault(self) -> Fault | None:
        if self._queued:
            return self._queued.popleft()
        if self._random_rate and self._random_kinds and self._rng.random() < self._random_rate:
            return self._rng.choice(self._random_kinds)
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        with self._lock:
            fault = self._pick_fault()
            record = RecordedRequest("POST", request.path, body, dict(request.headers), arrived,
                                     fault.kind if fault else None)
            self._requests.append(record)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            latency = self.latency_s
            responder = self.responder or default_responder
        try:
            if not isinstance(body, dict):
                return _error(400, "request body is not a JSON object")
            if callable(latency):
                latency = latency(body)
            if latency:
                await asyncio.sleep(latency)
            if fault is None:
                try:
                    reply = responder(body)
                except Exception as e:  # a broken test script must fail loudly, not be retried
                    with self._lock:
                        self._responder_errors.append(f"{type(e).__name__}: {e}")
                    return _error(400, f"fake server responder raised {type(e).__name__}: {e}")
                if isinstance(reply, Fault):
                    fault = reply
                    record.fault = fault.kind
                else:
                    return self._completion(body, _as_text(reply))
            return await self._serve_fault(request, body, fault)
        finally:
            with self._lock:
                self._in_flight -= 1  # before the response is written, so the client never sees a stale count
                record.replied = time.monotonic()
            self._handlers.discard(task)

    async def _serve_fault(self, request: web.Request, body: dict, fault: Fault) -> web.StreamResponse:
        if fault.kind in ("rate_limited", "server_error", "unavailable", "http_error"):
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            return _error(fault.status, fault.message, headers)
        if fault.kind == "reset":
            request.transport.abort()
            # Nothing can be written any more; aiohttp drops the response of a closed connection.
            return web.Response(status=500)
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay_s)
            return self._completion(body, self._normal_text(body))
        if fault.kind == "truncated":
            text = self._normal_text(body)
            return self._completion(body, text[: max(1, len(text) // 2)], finish_reason="length")
        if fault.kind == "invalid_json":
            return self._completion(body, '{"this is": not json at all')
        if fault.kind == "empty_choices":
            return self._completion(body, None)
        raise AssertionError(fault.kind)

    def _normal_text(self, body: dict) -> str:
        """The reply the responder would give when it is not itself a fault (for delayed and truncated replies)."""
        reply = (self.responder or default_responder)(body)
        return _as_text(default_responder(body) if isinstance(reply, Fault) else reply)

    def _completion(self, body: dict, text: str | None, finish_reason: str = "stop") -> web.Response:
        with self._lock:
            self._completion_ids += 1
            n = self._completion_ids
        prompt_tokens = sum(_words(m.get("content")) for m in body.get("messages", []) if isinstance(m, dict))
        completion_tokens = _words(text)
        choices = [] if text is None else [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
             "logprobs": None}
        ]
        return web.json_response({
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


def _as_text(reply: Reply) -> str:
    return reply if isinstance(reply, str) else json.dumps(reply)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": None}}, status=status,
                             headers=headers)
