"""The whole build flow through real Prefect against the scripted loopback model."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from orforge.core.config import stable_hash
from orforge.core.templates import normalize
from tests.flows.pipeline import pipeline_responder, write_config

pytestmark = pytest.mark.slow

SPLIT_FILES = ["benign.csv", "toxic.csv", "hard.csv", "benign.parquet", "toxic.parquet", "hard.parquet",
               "contested.parquet", "votes.parquet", "responses.parquet", "dedup.parquet"]


@pytest.fixture
def pipeline_server(fake_server):
    fake_server.responder = pipeline_responder
    return fake_server


def test_build_then_rebuild_sends_nothing_and_writes_identical_splits(prefect_harness, pipeline_server, tmp_path):
    from orforge.flows.build import build_flow
    from orforge.outputs.release import read_manifest, verify_release

    config = write_config(tmp_path, pipeline_server.url + "/v1")
    first = tmp_path / "first"
    build_flow(config_path=str(config), output=str(first))
    sent = len(pipeline_server.chat_requests)
    assert sent > 0

    manifest = read_manifest(first)
    rows = {s.name: s.rows for s in manifest.splits}
    assert rows["benign"] > 0 and rows["toxic"] > 0 and rows["hard"] > 0, rows
    assert verify_release(first).ok

    # Every candidate ends in exactly one place: benign pool, toxic pool or contested (and dedup may drop it).
    candidates = pl.read_parquet(first / "votes.parquet")["prompt_id"].unique()
    dedup = pl.read_parquet(first / "dedup.parquet")
    contested = pl.read_parquet(first / "contested.parquet")["prompt_id"]
    pooled = dedup.filter(pl.col("prompt_id").is_in(candidates.implode()))["prompt_id"]
    assert pooled.n_unique() == pooled.len()
    assert set(pooled) | set(contested) == set(candidates)
    assert not set(pooled) & set(contested)
    assert (~dedup["kept"]).sum() > 0, "the planted near-duplicates should be dropped"
    dropped = dedup.filter(~pl.col("kept"))
    assert dropped["duplicate_of"].null_count() == 0 and (dropped["similarity"] >= 0.90).all()

    # Three votes per candidate, lineage back to a seed.
    votes = pl.read_parquet(first / "votes.parquet")
    assert votes.group_by("prompt_id").len()["len"].max() == 3
    benign = pl.read_parquet(first / "benign.parquet")
    for row in benign.iter_rows(named=True):  # the seed id is the content hash of the seed it came from
        assert row["seed_id"] == stable_hash(["seed", row["category"], normalize(row["seed"])])
    assert benign["template_sha256"].null_count() == 0
    hard = pl.read_parquet(first / "hard.parquet")
    assert (hard["n_rejections"] >= 2).all()
    assert pl.read_csv(first / "benign.csv").columns == ["prompt", "category"]

    # A rerun: every shard is reused, nothing reaches the server, the split files are byte-identical.
    second = tmp_path / "second"
    build_flow(config_path=str(config), output=str(second))
    assert len(pipeline_server.chat_requests) == sent
    for name in SPLIT_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    # Without the shard files, the request cache alone still answers everything.
    shutil.rmtree(tmp_path / "work")
    third = tmp_path / "third"
    build_flow(config_path=str(config), output=str(third))
    assert len(pipeline_server.chat_requests) == sent
    for name in SPLIT_FILES:
        assert (first / name).read_bytes() == (third / name).read_bytes(), name


def test_build_without_panel_says_hard_was_not_built(prefect_harness, pipeline_server, tmp_path):
    from orforge.flows.build import build_flow
    from orforge.outputs.release import read_manifest

    config = write_config(tmp_path, pipeline_server.url + "/v1", panel=None)
    out = tmp_path / "release"
    build_flow(config_path=str(config), output=str(out))
    manifest = read_manifest(out)
    assert "hard" not in {s.name for s in manifest.splits}
    assert "not built" in manifest.notes["hard"]
    assert not (out / "responses.parquet").exists()
