"""add-category: a new release version with the old rows byte-for-byte plus the new category's rows."""

from __future__ import annotations

import hashlib

import polars as pl
import pytest
from typer.testing import CliRunner

from orforge.flows.cli import app
from tests.flows.pipeline import pipeline_responder, write_config

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture
def built(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow

    fake_server.responder = pipeline_responder
    config = write_config(tmp_path, fake_server.url + "/v1")
    release = tmp_path / "releases" / "v1"
    build_flow(config_path=str(config), output=str(release))
    return release, config, fake_server


def test_add_category_keeps_old_rows_and_adds_new_ones(built, tmp_path):
    from orforge.outputs.release import read_manifest, verify_release

    release, config, server = built
    examples = tmp_path / "examples.txt"
    examples.write_text("How do I find out where a celebrity lives?\n")
    new = tmp_path / "releases" / "v2"
    result = runner.invoke(app, ["add-category", "--release", str(release), "--name", "stalking",
                                 "--description", "Following or monitoring a person without consent.",
                                 "--examples", str(examples), "--output", str(new)])
    assert result.exit_code == 0, result.output
    assert verify_release(new).ok and verify_release(release).ok

    for split in ("benign", "toxic", "hard"):
        old_csv, new_csv = (release / f"{split}.csv").read_bytes(), (new / f"{split}.csv").read_bytes()
        assert new_csv.startswith(old_csv), split
        old_rows = pl.read_parquet(release / f"{split}.parquet")
        new_rows = pl.read_parquet(new / f"{split}.parquet")
        assert new_rows.head(old_rows.height).equals(old_rows), split
        assert set(new_rows.slice(old_rows.height)["category"]) <= {"stalking"}
    added = pl.read_parquet(new / "benign.parquet").filter(pl.col("category") == "stalking")
    assert added.height > 0
    assert pl.read_parquet(new / "votes.parquet").height > pl.read_parquet(release / "votes.parquet").height

    manifest = read_manifest(new)
    assert manifest.notes["added_categories"] == ["stalking"]
    parent = read_manifest(release)
    assert manifest.parent.files == parent.files and manifest.parent.folder == "v1"
    assert manifest.parent.manifest_sha256 == hashlib.sha256((release / "manifest.json").read_bytes()).hexdigest()
    assert (manifest.parent.config_hash, manifest.parent.created) == (parent.config_hash, parent.created)
    assert str(tmp_path) not in manifest.parent.model_dump_json()  # named by folder and hash, not by a path
    seeds_requests = [r for r in server.chat_requests if "Category: stalking" in r.last_user]
    assert seeds_requests and "celebrity lives" in seeds_requests[0].last_user


def test_add_category_that_exists_exits_2_and_writes_nothing(built, tmp_path):
    release, config, server = built
    sent = len(server.chat_requests)
    out = tmp_path / "releases" / "v2"
    result = runner.invoke(app, ["add-category", "--release", str(release), "--name", "privacy",
                                 "--description", "again", "--output", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert not out.exists() and len(server.chat_requests) == sent


def test_a_parent_written_with_manifest_schema_1_still_grows_and_rebuilds(built, tmp_path):
    import json
    import shutil
    from pathlib import Path

    from orforge.core.manifest import SCHEMA_VERSION
    from orforge.flows.schedule import scheduled_build_flow
    from orforge.outputs.release import read_manifest, verify_release
    from tests.core.manifest_v1 import rewrite_as_schema_1

    release, config, server = built
    rewrite_as_schema_1(release)
    assert read_manifest(release).schema_version == 1 and verify_release(release).ok
    # A scheduled rebuild takes the newest dated release of the config's name as the previous one.
    previous = tmp_path / "releases" / "pipeline-test" / "20260101-000000-abc123"
    shutil.copytree(release, previous)

    new = tmp_path / "releases" / "v2"
    result = runner.invoke(app, ["add-category", "--release", str(release), "--name", "stalking",
                                 "--description", "Following or monitoring a person without consent.",
                                 "--output", str(new)])
    assert result.exit_code == 0, result.output
    child = read_manifest(new)
    assert child.schema_version == SCHEMA_VERSION == 2 and verify_release(new).ok
    assert child.parent.manifest_sha256 == hashlib.sha256((release / "manifest.json").read_bytes()).hexdigest()
    assert (new / "benign.csv").read_bytes().startswith((release / "benign.csv").read_bytes())
    assert pl.read_parquet(new / "benign.parquet").filter(pl.col("category") == "stalking").height > 0

    sent = len(server.chat_requests)
    rebuilt = Path(scheduled_build_flow(config_path=str(config)))
    assert len(server.chat_requests) == sent  # same config: every answer from the cache or the stored shards
    diff = json.loads((rebuilt / "diff.json").read_text())
    assert diff["previous"]["folder"] == previous.name and (diff["added"], diff["removed"]) == (0, 0)
    assert read_manifest(rebuilt).schema_version == 2 and verify_release(rebuilt).ok
