"""The vllm backend without vLLM: how a shard's requests are built, and a clear error when vLLM is missing."""

from __future__ import annotations

import importlib.util
from typing import Literal

import pytest
from pydantic import BaseModel

from orforge.core.config import ModelSpec
from orforge.llm.backends import backend_class
from orforge.llm.backends.vllm import build_chat_call
from orforge.llm.hub import LLMHub
from orforge.llm.types import BackendError, LLMRequest


class Verdict(BaseModel):
    verdict: Literal["benign", "toxic"]


def test_build_chat_call_puts_the_schema_in_structured_outputs_and_keeps_sampling(tmp_path):
    spec = ModelSpec(backend="vllm", model="meta-llama/Llama-3.1-8B-Instruct", temperature=0.7, max_tokens=64,
                     system_prompt="Be brief.", extra={"top_p": 0.9})
    with LLMHub(tmp_path / "c.sqlite") as hub:
        llm_like = type("L", (), {"spec": spec})()
        key = {True: spec.answer_key(True), False: spec.answer_key(False)}
        prepared = [hub._prepare(llm_like, LLMRequest.chat("is this ok?", response_model=Verdict, sample_index=3), 0,
                                 key),
                    hub._prepare(llm_like, LLMRequest.chat("free text please"), 1, key)]
    conversations, params = build_chat_call(spec, prepared)
    assert conversations[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "is this ok?"}]
    assert params[0] == {"n": 1, "temperature": 0.7, "max_tokens": 64, "seed": 3, "top_p": 0.9,
                         "structured_outputs": {"json": Verdict.model_json_schema()}}
    assert "structured_outputs" not in params[1] and params[1]["seed"] == 0
    # No `guided_*` argument: those were removed in vLLM 0.12.
    assert not any(k.startswith("guided") for p in params for k in p)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_how_to_install_it(tmp_path):
    with LLMHub(tmp_path / "c.sqlite") as hub, pytest.raises(BackendError, match=r"orforge\[gpu\]"):
        hub.model(ModelSpec(backend="vllm", model="some/model"), "moderator")
    assert backend_class("vllm").__name__ == "VLLMBackend"
