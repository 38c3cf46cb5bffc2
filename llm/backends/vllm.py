"""`vllm` backend: vLLM's offline engine in this process (GPU machines; `pip install 'orforge[gpu]'`).

`vllm` is imported only when a `vllm` spec is used. One `vllm.LLM` per model per run; a batch of requests goes in one
`LLM.chat(...)` call, with structured output through `StructuredOutputsParams(json=schema)` (vLLM >= 0.12; the old
`guided_*` arguments are gone). Requests are built by `build_chat_call`, which needs no vLLM and is unit-tested.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from orforge.core.config import ModelSpec
from orforge.llm.backends import register
from orforge.llm.types import BackendError, Prepared, RawCompletion


def build_chat_call(spec: ModelSpec, batch: list[Prepared]) -> tuple[list[list[dict]], list[dict[str, Any]]]:
    """The conversations and the keyword arguments of each request's `SamplingParams`."""
    conversations = [p.messages for p in batch]
    params = []
    for p in batch:
        kw: dict[str, Any] = {"n": 1, "temperature": p.params["temperature"], "max_tokens": p.params["max_tokens"],
                              "seed": p.params["seed"], **spec.extra}
        if p.schema is not None:
            kw["structured_outputs"] = {"json": p.schema}
        params.append(kw)
    return conversations, params


@register("vllm")
class VLLMBackend:
    def __init__(self, spec: ModelSpec, semaphore: asyncio.Semaphore, hub=None):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise BackendError(
                "the vllm backend needs vLLM on a CUDA machine: pip install 'orforge[gpu]'"
            ) from None
        self.spec = spec
        self.semaphore = semaphore
        self.engine = hub.service(("vllm", spec.model), lambda: _Engine(spec.model)).llm

    def endpoint(self) -> str:
        return f"vLLM offline engine ({self.spec.model})"

    def response_format(self, schema: dict, name: str) -> dict | None:
        return None  # the schema travels in SamplingParams, not in a request field

    def _run(self, batch: list[Prepared]) -> list[RawCompletion]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        conversations, kwargs = build_chat_call(self.spec, batch)
        params = []
        for kw in kwargs:
            so = kw.pop("structured_outputs", None)
            params.append(SamplingParams(**kw, structured_outputs=StructuredOutputsParams(**so) if so else None))
        outputs = self.engine.chat(conversations, params, use_tqdm=False)
        completions = []
        for out in outputs:
            first = out.outputs[0] if out.outputs else None
            completions.append(RawCompletion(
                text=first.text if first else None,
                finish_reason=first.finish_reason if first else None,
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(first.token_ids) if first else 0,
            ))
        return completions

    async def complete(self, batch: list[Prepared]) -> AsyncIterator[tuple[Prepared, RawCompletion | BackendError]]:
        if not batch:
            return
        async with self.semaphore:  # the engine batches internally; one shard call at a time per model
            try:
                completions = await asyncio.to_thread(self._run, batch)
            except Exception as e:  # noqa: BLE001 - an engine error fails this batch, not the run
                for p in batch:
                    yield p, BackendError(f"vLLM engine error: {type(e).__name__}: {e}")
                return
        for p, c in zip(batch, completions):
            yield p, c

    async def aclose(self) -> None:
        return None


class _Engine:
    def __init__(self, model: str):
        import vllm

        self.llm = vllm.LLM(model=model)

    def stop(self) -> None:
        del self.llm
