"""Rows already released are kept: the rule for deduplicating a new build against earlier releases.

A prompt this build generated again (same text, so the same content-hash prompt_id) is the released prompt itself,
not a near-duplicate of it: it stays, unchanged. Only the build's new prompts go through near-duplicate removal,
compared with each other and with every earlier prompt. So a rebuild on an unchanged config writes the same
splits, and a rebuild on a grown config keeps the released rows and adds only new prompts that are not near-copies
of released ones.

Functions over frames only: the flow reads the earlier releases' files and passes their frames in.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from orforge.core.records import DEDUP

RELEASED = {"prompt_id": pl.Utf8, "prompt": pl.Utf8}


def released_prompts(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """prompt_id, prompt of every earlier released row, each prompt id once (first seen wins), in the order given."""
    parts = [f.select(pl.col("prompt_id").cast(pl.Utf8), pl.col("prompt").cast(pl.Utf8)) for f in frames]
    if not parts:
        return pl.DataFrame(schema=RELEASED)
    return pl.concat(parts).unique("prompt_id", keep="first", maintain_order=True)


def _is_released(released: pl.DataFrame) -> pl.Expr:
    return pl.col("prompt_id").is_in(released["prompt_id"].implode())


def unreleased(records: pl.DataFrame, released: pl.DataFrame) -> pl.DataFrame:
    """The rows of `records` whose prompt id is in no earlier release: the only ones near-dedup has to judge."""
    return records.filter(~_is_released(released))


def keep_released(records: pl.DataFrame, new_decisions: pl.DataFrame, released: pl.DataFrame) -> pl.DataFrame:
    """One `DEDUP` row per row of `records`, in its order: `new_decisions` (near-dedup of `unreleased(records,
    released)`) for the new rows, and kept=True with no duplicate for every row that is itself released."""
    kept_released = records.filter(_is_released(released)).select(
        pl.col("prompt_id").cast(pl.Utf8), pl.lit(True).alias("kept"), pl.lit(None, pl.Utf8).alias("duplicate_of"),
        pl.lit(None, pl.Float64).alias("similarity"))
    order = records.select(pl.col("prompt_id").cast(pl.Utf8)).with_row_index("__order")
    combined = pl.concat([new_decisions.select(list(DEDUP)).cast(DEDUP), kept_released.cast(DEDUP)])
    return combined.join(order, on="prompt_id").sort("__order").drop("__order")
