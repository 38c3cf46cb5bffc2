"""MiniLM encoding speed: the torch backend (sentence-transformers, fp32: the reference) against the onnx backend
(int8 onnxruntime export of the same bundled weights), and the cosine of every onnx vector to its torch vector.

    .venv/bin/python benchmarks/encode_speed.py [--texts 2000] [--repeats 2] [--batch-size 256]

Both run through `dedup.embed.Embedder` with an in-memory store (every text is encoded; store writes included for
both), after a warm-up that loads the model, in one process, repeats interleaved with alternating order. Printed:
wall seconds and CPU seconds (user+sys, all threads) per backend and repeat, texts/s, the speed-up (median torch /
median onnx, wall and CPU), and min / mean cosine over all texts. The first use of the onnx backend on a machine
exports the model (timed separately). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dedup_scaling import cpu_seconds, machine, synthetic_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    from orforge.dedup.embed import Embedder, bundled_model_dir, onnx_cache_dir, onnx_model_path

    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    started = time.perf_counter()
    existed = (onnx_cache_dir() / "minilm-onnx").exists()
    model_path = onnx_model_path(bundled_model_dir())
    print(f"onnx model: {model_path} ({'found in cache' if existed else 'exported now'}, "
          f"{time.perf_counter() - started:.1f} s, {model_path.stat().st_size / 2**20:.0f} MB)")

    texts = synthetic_prompts(args.texts, seed=11)
    embedders = {name: Embedder(None, batch_size=args.batch_size, backend=name) for name in ("torch", "onnx")}
    for embedder in embedders.values():
        embedder.encode(["warm-up: load the model"])
    import onnxruntime
    import torch

    print(f"{args.texts} synthetic prompts, mean {np.mean([len(t.split()) for t in texts]):.1f} words; batch "
          f"{args.batch_size}; torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"{onnxruntime.__version__}\n")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in embedders}
    vectors: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        order = list(embedders) if repeat % 2 == 0 else list(embedders)[::-1]
        for name in order:
            embedder = embedders[name]
            embedder._db.execute("DELETE FROM embeddings")  # every text encoded again, store writes included
            wall, cpu = time.perf_counter(), cpu_seconds()
            vectors[name] = embedder.encode(texts)
            times[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))
            print(f"repeat {repeat + 1} {name:5s}: wall {times[name][-1][0]:6.1f} s, cpu {times[name][-1][1]:6.1f} s, "
                  f"{args.texts / times[name][-1][0]:6.0f} texts/s   load {os.getloadavg()[0]:.2f}", flush=True)

    wall = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
    cpu = {n: statistics.median(c for _, c in t) for n, t in times.items()}
    cosines = np.einsum("ij,ij->i", vectors["onnx"], vectors["torch"])
    print(f"\nspeed-up onnx vs torch: wall {wall['torch'] / wall['onnx']:.2f}x, cpu {cpu['torch'] / cpu['onnx']:.2f}x "
          f"(medians: torch {wall['torch']:.1f} s / {cpu['torch']:.1f} cpu s, onnx {wall['onnx']:.1f} s / "
          f"{cpu['onnx']:.1f} cpu s)")
    print(f"cosine onnx vs torch over {len(cosines)} texts: min {cosines.min():.4f}, mean {cosines.mean():.5f}, "
          f"below 0.99: {(cosines < 0.99).sum()}")
    print(f"load average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
