"""Helpers shared by the fault tests: config edits, request identities, a free port, and the release bookkeeping
checks that must hold whatever went wrong during a build."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import polars as pl
import yaml

from orforge.outputs.release import read_manifest

# Faults the openai client retries (transport and status); the others reach the hub as a 200 and are re-asked.
TRANSPORT_FAULTS = frozenset({"rate_limited", "server_error", "unavailable", "reset", "delay"})
REASK_SEED_STEP = 1_000_003  # llm.hub moves a re-ask's seed by this much per attempt


def edit_config(path: Path, specs: dict | None = None, **top) -> Path:
    """Rewrite a config written by `write_config`: `specs` fields go into every model spec, `top` keys replace
    top-level sections."""
    raw = yaml.safe_load(path.read_text())
    raw.update(top)
    for spec in _specs(raw):
        spec.update(specs or {})
    path.write_text(yaml.safe_dump(raw))
    return path


def _specs(raw: dict) -> list[dict]:
    found = [raw["seeds"]["model"], raw["rewrites"]["model"], *raw["moderation"]["moderators"]]
    if raw.get("panel"):
        found += raw["panel"]["members"]
    return found


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def logical_id(body: dict) -> str:
    """What a request asks, whichever attempt it is: a re-ask changes the seed and temperature, not the question."""
    return json.dumps([body.get("model"), body.get("messages"), (body.get("seed") or 0) % REASK_SEED_STEP],
                      sort_keys=True)


def check_release_bookkeeping(folder: Path, n_moderators: int = 3, panel_size: int = 3) -> dict:
    """Assert that every seed, candidate, vote and failure of a release is accounted for, and that the manifest's
    counts agree with the files. Returns the frames for further checks."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    candidates = pl.read_parquet(folder / "candidates.parquet")
    votes = pl.read_parquet(folder / "votes.parquet")
    failures = pl.read_parquet(folder / "failures.parquet")
    dedup = pl.read_parquet(folder / "dedup.parquet")
    contested = pl.read_parquet(folder / "contested.parquet")
    responses = pl.read_parquet(folder / "responses.parquet")

    # Every candidate ends in exactly one place: the benign pool, the toxic pool, contested, or unjudged with a
    # moderation failure for every moderator.
    cand_ids = set(candidates["prompt_id"])
    assert len(cand_ids) == candidates.height
    pooled = dedup.filter(pl.col("prompt_id").is_in(list(cand_ids)))
    assert pooled["prompt_id"].n_unique() == pooled.height, "a candidate is in both pools"
    in_pool = {pool: set(pooled.filter(pl.col("pool") == pool)["prompt_id"]) for pool in ("benign", "toxic")}
    contested_ids = set(contested["prompt_id"])
    assert not contested_ids & (in_pool["benign"] | in_pool["toxic"])
    unjudged = cand_ids - in_pool["benign"] - in_pool["toxic"] - contested_ids
    decision = dict(candidates.select("prompt_id", "decision").iter_rows())
    for name, ids in (*in_pool.items(), ("contested", contested_ids), ("unjudged", unjudged)):
        assert {p for p in cand_ids if decision[p] == name} == ids, name

    # Per candidate: votes and moderation failures add up to the number of moderators, and failures carry a reason.
    mod_failures = failures.filter(pl.col("stage") == "moderation")
    assert set(votes["prompt_id"]) <= cand_ids and set(mod_failures["item_id"]) <= cand_ids
    n_votes = dict(votes.group_by("prompt_id").len().iter_rows())
    n_failed = dict(mod_failures.group_by("item_id").len().iter_rows())
    for p in cand_ids:
        assert n_votes.get(p, 0) + n_failed.get(p, 0) == n_moderators, p
    for p in unjudged:
        assert n_failed.get(p, 0) == n_moderators, p
    missing = dict(candidates.select("prompt_id", "n_missing").iter_rows())
    assert all(missing[p] == n_failed.get(p, 0) for p in cand_ids)
    assert failures["reason"].null_count() == 0 and (failures["reason"].str.len_chars() > 0).all()

    # Every seed produced candidates or has a rewrite failure (never both). The seeds are the toxic pool's rows
    # that are not candidates (toxic.include_seeds is on by default).
    seed_ids = set(dedup.filter(pl.col("pool") == "toxic")["prompt_id"]) - cand_ids
    produced = set(candidates["seed_id"])
    rewrite_failed = set(failures.filter(pl.col("stage") == "rewrites")["item_id"])
    assert produced <= seed_ids and rewrite_failed <= seed_ids
    assert not produced & rewrite_failed
    assert produced | rewrite_failed == seed_ids

    # The manifest's funnel adds up and agrees with the files.
    funnel = pl.DataFrame(manifest.counts.funnel)
    for row in funnel.iter_rows(named=True):
        assert row["benign"] + row["toxic"] + row["contested"] + row["unjudged"] == row["candidates"], row
    totals = funnel.drop("category").sum().row(0, named=True)
    assert totals["seeds"] == len(seed_ids)
    assert totals["candidates"] == candidates.height
    for name, ids in (*in_pool.items(), ("contested", contested_ids), ("unjudged", unjudged)):
        assert totals[name] == len(ids), name
    for pool in ("benign", "toxic"):
        kept = dedup.filter((pl.col("pool") == pool) & pl.col("kept")).height
        assert totals[f"{pool}_after_dedup"] == kept, pool
    assert totals["split_benign"] == totals["benign_after_dedup"]  # no per-category cap in these configs

    rows = {}
    for split in manifest.splits:
        frame = pl.read_parquet(folder / split.parquet)
        rows[split.name] = frame.height
        assert frame.height == split.rows == sum(split.by_category.values()), split.name
        if split.csv:
            csv = pl.read_csv(folder / split.csv)
            assert csv.columns == ["prompt", "category"] and csv.height == split.rows, split.name
        if f"split_{split.name}" in totals:
            assert totals[f"split_{split.name}"] == split.rows, split.name
    counts = manifest.counts
    assert counts.votes == votes.height
    assert counts.responses == responses.height
    assert counts.dedup_dropped == (~dedup["kept"]).sum()
    assert manifest.failures.total == failures.height
    assert sum(n for stage in manifest.failures.by_stage.values() for n in stage.values()) == failures.height

    # The panel: every member answered (or failed on) every benign prompt; a null answer has a failure row.
    benign_ids = set(pl.read_parquet(folder / "benign.parquet")["prompt_id"])
    assert set(responses["prompt_id"]) == benign_ids
    assert responses.height == panel_size * len(benign_ids)
    null_answers = set(responses.filter(pl.col("response").is_null()).select("prompt_id", "member").iter_rows())
    panel_failed = set(failures.filter(pl.col("stage") == "panel").select("item_id", "model").iter_rows())
    assert null_answers == panel_failed
    hard = pl.read_parquet(folder / "hard.parquet")
    assert set(hard["prompt_id"]) <= benign_ids

    # Token accounting: each role's failure count is the number of failure rows it left.
    for role, usage in manifest.tokens.items():
        assert usage.failures == failures.filter(pl.col("role") == role).height, role
    return {"manifest": manifest, "candidates": candidates, "votes": votes, "failures": failures,
            "responses": responses, "rows": rows}
