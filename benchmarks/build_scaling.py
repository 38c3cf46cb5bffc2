"""Warm rebuilds and Prefect's share of a build, on the scripted loopback model (tests/flows/pipeline.py).

1. Warm rebuild: a build of a few thousand candidates cold, then the same command warm (shards reused), then warm
   with the work dir deleted (request cache only): wall time of each and requests that reached the server.
2. Prefect overhead: the same build at two sizes; task runs per build (they must grow with shards, not prompts),
   and wall time through Prefect vs the same stages called directly (task.fn) on a warm request cache.

    .venv/bin/python benchmarks/build_scaling.py [--seeds-per-category 100]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import footer, header, table  # noqa: E402

import orforge.flows  # noqa: E402,F401  (Prefect environment defaults)


def _serve(conn) -> None:
    from tests.fakeserver import FakeServer
    from tests.flows.pipeline import pipeline_responder

    server = FakeServer(responder=pipeline_responder).start()
    conn.send(server.port)
    while (message := conn.recv()) == "count":
        conn.send(len(server.chat_requests))
    server.stop()


class PipelineServer:
    """The scripted pipeline model in a child process, so the server's CPU is not the build's."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        self.base_url = f"http://127.0.0.1:{self.conn.recv()}/v1"

    def requests(self) -> int:
        self.conn.send("count")
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(15)


class Direct:
    """A finished 'future' for running the stages without Prefect."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def without_prefect():
    """Swap the build's tasks for direct calls of their functions (what the stages cost with no orchestration)."""
    import orforge.flows.build as fb

    saved = {name: getattr(fb, name) for name in ("seeds_task", "rewrites_task", "moderation_task", "answer_task",
                                                  "dedup_task")}

    class Shim:
        def __init__(self, task):
            self.fn = task.fn

        def submit(self, *args, **kwargs):
            return Direct(self.fn(*args, **kwargs))

        def __call__(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    for name, task in saved.items():
        setattr(fb, name, Shim(task))
    return lambda: [setattr(fb, name, task) for name, task in saved.items()]


def config(root: Path, base_url: str, seeds_per_category: int) -> Path:
    from tests.flows.pipeline import write_config

    root.mkdir(parents=True, exist_ok=True)
    return write_config(root, base_url, shard_size=250,
                        categories={"preset": "orbench", "include": ["privacy", "violence", "deception", "hate"]},
                        seeds={"model": {"backend": "openai", "base_url": base_url, "model": "fake-model",
                                         "name": "gen", "max_concurrency": 32},
                               "seeds_per_category": seeds_per_category, "seeds_per_call": 20})


def timed_build(cfg_path: Path, out: Path) -> float:
    from orforge.flows.build import build_flow

    start = time.perf_counter()
    build_flow(config_path=str(cfg_path), output=str(out))
    return time.perf_counter() - start


def task_runs(flow_name: str = "orforge-build") -> list[int]:
    """Task runs of each build flow run so far, oldest first, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = sorted(client.read_flow_runs(), key=lambda r: r.created)
        return [len(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id]))))
                for r in runs if r.name and r.flow_id]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds-per-category", type=int, default=100)
    args = parser.parse_args()
    header("Warm rebuild and Prefect overhead (scripted loopback model, MiniLM dedup)", ("prefect", "polars"))
    from prefect.testing.utilities import prefect_test_harness

    from orforge.core.config import load_config
    from orforge.flows.build import build
    from orforge.outputs.release import read_manifest

    server = PipelineServer()
    tmp = Path(tempfile.mkdtemp(prefix="orforge-bench-"))
    try:
        with prefect_test_harness(server_startup_timeout=120):
            rows = []
            cfg = config(tmp / "big", server.base_url, args.seeds_per_category)
            before = server.requests()
            cold = timed_build(cfg, tmp / "big" / "cold")
            cold_requests = server.requests() - before
            candidates = read_manifest(tmp / "big" / "cold").counts.votes // 3
            before = server.requests()
            warm = timed_build(cfg, tmp / "big" / "warm")
            warm_requests = server.requests() - before
            shutil.rmtree(tmp / "big" / "work")
            before = server.requests()
            cache_only = timed_build(cfg, tmp / "big" / "cache-only")
            cache_requests = server.requests() - before
            rows += [("cold", f"{cold:.1f}", cold_requests, "100%"),
                     ("warm (shards reused)", f"{warm:.1f}", warm_requests, f"{100 * warm / cold:.1f}%"),
                     ("warm (request cache only)", f"{cache_only:.1f}", cache_requests,
                      f"{100 * cache_only / cold:.1f}%")]
            print(f"\n1. Warm rebuild: {candidates} candidates, 4 categories, shard_size 250 (goal: warm sends 0 "
                  "requests and takes < 10% of cold)")
            print(table(("run", "wall s", "requests sent", "of cold"), rows))

            # Prefect overhead: a smaller build and the big one, through Prefect and without it (warm cache,
            # no shard files, so every stage really runs and every request is a cache hit).
            small = config(tmp / "small", server.base_url, max(10, args.seeds_per_category // 4))
            timed_build(small, tmp / "small" / "cold")
            rows = []
            for label, cfg_path in (("small", small), ("big", cfg)):
                shutil.rmtree(cfg_path.parent / "work", ignore_errors=True)
                with_prefect = timed_build(cfg_path, cfg_path.parent / f"prefect-{time.time_ns()}")
                n_tasks = task_runs()[-1]
                votes = read_manifest(cfg_path.parent / "cold").counts.votes
                shutil.rmtree(cfg_path.parent / "work", ignore_errors=True)
                restore = without_prefect()
                try:
                    start = time.perf_counter()
                    build(load_config(cfg_path), cfg_path.parent / f"direct-{time.time_ns()}")
                    direct = time.perf_counter() - start
                finally:
                    restore()
                rows.append((label, votes // 3, n_tasks, f"{with_prefect:.1f}", f"{direct:.1f}",
                             f"{with_prefect - direct:.1f}", f"{100 * (with_prefect - direct) / with_prefect:.0f}%"))
            print("\n2. Prefect overhead (warm request cache, shard files removed so every stage runs)")
            print(table(("build", "candidates", "task runs", "with Prefect s", "stages alone s", "Prefect s",
                         "Prefect share"), rows))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    footer()


if __name__ == "__main__":
    main()
