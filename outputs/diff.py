"""What changed between two releases: prompts added and removed, per published split and category, by prompt_id.

A prompt_id is a content hash, so a prompt whose text is unchanged keeps its id from one release to the next and an
edited prompt counts as one removed and one added. Only the published splits are compared (`contested` is kept for
the record only). A split that one release lacks (e.g. `hard` when no panel was configured) counts as empty there,
and `in_previous` / `in_current` say so.

`diff.json` lists the ids added and removed (so an evaluation can be brought up to date without rereading both
releases); `diff.md` is the human summary with a few example prompts. Both are derived files
(`outputs.release.DERIVED`): the manifest does not hash them. A release is named by its folder's name, its
manifest's sha256 and its creation time, never by a path: the files may be published, and the builder's file system
is nobody else's business (the sha256 pins the exact release wherever it is copied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from orforge.outputs.atomic import write_json, write_text
from orforge.core.manifest import Manifest
from orforge.outputs.release import RECORD_ONLY_SPLITS, manifest_sha256, read_manifest
from orforge.outputs.splits import PUBLISHED_SPLITS

DIFF_JSON = "diff.json"
DIFF_MD = "diff.md"
EXAMPLES_PER_SPLIT = 5


def _published(manifest: Manifest) -> list[str]:
    return [s.name for s in manifest.splits if s.name not in RECORD_ONLY_SPLITS]


def _split_frame(folder: Path, split: str, present: bool) -> pl.DataFrame:
    schema = {"prompt_id": pl.Utf8, "category": pl.Utf8, "prompt": pl.Utf8}
    if not present:
        return pl.DataFrame(schema=schema)
    return pl.read_parquet(folder / f"{split}.parquet", columns=list(schema)).cast(schema)


def _settings(manifest: Manifest) -> dict[str, Any]:
    """The recorded config without `dedup.against`: a scheduled rebuild points that at the previous release, which
    differs every run, while the settings that make the prompts stay the same."""
    config = json.loads(json.dumps(manifest.config))
    if isinstance(config.get("dedup"), dict):
        config["dedup"].pop("against", None)
    return config


def _counts(frame: pl.DataFrame) -> dict[str, int]:
    return dict(frame.group_by("category").len().iter_rows()) if frame.height else {}


def diff_releases(previous: Path | str, current: Path | str) -> dict[str, Any]:
    """Compare two release folders split by split; every count is a number of distinct prompt_ids."""
    previous, current = Path(previous), Path(current)
    prev_manifest, cur_manifest = read_manifest(previous), read_manifest(current)
    prev_splits, cur_splits = _published(prev_manifest), _published(cur_manifest)
    names = [s for s in PUBLISHED_SPLITS if s in prev_splits or s in cur_splits]
    names += sorted(s for s in {*prev_splits, *cur_splits} if s not in PUBLISHED_SPLITS)

    splits: dict[str, Any] = {}
    for split in names:
        before = _split_frame(previous, split, split in prev_splits).unique("prompt_id", keep="first")
        after = _split_frame(current, split, split in cur_splits).unique("prompt_id", keep="first")
        added = after.join(before, on="prompt_id", how="anti").sort("category", "prompt_id")
        removed = before.join(after, on="prompt_id", how="anti").sort("category", "prompt_id")
        counts = {"previous": _counts(before), "current": _counts(after), "added": _counts(added),
                  "removed": _counts(removed)}
        categories = sorted({c for per in counts.values() for c in per})
        splits[split] = {
            "in_previous": split in prev_splits,
            "in_current": split in cur_splits,
            "previous": before.height,
            "current": after.height,
            "added": added.height,
            "removed": removed.height,
            "unchanged": after.height - added.height,
            "by_category": {c: {k: per.get(c, 0) for k, per in counts.items()} for c in categories},
            "added_ids": added["prompt_id"].to_list(),
            "removed_ids": removed["prompt_id"].to_list(),
            "added_examples": added.select("category", "prompt").head(EXAMPLES_PER_SPLIT).to_dicts(),
            "removed_examples": removed.select("category", "prompt").head(EXAMPLES_PER_SPLIT).to_dicts(),
        }
    return {
        "previous": _release_ref(previous, prev_manifest),
        "current": _release_ref(current, cur_manifest),
        "config_changed": _settings(prev_manifest) != _settings(cur_manifest),
        "added": sum(s["added"] for s in splits.values()),
        "removed": sum(s["removed"] for s in splits.values()),
        "splits": splits,
    }


def _release_ref(folder: Path, manifest: Manifest) -> dict[str, str]:
    return {"folder": folder.resolve().name, "name": manifest.name, "created": manifest.created,
            "manifest_sha256": manifest_sha256(folder)}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def diff_markdown(diff: dict[str, Any]) -> str:
    out = [
        "# Changes since the previous release",
        "",
        f"Previous release: `{diff['previous']['folder']}` (created {diff['previous']['created']}, manifest sha256 "
        f"`{diff['previous']['manifest_sha256'][:16]}`). This release: `{diff['current']['folder']}` (created "
        f"{diff['current']['created']}, manifest sha256 `{diff['current']['manifest_sha256'][:16]}`).",
        "",
        f"{diff['added']} prompts added and {diff['removed']} removed over all published splits, counted by "
        "prompt_id (a content hash: an edited prompt is one removed and one added). "
        + ("The build config changed between the two." if diff["config_changed"] else "The build config is the same."),
        "",
    ]
    rows = []
    for name, s in diff["splits"].items():
        note = "" if s["in_previous"] and s["in_current"] else ("new split" if s["in_current"] else "not built now")
        rows.append([name, s["previous"], s["current"], f"+{s['added']}", f"-{s['removed']}", note])
    out += _table(["split", "previous", "current", "added", "removed", "note"], rows) + [""]
    for name, s in diff["splits"].items():
        if not (s["added"] or s["removed"]):
            continue
        out += [f"## {name}", ""]
        out += _table(["category", "previous", "current", "added", "removed"],
                      [[c, v["previous"], v["current"], f"+{v['added']}", f"-{v['removed']}"]
                       for c, v in s["by_category"].items()])
        out.append("")
        for label, key, total in (("Added", "added_examples", s["added"]), ("Removed", "removed_examples",
                                                                             s["removed"])):
            if s[key]:
                shown = f" (first {len(s[key])} of {total})" if total > len(s[key]) else ""
                out += [f"{label}{shown}:", ""] + [f"- [{e['category']}] {_cell(e['prompt'])}" for e in s[key]]
                out.append("")
    out.append(f"The full lists of prompt ids are in `{DIFF_JSON}`.")
    return "\n".join(out) + "\n"


def write_diff(folder: Path | str, diff: dict[str, Any]) -> tuple[Path, Path]:
    """Write `diff.json` and `diff.md` into the release folder, each atomically."""
    folder = Path(folder)
    return write_json(folder / DIFF_JSON, diff), write_text(folder / DIFF_MD, diff_markdown(diff))
