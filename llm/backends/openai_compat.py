"""`openai` backend: the AsyncOpenAI client against any OpenAI-compatible server (vLLM serve, OpenAI, llama.cpp).

Transport retries are the openai client's own: it retries 408/409/429/5xx, timeouts and connection errors up to
`max_retries` with jittered exponential backoff and honours `Retry-After`; any other 4xx fails at once with the
server's message. The concurrency cap is a semaphore shared by every spec on the same endpoint and model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import openai

from orforge.core.config import ModelSpec
from orforge.llm.backends import register
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
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=spec.timeout_s),
        )

    def endpoint(self) -> str:
        return f"{self.base_url} ({self.spec.model})"

    def response_format(self, schema: dict, name: str) -> dict | None:
        return response_format(self.spec.dialect, schema, name)

    async def _one(self, req: Prepared) -> RawCompletion:
        kwargs = dict(model=self.spec.model, messages=req.messages, temperature=req.params["temperature"],
                      max_tokens=req.params["max_tokens"], seed=req.params["seed"])
        if req.schema is not None and (fmt := self.response_format(req.schema, req.meta.get("schema_name", "reply"))):
            kwargs["response_format"] = fmt
        if self.spec.extra:
            kwargs["extra_body"] = self.spec.extra
        async with self.semaphore:
            try:
                resp = await self.client.chat.completions.create(**kwargs)
            except openai.APITimeoutError:
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

    async def complete(self, batch: list[Prepared]) -> AsyncIterator[tuple[Prepared, RawCompletion | BackendError]]:
        async def run(req: Prepared):
            try:
                return req, await self._one(req)
            except BackendError as e:
                return req, e

        tasks = [asyncio.ensure_future(run(r)) for r in batch]
        try:
            for fut in asyncio.as_completed(tasks):
                yield await fut
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.client.close()


def _server_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:300]
    return str(e.message)[:300]
