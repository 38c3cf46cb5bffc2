"""One definition of what changes a model's answer, shared by the request cache and the stored shards' keys."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from orforge.core.config import AnswerSettings, ModelEndpoint, ModelLabel, ModelSpec
from orforge.flows.build import _spec_key as shard_key_part
from orforge.llm.cache import cache_key
from orforge.llm.hub import LLMHub
from orforge.llm.types import LLMRequest

GROUPS = {"answer": AnswerSettings, "endpoint": ModelEndpoint, "label": ModelLabel}

# A second valid value for every field, so each one can be changed alone. A new field without one fails below.
ANSWER_CHANGES = {
    "backend": "vllm",
    "model": "other-model",
    "temperature": 0.7,
    "max_tokens": 64,
    "structured_output": "none",
    "system_prompt": "Answer in one sentence.",
    "extra": {"top_p": 0.5},
}
ENDPOINT_CHANGES = {
    "base_url": "http://10.0.0.7:9000/v1",
    "api_key_env": "SOME_PROVIDER_KEY",
    "max_concurrency": 3,
    "timeout_s": 7.5,
    "max_retries": 0,
}
BASE = {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "fake-model"}
MESSAGES = [{"role": "user", "content": "Is this harmful?"}]
SCHEMA = {"type": "object", "properties": {"verdict": {"type": "string"}}, "required": ["verdict"]}


class Verdict(BaseModel):
    verdict: str


def request_key(spec: ModelSpec) -> str:
    """The key the hub gives a structured request with this spec."""
    return cache_key(spec.answer_key(), MESSAGES, SCHEMA, 0)


def test_every_spec_field_is_declared_in_exactly_one_group():
    """A field added to ModelSpec itself, or to two groups, fails here: it must say whether it changes answers."""
    for field in ModelSpec.model_fields:
        owners = [group for group, cls in GROUPS.items() if field in cls.model_fields]
        assert len(owners) == 1, f"ModelSpec.{field} is declared in {owners or 'no group'}"
    assert set(ModelSpec.model_fields) == set().union(*(cls.model_fields for cls in GROUPS.values()))
    assert set(ModelLabel.model_fields) == {"name", "price"}, \
        "only the label and the price may sit outside answers and endpoint"
    # Every field of the two groups has a change to try in the tests below.
    assert set(ANSWER_CHANGES) == set(AnswerSettings.model_fields)
    assert set(ENDPOINT_CHANGES) == set(ModelEndpoint.model_fields)


def test_the_views_hold_their_groups_fields():
    spec = ModelSpec(**BASE, name="judge-a", temperature=0.3, timeout_s=9.0)
    assert spec.answer_settings.model_dump() == {f: getattr(spec, f) for f in AnswerSettings.model_fields}
    assert spec.answer_settings.structured_output == "json_schema"  # resolved from the backend
    assert spec.endpoint.model_dump() == {f: getattr(spec, f) for f in ModelEndpoint.model_fields}
    assert spec.endpoint.timeout_s == 9.0 and spec.answer_settings.temperature == 0.3


@pytest.mark.parametrize("field", sorted(ANSWER_CHANGES))
def test_changing_what_is_asked_changes_the_request_key_and_the_shard_key(field):
    before, after = ModelSpec(**BASE), ModelSpec(**{**BASE, field: ANSWER_CHANGES[field]})
    assert getattr(before, field) != getattr(after, field)
    assert request_key(before) != request_key(after)
    assert shard_key_part(before) != shard_key_part(after)


@pytest.mark.parametrize("field", sorted(ENDPOINT_CHANGES))
def test_changing_where_it_is_sent_changes_neither_key(field):
    before, after = ModelSpec(**BASE), ModelSpec(**{**BASE, field: ENDPOINT_CHANGES[field]})
    assert getattr(before, field) != getattr(after, field)
    assert request_key(before) == request_key(after)
    assert shard_key_part(before) == shard_key_part(after)


def test_the_name_changes_the_shard_key_but_not_the_request_key():
    """Records carry the label, so a renamed moderator needs new shards; its answers are the same ones."""
    plain, named = ModelSpec(**BASE), ModelSpec(**BASE, name="moderator-a")
    assert request_key(plain) == request_key(named)
    assert shard_key_part(plain) != shard_key_part(named)
    # A name equal to the model is the same label, so the same records.
    assert shard_key_part(plain) == shard_key_part(ModelSpec(**BASE, name="fake-model"))


def test_a_price_changes_neither_key():
    """Prices are accounting: pricing a model, or changing its price, keeps every cached answer and stored shard."""
    plain = ModelSpec(**BASE)
    priced = ModelSpec(**BASE, price={"input_per_million": 0.15, "output_per_million": 0.6})
    dearer = ModelSpec(**BASE, price={"input_per_million": 3.0, "output_per_million": 15.0, "currency": "EUR"})
    assert request_key(plain) == request_key(priced) == request_key(dearer)
    assert shard_key_part(plain) == shard_key_part(priced) == shard_key_part(dearer)
    assert priced.cost(1_000_000, 2_000_000) == pytest.approx(0.15 + 1.2) and plain.cost(10, 10) is None


def test_the_default_dialect_and_the_same_dialect_written_out_are_one_key():
    assert ModelSpec(**BASE).answer_key() == ModelSpec(**BASE, structured_output="json_schema").answer_key()


def test_the_dialect_does_not_enter_the_key_of_a_request_without_a_schema():
    plain, other = ModelSpec(**BASE), ModelSpec(**BASE, structured_output="none")
    assert plain.answer_key(structured=False) == other.answer_key(structured=False)
    assert plain.answer_key(structured=True) != other.answer_key(structured=True)
    assert ModelSpec(**BASE, temperature=0.5).answer_key(structured=False) != plain.answer_key(structured=False)


def test_through_the_hub_endpoint_changes_are_cache_hits_and_answer_changes_are_not(fake_server, make_spec,
                                                                                    cache_path, monkeypatch):
    monkeypatch.setenv("SOME_PROVIDER_KEY", "sk-test")
    requests = [LLMRequest.chat(f"question {i}", response_model=Verdict) for i in range(3)]
    with LLMHub(cache_path) as hub:
        assert all(r.ok for r in hub.model(make_spec(), "probe").generate(requests))
    sent = len(fake_server.chat_requests)
    assert sent == 3

    moved = {**ENDPOINT_CHANGES, "base_url": fake_server.url.replace("127.0.0.1", "localhost") + "/v1"}
    with LLMHub(cache_path) as hub:
        for field, value in moved.items():
            results = hub.model(make_spec(**{field: value}), "probe").generate(requests)
            assert all(r.ok and r.cached for r in results), field
        assert len(fake_server.chat_requests) == sent
        # The vllm backend needs its offline engine, so it is left to the unit test above; json_object is the
        # other dialect the fake server reads a schema from.
        for field, value in {**ANSWER_CHANGES, "structured_output": "json_object"}.items():
            if field == "backend":
                continue
            results = hub.model(make_spec(**{field: value}), "probe").generate(requests)
            assert all(r.ok and not r.cached for r in results), field
            sent += 3
            assert len(fake_server.chat_requests) == sent, field
