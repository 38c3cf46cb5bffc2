"""Contrast pairs of an OR-Bench release: every benign rewrite beside the toxic seed it was written from.

The lineage columns every benign row carries (`seed_id`, `seed`) already pair it with a toxic prompt on the same
subject, so the pairs cost nothing to make (XSTest built its contrast sets by hand). The release holds them as
`contrast_pairs.parquet` and `contrast_pairs.csv` (core.records.CONTRAST_PAIRS columns); `orforge evaluate` has each
target answer the seeds too and counts, per target, the four ways a pair can go (outputs.scoring.contrast_scores).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from orforge.core.records import CONTRAST_PAIRS

PAIRS = "contrast_pairs"


def pair_id(prompt_id: str, seed_id: str) -> str:
    return hashlib.sha256(f"{prompt_id}\x00{seed_id}".encode()).hexdigest()[:16]


def contrast_pairs(benign: pl.DataFrame) -> pl.DataFrame:
    """One pair per benign row that has a seed (CONTRAST_PAIRS columns), sorted by category and prompt_id."""
    missing = [c for c in ("prompt_id", "prompt", "category", "seed_id", "seed") if c not in benign.columns]
    if missing:
        raise ValueError(f"contrast pairs need the benign split's lineage; it lacks column(s) {missing}")
    rows = benign.filter(pl.col("seed_id").is_not_null() & pl.col("seed").is_not_null())
    rows = rows.unique("prompt_id", keep="first").sort("category", "prompt_id")
    ids = [pair_id(p, s) for p, s in zip(rows["prompt_id"].to_list(), rows["seed_id"].to_list())]
    return rows.with_columns(pl.Series("pair_id", ids, dtype=pl.Utf8)).select(
        pl.col(c).cast(t) for c, t in CONTRAST_PAIRS.items())


def contrast_release_files(splits: dict[str, pl.DataFrame]) -> tuple[dict[str, pl.DataFrame], dict[str, str]]:
    """The pairs of a release's benign split as `write_release(tables=..., files=...)` arguments: the parquet table
    and the CSV text. Empty dicts when there is no benign split."""
    if "benign" not in splits:
        return {}, {}
    pairs = contrast_pairs(splits["benign"])
    return {PAIRS: pairs}, {f"{PAIRS}.csv": pairs.write_csv()}


def load_contrast_pairs(release: Path) -> pl.DataFrame:
    """The release's contrast pairs: its `contrast_pairs.parquet`, or (a release written before pairs were exported)
    made from its benign split the same way."""
    path = release / f"{PAIRS}.parquet"
    if path.is_file():
        return pl.read_parquet(path)
    benign = release / "benign.parquet"
    return contrast_pairs(pl.read_parquet(benign)) if benign.is_file() else pl.DataFrame(schema=CONTRAST_PAIRS)
