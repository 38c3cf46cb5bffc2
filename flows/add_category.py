"""The `add-category` flow: grow an existing release by new rejection categories.

The new categories go through the whole pipeline (seeds, rewrites, votes, panel) and are deduplicated against every
prompt of the existing release. The result is a new release folder whose files hold the old rows first, unchanged
(each old CSV is a byte prefix of the new one; each old parquet's rows are the new one's first rows), then the new
category's rows. The new manifest records the parent release (`Manifest.parent`: its folder name, manifest sha256
and file hashes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from prefect import flow

from orforge.core.categories import resolve_categories
from orforge.core.config import BuildConfig, CategorySpec, ConfigError, parse_config
from orforge.flows.build import run_pipeline
from orforge.flows.common import new_folder, publish_funnel_artifact, published_diversity, release_diversity
from orforge.core.manifest import ManifestError, ParentRelease
from orforge.outputs.release import (
    MANIFEST,
    QUALITY_REJECTIONS_FILE,
    ManifestInfo,
    manifest_sha256,
    read_manifest,
    read_release,
    verify_release,
    write_release,
)
from orforge.outputs.contrast import contrast_release_files
from orforge.outputs.report import write_report


class AddCategoryError(ValueError):
    """The request cannot be carried out as asked (exit code 2)."""


def release_config(release: Path) -> BuildConfig:
    """The config a release was built with, as its manifest recorded it."""
    try:
        manifest = read_manifest(release)
        return parse_config(manifest.config, str(release / MANIFEST))
    except ManifestError as e:
        raise AddCategoryError(str(e)) from None
    except ConfigError as e:
        raise AddCategoryError(f"{e}; pass --config with the models to use") from None


def existing_categories(release: Path) -> set[str]:
    candidates = pl.read_parquet(release / "candidates.parquet", columns=["category"])
    return set(candidates["category"]) | {c.name for c in resolve_categories(release_config(release).categories)}


def plan(release: Path, new: list[CategorySpec], cfg: BuildConfig | None) -> BuildConfig:
    """Check the request and return the config for the new categories' run. Raises AddCategoryError."""
    if not (release / MANIFEST).is_file() or not (release / "candidates.parquet").is_file():
        raise AddCategoryError(f"{release}: not a release folder written by orforge build")
    try:
        check = verify_release(release)
    except ManifestError as e:
        raise AddCategoryError(str(e)) from None
    if check.changed or check.missing:
        raise AddCategoryError(f"{release}: files differ from its manifest ({check}); refusing to extend it")
    if not new:
        raise AddCategoryError("no new category given (use --name/--description or categories.custom in --config)")
    taken = existing_categories(release)
    names = [c.name for c in new]
    clash = sorted(set(names) & taken) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise AddCategoryError(f"category {clash[0]!r} already exists in {release}")
    cfg = cfg or release_config(release)
    n_total = len(taken) + len(new)
    share = len(new) / n_total  # the new categories get their share of the balanced splits, not the whole size
    splits = cfg.splits.model_copy(update={"toxic_size": max(1, round(cfg.splits.toxic_size * share)),
                                           "hard_size": max(1, round(cfg.splits.hard_size * share))})
    dedup = cfg.dedup.model_copy(update={"against": [*cfg.dedup.against, release]})
    return cfg.model_copy(update={"splits": splits, "dedup": dedup})


def _append(old: pl.DataFrame | None, new: pl.DataFrame | None) -> pl.DataFrame | None:
    if old is None or new is None:
        return old if new is None else new
    return pl.concat([old, new.select(old.columns).cast(old.schema)])


def add_categories(release: Path, new: list[CategorySpec], cfg: BuildConfig | None = None,
                   output: Path | None = None) -> Path:
    run_cfg = plan(release, new, cfg)
    started = datetime.now(UTC)
    folder = output or new_folder(release.parent, started)
    old = read_release(release)
    result = run_pipeline(run_cfg, new)

    splits = {name: _append(old["splits"].get(name), result.splits.get(name))
              for name in [*old["splits"], *(n for n in result.splits if n not in old["splits"])]}
    dedup = _append(pl.read_parquet(release / "dedup.parquet"), result.dedup) \
        if (release / "dedup.parquet").exists() else result.dedup
    parent = old["manifest"]
    old_funnel = parent.counts.funnel
    funnel = _append(pl.DataFrame(old_funnel), result.funnel) if old_funnel else result.funnel
    base = cfg or release_config(release)
    merged_cfg = base.model_copy(update={"categories": base.categories.model_copy(
        update={"custom": [*base.categories.custom, *new]})})
    notes = {**parent.notes, **result.notes, "added_categories": [c.name for c in new]}
    # Named by folder name and manifest hash, not by a path on this machine: the manifest is published.
    parent_ref = ParentRelease(folder=release.resolve().name, name=parent.name, created=parent.created,
                               manifest_sha256=manifest_sha256(release), config_hash=parent.config_hash,
                               files=parent.files)
    info = ManifestInfo(config=merged_cfg, funnel=funnel, tokens=result.tokens, notes=notes, name=base.name,
                        created=started.isoformat(timespec="seconds"), parent=parent_ref,
                        diversity=release_diversity(run_cfg, published_diversity(splits), run_cfg.dedup.threshold),
                        quality=_append(pl.read_parquet(release / QUALITY_REJECTIONS_FILE)
                                        if (release / QUALITY_REJECTIONS_FILE).exists() else None, result.rejected))
    pair_tables, pair_files = contrast_release_files(splits)
    write_release(folder, splits, _append(old["votes"], result.votes), _append(old["failures"], result.failures),
                  info, responses=_append(old["responses"], result.responses), dedup=dedup, tables=pair_tables,
                  files=pair_files)
    write_report(folder)
    publish_funnel_artifact(merged_cfg, funnel, folder)
    return folder


@flow(name="orforge-add-category", persist_result=False)
def add_category_flow(release: str, categories: list[dict], config_path: str | None = None,
                      output: str | None = None) -> str:
    from orforge.core.config import load_config

    cfg = load_config(config_path) if config_path else None
    specs = [CategorySpec(**c) for c in categories]
    return str(add_categories(Path(release), specs, cfg, Path(output) if output else None))
