"""What a `base_url` list costs and how it spreads load (llm/replicas.py), on loopback server processes.

    .venv/bin/python benchmarks/replicas.py [--requests 2000] [--concurrency 32] [--repeats 3]

1. Cost: the same batch through LLMHub against a zero-latency server, as a single URL, as a one-item list (the
   router's own cost per request) and as two replicas (two server processes, each at half the cap, so the same
   number in flight). Requests/s and the client's CPU ms per request, repeats interleaved, median.
2. Spread: one replica answering in 100 ms and one at once, each at a quarter of the cap: how many requests each
   got (least in flight sends most to the fast one; round robin would split evenly).
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
from common import ServerProcess, median, prompts, run_llm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n, cap = args.requests, args.concurrency
    common.header("replicas: the cost of a base_url list and how it spreads load")

    with ServerProcess() as one, ServerProcess() as two:
        shapes = {
            "single URL": (one.base_url, cap),
            "list of 1": ([one.base_url], cap),
            f"list of 2 (cap {cap // 2} each)": ([one.base_url, two.base_url], cap // 2),
        }
        for name, (url, c) in shapes.items():  # untimed warm-up: imports, connections, schemas
            run_llm(url, prompts(64, f"warm-{name}"), c, "json")
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in shapes}
        for r in range(args.repeats):
            order = list(shapes) if r % 2 == 0 else list(reversed(shapes))
            for name in order:
                url, c = shapes[name]
                seconds, cpu, ok = run_llm(url, prompts(n, f"{name}-{r}"), c, "json")
                assert ok == n, f"{name}: {ok} of {n} ok"
                runs[name].append((n / seconds, 1000 * cpu / n))
            one.reset()
            two.reset()
        print(f"1. cost, {n} json requests, {cap} in flight in all, median of {args.repeats}:")
        base = median(rps for rps, _ in runs["single URL"])
        print(common.table(["shape", "requests/s", "vs single URL", "client CPU ms/request"],
                           [[name, f"{median(x for x, _ in v):.0f}", f"{median(x for x, _ in v) / base:.2f}",
                             f"{median(c for _, c in v):.2f}"] for name, v in runs.items()]))

    with ServerProcess(latency_s=0.1) as slow, ServerProcess() as fast:
        per = max(1, cap // 4)
        seconds, _, ok = run_llm([slow.base_url, fast.base_url], prompts(n, "spread"), per, "json")
        got = {"slow (100 ms)": slow.stats()["chat_requests"], "fast (0 ms)": fast.stats()["chat_requests"]}
        print(f"\n2. spread, {n} requests, cap {per} per replica, {seconds:.1f} s, {ok} ok:")
        print(common.table(["replica", "requests", "share"], [[k, v, f"{v / n:.2f}"] for k, v in got.items()]))
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
