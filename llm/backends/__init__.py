"""Backends behind a registry: one small module per backend, registered by name, heavy imports kept lazy.

A backend turns prepared requests into raw completions. It knows nothing of caching, validation, re-asks or
accounting: the hub (`llm.hub`) does those once for every backend.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from orforge.core.config import ModelSpec
from orforge.llm.types import BackendError, Prepared, RawCompletion


class Backend(Protocol):
    spec: ModelSpec

    def endpoint(self) -> str:
        """A human-readable name for the endpoint (for errors and the circuit breaker); no secrets."""

    def response_format(self, schema: dict, name: str) -> dict | None:
        """The structured-output request field in this backend's dialect."""

    def complete(self, batch: list[Prepared]) -> AsyncIterator[Outcome]:
        """Yield each request with its completion (or the error it ended with) as soon as it is done (an async
        generator, or `each_as_done` over a per-request coroutine); closing it early cancels what is in flight."""

    async def aclose(self) -> None: ...


Outcome = tuple[Prepared, RawCompletion | BackendError]


async def each_as_done(batch: list[Prepared], run: Callable[[Prepared], Awaitable[Outcome]]) -> AsyncIterator[Outcome]:
    """`run` on every request of `batch` at once, each outcome yielded as soon as it is done (what `complete` does).

    When the consumer stops early or `run` raises, the requests still running are cancelled and waited for."""
    tasks = [asyncio.ensure_future(run(p)) for p in batch]
    try:
        for fut in asyncio.as_completed(tasks):
            yield await fut
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_MODULES = {"openai": "orforge.llm.backends.openai_compat", "local": "orforge.llm.backends.local", "vllm": "orforge.llm.backends.vllm"}
_REGISTRY: dict[str, type] = {}


def register(name: str):
    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def backend_class(name: str) -> type:
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise ValueError(f"unknown backend {name!r}; known: {sorted(_MODULES)}")
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]
