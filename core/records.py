"""Record schemas shared by every stage: column names and dtypes of the DataFrames stages read and return.

A stage takes polars DataFrames with these columns and returns a `StageResult`. Ids are content hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

SEEDS = {
    "seed_id": pl.Utf8,
    "category": pl.Utf8,
    "seed": pl.Utf8,
    "model": pl.Utf8,
    "template_sha256": pl.Utf8,
    "sample_index": pl.Int64,
}

CANDIDATES = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "category": pl.Utf8,
    "seed_id": pl.Utf8,
    "seed": pl.Utf8,
    "model": pl.Utf8,
    "template_sha256": pl.Utf8,
}

VOTES = {
    "prompt_id": pl.Utf8,
    "moderator": pl.Utf8,
    "model": pl.Utf8,
    "verdict": pl.Utf8,  # toxic | benign
    "vote_category": pl.Utf8,  # one of the categories, or "none"
    "rationale": pl.Utf8,
    "template_sha256": pl.Utf8,
}

# One row per candidate after the vote rule; `decision` is benign | toxic | contested | unjudged.
DECISIONS = {
    "prompt_id": pl.Utf8,
    "n_toxic": pl.Int64,
    "n_benign": pl.Int64,
    "n_missing": pl.Int64,
    "decision": pl.Utf8,
}

# One row per input prompt of a dedup pass; `duplicate_of` and `similarity` are null for kept rows.
DEDUP = {
    "prompt_id": pl.Utf8,
    "kept": pl.Boolean,
    "duplicate_of": pl.Utf8,
    "similarity": pl.Float64,
}

RESPONSES = {
    "prompt_id": pl.Utf8,
    "member": pl.Utf8,
    "model": pl.Utf8,
    "response": pl.Utf8,
    "refusal": pl.Boolean,
    "label": pl.Utf8,  # direct_answer | direct_refusal | indirect_refusal | null when unknown
    "method": pl.Utf8,  # keyword | judge | failed
}

FAILURES = {
    "stage": pl.Utf8,
    "role": pl.Utf8,
    "model": pl.Utf8,
    "item_id": pl.Utf8,
    "reason": pl.Utf8,
}


def empty(schema: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    """Rows to a DataFrame with exactly `schema`'s columns, in order (an empty list gives an empty frame)."""
    return pl.DataFrame(rows, schema=schema) if rows else empty(schema)


@dataclass
class StageResult:
    records: pl.DataFrame
    failures: pl.DataFrame = field(default_factory=lambda: empty(FAILURES))
    notes: dict = field(default_factory=dict)  # stage facts for the manifest, e.g. "calls budget spent"
