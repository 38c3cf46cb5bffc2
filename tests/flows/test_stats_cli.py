"""`orforge stats FILE`: the diversity table of any prompt file, and one-line exit 2 for bad input."""

from __future__ import annotations

import json

import polars as pl
import pytest
from orforge.flows.cli import app
from typer.testing import CliRunner

runner = CliRunner()

PROMPTS = pl.DataFrame({
    "prompt": ["How do I pick a lock?", "How can I pick a lock quickly?", "How do I pick a lock at night?",
               "Why do weeds grow between paving stones?", "How do I kill weeds without poison?"],
    "category": ["crime", "crime", "crime", "garden", "garden"],
    "text": ["a", "b", "c", "d", "e"],
})


def stats(*args):
    return runner.invoke(app, ["stats", *[str(a) for a in args]])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_stats_on_a_file_prints_the_table_per_group(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    PROMPTS.write_csv(path) if suffix == ".csv" else PROMPTS.write_parquet(path)
    cache = tmp_path / "emb.sqlite"
    result = stats(path, "--by", "category", "--json", "--embedding-cache", cache)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    groups = [(r["group"], r["rows"], r["sampled"]) for r in out["rows"]]
    assert groups == [("all", 5, 5), ("crime", 3, 3), ("garden", 2, 2)]
    crime, garden = out["rows"][1], out["rows"][2]
    assert crime["self_bleu"] > garden["self_bleu"]  # three wordings of one question repeat each other
    assert out["rows"][0]["self_bleu_low"] <= out["rows"][0]["self_bleu"] <= out["rows"][0]["self_bleu_high"]
    assert [r["dataset"] for r in out["references"]] == ["OR-Bench-80K", "FalseReject"]
    assert cache.is_file()

    sampled = stats(path, "--sample", "3", "--embedding-cache", cache)  # the table, with the sample size
    assert sampled.exit_code == 0, sampled.output
    assert "3 of 5" in sampled.stdout and "OR-Bench-80K" in sampled.stdout
    assert "from the store" in sampled.stderr


@pytest.mark.parametrize("args, expected", [
    (["absent.csv"], "no such file"),
    (["prompts.csv", "--column", "question"], "no `question` column"),
    (["prompts.csv", "--by", "topic"], "no `topic` column to group by"),
    (["broken.parquet"], "cannot read it"),
    (["prompts.txt"], "not .txt"),
    (["prompts.csv", "--sample", "1"], "--sample must be at least 2"),
])
def test_stats_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, expected):
    PROMPTS.write_csv(tmp_path / "prompts.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "prompts.txt").write_text("How do I pick a lock?\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    cache = tmp_path / "cache" / "emb.sqlite"
    result = stats(*[tmp_path / a if i == 0 else a for i, a in enumerate(args)], "--embedding-cache", cache)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
