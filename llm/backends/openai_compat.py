"""`openai` backend: the AsyncOpenAI client against any OpenAI-compatible server (vLLM serve, OpenAI, llama.cpp).

Transport retries are the openai client's own: it retries 408/409/429/5xx, timeouts and connection errors up to
`max_retries` with jittered exponential backoff and honours `Retry-After`; any other 4xx fails at once with the
server's message. The concurrency cap is a semaphore shared by every spec on the same endpoint and model.

The transport is aiohttp (the client's `DefaultAioHttpClient`, extra `openai[aiohttp]`), not httpx's own pool,
which scans every pooled connection on every request (`_assign_requests_to_connections`): py-spy put 30% of a
build's samples in that pool, and a request through aiohttp costs the client a third less CPU (docs/benchmarks.md,
"Whole-build throughput").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import httpx
import openai
from openai.types.chat import ChatCompletion

from orforge.core.config import ModelSpec
from orforge.llm.backends import Outcome, each_as_done, register
from orforge.llm.dialects import response_format
from orforge.llm.types import BackendError, Prepared, RawCompletion


@register("openai")
class OpenAIBackend:
    def __init__(self, spec: ModelSpec, semaphore: asyncio.Semaphore, hub=None, base_url: str | None = None):
        self.spec = spec
        self.base_url = base_url or spec.base_url
        self.semaphore = semaphore
        # The semaphore is the cap; httpx's pool must never be the tighter limit.
        limits = httpx.Limits(max_connections=spec.max_concurrency * 2 + 16,
                              max_keepalive_connections=spec.max_concurrency * 2 + 16)
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=spec.api_key() or "not-needed",
            max_retries=spec.max_retries,
            timeout=spec.timeout_s,
            http_client=openai.DefaultAioHttpClient(limits=limits, timeout=spec.timeout_s),
        )

    def endpoint(self) -> str:
        return f"{self.base_url} ({self.spec.model})"

    def response_format(self, schema: dict, name: str) -> dict | None:
        return response_format(self.spec.dialect, schema, name)

    async def _one(self, req: Prepared) -> RawCompletion:
        body = {"model": self.spec.model, "messages": req.messages, "temperature": req.params["temperature"],
                "max_tokens": req.params["max_tokens"], "seed": req.params["seed"]}
        if req.schema is not None and (fmt := self.response_format(req.schema, req.meta.get("schema_name", "reply"))):
            body["response_format"] = fmt
        body.update(self.spec.extra)  # what `extra_body` does: the spec's extra fields win
        async with self.semaphore:
            try:
                # The client's own POST (its retries, errors and response model) with a body that is plain JSON
                # already: `chat.completions.create` walks every message through its TypedDict transform first,
                # 15% of a build's CPU for a body it leaves unchanged.
                resp = await self.client.post("/chat/completions", body=body, cast_to=ChatCompletion)
            except openai.APITimeoutError as e:
                if (refused := _connection_failure(e)) is not None:
                    raise BackendError(f"connection error to {self.endpoint()}: {refused}") from None
                raise BackendError(f"timeout after {self.spec.timeout_s:g}s from {self.endpoint()}") from None
            except openai.APIConnectionError as e:
                raise BackendError(f"connection error to {self.endpoint()}: {e.__cause__ or e}") from None
            except openai.APIStatusError as e:
                raise BackendError(f"HTTP {e.status_code} from {self.endpoint()}: {_server_message(e)}") from None
            except (openai.OpenAIError, ValueError) as e:
                raise BackendError(f"bad response from {self.endpoint()}: {e}") from None
        usage = resp.usage
        choice = resp.choices[0] if resp.choices else None
        return RawCompletion(
            text=choice.message.content if choice else None,
            finish_reason=choice.finish_reason if choice else None,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    def complete(self, batch: list[Prepared]) -> AsyncIterator[Outcome]:
        return each_as_done(batch, self._outcome)

    async def _outcome(self, req: Prepared) -> Outcome:
        try:
            return req, await self._one(req)
        except BackendError as e:
            return req, e

    async def aclose(self) -> None:
        await self.client.close()


def _connection_failure(e: BaseException) -> BaseException | None:
    """The aiohttp error under a timeout that was none: the transport reports every aiohttp connection error (refused,
    reset, closed without a reply) as a connect timeout. None for a real timeout."""
    cause = e.__cause__ or e.__context__
    while cause is not None and not isinstance(cause, aiohttp.ClientError | asyncio.TimeoutError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, aiohttp.ServerTimeoutError):
        return cause
    return None


def _server_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:300]
    return str(e.message)[:300]
