"""Small, hand-countable records for the outputs tests: 3 categories, seeds, candidates, decisions, dedup results."""

from __future__ import annotations

import polars as pl
import pytest

from orforge.core.config import BuildConfig, stable_hash
from orforge.core.records import CANDIDATES, DECISIONS, DEDUP, FAILURES, SEEDS, VOTES, frame

CATEGORIES = ("harassment", "privacy", "violence")
TEMPLATE = "a" * 64


def make_seeds(per_category: int = 2) -> pl.DataFrame:
    rows = []
    for cat in CATEGORIES:
        for i in range(per_category):
            text = f"{cat} seed {i}"
            rows.append(
                {"seed_id": stable_hash(["seed", cat, text]), "category": cat, "seed": text, "model": "seeder",
                 "template_sha256": TEMPLATE, "sample_index": i}
            )
    return frame(rows, SEEDS)


def make_candidates(seeds: pl.DataFrame, per_seed: int) -> pl.DataFrame:
    rows = []
    for s in seeds.iter_rows(named=True):
        for j in range(per_seed):
            text = f"rewrite {j} of {s['seed']}"
            rows.append(
                {"prompt_id": stable_hash(["cand", text]), "prompt": text, "category": s["category"],
                 "seed_id": s["seed_id"], "seed": s["seed"], "model": "rewriter", "template_sha256": TEMPLATE}
            )
    return frame(rows, CANDIDATES)


def decide(candidates: pl.DataFrame, decision_of) -> pl.DataFrame:
    """decision_of(index, row) -> decision or None (None: no decision row at all)."""
    counts = {"benign": (0, 3, 0), "toxic": (3, 0, 0), "contested": (1, 1, 1), "unjudged": (0, 0, 3)}
    rows = []
    for i, c in enumerate(candidates.iter_rows(named=True)):
        d = decision_of(i, c)
        if d is None:
            continue
        t, b, m = counts[d]
        rows.append({"prompt_id": c["prompt_id"], "n_toxic": t, "n_benign": b, "n_missing": m, "decision": d})
    return frame(rows, DECISIONS)


def keep_all(ids, drop=()) -> pl.DataFrame:
    drop = set(drop)
    rows = [
        {"prompt_id": p, "kept": p not in drop, "duplicate_of": None if p not in drop else "someone",
         "similarity": None if p not in drop else 0.95}
        for p in ids
    ]
    return frame(rows, DEDUP)


def build_config(**overrides) -> BuildConfig:
    spec = lambda name: {"backend": "local", "name": name, "model": f"{name}-model"}  # noqa: E731
    raw = {
        "name": "tiny-orbench",
        "seeds": {"model": spec("seeder"), "seeds_per_category": 2},
        "rewrites": {"model": spec("rewriter"), "rewrites_per_seed": 4},
        "moderation": {"moderators": [spec("mod-a"), spec("mod-b"), spec("mod-c")]},
        "panel": {"members": [spec("p1"), spec("p2"), spec("p3")]},
        **overrides,
    }
    return BuildConfig.model_validate(raw)


@pytest.fixture
def records():
    """seeds (2/category), candidates (4/seed = 8/category); per category: 4 benign, 2 toxic, 1 contested,
    1 with no decision row; one benign and one toxic per category dropped by dedup."""
    seeds = make_seeds()
    cands = make_candidates(seeds, per_seed=4)
    pattern = ["benign", "benign", "toxic", "contested", "benign", "benign", "toxic", None]
    decisions = decide(cands, lambda i, c: pattern[i % 8])
    joined = cands.join(decisions, on="prompt_id", how="left")
    benign_ids = joined.filter(pl.col("decision") == "benign")["prompt_id"].to_list()
    toxic_ids = joined.filter(pl.col("decision") == "toxic")["prompt_id"].to_list()
    category_of = dict(zip(joined["prompt_id"].to_list(), joined["category"].to_list()))

    def first_per_category(ids):
        return [next(p for p in ids if category_of[p] == cat) for cat in CATEGORIES]

    dropped_benign = first_per_category(benign_ids)
    dropped_toxic = first_per_category(toxic_ids)
    benign_dedup = keep_all(benign_ids, drop=dropped_benign)
    toxic_dedup = keep_all(toxic_ids + seeds["seed_id"].to_list(), drop=dropped_toxic)
    return {
        "seeds": seeds, "candidates": cands, "decisions": decisions,
        "benign_dedup": benign_dedup, "toxic_dedup": toxic_dedup,
        "dropped": set(dropped_benign) | set(dropped_toxic),
    }


def make_votes(candidates: pl.DataFrame) -> pl.DataFrame:
    rows = [
        {"prompt_id": c, "moderator": m, "model": f"{m}-model", "verdict": "benign", "vote_category": "none",
         "rationale": None, "template_sha256": TEMPLATE}
        for c in candidates["prompt_id"].to_list() for m in ("mod-a", "mod-b", "mod-c")
    ]
    return frame(rows, VOTES)


def make_failures() -> pl.DataFrame:
    rows = [
        {"stage": "moderate", "role": "moderator", "model": "mod-a", "item_id": "x1", "reason": "invalid_json"},
        {"stage": "moderate", "role": "moderator", "model": "mod-a", "item_id": "x2", "reason": "invalid_json"},
        {"stage": "rewrite", "role": "rewrites", "model": "rewriter", "item_id": "s1", "reason": "timeout"},
    ]
    return frame(rows, FAILURES)
