"""Rows already released are kept: only new prompts go to near-dedup, released ones come back kept, in order."""

from __future__ import annotations

import polars as pl

from orforge.core.records import DEDUP
from orforge.dedup.released import keep_released, released_prompts, unreleased


def test_released_prompts_are_unique_first_seen_and_typed():
    a = pl.DataFrame({"prompt_id": ["p1", "p2"], "prompt": ["one", "two"], "category": ["x", "y"]})
    b = pl.DataFrame({"prompt_id": ["p2", "p3"], "prompt": ["two again", "three"]})
    merged = released_prompts([a, b])
    assert merged.rows() == [("p1", "one"), ("p2", "two"), ("p3", "three")]
    assert released_prompts([]).schema == {"prompt_id": pl.Utf8, "prompt": pl.Utf8}


def test_released_rows_are_kept_and_only_new_rows_are_judged():
    records = pl.DataFrame({"prompt_id": ["n1", "r1", "n2", "r2"], "prompt": ["a", "b", "c", "d"]})
    released = pl.DataFrame({"prompt_id": ["r1", "r2", "old"], "prompt": ["b", "d", "e"]})
    new = unreleased(records, released)
    assert new["prompt_id"].to_list() == ["n1", "n2"]
    # near-dedup's verdict on the new rows: n2 is a near-copy of a released prompt
    decisions = pl.DataFrame({"prompt_id": ["n1", "n2"], "kept": [True, False], "duplicate_of": [None, "old"],
                              "similarity": [None, 0.97]}, schema=DEDUP)
    out = keep_released(records, decisions, released)
    assert out.schema == DEDUP
    assert out.rows() == [("n1", True, None, None), ("r1", True, None, None), ("n2", False, "old", 0.97),
                          ("r2", True, None, None)]


def test_nothing_released_leaves_every_row_to_near_dedup():
    records = pl.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x", "y"]})
    released = released_prompts([])
    assert unreleased(records, released).equals(records)
    decisions = pl.DataFrame({"prompt_id": ["a", "b"], "kept": [True, True], "duplicate_of": [None, None],
                              "similarity": [None, None]}, schema=DEDUP)
    assert keep_released(records, decisions, released).equals(decisions)
