"""Does llm/ keep max_concurrency requests in flight? Achieved requests/s vs the ideal against a 100 ms server.

    .venv/bin/python benchmarks/concurrency.py [--caps 8 64 256] [--waves 10] [--repeats 3]

The loopback OpenAI-compatible server (tests/fakeserver.py, in its own process on 127.0.0.1) answers every request
after `--latency` seconds (100 ms). With a cap of C requests in flight the ideal rate is C / latency; the ratio
achieved / ideal shows how well llm/ fills the cap (goal >= 0.9). Each point sends `waves` x C requests (bounded:
at most `--max-requests`), through LLMHub.model(spec).generate with spec.max_concurrency = C and a fresh cache.

For reference the same points are measured with a bare asyncio + AsyncOpenAI + Semaphore(C) loop, and the bare
loop's rate against a zero-latency server at the same cap (the client ceiling): where the ideal is above that
ceiling, no client in one Python process reaches it on this machine, and llm/ is judged against the ceiling. The
server reports the most requests it had in flight at once, which must equal the cap and never exceed it. Numbers
are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
from common import prompts, run_bare, run_llm  # noqa: E402

GOAL = 0.9
SIDES = {"llm/": run_llm, "bare": run_bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--latency", type=float, default=0.1, help="server reply delay, seconds")
    parser.add_argument("--waves", type=int, default=10, help="requests per point = waves x cap")
    parser.add_argument("--max-requests", type=int, default=5000, help="bound on requests per point")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kind", choices=["text", "json"], default="json")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="per cap: no new repeat after")
    args = parser.parse_args()

    common.header("llm/ concurrency: achieved requests/s vs max_concurrency / latency")
    print(f"server latency {args.latency * 1000:.0f} ms, in its own process on 127.0.0.1; {args.waves} x cap requests "
          f"per point (at most {args.max_requests}); {args.kind} requests; {args.repeats} repeats, llm/ and bare "
          "interleaved (order alternating), median.\n", flush=True)
    rows = []
    ceilings = {}
    with common.start_server("process", latency_s=0.0) as fast:
        # The client's own ceiling at each cap: the bare loop against a zero-latency server, same request count.
        run_bare(fast.base_url, prompts(64, "warm-ceiling"), 32, args.kind)
        for cap in args.caps:
            n = min(args.waves * cap, args.max_requests)
            ceilings[cap] = common.median(
                n / run_bare(fast.base_url, prompts(n, f"ceiling{cap}-{r}"), cap, args.kind)[0]
                for r in range(args.repeats))
    with common.start_server("process", latency_s=args.latency) as server:
        run_llm(server.base_url, prompts(64, "warm-llm"), 32, args.kind)  # untimed: imports, schemas
        run_bare(server.base_url, prompts(64, "warm-bare"), 32, args.kind)
        for cap in args.caps:
            n = min(args.waves * cap, args.max_requests)
            ideal = cap / args.latency
            rates: dict[str, list[float]] = {side: [] for side in SIDES}
            in_flight: dict[str, list[int]] = {side: [] for side in SIDES}
            cpu_us: dict[str, list[float]] = {side: [] for side in SIDES}
            failed = 0
            deadline = time.monotonic() + args.max_seconds
            for r in range(args.repeats):
                for side in (list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]):
                    server.reset()
                    texts = prompts(n, f"cap{cap}-{side}-{r}")
                    seconds, cpu, ok = SIDES[side](server.base_url, texts, cap, args.kind)
                    failed += n - ok
                    rates[side].append(n / seconds)
                    cpu_us[side].append(cpu / n * 1e6)
                    in_flight[side].append(server.stats()["max_in_flight"])
                if time.monotonic() > deadline:
                    print(f"  (cap {cap}: time bound of {args.max_seconds:g}s reached after {r + 1} repeats)")
                    break
            llm_rate, bare_rate = common.median(rates["llm/"]), common.median(rates["bare"])
            ratio = llm_rate / ideal
            print(f"  done: cap {cap}: llm/ {llm_rate:.0f} req/s = {ratio:.3f} of ideal {ideal:.0f}; "
                  f"bare {bare_rate:.0f} req/s", flush=True)
            reachable = min(ideal, ceilings[cap])
            rows.append([cap, n, f"{ideal:.0f}", f"{llm_rate:.0f}",
                         f"{ratio:.3f} ({'meets goal' if ratio >= GOAL else 'BELOW goal'})",
                         f"{bare_rate:.0f}", f"{bare_rate / ideal:.3f}", f"{llm_rate / bare_rate:.3f}",
                         f"{ceilings[cap]:.0f}", f"{llm_rate / reachable:.3f}",
                         f"{common.median(cpu_us['llm/']):.0f} / {common.median(cpu_us['bare']):.0f}",
                         " ".join(f"{x:.0f}" for x in rates["llm/"]),
                         f"{max(in_flight['llm/'])} / {max(in_flight['bare'])}", failed])
    print()
    print(common.table(["cap", "requests", "ideal req/s", "llm/ req/s (median)", f"llm/ / ideal (goal >= {GOAL})",
                        "bare req/s", "bare / ideal", "llm/ / bare", "client ceiling req/s (bare, 0 ms)",
                        "llm/ / min(ideal, ceiling)", "client CPU us/request llm/ / bare", "llm/ repeats",
                        "server max in flight llm/ / bare", "failed"], rows))
    print("\nideal = cap / latency. 'client ceiling' = the bare loop's rate at the same cap against a zero-latency "
          "server: the most this machine's Python process can push through the openai client at all. "
          "'client CPU' is this process's CPU time per request (other work on the machine disturbs it less than "
          "wall time). 'server max in flight' is the most requests the server held at once (= cap when the cap is "
          "filled, never above it).")
    common.footer()


if __name__ == "__main__":
    main()
