"""How near-duplicate removal scales: exact vs approximate (IVF) search at 10K / 50K / 100K / 1M prompts, their
agreement, and encode time.

    .venv/bin/python benchmarks/dedup_scaling.py [--sizes 10000 50000 100000] [--methods exact ivf naive]
    .venv/bin/python benchmarks/dedup_scaling.py --sizes 1000000 --methods ivf --skip-encode

Dedup runs on synthetic unit vectors (384-d, like all-MiniLM-L6-v2) with 5% planted near-duplicates (noisy copies,
cosine ~0.95-0.995 with a row of the first half), so it measures the search alone (encoding excluded). Each
measurement runs in a fresh process so its peak RSS is its own. Methods on the same data:
  exact  dedup.near.dedup(index="exact"): incremental faiss IndexFlatIP over kept vectors, greedy keep-first
  ivf    dedup.near.dedup(index="ivf"): the same greedy pass over a faiss IndexIVFFlat of kept vectors
  naive  numpy all pairs: blockwise X[block] @ X[:end].T, every pair j < i at or above the threshold collected,
         then one greedy pass in order (a reference for exact)
Recall, printed per size: `planted` = share of planted copies dropped; with exact in the run, `drop recall` = share
of exact's drops that ivf also makes and `extra` = rows ivf drops that exact keeps; without exact (1M),
`sampled miss` = share of 2,000 evenly spaced rows ivf kept that have an earlier kept row at or above the threshold
(exact search against ivf's kept rows), i.e. missed drop decisions. Encode time is measured on real MiniLM over
synthetic prompt-like sentences and extrapolated linearly; it is labelled as such. Numbers are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 384
PLANTED_SHARE = 0.05


# -- data -----------------------------------------------------------------------------------------------------


def synthetic_vectors(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors; 5% of rows (after the first half) are noisy copies (cos ~0.95-0.995) of earlier rows."""
    rng = np.random.default_rng(seed)
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 16384):  # in chunks, to keep the generator's own peak memory low
        block = rng.standard_normal((min(16384, n - start), DIM), dtype=np.float32)
        vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    planted = int(n * PLANTED_SHARE)
    targets = rng.choice(np.arange(n // 2, n), planted, replace=False)
    sources = rng.integers(0, n // 2, planted)
    noise = rng.uniform(0.005, 0.016, (planted, 1)).astype(np.float32)
    copies = vectors[sources] + noise * rng.standard_normal((planted, DIM), dtype=np.float32)
    vectors[targets] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return vectors, np.sort(targets)


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """Distinct prompt-like sentences (12-25 words) built from parts; only their length and variety matter here."""
    openers = ["How do I", "What is the safest way to", "Can you explain how people", "Is it legal to",
               "Why is it dangerous to", "Write a short scene in which a character tries to",
               "For a safety training, describe how to", "What should a beginner know before they"]
    actions = ["dispose of expired prescription medication", "open a lock on a shed they own", "stop a runaway "
               "process on a shared Linux server", "store household bleach and ammonia", "identify a phishing "
               "email that imitates a bank", "handle a kitchen knife when sharpening it", "report a neighbour who "
               "is growing illegal plants", "test a smoke detector that keeps chirping", "remove a wasp nest from "
               "an attic", "recognise the signs of carbon monoxide poisoning", "buy a replacement for a broken "
               "hunting rifle scope", "track a lost phone that was probably stolen", "clean up mould after a "
               "flood", "get rid of rats in a restaurant kitchen", "break into their own car after locking the "
               "keys inside", "spot counterfeit banknotes at a market stall", "shoot a realistic action film "
               "scene with fake guns", "mix fertiliser for a vegetable garden", "cut down a dead tree near a "
               "power line", "calm an aggressive dog on a walk"]
    contexts = ["without damaging anything", "as a first-time homeowner", "in a small apartment",
                "with only basic tools", "before the inspector arrives next week", "while keeping children safe",
                "according to the rules in most countries", "in a way that would pass a workplace audit",
                "when no professional is available", "on a very tight budget"]
    rng = np.random.default_rng(seed)
    combos = [(o, a, c) for o in openers for a in actions for c in contexts]
    order = rng.permutation(len(combos))
    texts = []
    for i in range(n):
        opener, action, context = combos[order[i % len(combos)]]
        # Past the distinct combinations a case number keeps every text distinct (and so uncached).
        suffix = f" (case {i})" if i >= len(combos) else ""
        texts.append(f"{opener} {action} {context}{suffix}?")
    return texts


# -- measurements (each in its own process) ---------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def naive_dedup(vectors: np.ndarray, threshold: float, block: int = 1024, column_tile: int = 16384) -> np.ndarray:
    """All pairs j < i by blockwise matrix products, then greedy keep-first over the collected pairs."""
    from orforge.dedup.near import SIMILARITY_TOLERANCE

    cutoff = np.float32(threshold) - np.float32(SIMILARITY_TOLERANCE)
    n = len(vectors)
    earlier_close: dict[int, list[int]] = {}
    for start in range(0, n, block):
        stop = min(start + block, n)
        for col in range(0, stop, column_tile):
            col_stop = min(col + column_tile, stop)
            sims = vectors[start:stop] @ vectors[col:col_stop].T
            rows, cols = np.nonzero(sims >= cutoff)
            for r, c in zip(rows + start, cols + col):
                if c < r:
                    earlier_close.setdefault(int(r), []).append(int(c))
    kept = np.ones(n, dtype=bool)
    for i in sorted(earlier_close):
        kept[i] = not kept[earlier_close[i]].any()
    return kept


def run_case(method: str, data: Path, threshold: float, out: Path) -> dict:
    import faiss
    import polars as pl

    from orforge.dedup.near import BATCH_SIZES, dedup

    vectors = np.load(data)
    records = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(len(vectors))]})
    baseline = rss_mb()
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    index = {}
    if method == "naive":
        kept = naive_dedup(vectors, threshold)
    else:
        result = dedup(records, vectors, threshold, index=method)
        kept = result.records.get_column("kept").to_numpy()
        index = result.notes["index"]
    seconds = time.perf_counter() - started
    np.save(out, kept)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu_started,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "dropped": int((~kept).sum()),
        "kept_sha": hashlib.sha256(np.packbits(kept).tobytes()).hexdigest()[:12],
        "threads": faiss.omp_get_max_threads(),
        "batch_size": BATCH_SIZES.get(index.get("kind")),
        "index": index,
    }


def sampled_miss(vectors: np.ndarray, kept: np.ndarray, threshold: float, samples: int = 2000) -> float:
    """Share of evenly spaced kept rows with an earlier kept row at or above the threshold (exact search)."""
    import faiss

    from orforge.dedup.near import SIMILARITY_TOLERANCE

    kept_rows = np.flatnonzero(kept)
    picks = kept_rows[np.linspace(0, kept_rows.size - 1, min(samples, kept_rows.size)).astype(np.int64)]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors[kept_rows]))
    sims, found = index.search(np.ascontiguousarray(vectors[picks]), 8)
    cutoff = threshold - SIMILARITY_TOLERANCE
    earlier = kept_rows[np.clip(found, 0, None)] < picks[:, None]
    return float(((sims >= cutoff) & earlier & (found >= 0)).any(axis=1).mean())


def run_encode(n_texts: int) -> dict:
    texts = synthetic_prompts(n_texts)
    with tempfile.TemporaryDirectory() as tmp:
        from orforge.dedup.embed import Embedder

        baseline = rss_mb()
        with Embedder(Path(tmp) / "emb.sqlite") as embedder:
            started = time.perf_counter()
            embedder.encode(["warm-up: load the model"])
            load_seconds = time.perf_counter() - started
            started = time.perf_counter()
            embedder.encode(texts)
            encode_seconds = time.perf_counter() - started
            assert embedder.texts_encoded == n_texts + 1
        with Embedder(Path(tmp) / "emb.sqlite") as reopened:
            started = time.perf_counter()
            reopened.encode(texts)
            cached_seconds = time.perf_counter() - started
            assert reopened.texts_encoded == 0
        import torch

        return {
            "texts": n_texts,
            "mean_words": float(np.mean([len(t.split()) for t in texts])),
            "load_seconds": load_seconds,
            "encode_seconds": encode_seconds,
            "cached_seconds": cached_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": baseline,
            "torch_threads": torch.get_num_threads(),
        }


def in_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    except (OSError, StopIteration):
        simd = "?"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import faiss

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{len(os.sched_getaffinity(0))} cores usable (nproc), CPU '{model}' ({simd}), {mem_gb:.0f} GiB RAM; "
            f"Python {platform.python_version()}, numpy {np.__version__}, faiss {faiss.__version__}; "
            f"load average at start {load} (other work on the machine slows every number)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--methods", nargs="+", default=["exact", "ivf", "naive"], choices=["exact", "ivf", "naive"])
    parser.add_argument("--threshold", type=float, default=0.90)
    parser.add_argument("--encode-texts", type=int, default=2000)
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case == "encode":
        print(json.dumps(run_encode(args.encode_texts)))
        return
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.data), args.threshold, Path(args.out))))
        return

    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"threshold {args.threshold}; synthetic 384-d unit vectors, {PLANTED_SHARE:.0%} planted near-duplicates; "
          "dedup time excludes encoding; peak = peak RSS of a fresh process, work = peak minus RSS after loading "
          "the vectors (input alone: n x 1.5 KB); cpu s = user+sys of all threads (wall x cores when nothing "
          "else runs)\n")

    methods = args.methods
    header = f"{'prompts':>8} {'planted':>7} | " + " | ".join(
        f"{m + ' s':>8} {'cpu s':>6} {'dropped':>7} {'peak MB':>7} {'work MB':>7} {'planted':>7}" for m in methods
    ) + f" | {'ivf vs exact':>24}"
    print(header)
    print("-" * len(header))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            vectors, planted_rows = synthetic_vectors(n)
            path = Path(tmp) / f"vectors_{n}.npy"
            np.save(path, vectors)
            results, kept = {}, {}
            for m in methods:
                out = Path(tmp) / f"kept_{m}.npy"
                results[m] = in_child("--case", m, "--data", str(path), "--threshold", str(args.threshold),
                                      "--out", str(out))
                kept[m] = np.load(out)
            cells = [f"{r['seconds']:8.2f} {r['cpu_seconds']:6.1f} {r['dropped']:7d} {r['peak_rss_mb']:7.0f} "
                     f"{r['peak_rss_mb'] - r['baseline_rss_mb']:7.0f} {(~kept[m][planted_rows]).mean():7.4f}"
                     for m, r in results.items()]
            if "ivf" in kept and "exact" in kept:
                exact_drops, ivf_drops = ~kept["exact"], ~kept["ivf"]
                versus = (f"drop recall {(exact_drops & ivf_drops).sum() / max(exact_drops.sum(), 1):.4f}, "
                          f"extra {int((ivf_drops & ~exact_drops).sum())}")
            elif "ivf" in kept:
                versus = f"sampled miss {sampled_miss(vectors, kept['ivf'], args.threshold):.4f}"
            else:
                versus = "-"
            if "naive" in kept and "exact" in kept and not np.array_equal(kept["naive"], kept["exact"]):
                versus += " (naive and exact DISAGREE)"
            print(f"{n:8d} {len(planted_rows):7d} | " + " | ".join(cells) + f" | {versus:>24}"
                  f"   load {os.getloadavg()[0]:.2f}", flush=True)
            del vectors
            path.unlink()

    for m, r in results.items():
        print(f"{m}: batch_size {r['batch_size']}, {r['threads']} OpenMP threads, index {r['index'] or 'numpy'}.")
    if args.skip_encode:
        print(f"load average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    enc = in_child("--case", "encode", "--encode-texts", str(args.encode_texts))
    rate = enc["texts"] / enc["encode_seconds"]
    print(f"encode (MEASURED on {enc['texts']} synthetic prompt sentences, mean {enc['mean_words']:.1f} words, "
          f"real all-MiniLM-L6-v2 on CPU, {enc['torch_threads']} torch threads): model load "
          f"{enc['load_seconds']:.1f} s, {enc['encode_seconds']:.1f} s = {rate:.0f} texts/s; "
          f"rerun from the store {enc['cached_seconds']:.2f} s; peak RSS {enc['peak_rss_mb']:.0f} MB; "
          f"EXTRAPOLATED (linear) encode of {max(args.sizes)} prompts: {max(args.sizes) / rate:.0f} s.")
    print(f"load average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
