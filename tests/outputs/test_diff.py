"""Release diffs on hand-made releases: exact ids and counts per split and category, files, derived-file status."""

from __future__ import annotations

import json

import polars as pl
import pytest

from orforge.core.records import FAILURES, VOTES, empty
from orforge.outputs.diff import diff_releases, write_diff
from orforge.outputs.release import ManifestInfo, verify_release, write_release
from orforge.outputs.splits import HARD_COLUMNS, SPLIT_COLUMNS
from tests.outputs.conftest import build_config


def split(rows: list[tuple[str, str]], schema=SPLIT_COLUMNS) -> pl.DataFrame:
    """rows of (prompt_id, category); the prompt text is derived from the id."""
    data = [{"prompt_id": i, "prompt": f"prompt {i} | piped", "category": c, "source": "rewrite"} for i, c in rows]
    return pl.DataFrame(data, schema=schema) if data else pl.DataFrame(schema=schema)


def release(folder, splits: dict[str, pl.DataFrame], **config_overrides):
    splits = {**splits, "contested": split([("contested-" + folder.name, "privacy")])}
    info = ManifestInfo(config=build_config(**config_overrides), name="tiny-orbench", created="2024-01-01T00:00:00")
    return write_release(folder, splits, empty(VOTES), empty(FAILURES), info)


@pytest.fixture
def two_releases(tmp_path):
    previous = release(tmp_path / "20240101-030000", {
        "benign": split([("a", "privacy"), ("b", "privacy"), ("c", "privacy"), ("d", "violence")]),
        "toxic": split([("t1", "privacy"), ("t2", "violence")]),
        "hard": split([("a", "privacy"), ("d", "violence")], HARD_COLUMNS),
    })
    current = release(tmp_path / "20240108-030000", {
        "benign": split([("a", "privacy"), ("b", "privacy"), ("d", "violence"), ("e", "privacy"),
                         ("f", "violence"), ("g", "harassment")]),
        "toxic": split([("t1", "privacy"), ("t2", "violence")]),
    }, dedup={"against": ["/somewhere/20240101-030000"]})
    return previous, current


def test_diff_counts_added_and_removed_ids_per_split_and_category(two_releases):
    previous, current = two_releases
    diff = diff_releases(previous, current)

    benign = diff["splits"]["benign"]
    assert (benign["previous"], benign["current"], benign["added"], benign["removed"], benign["unchanged"]) == \
        (4, 6, 3, 1, 3)
    assert benign["added_ids"] == ["g", "e", "f"]  # sorted by category, then id
    assert benign["removed_ids"] == ["c"]
    assert benign["by_category"] == {
        "harassment": {"previous": 0, "current": 1, "added": 1, "removed": 0},
        "privacy": {"previous": 3, "current": 3, "added": 1, "removed": 1},
        "violence": {"previous": 1, "current": 2, "added": 1, "removed": 0},
    }
    assert {e["prompt"] for e in benign["added_examples"]} == {"prompt e | piped", "prompt f | piped",
                                                               "prompt g | piped"}

    toxic = diff["splits"]["toxic"]
    assert (toxic["added"], toxic["removed"], toxic["unchanged"]) == (0, 0, 2)

    # The new release has no panel: its hard split is absent, so every hard prompt counts as removed.
    hard = diff["splits"]["hard"]
    assert hard["in_previous"] and not hard["in_current"]
    assert (hard["removed"], hard["removed_ids"], hard["current"]) == (2, ["a", "d"], 0)

    assert "contested" not in diff["splits"]  # record-only, never published
    assert (diff["added"], diff["removed"]) == (3, 3)
    # Only dedup.against differs between the two configs: that is not a change of the build's settings.
    assert diff["config_changed"] is False


def test_a_changed_setting_is_reported(tmp_path):
    frames = {"benign": split([("a", "privacy")]), "toxic": split([])}
    previous = release(tmp_path / "p", frames)
    current = release(tmp_path / "c", frames, seed=7)
    diff = diff_releases(previous, current)
    assert diff["config_changed"] is True
    assert (diff["added"], diff["removed"]) == (0, 0)
    assert diff["splits"]["benign"]["unchanged"] == 1


def test_write_diff_writes_json_and_markdown_that_verify_release_ignores(two_releases):
    previous, current = two_releases
    diff = diff_releases(previous, current)
    json_path, md_path = write_diff(current, diff)

    assert json.loads(json_path.read_text()) == diff
    md = md_path.read_text()
    assert "| benign | 4 | 6 | +3 | -1 |  |" in md
    assert "| hard | 2 | 0 | +0 | -2 | not built now |" in md
    assert "| privacy | 3 | 3 | +1 | -1 |" in md
    assert "- [privacy] prompt c \\| piped" in md  # a removed example, its pipe escaped for the table syntax
    assert "## toxic" not in md  # nothing changed there
    # Derived files: the sealed release still verifies, and no temporary file is left behind.
    assert verify_release(current).ok, str(verify_release(current))
    assert sorted(p.name for p in current.iterdir() if p.name.startswith(".")) == []


def test_diff_needs_release_folders(tmp_path, two_releases):
    previous, _ = two_releases
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        diff_releases(previous, tmp_path / "empty")


def test_diff_names_releases_by_folder_and_hash_not_by_path(two_releases, tmp_path):
    import hashlib

    previous, current = two_releases
    diff = diff_releases(previous, current)
    json_path, md_path = write_diff(current, diff)
    for name, folder in (("previous", previous), ("current", current)):
        ref = diff[name]
        assert ref == {"folder": folder.name, "name": "tiny-orbench", "created": "2024-01-01T00:00:00",
                       "manifest_sha256": hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()}
    md = md_path.read_text()
    assert f"Previous release: `{previous.name}` (created 2024-01-01T00:00:00, manifest sha256 " \
           f"`{diff['previous']['manifest_sha256'][:16]}`)" in md
    # No trace of where the builder keeps its releases, in either file.
    for text in (json_path.read_text(), md):
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text and "/tmp" not in text


def test_a_relative_folder_is_named_by_its_own_name(two_releases, monkeypatch):
    previous, current = two_releases
    monkeypatch.chdir(current)
    diff = diff_releases(previous, ".")
    assert diff["current"]["folder"] == current.name and diff["splits"]["benign"]["added"] == 3
