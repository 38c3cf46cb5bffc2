"""Prompts from a user's file (a red-team corpus, ALERT's own release...) turned into records: the alternative to
generating seeds for a harmful set. Pure: the file is read by `flows.prompt_files.read_prompt_file`, so this takes a
frame and is testable without files.

Input: a frame with a `prompt` column and optionally `category` and `id`. Output: core.records.INGESTED.
It lives with the generators because it produces the prompt rows a generator would otherwise write.
"""

from __future__ import annotations

import polars as pl

from orforge.core.config import stable_hash
from orforge.core.records import INGESTED, StageResult

# ALERT's release wraps every prompt as "### Instruction:\n<prompt>\n### Response:\n"; the wrapper is optional.
_WRAPPER_HEAD = r"^\s*###\s*Instruction:\s*"
_WRAPPER_TAIL = r"\s*###\s*Response:\s*$"


def harmful_prompt_id(prompt: str) -> str:
    """The content-hash id of a harmful prompt: the same text has the same id whichever way it was made."""
    return stable_hash(["harmful", prompt])


def strip_instruction_wrapper(text: pl.Expr) -> pl.Expr:
    return text.str.replace(_WRAPPER_HEAD, "").str.replace(_WRAPPER_TAIL, "")


def ingest_prompts(prompts: pl.DataFrame) -> StageResult:
    """Unwrap, trim, drop empty prompts and exact duplicates (the first is kept), give content-hash ids.
    A missing `prompt` column is a ValueError."""
    if "prompt" not in prompts.columns:
        raise ValueError(f"no `prompt` column (columns: {', '.join(prompts.columns) or 'none'})")

    def text_column(name: str) -> pl.Expr:
        if name not in prompts.columns:
            return pl.lit(None, dtype=pl.Utf8)
        stripped = pl.col(name).cast(pl.Utf8).str.strip_chars()
        return pl.when(stripped == "").then(None).otherwise(stripped)

    rows = prompts.select(
        prompt=strip_instruction_wrapper(pl.col("prompt").cast(pl.Utf8)).str.strip_chars(),
        category=text_column("category"),
        source_id=text_column("id"),
    )
    non_empty = rows.filter(pl.col("prompt").is_not_null() & (pl.col("prompt") != ""))
    unique = non_empty.unique(subset="prompt", keep="first", maintain_order=True)
    records = unique.with_columns(
        prompt_id=pl.col("prompt").map_elements(harmful_prompt_id, return_dtype=pl.Utf8)
    ).select(list(INGESTED)).cast(INGESTED)
    notes = {"ingested_rows": prompts.height, "empty_dropped": rows.height - non_empty.height,
             "duplicates_dropped": non_empty.height - unique.height}
    return StageResult(records, notes=notes)
