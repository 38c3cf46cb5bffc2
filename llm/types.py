"""What stages send to the llm/ layer and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class LLMRequest:
    """One chat request. `sample_index` keeps sampled answers to the same prompt apart in the cache.

    `item_id` is the caller's id for the thing the request is about (a seed id, a prompt id); it is carried
    through to the result and into failure records, and never reaches the model or the cache key.
    """

    messages: tuple[dict[str, str], ...]
    response_model: type[BaseModel] | None = None
    sample_index: int = 0
    item_id: str = ""

    @staticmethod
    def chat(
        user: str,
        *,
        system: str | None = None,
        response_model: type[BaseModel] | None = None,
        sample_index: int = 0,
        item_id: str = "",
    ) -> LLMRequest:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return LLMRequest(tuple(messages), response_model, sample_index, item_id)


@dataclass
class Usage:
    requests: int = 0  # requests that reached the model (attempts included)
    cached: int = 0  # answers served from the cache
    failures: int = 0  # requests that ended as recorded failures
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None  # what the sent requests' tokens cost at the spec's price; None when it has none

    def add(self, other: Usage) -> None:
        for k in vars(self):
            mine, theirs = getattr(self, k), getattr(other, k)
            setattr(self, k, mine if theirs is None else theirs if mine is None else mine + theirs)

    def as_dict(self) -> dict[str, int | float]:
        """The counts, and the cost when the spec is priced."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class LLMResult:
    """Either `ok` with `text` (and `parsed` when a response model was given), or a failure with `error`."""

    request: LLMRequest
    ok: bool
    text: str | None = None
    parsed: Any = None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class RawCompletion:
    """What a backend returns for one attempt before validation."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BackendError(Exception):
    """A request that failed at the transport or server after the backend's own retries."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CircuitOpenError(RuntimeError):
    """Too many requests to one endpoint failed: the stage stops instead of burning hours on a dead server."""


@dataclass
class Prepared:
    """A request in the backend's terms: final messages, sampling parameters and structured-output dialect."""

    messages: list[dict[str, str]]
    params: dict[str, Any]  # temperature, max_tokens, seed, extra body keys
    schema: dict | None
    key: str
    index: int = 0  # position in the batch
    attempt: int = 0
    meta: dict = field(default_factory=dict)
