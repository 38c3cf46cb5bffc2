"""Shared fixtures: the loopback OpenAI-compatible server, specs pointing at it, and a hub on a temporary cache."""

from __future__ import annotations

import os

# Before anything imports sentence-transformers or Prefect: no network for model files, quiet and patient Prefect.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

from tests.fakeserver import FakeServer  # noqa: E402

FAKE_MODEL = "fake-model"


@pytest.fixture
def fake_server():
    """A fresh FakeServer per test (starting one takes about a millisecond), stopped afterwards.

    A test whose responder raised fails at teardown: the server answers such requests with a 400, which the code
    under test may record as an ordinary failure, and the broken script would otherwise go unnoticed.
    Set `fake_server.expect_responder_errors = True` to allow it.
    """
    server = FakeServer(models=[FAKE_MODEL]).start()
    server.expect_responder_errors = False
    try:
        yield server
    finally:
        server.stop()
    if server.responder_errors and not server.expect_responder_errors:
        pytest.fail(f"the fake server's responder raised: {server.responder_errors[0]}")


@pytest.fixture
def make_spec(fake_server):
    """`make_spec(**overrides)` -> a ModelSpec for the fake server, with test-friendly timeouts and retries."""
    from orforge.core.config import ModelSpec

    def make(**overrides) -> ModelSpec:
        fields = {
            "backend": "openai",
            "base_url": fake_server.url + "/v1",
            "model": FAKE_MODEL,
            "timeout_s": 10.0,
            "max_retries": 2,
            **overrides,
        }
        return ModelSpec(**fields)

    return make


@pytest.fixture
def cache_path(tmp_path):
    return tmp_path / "cache" / "cache.sqlite"


@pytest.fixture
def llm_hub(cache_path):
    """An LLMHub on a cache file in the test's temporary folder, closed afterwards."""
    from orforge.llm.hub import LLMHub

    hub = LLMHub(cache_path)
    try:
        yield hub
    finally:
        hub.close()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every test that runs a real flow (starting one takes 10-25 s here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
