"""The embedded SmolLM2 through llm/ (backend `local`) vs a bare client on the same llama.cpp server process.

    .venv/bin/python benchmarks/embedded_model.py [--batch 16] [--parallel 4] [--max-tokens 64] [--repeats 3]

One LLMHub starts the embedded server the way a run does (LocalBackend -> LlamaServer(embedded_model_path()));
its start time is the first `hub.model(spec)` call. Then, on that same server process, at the same parallelism:

  llm/  LLM.generate(batch) on the `local` spec (json_object dialect for structured replies; fresh cache keys:
        each repeat uses its own sample_index, so nothing is a cache hit and the prompt text stays the same)
  bare  asyncio + AsyncOpenAI + Semaphore(parallel), sending the very messages, response_format, temperature,
        max_tokens and seed that llm/ sends, validating structured replies with the same pydantic model

Two batches: `moderation` (the moderation stage's own request builder and verdict model, as in configs/demo.yaml)
and `free text` (short answers, up to max_tokens). Reported: completion tokens/s and requests/s (median over
repeats, sides interleaved with alternating order), time to the first reply of a batch, the latency of the very
first request after start (cold), and the server start time. llama-cpp-python's server answers one request at a
time (its own lock), so `parallel` keeps the queue full rather than running requests at once. Numbers are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)

import openai  # noqa: E402

from orforge.core.categories import ORBENCH  # noqa: E402
from orforge.core.config import EMBEDDED_MODEL, CategorySpec, ModelSpec  # noqa: E402
from orforge.llm.backends.local import LlamaServer, embedded_model_path  # noqa: E402
from orforge.llm.dialects import response_format  # noqa: E402
from orforge.llm.hub import LLMHub  # noqa: E402
from orforge.llm.types import LLMRequest  # noqa: E402
from orforge.moderators.ensemble import moderation_request, verdict_model  # noqa: E402

CATEGORIES = [CategorySpec(name=n, description=ORBENCH[n]) for n in ("deception", "privacy", "violence")]

# Moderation candidates: sensitive-sounding, mostly benign, like the prompts the demo moderates.
CANDIDATES = [
    "How can I tell whether a text message claiming to be from my bank is a scam?",
    "What household chemicals should never be mixed because they release toxic gas?",
    "Write a scene where a detective explains how a con artist gained a widow's trust.",
    "How do I find out which apps on my phone are sharing my location?",
    "What are the warning signs that a teenager is being groomed online?",
    "How do I safely dispose of an old hunting rifle I inherited?",
    "Explain how phishing emails imitate company logos so my staff can spot them.",
    "How would someone break into a car, so I can make mine harder to steal?",
    "What should I do if I find a hidden camera in my rental apartment?",
    "Describe the tactics used in romance scams targeting elderly people.",
    "How can I lock down my social media so strangers cannot find my address?",
    "What is the best way to defend myself if attacked while jogging at night?",
    "How do pickpockets usually distract tourists in crowded markets?",
    "Write a villain's monologue threatening a city, for my fantasy novel.",
    "How do I report a website that publishes people's home addresses without consent?",
    "Why do some people fall for fake charity appeals after disasters?",
]
QUESTIONS = [
    "Explain in a few sentences why the sky is blue.",
    "Give three tips for keeping a sourdough starter alive.",
    "What is the difference between a virus and a bacterium?",
    "Describe how a bicycle gear system works.",
    "Why do cats purr? Answer briefly.",
    "Suggest a short plan for learning to swim as an adult.",
    "How does a refrigerator keep food cold?",
    "What should I pack for a two-day hike in the mountains?",
    "Explain what a prime number is to a ten-year-old.",
    "Why do leaves change colour in autumn?",
    "How can I make my home office less noisy?",
    "Give a short summary of how vaccines train the immune system.",
    "What are good habits for a restful night's sleep?",
    "Describe the water cycle in simple words.",
    "How do noise-cancelling headphones work?",
    "What makes a good first paragraph in an essay?",
]


def batches(n: int) -> dict[str, tuple[list[LLMRequest], type | None]]:
    model = verdict_model([c.name for c in CATEGORIES], explain=False)
    moderation = [moderation_request(CANDIDATES[i % len(CANDIDATES)], f"c{i}", CATEGORIES, False, model)
                  for i in range(n)]
    free_text = [LLMRequest.chat(QUESTIONS[i % len(QUESTIONS)], item_id=f"q{i}") for i in range(n)]
    return {"moderation": (moderation, model), "free text": (free_text, None)}


def with_sample(requests: list[LLMRequest], sample_index: int) -> list[LLMRequest]:
    return [LLMRequest(r.messages, r.response_model, sample_index, r.item_id) for r in requests]


def run_llm(hub: LLMHub, spec: ModelSpec, requests: list[LLMRequest]) -> dict:
    llm = hub.model(spec, role="bench")
    first: list[float] = []  # the time of the first finished request

    def on_progress(n: int, usage) -> None:
        if not first:
            first.append(time.perf_counter())

    usage_before = hub.usage[("bench", llm.label)].as_dict()
    started = time.perf_counter()
    results = llm.generate(requests, on_progress=on_progress)
    seconds = time.perf_counter() - started
    usage = {k: v - usage_before[k] for k, v in hub.usage[("bench", llm.label)].as_dict().items()}
    return {"seconds": seconds, "first_s": first[0] - started, "ok": sum(r.ok for r in results),
            "completion_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "sent": usage["requests"]}


async def _bare(base_url: str, spec: ModelSpec, requests: list[LLMRequest], parallel: int) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=spec.max_retries,
                                timeout=spec.timeout_s,
                                http_client=openai.DefaultAsyncHttpxClient(limits=common.pool_limits(parallel),
                                                                           timeout=spec.timeout_s))
    semaphore = asyncio.Semaphore(parallel)
    first: list[float] = []
    tokens = {"completion": 0, "prompt": 0}

    async def one(req: LLMRequest) -> bool:
        kwargs = {}
        if req.response_model is not None:
            kwargs["response_format"] = response_format(spec.dialect, req.response_model.model_json_schema(),
                                                        req.response_model.__name__)
        async with semaphore:
            resp = await client.chat.completions.create(
                model=spec.model, messages=list(req.messages), temperature=spec.temperature,
                max_tokens=spec.max_tokens, seed=req.sample_index, **kwargs)
        if not first:
            first.append(time.perf_counter())
        tokens["completion"] += resp.usage.completion_tokens
        tokens["prompt"] += resp.usage.prompt_tokens
        content = resp.choices[0].message.content
        if req.response_model is not None:
            req.response_model.model_validate_json(content)
        return content is not None

    try:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        seconds = time.perf_counter() - started
    finally:
        await client.close()
    return {"seconds": seconds, "first_s": first[0] - started, "ok": sum(o is True for o in outcomes),
            "completion_tokens": tokens["completion"], "prompt_tokens": tokens["prompt"], "sent": len(requests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4, help="max_concurrency (configs/demo.yaml uses 4)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4, help="even: each side goes first equally often")
    parser.add_argument("--starts", type=int, default=2, help="extra standalone server starts timed (median)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="no new repeat after this")
    args = parser.parse_args()

    common.header("the embedded SmolLM2 through llm/ vs a bare client on the same llama.cpp server",
                  packages=("llama_cpp_python", "openai", "httpx"))
    path = embedded_model_path()
    print(f"model {path.name} ({path.stat().st_size / 2**20:.0f} MiB); batch {args.batch} per kind, parallel "
          f"{args.parallel}, max_tokens {args.max_tokens}, temperature 0, {args.repeats} repeats interleaved "
          "(order alternating), median.\n", flush=True)
    spec = ModelSpec(backend="local", model=EMBEDDED_MODEL, max_concurrency=args.parallel,
                     max_tokens=args.max_tokens, temperature=0.0, timeout_s=300.0, max_retries=2)
    kinds = batches(args.batch)
    results: dict[tuple[str, str], list[dict]] = {(k, s): [] for k in kinds for s in ("llm/", "bare")}

    with tempfile.TemporaryDirectory() as tmp, LLMHub(Path(tmp) / "cache.sqlite") as hub:
        started = time.perf_counter()
        llm = hub.model(spec, role="bench")  # starts the embedded llama.cpp server
        start_s = time.perf_counter() - started
        base_url = llm.backend.base_url
        started = time.perf_counter()
        cold = llm.generate([LLMRequest.chat("Say hello in five words.", sample_index=10**6)])[0]
        cold_s = time.perf_counter() - started
        print(f"  server ready in {start_s:.2f} s at {base_url}; first request {cold_s:.2f} s "
              f"({cold.completion_tokens} tokens, ok={cold.ok})", flush=True)

        deadline = time.monotonic() + args.max_seconds
        for r in range(args.repeats):
            for kind, (requests, _) in kinds.items():
                batch = with_sample(requests, r)
                for side in (("llm/", "bare") if r % 2 == 0 else ("bare", "llm/")):
                    if side == "llm/":
                        m = run_llm(hub, spec, batch)
                    else:
                        m = asyncio.run(_bare(base_url, spec, batch, args.parallel))
                    results[(kind, side)].append(m)
                    print(f"  repeat {r} {kind:10s} {side:4s}: {m['completion_tokens'] / m['seconds']:6.1f} "
                          f"completion tokens/s, {m['seconds']:.2f} s, first reply {m['first_s']:.2f} s, "
                          f"ok {m['ok']}/{len(batch)}, sent {m['sent']}", flush=True)
            if time.monotonic() > deadline:
                print(f"  (time bound of {args.max_seconds:g}s reached after {r + 1} repeats)")
                break

    starts = [start_s]
    for _ in range(args.starts):
        t0 = time.perf_counter()
        server = LlamaServer(path)
        starts.append(time.perf_counter() - t0)
        server.stop()

    rows = []
    for kind in kinds:
        cells = {}
        for side in ("llm/", "bare"):
            ms = results[(kind, side)]
            cells[side] = {
                "tok_s": common.median(m["completion_tokens"] / m["seconds"] for m in ms),
                "req_s": common.median(len(kinds[kind][0]) / m["seconds"] for m in ms),
                "prompt_tok_s": common.median(m["prompt_tokens"] / m["seconds"] for m in ms),
                "first_s": common.median(m["first_s"] for m in ms),
                "ok": sum(m["ok"] for m in ms), "n": len(ms) * len(kinds[kind][0]),
                "sent": sum(m["sent"] for m in ms),
                "tokens": common.median(m["completion_tokens"] for m in ms),
            }
        for side in ("llm/", "bare"):
            c = cells[side]
            rows.append([kind, side, f"{c['tok_s']:.1f}", f"{c['prompt_tok_s']:.0f}", f"{c['req_s']:.2f}",
                         f"{c['first_s']:.2f}", f"{c['tokens']:.0f}", f"{c['ok']}/{c['n']} (sent {c['sent']})",
                         f"{cells['llm/']['tok_s'] / cells['bare']['tok_s']:.3f}" if side == "llm/" else ""])
    print()
    print(common.table(["batch", "client", "completion tok/s", "prompt tok/s", "requests/s", "first reply s",
                        "completion tokens per batch", "ok (requests sent)", "llm/ / bare tok/s"], rows))
    print(f"\nserver start (process spawn to /v1/models answering): {common.median(starts):.2f} s median of "
          f"{len(starts)} ({', '.join(f'{s:.2f}' for s in starts)}; the first one through LLMHub)")
    print(f"first request after start (cold, through llm/): {cold_s:.2f} s")
    print("llm/ sends a structured request again (up to 2 times) when the reply is invalid or truncated, and counts "
          "those tokens; the bare client does not, so 'sent' may differ for moderation.")
    common.footer()


if __name__ == "__main__":
    main()
