"""Reading a user's prompt file (CSV, JSONL or parquet with a `prompt` column): ALERT's harmful set and OR-Bench's
seeds. I/O lives in flows/; the rows then go through the pure `generators.ingest.ingest_prompts`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from orforge.core.config import SeedFileConfig
from orforge.core.records import StageResult
from orforge.generators.ingest import ingest_prompts
from orforge.generators.seeds import seeds_from_file

READERS = {
    ".csv": lambda p: pl.read_csv(p, infer_schema_length=0),  # every column as text: ids stay as written
    ".jsonl": pl.read_ndjson,
    ".ndjson": pl.read_ndjson,
    ".parquet": pl.read_parquet,
}


def read_prompt_file(path: Path | str, column: str = "prompt") -> pl.DataFrame:
    """The file's rows as they are. Raises a one-line ValueError naming the file when it cannot be read or has no
    `column` (default `prompt`)."""
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
    if column not in rows.columns:
        raise ValueError(f"{path}: no `{column}` column (columns: {', '.join(rows.columns) or 'none'})")
    return rows


def ingest_prompt_file(path: Path | str) -> StageResult:
    """`read_prompt_file` then `ingest_prompts`: core.records.INGESTED rows, notes with the counts dropped."""
    return ingest_prompts(read_prompt_file(path))


def read_seed_file(spec: SeedFileConfig, categories: list[str]) -> pl.DataFrame:
    """The OR-Bench seeds in a user's file as core.records.SEEDS rows, through the same reader and ingestion as
    ALERT's prompt files. A one-line ValueError naming the file for a missing column, a row without a category, a
    category the build does not have, or a file without seeds."""
    path = Path(spec.path)
    rows = read_prompt_file(path, spec.prompt_column)
    if spec.category_column not in rows.columns:
        raise ValueError(f"{path}: no `{spec.category_column}` column (columns: {', '.join(rows.columns)})")
    ingested = ingest_prompts(rows.select(prompt=pl.col(spec.prompt_column),
                                          category=pl.col(spec.category_column))).records
    if ingested.is_empty():
        raise ValueError(f"{path}: no seeds in it")
    uncategorised = ingested.filter(pl.col("category").is_null()).height
    if uncategorised:
        raise ValueError(f"{path}: {uncategorised} seed(s) have no `{spec.category_column}`")
    unknown = sorted(set(ingested["category"].to_list()) - set(categories))
    if unknown:
        raise ValueError(f"{path}: categories this build does not have: {', '.join(unknown)} "
                         f"(it has: {', '.join(categories)})")
    return seeds_from_file(ingested, path.name, hashlib.sha256(path.read_bytes()).hexdigest())
