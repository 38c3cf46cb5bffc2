"""Whole-build throughput: the real OR-Bench build (Prefect, real flows) against a loopback server, from its side.

    .venv/bin/python benchmarks/build_throughput.py [--seeds-per-category 150] [--categories 4]
                                                    [--runs zero-32,bare-32,slow-32,slow-256]

The scripted pipeline model (tests/flows/pipeline.py) runs in its own process and records, for every chat request,
when it arrived and when its reply was ready, and which stage sent it. From those spans:

- busiest 5 s: the most requests that arrived in any 5-second window, per second;
- mean in flight in the busiest 5 s: the 5-second window with the most request-seconds in flight, divided by 5;
- idle between first and last request: time with nothing in flight at the server (and how much of it came in
  gaps of at least 100 ms: a stage waiting for another, not the gaps between two replies);
- each stage's first and last request, seconds after the build's first request.

Runs (each a fresh request cache and work dir; every request a miss):

  zero-<cap>   the build against a zero-latency server, every role at max_concurrency <cap>
  bare-<cap>   a bare AsyncOpenAI + asyncio.Semaphore(<cap>) loop (benchmarks/common.py) on the same zero-latency
               server, moderation-like structured requests, the reference for zero-<cap>: goal build >= 0.9 x bare
  slow-<cap>   the build against a server that answers after 100 ms (--slow-latency-ms): goal mean in flight
               >= 0.9 x cap
  bareslow-<cap>  the bare loop against that slow server: what one client process on this machine reaches at that
               cap and latency, the ceiling for slow-<cap> (at cap 256 and 100 ms the cap needs 2,560 requests/s)

MiniLM's embeddings of the candidates are computed once in a warm-up build and copied into every measured run's work
dir, so dedup's encoding (a fixed CPU cost, see dedup_scaling.py) is not what the numbers measure; dedup itself
still runs and is a barrier (it needs every candidate). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import footer, header, prompts, run_bare, table  # noqa: E402

import orforge.flows  # noqa: E402,F401  (Prefect environment defaults)

CATEGORIES = ("privacy", "violence", "deception", "hate", "self-harm", "sexual", "harmful", "illegal", "unethical",
              "harassment")
WINDOW_S = 5.0
GAP_S = 0.1
SLOW_LATENCY_S = 0.1


# -- the server, in its own process ---------------------------------------------------------------------------------
def _serve(conn, latency_s: float) -> None:
    from tests.fakeserver import FakeServer, default_responder
    from tests.flows.pipeline import pipeline_responder, stage_of

    def responder(body: dict):
        try:
            return pipeline_responder(body)
        except AssertionError:  # the bare loop's requests are not a pipeline stage's
            return default_responder(body)

    class TimedServer(FakeServer):
        """Records (arrival, reply ready, stage) per chat request, from the server's side."""

        spans: list[tuple[float, float, str]] = []

        async def _chat(self, request):
            arrived = time.monotonic()
            try:
                stage = stage_of(await request.json())  # aiohttp keeps the body: the handler reads it again
            except Exception:  # noqa: BLE001 - a body that is not JSON is the handler's business
                stage = "unknown"
            try:
                return await super()._chat(request)
            finally:
                self.spans.append((arrived, time.monotonic(), stage))

    server = TimedServer(responder=responder, latency_s=latency_s).start()
    conn.send(server.port)
    while conn.recv() == "spans":
        spans, TimedServer.spans = TimedServer.spans, []
        server.reset()
        server.responder, server.latency_s = responder, latency_s
        conn.send(spans)
    server.stop()


class Server:
    def __init__(self, latency_s: float):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, latency_s), daemon=True, name="fake-openai")
        self.proc.start()
        self.base_url = f"http://127.0.0.1:{self.conn.recv()}/v1"

    def spans(self) -> list[tuple[float, float, str]]:
        """The spans recorded since the last call (and forget them)."""
        self.conn.send("spans")
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(15)


# -- what the server saw --------------------------------------------------------------------------------------------
def measure(spans: list[tuple[float, float, str]]) -> dict:
    starts = np.array(sorted(s for s, _, _ in spans))
    ends = np.array([e for _, e, _ in spans])
    first, last = starts[0], max(ends.max(), starts[-1])
    # Busiest window of arrivals: for each arrival, how many arrived in the WINDOW_S after it.
    counts = np.searchsorted(starts, starts + WINDOW_S, side="left") - np.arange(len(starts))
    busiest_rps = counts.max() / min(WINDOW_S, max(last - first, 1e-9))
    # In flight as a step function over time; its integral F(t) is piecewise linear between events.
    times = np.concatenate([starts, ends])
    steps = np.concatenate([np.ones(len(starts)), -np.ones(len(ends))])
    order = np.argsort(times, kind="stable")
    times, level = times[order], np.cumsum(steps[order])
    durations = np.diff(times)
    integral = np.concatenate([[0.0], np.cumsum(level[:-1] * durations)])
    grid = np.arange(first, max(first, last - WINDOW_S) + 0.01, 0.01)
    window = np.interp(grid + WINDOW_S, times, integral) - np.interp(grid, times, integral)
    mean_in_flight = window.max() / min(WINDOW_S, max(last - first, 1e-9))
    idle = durations[level[:-1] <= 0]
    by_stage: dict[str, list[float]] = {}
    for s, e, stage in spans:
        lo, hi = by_stage.setdefault(stage, [s, e])
        by_stage[stage] = [min(lo, s), max(hi, e)]
    return {"requests": len(spans), "seconds": last - first, "busiest_rps": busiest_rps,
            "mean_in_flight": mean_in_flight, "max_in_flight": int(level.max()), "idle_s": float(idle.sum()),
            "idle_gaps_s": float(idle[idle >= GAP_S].sum()), "n_gaps": int((idle >= GAP_S).sum()),
            "stages": {k: (v[0] - first, v[1] - first) for k, v in by_stage.items()}}


# -- the build ------------------------------------------------------------------------------------------------------
def config(root: Path, base_url: str, cap: int, seeds_per_category: int, categories: int) -> Path:
    from tests.flows.pipeline import write_config

    root.mkdir(parents=True, exist_ok=True)
    spec = {"backend": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": cap,
            "timeout_s": 30, "max_retries": 2}
    return write_config(
        root, base_url, shard_size=250,
        categories={"preset": "orbench", "include": list(CATEGORIES[:categories])},
        seeds={"model": {**spec, "name": "gen"}, "seeds_per_category": seeds_per_category, "seeds_per_call": 20},
        rewrites={"model": {**spec, "name": "rewriter"}, "rewrites_per_seed": 3},
        moderation={"moderators": [{**spec, "name": f"mod-{i}", "system_prompt": f"moderator {i}"} for i in range(3)]},
        splits={"toxic_size": 20, "hard_size": 50, "hard_min_rejections": 2},
        panel={"members": [{**spec, "name": f"member-{i}", "system_prompt": f"member {i}"} for i in range(3)]},
    )


def run_build(root: Path, base_url: str, cap: int, args, embeddings: Path | None) -> float:
    from orforge.flows.build import build_flow

    cfg = config(root, base_url, cap, args.seeds_per_category, args.categories)
    if embeddings is not None:
        (root / "work").mkdir(parents=True, exist_ok=True)
        shutil.copy(embeddings, root / "work" / "embeddings.sqlite")
    started = time.perf_counter()
    build_flow(config_path=str(cfg), output=str(root / "release"))
    return time.perf_counter() - started


def load() -> str:
    import os

    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds-per-category", type=int, default=150)
    parser.add_argument("--categories", type=int, default=4, choices=range(1, len(CATEGORIES) + 1))
    parser.add_argument("--runs", default="zero-32,bare-32,slow-32,slow-256",
                        help="comma-separated: zero-<cap>, bare-<cap>, slow-<cap>, bareslow-<cap>")
    parser.add_argument("--bare-requests", type=int, default=6000)
    parser.add_argument("--slow-latency-ms", type=float, default=SLOW_LATENCY_S * 1000)
    args = parser.parse_args()
    slow_s = args.slow_latency_ms / 1000
    runs = [(kind, int(cap)) for kind, cap in (r.split("-") for r in args.runs.split(","))]
    header("Whole-build throughput: the OR-Bench build vs a bare AsyncOpenAI loop, seen from the server",
           ("openai", "httpx", "aiohttp", "prefect", "polars"))
    print(f"{args.categories} categories x {args.seeds_per_category} seeds, 3 rewrites per seed, 3 moderators, "
          f"3 panel members, shard_size 250; slow server latency {slow_s * 1000:.0f} ms\n", flush=True)
    from prefect.testing.utilities import prefect_test_harness

    tmp = Path(tempfile.mkdtemp(prefix="orforge-throughput-"))
    servers = {}
    rows, stage_rows, results = [], [], {}
    try:
        servers["zero"] = Server(0.0)
        if any(kind in ("slow", "bareslow") for kind, _ in runs):
            servers["slow"] = Server(slow_s)
        with prefect_test_harness(server_startup_timeout=300):
            embeddings = None
            if any(kind in ("zero", "slow") for kind, _ in runs):
                run_build(tmp / "warm-up", servers["zero"].base_url, 32, args, None)
                servers["zero"].spans()
                embeddings = tmp / "warm-up" / "work" / "embeddings.sqlite"
            for n, (kind, cap) in enumerate(runs):
                server = servers["slow" if kind in ("slow", "bareslow") else "zero"]
                before = load()
                if kind in ("bare", "bareslow"):
                    wall, _, _ = run_bare(server.base_url, prompts(args.bare_requests, f"bare-{n}"), cap, "json")
                else:
                    wall = run_build(tmp / f"{kind}-{cap}-{n}", server.base_url, cap, args, embeddings)
                m = measure(server.spans())
                results[(kind, cap)] = m
                rows.append((f"{kind}-{cap}", m["requests"], f"{wall:.1f}", f"{m['requests'] / m['seconds']:.0f}",
                             f"{m['busiest_rps']:.0f}", f"{m['mean_in_flight']:.1f}",
                             f"{m['mean_in_flight'] / cap:.2f}", m["max_in_flight"], f"{m['idle_s']:.2f}",
                             f"{m['idle_gaps_s']:.2f} ({m['n_gaps']})", f"{before} -> {load()}"))
                if kind in ("zero", "slow"):
                    stage_rows.append((f"{kind}-{cap}", *(
                        f"{m['stages'][s][0]:.1f}-{m['stages'][s][1]:.1f}" if s in m["stages"] else "-"
                        for s in ("SeedPrompts", "Rewrites", "ModerationVerdict", "panel"))))
                print(f"{kind}-{cap}: {m['requests']} requests, {wall:.1f} s, busiest 5 s {m['busiest_rps']:.0f}/s, "
                      f"mean in flight {m['mean_in_flight']:.1f}, load {load()}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(("run", "requests", "wall s", "req/s first-last", "busiest 5 s req/s", "mean in flight (busiest 5 s)",
                 "/ cap", "max in flight", "idle s", "idle in gaps >= 100 ms (n)", "load 1-min before -> after"),
                rows))
    print("\nEach stage's first request to its last reply, seconds after the build's first request")
    print(table(("run", "seeds", "rewrites", "moderation", "panel"), stage_rows))
    for cap in sorted({c for k, c in results if k == "zero"}):
        if ("bare", cap) in results:
            ratio = results[("zero", cap)]["busiest_rps"] / results[("bare", cap)]["busiest_rps"]
            print(f"\ncap {cap}: build busiest 5 s / bare busiest 5 s = {ratio:.2f} (goal >= 0.9)")
    for (kind, cap), m in results.items():
        if kind == "slow":
            bare = results.get(("bareslow", cap))
            versus = f"; bare loop {bare['mean_in_flight'] / cap:.2f}" if bare else ""
            print(f"{slow_s * 1000:.0f} ms, cap {cap}: mean in flight / cap = {m['mean_in_flight'] / cap:.2f} "
                  f"(goal >= 0.9){versus}")
    footer()


if __name__ == "__main__":
    main()
