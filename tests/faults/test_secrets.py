"""An API key given through `api_key_env` reaches the server and nothing else: not the cache, the work dir, the
release, the console, the logs, nor Prefect's records."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner

import orforge.flows.build  # noqa: F401  (Prefect configures logging on first import; caplog must come after that)
from orforge.flows.cli import app
from tests.faults.support import edit_config, files_under
from tests.flows.pipeline import pipeline_responder, write_config

pytestmark = pytest.mark.slow


def _prefect_records() -> str:
    """Everything the test harness's Prefect server holds about runs: artifacts, logs, flow and task runs."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parts = [client.read_artifacts(), client.read_logs(), client.read_flow_runs(), client.read_task_runs()]
    return json.dumps([[item.model_dump(mode="json") for item in part] for part in parts])


def _prefect_database_files() -> list[Path]:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    if not url.startswith("sqlite"):
        return []
    path = Path(url.split(":///", 1)[1])
    return sorted(path.parent.glob(path.name + "*"))


def test_api_key_reaches_the_server_and_nothing_else(prefect_harness, fake_server, tmp_path, monkeypatch, caplog,
                                                      capfd):
    key = "sk-orforge-test-" + secrets.token_hex(20)
    env_name = "ORFORGE_TEST_KEY_" + secrets.token_hex(4).upper()
    monkeypatch.setenv(env_name, key)
    fake_server.responder = pipeline_responder
    config = edit_config(write_config(tmp_path, fake_server.url + "/v1"), specs={"api_key_env": env_name})
    caplog.set_level(logging.DEBUG)

    result = CliRunner().invoke(app, ["build", "--config", str(config), "--output", str(tmp_path / "release")])
    assert result.exit_code == 0, result.output

    # The key was used: every request carried it.
    requests = fake_server.chat_requests
    assert requests and all(r.headers.get("Authorization") == f"Bearer {key}" for r in requests)
    assert env_name in (tmp_path / "release" / "manifest.json").read_text()  # the variable's name is fine to keep

    # ...and it is nowhere else.
    written = files_under(tmp_path)  # cache.sqlite*, work dir, release (manifest, card, report, parquets), config
    assert any(p.name.startswith("cache.sqlite") for p in written) and (tmp_path / "work").is_dir()
    assert (tmp_path / "release" / "report.html").is_file()
    leaks = [str(p) for p in written if key.encode() in p.read_bytes()]
    captured = capfd.readouterr()
    prefect_records, prefect_db = _prefect_records(), _prefect_database_files()
    for name, text in [("CLI output", result.output), ("stdout", captured.out), ("stderr", captured.err),
                       ("log records", "\n".join(r.getMessage() for r in caplog.records)),
                       ("Prefect records", prefect_records)]:
        if key in text:
            leaks.append(name)
    leaks += [str(p) for p in prefect_db if key.encode() in p.read_bytes()]
    assert not leaks, f"the API key leaked into: {leaks}"
    # The places searched did hold this build's traces (so an empty search proves nothing was missed).
    assert any("HTTP Request" in r.getMessage() for r in caplog.records), "the log capture saw no request"
    assert "orforge-funnel" in prefect_records and str(tmp_path / "release") in prefect_records
    assert prefect_db and any(b"orforge-funnel" in p.read_bytes() for p in prefect_db)
