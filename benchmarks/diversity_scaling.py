"""What the diversity table costs at 80K prompts: the metrics themselves, and the MiniLM encode they need.

    .venv/bin/python benchmarks/diversity_scaling.py [--prompts 80000] [--categories 10] [--sample 1000]
                                                     [--encode-texts 1000]

The prompts are dedup_scaling.py's synthetic prompt-like sentences (distinct, 12-25 words), spread over categories
round-robin. `outputs.diversity.measure` runs over them as a build runs it over one split: overall and per category,
each on a seeded sample of at most --sample prompts. Encoding dominates and a build has usually embedded every
prompt already (its dedup stage fills the same store), so the two are timed apart:

  metrics  `measure` with vectors served from memory (a lookup table of random unit vectors for exactly the sampled
           texts): Self-BLEU, Distinct-n, the cosine matrix and the greedy clusters, nothing else. The cluster count
           depends on the vectors; the time hardly does.
  encode   the real all-MiniLM-L6-v2 (`dedup.embed.Embedder` on a fresh store) over --encode-texts of the sampled
           texts, model load apart, then the same texts again from the store; both rates are scaled to the number
           of sampled texts, labelled as extrapolated.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from common import footer, header, table
from dedup_scaling import synthetic_prompts
from orforge.dedup.embed import DIM, Embedder
from orforge.outputs.diversity import Measured, measure, sample_texts


class LookupEmbedder:
    """Vectors for a known set of texts from a dict: what a warm embedding store serves, without SQLite."""

    model_key = "benchmark-lookup"

    def __init__(self, texts: list[str], seed: int = 0):
        rng = np.random.default_rng(seed)
        unique = list(dict.fromkeys(texts))
        vectors = rng.standard_normal((len(unique), DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = dict(zip(unique, vectors))

    def encode(self, texts):
        return np.stack([self.vectors[t] for t in texts]) if texts else np.zeros((0, DIM), np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=80_000)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--encode-texts", type=int, default=1000)
    args = parser.parse_args()
    header("benchmarks/diversity_scaling.py: the diversity table at scale",
           packages=("sacrebleu", "polars", "faiss-cpu", "torch", "sentence-transformers"))

    texts = synthetic_prompts(args.prompts)
    frame = pl.DataFrame({"prompt": texts, "category": [f"cat{i % args.categories:02d}" for i in range(len(texts))]})
    groups = [frame["prompt"].to_list()] + [part["prompt"].to_list()
                                            for _, part in frame.group_by("category", maintain_order=True)]
    sampled = list(dict.fromkeys(t for g in groups for t in sample_texts(g, args.sample, 0)))

    lookup = LookupEmbedder(sampled)
    started = time.perf_counter()
    diversity = measure([Measured("synthetic", frame)], lookup, sample=args.sample, seed=0, threshold=0.9)
    metrics_s = time.perf_counter() - started
    overall = diversity.rows[0]

    subset = sampled[1 : args.encode_texts + 1]
    with tempfile.TemporaryDirectory() as tmp, Embedder(Path(tmp) / "emb.sqlite") as embedder:
        started = time.perf_counter()
        embedder.encode(sampled[:1])  # the model loads on the first text: timed apart from the encode itself
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        embedder.encode(subset)
        encode_s = time.perf_counter() - started
        started = time.perf_counter()
        embedder.encode(subset)
        store_s = time.perf_counter() - started
    scale = len(sampled) / len(subset)

    print(table(["what", "value"], [
        ["prompts, groups (overall + categories)", f"{len(texts):,}, {len(diversity.rows)}"],
        ["sample per group; distinct sampled texts", f"{args.sample:,}; {len(sampled):,}"],
        ["metrics, vectors from memory (s)", f"{metrics_s:.1f}"],
        ["overall Self-BLEU, Distinct-2 (synthetic text)", f"{overall.self_bleu:.3f}, {overall.distinct_2:.3f}"],
        ["MiniLM model load, with one text (s)", f"{load_s:.1f}"],
        [f"MiniLM encode of {len(subset):,} texts (s, texts/s)", f"{encode_s:.1f}, {len(subset) / encode_s:.0f}"],
        [f"encode of all {len(sampled):,} sampled texts (s, extrapolated)", f"{encode_s * scale:.0f}"],
        [f"the same {len(subset):,} texts from the store (s)", f"{store_s:.2f}"],
        ["all sampled texts from the store (s, extrapolated)", f"{store_s * scale:.1f}"],
    ]))
    footer()


if __name__ == "__main__":
    main()
