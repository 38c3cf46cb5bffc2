"""Backends behind a registry: one small module per backend, registered by name, heavy imports kept lazy.

A backend turns prepared requests into raw completions. It knows nothing of caching, validation, re-asks or
accounting: the hub (`llm.hub`) does those once for every backend.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import Protocol

from orforge.core.config import ModelSpec
from orforge.llm.types import BackendError, Prepared, RawCompletion


class Backend(Protocol):
    spec: ModelSpec

    def endpoint(self) -> str:
        """A human-readable name for the endpoint (for errors and the circuit breaker); no secrets."""

    def response_format(self, schema: dict, name: str) -> dict | None:
        """The structured-output request field in this backend's dialect."""

    async def complete(self, batch: list[Prepared]) -> AsyncIterator[tuple[Prepared, RawCompletion | BackendError]]:
        """Yield each request with its completion (or the error it ended with) as soon as it is done."""

    async def aclose(self) -> None: ...


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
