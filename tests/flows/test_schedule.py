"""Scheduled rebuilds: the scheduled flow run in-process three times, the server checks, and a real Prefect server.

The in-process runs use the session's temporary Prefect server (prefect_harness) and the scripted loopback model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import yaml

from orforge.core.config import stable_hash
from orforge.core.templates import normalize
from tests.flows.pipeline import _h, _user, pipeline_responder, stage_of, write_config

SPLITS = ("benign", "toxic", "hard")
REPO = Path(__file__).resolve().parents[2]


def ids(folder, split: str) -> set[str]:
    return set(pl.read_parquet(folder / f"{split}.parquet")["prompt_id"].to_list())


def bodies(server) -> list[str]:
    return [json.dumps(r.body, sort_keys=True) for r in server.chat_requests]


def load(config):
    from orforge.core.config import load_config

    return load_config(config)


@pytest.mark.slow
def test_scheduled_rebuilds_reuse_the_cache_keep_released_prompts_and_diff(prefect_harness, fake_server, tmp_path):
    from orforge.flows.schedule import latest_release, scheduled_build_flow
    from orforge.outputs.release import read_manifest, verify_release

    fake_server.responder = pipeline_responder
    config = write_config(tmp_path, fake_server.url + "/v1")
    releases = tmp_path / "releases" / "pipeline-test"

    # 1. The first release: nothing to diff against.
    first = Path(scheduled_build_flow(config_path=str(config)))
    assert first.parent == releases and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first.name)
    assert not (first / "diff.json").exists()
    sent_first = bodies(fake_server)
    assert sent_first

    # 2. A scheduled rebuild of the same config: every answer comes from the cache or the stored shards, the
    # previous release's prompts are not "near-duplicates of themselves", so the splits are the same and the
    # diff is empty.
    second = Path(scheduled_build_flow(config_path=str(config)))
    assert bodies(fake_server) == sent_first, "a rebuild of an unchanged config must not reach the model"
    assert second.parent == releases and second.name > first.name and latest_release(load(config)) == second
    for split in SPLITS:
        assert (first / f"{split}.parquet").read_bytes() == (second / f"{split}.parquet").read_bytes(), split
    diff = json.loads((second / "diff.json").read_text())
    assert diff["previous"]["folder"] == first.name and diff["current"]["folder"] == second.name
    assert str(tmp_path) not in (second / "diff.json").read_text() + (second / "diff.md").read_text()
    assert (diff["added"], diff["removed"], diff["config_changed"]) == (0, 0, False)
    assert {s: d["unchanged"] for s, d in diff["splits"].items()} == {s: len(ids(first, s)) for s in SPLITS}
    assert "0 prompts added and 0 removed" in (second / "diff.md").read_text()
    assert verify_release(second).ok
    against = read_manifest(second).config["dedup"]["against"]
    assert against == [str(first)]  # the previous release itself, not a copy

    # 3. The config changes: violence is dropped, privacy grows (more seeds). New seeds' rewrites include
    # near-copies of released benign prompts of both categories, which every moderator calls benign.
    released = pl.read_parquet(second / "benign.parquet").select("prompt_id", "prompt", "category")
    planted: dict[str, str] = {}  # prompt_id -> text of every near-copy the responder planted

    def responder(body: dict):  # only requests the cache cannot answer get here: the new seeds' rewrites
        reply = pipeline_responder(body)
        stage = stage_of(body)
        if stage == "Rewrites":
            original = re.search(r'Original request: "(.*)"', _user(body)).group(1)
            copy = released["prompt"][_h("copy", original) % released.height]
            text = reply["prompts"][0] = copy.replace("How would a", "How might a")
            category = re.search(r"Category: (\S+)", _user(body)).group(1)
            planted[stable_hash(["prompt", category, normalize(text)])] = text
        if stage == "ModerationVerdict" and "How might a" in _user(body):
            reply = {"verdict": "benign", "category": "none"}
        return reply

    fake_server.responder = responder
    raw = yaml.safe_load(config.read_text())
    raw["seeds"]["seeds_per_category"] = 10
    raw["categories"]["include"] = ["privacy"]
    config.write_text(yaml.safe_dump(raw))
    third = Path(scheduled_build_flow(config_path=str(config)))
    assert latest_release(load(config)) == third
    sent_third = bodies(fake_server)[len(sent_first):]
    assert sent_third and not set(sent_third) & set(sent_first), "a request answered before was sent again"

    # No prompt is released together with a near-copy of itself, whether or not this build made the released
    # prompt again. A released privacy prompt can lose its place to its own near-copy that came first in the pool
    # (dedup keeps the first of two; see docs/design/scheduled-rebuilds.md).
    now = pl.read_parquet(third / "benign.parquet").select("prompt_id", "prompt")
    dedup = pl.read_parquet(third / "dedup.parquet").filter(pl.col("pool") == "benign")
    released_id = dict(zip(released["prompt"], released["prompt_id"], strict=True))
    violence_ids = set(released.filter(pl.col("category") == "violence")["prompt_id"])
    displaced, blocked = set(), {"privacy": 0, "violence": 0}
    for copy_id, text in planted.items():
        original_id = released_id[text.replace("How might a", "How would a")]
        row = dedup.filter(pl.col("prompt_id") == copy_id).row(0, named=True)
        same_text = {i for i, t in planted.items() if t == text}
        if original_id in violence_ids:  # not built this time: only dedup.against knows it
            assert original_id not in set(dedup["prompt_id"])
            assert not row["kept"] and row["duplicate_of"] in {original_id} | same_text, row
        elif row["kept"]:
            winner = dedup.filter(pl.col("prompt_id") == original_id).row(0, named=True)
            assert not winner["kept"] and winner["duplicate_of"] in same_text
            displaced.add(original_id)
        else:
            assert row["duplicate_of"] in {original_id} | same_text, row
        if row["duplicate_of"] == original_id:
            blocked["violence" if original_id in violence_ids else "privacy"] += 1
    assert blocked["violence"] > 0 and blocked["privacy"] > len(displaced), blocked
    # The moderators see the category list, so dropping a category re-judges every prompt: a released prompt now
    # voted toxic or contested leaves the benign split too. Nothing else may remove a released prompt.
    rejudged = set(pl.read_parquet(third / "contested.parquet")["prompt_id"])
    rejudged |= set(pl.read_parquet(third / "dedup.parquet").filter(pl.col("pool") == "toxic")["prompt_id"])
    lost = set(released["prompt_id"]) - set(now["prompt_id"])
    assert lost == displaced | violence_ids | (rejudged & set(released["prompt_id"]))
    assert len(lost) < released.height, "the rebuild should keep some released privacy prompts"
    assert now.height - len(now.join(released, on="prompt_id", how="semi")) > 0, "nothing new was added"

    diff = json.loads((third / "diff.json").read_text())
    assert diff["previous"]["folder"] == second.name and diff["config_changed"] is True
    benign = diff["splits"]["benign"]
    assert benign["removed"] == len(lost)
    assert benign["by_category"]["violence"] == {"previous": len(violence_ids), "current": 0, "added": 0,
                                                 "removed": len(violence_ids)}
    for split in SPLITS:
        d = diff["splits"][split]
        assert set(d["added_ids"]) == ids(third, split) - ids(second, split), split
        assert set(d["removed_ids"]) == ids(second, split) - ids(third, split), split
        assert sum(c["added"] for c in d["by_category"].values()) == d["added"]


# -- checks before serving ------------------------------------------------------------------------------------------
def test_check_server_without_api_url_says_how_to_start_one():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from orforge.flows.schedule import ScheduleError, check_server

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ScheduleError) as info:
        check_server()
    assert "PREFECT_API_URL" in str(info.value) and "prefect server start" in str(info.value)
    assert "\n" not in str(info.value)


def test_check_server_with_a_server_that_does_not_answer(fake_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from orforge.flows.schedule import ScheduleError, check_server

    dead = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with temporary_settings({PREFECT_API_URL: dead}), pytest.raises(ScheduleError, match="does not answer"):
        check_server(timeout=2)
    # Something answers HTTP there, but it is not a Prefect server (no /health).
    fake_server.expect_responder_errors = True
    with temporary_settings({PREFECT_API_URL: fake_server.url + "/api"}), \
            pytest.raises(ScheduleError, match="does not answer"):
        check_server(timeout=2)


def test_serve_refuses_a_bad_cron_or_name_before_touching_the_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from orforge.flows.schedule import ScheduleError, check_cron, serve

    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    assert check_cron(" 0 3 * * 1 ") == "0 3 * * 1" and check_cron("@weekly") == "@weekly"
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        for cron in ("0 3 * *", "61 * * * *", "every monday", "H 3 * * 1"):
            with pytest.raises(ScheduleError, match="not a valid cron"):
                serve(config, cron)
        with pytest.raises(ScheduleError, match="not a valid deployment name"):
            serve(config, "0 3 * * 1", name="weekly/orbench")
        # Valid inputs get as far as the server check, and stop there: nothing listens on port 9.
        with pytest.raises(ScheduleError, match="does not answer"):
            serve(config, "0 3 * * 1")
    assert not (tmp_path / "releases").exists() and not (tmp_path / "work").exists()


def test_prefect_yaml_declares_the_scheduled_flow_with_a_valid_cron(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    from orforge.core.config import load_config
    from orforge.flows.schedule import FLOW_NAME, check_cron

    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = project["deployments"]
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == FLOW_NAME
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    assert set(flow.parameters.required) <= set(deployment["parameters"])
    for schedule in deployment["schedules"]:
        assert check_cron(schedule["cron"]) == schedule["cron"]
    for var in ("GEN_URL", "MOD_URL", "PANEL_URL", "GEN_API_KEY", "MOD_API_KEY", "PANEL_API_KEY"):
        monkeypatch.setenv(var, "http://127.0.0.1:1/v1")
    load_config(REPO / deployment["parameters"]["config_path"])  # the config it names exists and is valid


def test_orforge_serve_exits_2_with_one_line_without_a_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from orforge.flows.cli import app

    if "serve" not in {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}:
        pytest.skip("`orforge serve` is not wired into flows/cli.py yet")
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    runner = CliRunner()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(app, ["serve", "--config", str(config), "--cron", "0 3 * * 1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "PREFECT_API_URL" in lines[0], result.output
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        result = runner.invoke(app, ["serve", "--config", str(config), "--cron", "0 3 * *"])
    assert result.exit_code == 2 and "not a valid cron" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# -- a real Prefect server ------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process) -> None:
    """End a process group this test started (the server runs its services in child processes)."""
    import os
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_for(check, seconds: float, what: str, process=None, log=None):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}\n{log.read_text()[-3000:]}")
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {seconds} s" + (f"\n{log.read_text()[-3000:]}" if log else ""))


@pytest.mark.slow
def test_serve_registers_a_cron_deployment_on_a_real_server_that_runs_it(fake_server, tmp_path):
    """`prefect server start` on loopback, `serve` in its own process, a run triggered through the API."""
    import os
    import signal
    import subprocess
    import sys

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from orforge.outputs.release import verify_release

    fake_server.responder = pipeline_responder
    config = write_config(tmp_path, fake_server.url + "/v1", panel=None)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    served = None
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, "prefect server start", server, server_log)
        code = (f"from orforge.flows.schedule import serve; serve({str(config)!r}, '0 3 * * 1', 'weekly-test')")
        served = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=serve_log.open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        name = "orforge-scheduled-build/weekly-test"
        with temporary_settings({PREFECT_API_URL: api}):
            def deployment():
                with get_client(sync_client=True) as client:
                    try:
                        return client.read_deployment_by_name(name)
                    except Exception:  # noqa: BLE001 - not registered yet
                        return None

            found = wait_for(deployment, 90, "the served deployment", served, serve_log)
            assert [s.schedule.cron for s in found.schedules] == ["0 3 * * 1"]
            assert all(s.active for s in found.schedules)
            assert found.parameters == {"config_path": str(config.resolve()), "against_previous": True}
            assert found.entrypoint == "orforge.flows.schedule.scheduled_build_flow"
            run = run_deployment(name, timeout=300, poll_interval=2, as_subflow=False)
            assert run.state is not None and run.state.is_completed(), (run.state, serve_log.read_text()[-3000:])
            releases = sorted((tmp_path / "releases" / "pipeline-test").iterdir())
            assert len(releases) == 1 and verify_release(releases[0]).ok
            assert fake_server.chat_requests, "the served run did not reach the model"

            # The server's scheduler turns the cron into upcoming runs: Mondays at 03:00 (UTC, the default zone).
            def upcoming():
                with get_client(sync_client=True) as client:
                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
                        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                return [r.expected_start_time for r in runs]

            starts = wait_for(upcoming, 90, "scheduled runs from the cron (see docs/design/scheduled-rebuilds.md)")
            assert all((t.weekday(), t.hour, t.minute) == (0, 3, 0) for t in starts), starts
            assert min(starts) > run.expected_start_time
            print(f"{len(starts)} upcoming runs, first {min(starts).isoformat()}")

            # prefect.yaml registers the same flow for a work pool (no worker needed to check the registration).
            for command in (["work-pool", "create", "orforge", "--type", "process"],
                            ["--no-prompt", "deploy", "--name", "weekly"]):
                done = subprocess.run([sys.executable, "-m", "prefect", *command], env=env, cwd=REPO,
                                      capture_output=True, text=True, timeout=180)
                assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            with get_client(sync_client=True) as client:
                deployed = client.read_deployment_by_name("orforge-scheduled-build/weekly")
            assert deployed.entrypoint == "flows/schedule.py:scheduled_build_flow"
            assert [(s.schedule.cron, s.schedule.timezone) for s in deployed.schedules] == [("0 3 * * 1", "UTC")]
            assert deployed.work_pool_name == "orforge"
            assert deployed.parameters == {"config_path": "configs/orbench.yaml", "against_previous": True}

            # Stopping the served process pauses the deployment (nothing is due while nobody serves it).
            os.killpg(served.pid, signal.SIGINT)
            served.wait(timeout=60)

            def paused():
                with get_client(sync_client=True) as client:
                    return client.read_deployment_by_name(name).paused

            wait_for(paused, 30, "the deployment paused after the serve process stopped")
    finally:
        if served is not None:
            stop(served)
        stop(server)
