"""Kill -9 in the middle of the rewrite stage, run the same command again: it finishes, nothing is lost, and no
request that had completed before the kill is sent again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fakeserver import FakeServer, Fault
from tests.flows.pipeline import pipeline_responder, stage_of, write_config

pytestmark = pytest.mark.slow
ORFORGE = [sys.executable, "-m", "orforge"]
ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    return env


class Gate:
    """Answers normally until `limit` rewrite requests were answered; after that it stalls every new one."""

    def __init__(self, limit: int):
        self.limit, self.answered, self.closed = limit, [], threading.Event()
        self.lock = threading.Lock()

    def __call__(self, body: dict):
        if stage_of(body) == "Rewrites" and not self.closed.is_set():
            with self.lock:
                if len([b for b in self.answered if stage_of(b) == "Rewrites"]) >= self.limit:
                    self.closed.set()
        if self.closed.is_set() and stage_of(body) == "Rewrites":
            return Fault.delay(60)
        reply = pipeline_responder(body)
        with self.lock:
            self.answered.append(body)
        return reply


def _identity(body: dict) -> str:
    return json.dumps([body["messages"], body.get("seed"), body.get("temperature")], sort_keys=True)


def test_kill_during_rewrites_then_resume(prefect_harness, tmp_path):
    from orforge.flows.build import build_flow

    with FakeServer() as reference_server:  # what an uninterrupted build produces
        reference_server.responder = pipeline_responder
        ref_dir = tmp_path / "ref"
        ref_dir.mkdir()
        build_flow(config_path=str(write_config(ref_dir, reference_server.url + "/v1")), output=str(ref_dir / "out"))

    gate = Gate(limit=4)
    with FakeServer() as server:
        server.responder = gate
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        config = write_config(run_dir, server.url + "/v1", shard_size=3)
        out = run_dir / "out"
        cmd = [*ORFORGE, "build", "--config", str(config), "--output", str(out)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert gate.closed.wait(240), "the build never reached the rewrite stage"
            time.sleep(1.5)  # let the answered requests land in the cache
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        assert not out.exists(), "a killed build must not leave a release folder"
        answered_before = [_identity(b) for b in gate.answered]
        sent_before = len(server.chat_requests)

        server.responder = pipeline_responder
        done = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

        resent = [_identity(r.body) for r in server.chat_requests[sent_before:]]
        again = set(answered_before) & set(resent)
        assert not again, f"{len(again)} requests answered before the kill were sent again"
        assert len(resent) > 0

    for name in ("benign.csv", "toxic.csv", "hard.csv", "votes.parquet", "dedup.parquet"):
        assert (out / name).read_bytes() == (ref_dir / "out" / name).read_bytes(), name
