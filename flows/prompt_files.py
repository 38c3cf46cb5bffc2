"""Reading a user's prompt file (CSV, JSONL or parquet with a `prompt` column) for the harmful set. I/O lives in
flows/; the rows then go through the pure `generators.ingest.ingest_prompts`."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from orforge.core.records import StageResult
from orforge.generators.ingest import ingest_prompts

READERS = {
    ".csv": lambda p: pl.read_csv(p, infer_schema_length=0),  # every column as text: ids stay as written
    ".jsonl": pl.read_ndjson,
    ".ndjson": pl.read_ndjson,
    ".parquet": pl.read_parquet,
}


def read_prompt_file(path: Path | str) -> pl.DataFrame:
    """The file's rows as they are. Raises a one-line ValueError naming the file when it cannot be read or has no
    `prompt` column."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: a prompt file is {', '.join(READERS)}, not {path.suffix or 'suffix-less'}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        rows = reader(path)
    except Exception as e:  # noqa: BLE001 - polars raises many kinds for a damaged file; all are bad input
        first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"{path}: cannot read it: {first_line.strip()}") from None
    if "prompt" not in rows.columns:
        raise ValueError(f"{path}: no `prompt` column (columns: {', '.join(rows.columns) or 'none'})")
    return rows


def ingest_prompt_file(path: Path | str) -> StageResult:
    """`read_prompt_file` then `ingest_prompts`: core.records.INGESTED rows, notes with the counts dropped."""
    return ingest_prompts(read_prompt_file(path))
