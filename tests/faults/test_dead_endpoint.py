"""A model endpoint with nothing listening: `orforge build` stops with one clear error naming the endpoint, exits 1,
and leaves no release behind."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orforge.flows.cli import app
from tests.faults.support import edit_config, free_port
from tests.flows.pipeline import write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seeds, stopped_by", [
    # Enough seed requests to trip the endpoint's circuit breaker...
    ({"seeds_per_category": 6, "seeds_per_call": 4}, "CircuitOpenError"),
    # ...and too few to trip it: the stage got nothing at all, which must not pass for an empty release.
    ({"seeds_per_category": 2, "seeds_per_call": 2, "max_calls_per_category": 2}, "StageFailedError"),
])
def test_dead_endpoint_stops_the_build_with_exit_1(prefect_harness, tmp_path, seeds, stopped_by):
    endpoint = f"http://127.0.0.1:{free_port()}/v1"
    config = write_config(tmp_path, endpoint)
    raw_seeds = {"model": {"backend": "openai", "base_url": endpoint, "model": "fake-model", "name": "gen",
                           "max_retries": 1, "timeout_s": 5}, **seeds}
    edit_config(config, specs={"max_retries": 1}, seeds=raw_seeds)

    result = CliRunner().invoke(app, ["build", "--config", str(config)])

    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert f"build failed: {stopped_by}" in errors[0] and endpoint in errors[0], errors[0]
    assert "connection error" in errors[0]
    releases = tmp_path / "releases"
    assert not releases.exists() or not any(releases.rglob("*")), sorted(releases.rglob("*"))
