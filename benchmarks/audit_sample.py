"""How long `orforge audit sample` takes on an OR-Bench-sized release (80K candidates, 3 moderators, a panel on 20K),
from synthetic frames: the population table, then a draw of 200 stratified by category x decision (30 strata).

    .venv/bin/python benchmarks/audit_sample.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import footer, header  # noqa: E402
from orforge.outputs.audit import audit_population, audit_sample  # noqa: E402


def main(n_candidates: int = 80_000) -> None:
    ids = [f"p{i:06d}" for i in range(n_candidates)]
    categories = [f"cat{i % 10}" for i in range(n_candidates)]
    decisions = ["benign" if i // 10 % 10 < 6 else "toxic" if i // 10 % 10 < 8 else "contested"
                 for i in range(n_candidates)]
    candidates = pl.DataFrame({"prompt_id": ids, "prompt": [f"prompt {i}" for i in ids], "category": categories,
                               "decision": decisions})
    votes = pl.concat([pl.DataFrame({"prompt_id": ids, "moderator": f"mod-{m}",
                                     "verdict": ["toxic" if (i + m) % 3 == 0 else "benign"
                                                 for i in range(n_candidates)]}) for m in range(3)])
    benign = candidates.filter(pl.col("decision") == "benign").select("prompt_id")
    answered = benign.head(20_000)["prompt_id"]
    responses = pl.concat([pl.DataFrame({"prompt_id": answered, "member": f"member-{m}",
                                         "refusal": [(i + m) % 4 == 0 for i in range(answered.len())]})
                           for m in range(3)])
    header("benchmarks/audit_sample.py: drawing a human-audit sample", packages=("polars",))
    started = time.perf_counter()
    population = audit_population(candidates, votes, {"benign": benign}, responses)
    built = time.perf_counter()
    _, key, allocation = audit_sample(population, 200, ["category", "decision"], seed=0)
    drawn = time.perf_counter()
    print(f"candidates {n_candidates:,}; population {built - started:.2f} s; stratified draw of {key.height} over "
          f"{len(allocation)} strata {drawn - built:.2f} s")
    footer()


if __name__ == "__main__":
    main()
