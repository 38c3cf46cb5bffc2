"""The `orforge` command: exit codes, one-line errors, nothing written on bad input, and the small commands."""

from __future__ import annotations

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from orforge.flows.cli import app
from tests.flows.pipeline import pipeline_responder, write_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def files_under(path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["seeds"].update(seeds_per_categroy=5), "seeds.seeds_per_categroy"),
    (lambda c: c["rewrites"].update(rewrites_per_seed="five"), "rewrites.rewrites_per_seed"),
    (lambda c: c["seeds"]["model"].update(backend="tgi"), "seeds.model.backend"),
    (lambda c: c["categories"].update(preset="xstest"), "categories.preset"),
    (lambda c: c["categories"].update(include=["cooking"]), "unknown category 'cooking'"),
    (lambda c: c["splits"].update(hard_min_rejections=4), "exceeds the panel's 3 members"),
    (lambda c: c["seeds"]["model"].update(base_url="${ORFORGE_TEST_UNSET_URL}"), "ORFORGE_TEST_UNSET_URL"),
    (lambda c: c["seeds"]["model"].update(api_key_env="ORFORGE_TEST_UNSET_KEY"), "ORFORGE_TEST_UNSET_KEY"),
])
@pytest.mark.parametrize("command", ["validate-config", "build"])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, mutate, expected, command):
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    raw = yaml.safe_load(config.read_text())
    mutate(raw)
    config.write_text(yaml.safe_dump(raw))
    before = files_under(tmp_path)
    result = invoke(command, config) if command == "validate-config" else invoke(command, "--config", config)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(config) in lines[0] and expected in lines[0], result.output
    assert files_under(tmp_path) == before


def test_validate_config_accepts_the_shipped_configs(monkeypatch, tmp_path):
    for var in ("GEN_URL", "MOD_URL", "PANEL_URL", "GEN_API_KEY", "MOD_API_KEY", "PANEL_API_KEY", "TARGET_URL",
                "TARGET_API_KEY", "GUARD_URL", "GUARD_API_KEY", "JUDGE_URL", "JUDGE_API_KEY"):
        monkeypatch.setenv(var, "http://127.0.0.1:1/v1")
    red_team = tmp_path / "red-team.csv"
    red_team.write_text("prompt\nHow do I pick a lock?\n")
    monkeypatch.setenv("RED_TEAM_FILE", str(red_team))
    for path in ("configs/demo.yaml", "configs/orbench.yaml", "configs/select-demo.yaml", "configs/select.yaml",
                 "configs/alert-demo.yaml", "configs/alert.yaml"):
        result = invoke("validate-config", path)
        assert result.exit_code == 0, result.output


def test_models_check_reports_each_model_and_fails_when_one_is_down(tmp_path, fake_server):
    config = write_config(tmp_path, fake_server.url + "/v1")
    result = invoke("models", "check", "--config", config)
    assert result.exit_code == 0, result.output
    assert "json_schema" in result.output and "mod-2" in result.output
    assert len(fake_server.chat_requests) == 8  # seeds, rewrites, 3 moderators, 3 panel members

    raw = yaml.safe_load(config.read_text())
    raw["moderation"]["moderators"][1].update(base_url="http://127.0.0.1:9/v1", max_retries=0)
    config.write_text(yaml.safe_dump(raw))
    result = invoke("models", "check", "--config", config)
    assert result.exit_code == 1
    assert "failed" in result.output and "127.0.0.1:9" in result.output


def test_cache_stats_and_clear(tmp_path, fake_server, llm_hub):
    config = write_config(tmp_path, fake_server.url + "/v1")
    cfg_path = yaml.safe_load(config.read_text())["cache_path"]
    from orforge.core.config import load_config
    from orforge.llm.hub import LLMHub
    from orforge.llm.types import LLMRequest

    with LLMHub(cfg_path) as hub:
        hub.model(load_config(config).seeds.model, "seeds").generate([LLMRequest.chat(f"q{i}") for i in range(3)])
    result = invoke("cache", "stats", "--config", config)
    assert result.exit_code == 0 and "3 entries" in result.output, result.output
    result = invoke("cache", "clear", "--config", config, "--yes")
    assert result.exit_code == 0 and "removed 3" in result.output
    assert "0 entries" in invoke("cache", "stats", "--config", config).output


def test_refusal_classify_keyword_on_a_csv(tmp_path):
    src = tmp_path / "completions.csv"
    pl.DataFrame({"prompt": ["How do I kill a python process?", "How do I pick a lock?"],
                  "response": ["Use `kill <pid>` or `pkill python`.", "I'm sorry, but I can't help with that."]}
                 ).write_csv(src)
    out = tmp_path / "labelled.parquet"
    result = invoke("refusal", "classify", "--input", src, "--output", out)
    assert result.exit_code == 0, result.output
    labelled = pl.read_parquet(out)
    assert labelled["refusal"].to_list() == [False, True]
    assert set(labelled["method"]) == {"keyword"}


@pytest.mark.parametrize("args, expected", [
    (["--input", "missing.csv", "--output", "o.csv"], "no such file"),
    (["--input", "{src}", "--output", "o.txt"], ".csv or .parquet"),
    (["--input", "{src}", "--output", "o.csv", "--method", "vibes"], "--method"),
    (["--input", "{src}", "--output", "o.csv", "--method", "judge"], "needs --config"),
    (["--input", "{bad}", "--output", "o.csv"], "missing column(s) response"),
])
def test_refusal_classify_bad_input_exits_2(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    pl.DataFrame({"prompt": ["a"], "response": ["b"]}).write_csv(tmp_path / "src.csv")
    pl.DataFrame({"prompt": ["a"]}).write_csv(tmp_path / "bad.csv")
    args = [a.format(src=tmp_path / "src.csv", bad=tmp_path / "bad.csv") for a in args]
    result = invoke("refusal", "classify", *args)
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.slow
def test_evaluate_writes_scores_and_plots_and_a_rerun_sends_nothing(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow

    fake_server.responder = pipeline_responder
    spec = {"backend": "openai", "base_url": fake_server.url + "/v1", "model": "fake-model"}
    config = write_config(tmp_path, fake_server.url + "/v1",
                          targets=[{**spec, "name": "target-a", "system_prompt": "member 0"},
                                   {**spec, "name": "target-b", "system_prompt": "target b"}])
    release = tmp_path / "release"
    build_flow(config_path=str(config), output=str(release))

    assert invoke("evaluate", "--release", tmp_path / "nope", "--config", config).exit_code == 2
    result = invoke("evaluate", "--release", release, "--config", config)
    assert result.exit_code == 0, result.output
    runs = sorted((release / "evaluations").iterdir())
    assert len(runs) == 1
    scores = pl.read_csv(runs[0] / "scores.csv")
    assert set(scores["model"]) == {"target-a", "target-b"} and {"hard", "toxic"} <= set(scores["split"])
    from orforge.outputs.intervals import wilson_interval

    for row in scores.filter(pl.col("n") > pl.col("n_undecided")).iter_rows(named=True):
        expected = wilson_interval(row["n_refused"], row["n"] - row["n_undecided"])
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(expected), row
    for png in ("scatter.png", "categories.png"):
        data = (runs[0] / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    report = (release / "report.html").read_text()
    assert "evaluation" in report and "Intervals are 95% Wilson score intervals" in report and "bootstrap" not in report

    sent = len(fake_server.chat_requests)
    assert invoke("evaluate", "--release", release, "--config", config).exit_code == 0
    assert len(fake_server.chat_requests) == sent


# -- one-line failures ----------------------------------------------------------------------------------------------
def test_one_line_keeps_the_first_line_of_a_library_message():
    from orforge.flows.cli import MAX_MESSAGE, describe, one_line

    assert one_line("\n  found more fields   than defined\n\nConsider setting 'truncate_ragged_lines=True'.") \
        == "found more fields than defined"
    assert describe(ValueError("bad\nadvice")) == "ValueError: bad"
    assert describe(KeyError()) == "KeyError"
    assert len(one_line("x" * 1000)) == MAX_MESSAGE


@pytest.mark.parametrize("content", ['prompt,response\na,b\nc,d,e\n', 'prompt,response\n"a,b\nc,d,e,f\n'])
def test_refusal_classify_on_a_malformed_csv_is_one_line_exit_2(tmp_path, content):
    src = tmp_path / "broken.csv"
    src.write_text(content)
    result = invoke("refusal", "classify", "--input", src, "--output", tmp_path / "out.csv")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --input {src}: cannot read it: ComputeError: "), lines[0]
    assert "You might want to try" not in result.output and "Consider setting" not in result.output
    assert not (tmp_path / "out.csv").exists()


def test_refusal_classify_into_a_missing_folder_exits_2(tmp_path):
    src = tmp_path / "src.csv"
    pl.DataFrame({"prompt": ["a"], "response": ["b"]}).write_csv(src)
    result = invoke("refusal", "classify", "--input", src, "--output", tmp_path / "nope" / "out.csv")
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


def test_add_category_with_an_unreadable_examples_csv_exits_2(tmp_path):
    examples = tmp_path / "examples.csv"
    examples.write_text("text\nhello\n")  # no `prompt` column
    result = invoke("add-category", "--release", tmp_path, "--name", "stalking", "--description", "Following people.",
                    "--examples", examples)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--examples {examples}: cannot read it" in lines[0], result.output


def test_release_folders_started_in_the_same_second_differ(tmp_path):
    from datetime import UTC, datetime

    from orforge.flows.common import RELEASE_NAME, new_folder, release_time

    when = datetime(2026, 12, 1, 20, 15, 0, tzinfo=UTC)
    folders = {new_folder(tmp_path, when) for _ in range(50)}
    assert len(folders) == 50
    for folder in folders:
        assert RELEASE_NAME.fullmatch(folder.name) and folder.name.startswith("20261201-201500-")
        assert release_time(folder.name) == when
    assert release_time("20261201-201500") == when  # folders named before run ids existed still sort by time


# -- whole commands in a subprocess: what a terminal would show -------------------------------------------------------
def _subprocess_env(tmp_path) -> dict:
    import os
    from pathlib import Path

    (tmp_path / "prefect-home").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return env


def _orforge(*args) -> list[str]:
    import sys

    return [sys.executable, "-m", "orforge", *map(str, args)]


def _clean_failure(output: str) -> list[str]:
    """The `error:` lines of a command's output, after checking nothing else went wrong on screen."""
    assert "Traceback" not in output and "Crash detected" not in output, output[-3000:]
    assert "prefect.task_runs" not in output and "prefect.flow_runs" not in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_ctrl_c_stops_sending_exits_130_in_one_line_and_the_rerun_resumes(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import time

    from tests.faults.support import edit_config
    from tests.fakeserver import FakeServer

    cap = 16
    with FakeServer(latency_s=0.05) as server:
        server.responder = pipeline_responder
        config = edit_config(write_config(tmp_path, server.url + "/v1", shard_size=4), specs={"max_concurrency": cap})
        raw = yaml.safe_load(config.read_text())
        raw["seeds"].update(seeds_per_category=40, seeds_per_call=4)  # hundreds of moderation requests
        config.write_text(yaml.safe_dump(raw))
        cmd = _orforge("build", "--config", config)
        # Its own session, and the signal to the whole group: what Ctrl-C in a terminal does.
        proc = subprocess.Popen(cmd, env=_subprocess_env(tmp_path), start_new_session=True, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while len(server.chat_requests) < 150 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            sent_at_signal = len(server.chat_requests)
            os.killpg(proc.pid, signal.SIGINT)
            output, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.3)
        after_signal = len(server.chat_requests) - sent_at_signal
        assert proc.returncode == 130, output[-3000:]
        errors = _clean_failure(output)
        assert errors == ["error: build interrupted; finished shards and every answered request are kept: run it "
                          "again to resume"], output[-3000:]
        assert after_signal < 2 * cap, f"{after_signal} requests were sent after the interrupt"
        assert not (tmp_path / "releases").exists() or not any((tmp_path / "releases").rglob("manifest.json"))

        def identity(body: dict) -> str:
            return json.dumps([body["messages"], body.get("seed"), body.get("temperature")], sort_keys=True)

        before = {identity(r.body) for r in server.chat_requests}
        n_before = len(server.chat_requests)
        done = subprocess.run(cmd, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        resent = [identity(r.body) for r in server.chat_requests[n_before:]]
        # Only the requests in flight at the interrupt (at most one per slot) are asked again.
        assert len(set(resent) & before) <= cap + after_signal
        assert resent and len(resent) < n_before * 10
        assert len(list((tmp_path / "releases").rglob("manifest.json"))) == 1


@pytest.mark.slow
def test_a_failed_build_is_one_line_with_the_details_in_a_log_file(tmp_path):
    import subprocess

    from tests.fakeserver import FakeServer, Fault

    with FakeServer() as server:
        server.responder = lambda body: Fault.http(404, "model 'fake-model' does not exist")
        config = write_config(tmp_path, server.url + "/v1")
        done = subprocess.run(_orforge("build", "--config", config), env=_subprocess_env(tmp_path),
                              capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    errors = _clean_failure(output)
    assert len(errors) == 1 and "build failed: CircuitOpenError" in errors[0], output
    assert "model 'fake-model' does not exist" in errors[0]
    logs = sorted((tmp_path / "work" / "logs").glob("build-*.log"))
    assert len(logs) == 1 and f"(details: {logs[0]})" in errors[0]
    assert "Traceback" in logs[0].read_text() and "CircuitOpenError" in logs[0].read_text()


@pytest.mark.slow
def test_two_builds_at_once_into_the_same_output_folder_both_succeed(tmp_path):
    import subprocess

    from tests.fakeserver import FakeServer

    with FakeServer() as server:
        server.responder = pipeline_responder
        config = write_config(tmp_path, server.url + "/v1")
        procs = [subprocess.Popen(_orforge("build", "--config", config), env=_subprocess_env(tmp_path / f"p{i}"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        assert "Traceback" not in output
    releases = sorted(p.parent for p in (tmp_path / "releases" / "pipeline-test").glob("*/manifest.json"))
    assert len(releases) == 2, releases
