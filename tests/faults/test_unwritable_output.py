"""A release that cannot be written. An output path that can never be a folder is invalid input: exit 2 before
anything is sent or written. A disk that fills up while the release is written is a failed run: exit 1, the
release folder and its hidden `.partial-` sibling are gone, and the work done so far is kept for the next run."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orforge.flows.cli import app
from tests.faults.support import files_under
from tests.flows.pipeline import pipeline_responder, write_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("where", ["output under a file", "output is a file", "output_dir under a file",
                                   "work_dir under a file"])
def test_an_output_path_that_cannot_be_a_folder_exits_2_before_anything_runs(tmp_path, fake_server, where):
    config = write_config(tmp_path, fake_server.url + "/v1")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where a folder would have to be\n")
    args = ["build", "--config", config]
    if where == "output under a file":
        args += ["--output", blocker / "release"]
    elif where == "output is a file":
        args += ["--output", blocker]
    else:
        raw = yaml.safe_load(config.read_text())
        key = where.split()[0]
        raw[key] = str(blocker / "sub")
        config.write_text(yaml.safe_dump(raw))
    before = {p: p.read_bytes() for p in files_under(tmp_path)}

    result = invoke(*args)

    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert f"{blocker} is a file" in lines[0]
    if where.startswith(("output_dir", "work_dir")):
        assert f"{config}: {where.split()[0]}" in lines[0]
    assert {p: p.read_bytes() for p in files_under(tmp_path)} == before  # no cache, no work dir, nothing
    assert fake_server.chat_requests == []


def _limit_file_size(limit: int):
    def apply() -> None:
        # Past the limit a write fails with EFBIG ("File too large"), as on a full disk, instead of killing us.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_while_writing_the_release_exits_1_and_leaves_no_partial_folder(prefect_harness, fake_server,
                                                                                    tmp_path):
    from prefect.settings import PREFECT_API_URL

    from orforge.flows.build import build_flow

    # Long category examples make the manifest (which records the config) larger than any file the build writes
    # before it, so a file size limit between the two lets the build run and the release fail at its last file.
    limit = 48 * 1024  # above SQLite's 32 KiB shared-memory file
    examples = [f"Example request number {i}: " + "a long and detailed description of the situation " * 8
                for i in range(2 * limit // 400)]
    # Every quality rule is on: the gate's language detector reads its model in memory, so the limit only stops the
    # release's last file, as a disk that fills there would.
    config = write_config(tmp_path, fake_server.url + "/v1",
                          categories={"preset": "orbench", "include": ["privacy"],
                                      "custom": [{"name": "long-read", "description": "Requests with long context.",
                                                  "examples": examples}]})
    fake_server.responder = pipeline_responder
    reference = tmp_path / "reference"
    build_flow(config_path=str(config), output=str(reference))  # fills the cache and the work dir
    assert (reference / "manifest.json").stat().st_size > limit
    assert max(p.stat().st_size for p in files_under(reference) if p.name != "manifest.json"
               and p.name != "report.html") < limit
    sent = len(fake_server.chat_requests)
    def stored(work: Path) -> dict:  # the cache and shards; a failed command adds its log under logs/, by design
        return {p: p.read_bytes() for p in files_under(work) if "logs" not in p.relative_to(work).parts}

    work_before = stored(tmp_path / "work")

    out = tmp_path / "full-disk" / "release"
    out.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "prefect-home"),
               PYTHONPATH=str(ROOT), GIT_OPTIONAL_LOCKS="0", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "orforge", "build", "--config", str(config), "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(limit))

    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"could not write release {out}" in errors[0] and "File too large" in errors[0], errors[0]
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no `.release.partial-*` sibling left either
    assert len(fake_server.chat_requests) == sent  # everything came from the work dir
    assert stored(tmp_path / "work") == work_before

    # With space again, the same command finishes from what was kept, asking the model nothing.
    result = invoke("build", "--config", config, "--output", out)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and len(fake_server.chat_requests) == sent
    for name in ("benign.csv", "toxic.csv", "hard.csv", "votes.parquet"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
