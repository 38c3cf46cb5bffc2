"""What llm/ costs per request: requests/s through LLMHub vs a bare AsyncOpenAI loop, same server, same requests.

    .venv/bin/python benchmarks/llm_overhead.py [--requests 2000] [--concurrency 32] [--repeats 5]
                                                [--server process|thread|both]

Both sides talk to the same zero-latency loopback OpenAI-compatible server (tests/fakeserver.py) with the same
number of requests at the same concurrency, in one run, repeats interleaved (the order alternates), median taken:

  llm/  LLMHub(fresh cache).model(spec).generate(batch): prompt preparation, cache keys and lookups, the backend's
        semaphore, validation, cache writes and accounting; every request a cache miss
  bare  asyncio + openai.AsyncOpenAI + asyncio.Semaphore(concurrency), asyncio.gather over the batch

Two request kinds: `text` (plain chat) and `json` (a moderation-like response model: the bare loop sends the same
response_format and validates the reply with the same pydantic model, so both sides do the same useful work).

By default the server runs in a separate process (`process`): in a thread of the measuring process (`thread`, how
the tests run it) its aiohttp loop shares the GIL with the client, and that slows both sides. `both` measures both
arrangements.

Last, llm/'s own CPU cost per request is measured without HTTP: the same generate() on a real LLMHub whose
backend is swapped for one that answers at once in process. Wall-time ratios on a shared machine swing by several
percent between runs; this number does not, and bare / (bare + own) is the ratio the first table tends to.
Numbers are printed, never asserted. The goal is llm/ / bare >= 0.95.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
from common import MAX_TOKENS, Verdict, fake_spec, prompts, run_bare, run_llm  # noqa: E402

from orforge.llm.hub import LLMHub  # noqa: E402
from orforge.llm.types import LLMRequest, RawCompletion  # noqa: E402

GOAL = 0.95

SIDES = {"llm/": run_llm, "bare": run_bare}


class InstantBackend:
    """Answers at once, in process: what is left of a request's CPU cost is llm/'s own (hub, cache, validation)."""

    def __init__(self, semaphore):
        self.semaphore = semaphore

    def endpoint(self) -> str:
        return "instant in-process backend"

    async def complete(self, batch):
        for p in batch:
            async with self.semaphore:  # the same semaphore step as the openai backend
                text = '{"verdict": "benign", "category": "none"}' if p.schema is not None else "A plain answer."
            yield p, RawCompletion(text, "stop", 20, 8)

    async def aclose(self) -> None:
        return None


def llm_own_cpu_us(kind: str, n: int, repeats: int) -> float:
    """Median CPU microseconds per request spent in llm/ itself: a real hub whose backend answers instantly."""
    response_model = Verdict if kind == "json" else None
    values = []
    for r in range(repeats):
        requests = [LLMRequest.chat(t, response_model=response_model) for t in prompts(n, f"own-{kind}-{r}")]
        with tempfile.TemporaryDirectory() as tmp, LLMHub(Path(tmp) / "cache.sqlite") as hub:
            llm = hub.model(fake_spec("http://127.0.0.1:9/v1", 32), role="bench")  # never contacted
            llm.backend = InstantBackend(llm.backend.semaphore)
            cpu = time.process_time()
            results = llm.generate(requests)
            cpu = time.process_time() - cpu
        assert all(res.ok for res in results)
        values.append(cpu / n * 1e6)
    return common.median(values)


def measure(where: str, kind: str, args) -> dict:
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu_us: dict[str, list[float]] = {side: [] for side in SIDES}  # client CPU microseconds per request
    failed = 0
    with common.start_server(where) as server:
        # Warm-up, untimed: imports, pydantic schemas, first connections.
        for side, run in SIDES.items():
            run(server.base_url, prompts(min(200, args.requests), f"warm-{kind}-{side}"), args.concurrency, kind)
        server.reset()
        server_cpu0, client_cpu0, wall0 = server.stats()["cpu_s"], time.process_time(), time.perf_counter()
        deadline = time.monotonic() + args.max_seconds
        for r in range(args.repeats):
            for side in (list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]):
                texts = prompts(args.requests, f"{where}-{kind}-{side}-{r}")
                seconds, cpu, ok = SIDES[side](server.base_url, texts, args.concurrency, kind)
                failed += args.requests - ok
                rates[side].append(args.requests / seconds)
                cpu_us[side].append(cpu / args.requests * 1e6)
            if time.monotonic() > deadline:
                print(f"  ({where}/{kind}: time bound of {args.max_seconds:g}s reached after {r + 1} repeats)")
                break
        wall = time.perf_counter() - wall0
        client_share = (time.process_time() - client_cpu0) / wall
        stats = server.stats()
    server_share = (stats["cpu_s"] - server_cpu0) / wall if stats["cpu_s"] is not None else None
    m = {side: common.median(rates[side]) for side in SIDES}
    c = {side: common.median(cpu_us[side]) for side in SIDES}
    return {"where": where, "kind": kind, "llm": m["llm/"], "bare": m["bare"], "ratio": m["llm/"] / m["bare"],
            "cpu_llm": c["llm/"], "cpu_bare": c["bare"], "cpu_ratio": c["bare"] / c["llm/"],
            "rates": rates, "failed": failed, "received": stats["chat_requests"],
            "client_share": client_share, "server_share": server_share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", choices=["text", "json"], default=["text", "json"])
    parser.add_argument("--server", choices=["process", "thread", "both"], default="both")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="per (server, kind): no new repeat after")
    args = parser.parse_args()

    common.header("llm/ overhead: requests/s through LLMHub vs a bare AsyncOpenAI loop")
    print(f"{args.requests} requests per batch at concurrency {args.concurrency}, {args.repeats} repeats interleaved "
          f"(order alternating), median; zero-latency loopback server on 127.0.0.1; max_tokens {MAX_TOKENS}.\n",
          flush=True)
    wheres = ["process", "thread"] if args.server == "both" else [args.server]
    rows = []
    bare_cpu: dict[str, float] = {}  # client CPU per request of the bare loop, first server arrangement
    for where in wheres:
        for kind in args.kinds:
            m = measure(where, kind, args)
            bare_cpu.setdefault(kind, m["cpu_bare"])
            verdict = "meets goal" if m["ratio"] >= GOAL else "BELOW goal"
            server_share = f"{m['server_share']:.0%}" if m["server_share"] is not None else "(same process)"
            rows.append([f"server in {where}", kind, f"{m['llm']:.0f}", f"{m['bare']:.0f}",
                         f"{m['ratio']:.3f} ({verdict})",
                         f"{m['cpu_llm']:.0f} / {m['cpu_bare']:.0f}", f"{m['cpu_ratio']:.3f}",
                         " ".join(f"{x:.0f}" for x in m["rates"]["llm/"]),
                         " ".join(f"{x:.0f}" for x in m["rates"]["bare"]),
                         f"{m['failed']}", f"{m['received']}", f"{m['client_share']:.0%} / {server_share}"])
            print(f"  done: {where} / {kind}: llm/ {m['llm']:.0f} req/s, bare {m['bare']:.0f} req/s, "
                  f"ratio {m['ratio']:.3f}; client CPU per request {m['cpu_llm']:.0f} vs {m['cpu_bare']:.0f} us",
                  flush=True)
    own = {kind: llm_own_cpu_us(kind, args.requests, args.repeats) for kind in args.kinds}
    print()
    print(common.table(["server", "kind", "llm/ req/s (median)", "bare req/s (median)", f"ratio (goal >= {GOAL})",
                        "client CPU us/request llm/ / bare", "CPU ratio bare / llm/", "llm/ repeats",
                        "bare repeats", "failed", "server saw", "CPU share client / server"], rows))
    print("\nratio = llm/ req/s / bare req/s (medians). 'CPU ratio' = the same comparison in client CPU per request, "
          "which other work on the machine disturbs less than wall time.\n"
          "'server saw' counts the timed requests of both sides (warm-up excluded); 'failed' must be 0.\n"
          "'CPU share': CPU seconds of each process over the timed wall time (100% = one core busy). A client near "
          "100% with the server well below it means the client is the bottleneck, as intended.")
    print()
    print(common.table(["kind", "llm/ own CPU us/request (instant backend, median)",
                        f"bare client CPU us/request (server in {wheres[0]})", "expected CPU ratio bare / llm/"],
                       [[kind, f"{own[kind]:.0f}", f"{bare_cpu[kind]:.0f}",
                         f"{bare_cpu[kind] / (bare_cpu[kind] + own[kind]):.3f}"] for kind in args.kinds]))
    print("\nllm/ own CPU: the same generate() on a real LLMHub whose backend answers at once in process (no HTTP), "
          "so all that is measured is llm/: preparation, cache key and lookup, semaphore, validation, the SQLite row, "
          "accounting. Expected ratio = bare / (bare + llm/ own): what the first table converges to without noise.")
    common.footer()


if __name__ == "__main__":
    main()
