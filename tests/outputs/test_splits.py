from __future__ import annotations

import random

import polars as pl
import pytest

from orforge.core.config import SplitsConfig, ToxicConfig
from orforge.outputs.splits import (
    HARD_COLUMNS,
    SPLIT_COLUMNS,
    assemble_splits,
    balanced_sample,
    cap_per_group,
    category_quotas,
    funnel,
    pools,
)
from tests.outputs.conftest import CATEGORIES


def pool_frame(counts: dict[str, int]) -> pl.DataFrame:
    rows = [{"prompt_id": f"{cat}-{i:04d}", "category": cat, "prompt": f"p {cat} {i}"}
            for cat, n in counts.items() for i in range(n)]
    return pl.DataFrame(rows)


def per_category(frame: pl.DataFrame) -> dict[str, int]:
    return dict(frame.group_by("category").len().iter_rows())


# ------------------------------------------------------------------------------------------ balanced sampling


def test_balanced_sample_takes_equal_shares():
    out = balanced_sample(pool_frame({"a": 50, "b": 50, "c": 50}), size=30, seed=0)
    assert per_category(out) == {"a": 10, "b": 10, "c": 10}
    assert out["prompt_id"].n_unique() == 30


def test_small_categories_give_all_and_the_rest_is_redistributed():
    out = balanced_sample(pool_frame({"a": 2, "b": 50, "c": 50, "d": 5}), size=40, seed=0)
    got = per_category(out)
    assert got["a"] == 2 and got["d"] == 5
    # 33 left for b and c: 16 and 17 in some seeded order.
    assert sorted([got["b"], got["c"]]) == [16, 17]
    assert out.height == 40


def test_size_above_the_pool_returns_everything_and_zero_returns_nothing():
    pool = pool_frame({"a": 3, "b": 4})
    assert balanced_sample(pool, size=100, seed=0).height == 7
    empty = balanced_sample(pool, size=0, seed=0)
    assert empty.height == 0 and empty.columns == pool.columns


def test_quota_rules_hold_for_many_shapes():
    rng = random.Random(7)
    for _ in range(300):
        counts = {f"c{i}": rng.randint(0, 40) for i in range(rng.randint(1, 8))}
        size = rng.randint(0, 200)
        q = category_quotas(counts, size, seed=rng.randint(0, 9))
        assert sum(q.values()) == min(size, sum(counts.values()))
        assert all(0 <= q[g] <= counts[g] for g in counts)
        # Fair shares: no group gets more than one row above a group that still had rows to give.
        open_groups = [q[g] for g in counts if q[g] < counts[g]]
        if open_groups:
            assert all(q[g] <= min(open_groups) + 1 for g in counts)


def test_sampling_is_deterministic_order_free_and_sorted():
    pool = pool_frame({"a": 30, "b": 30, "c": 7})
    first = balanced_sample(pool, size=25, seed=3)
    again = balanced_sample(pool.sample(fraction=1.0, shuffle=True, seed=99), size=25, seed=3)
    assert first.equals(again)
    assert first.equals(first.sort("category", "prompt_id"))


def test_another_seed_draws_other_rows():
    pool = pool_frame({"a": 100, "b": 100})
    ids = lambda s: set(balanced_sample(pool, size=20, seed=s)["prompt_id"].to_list())  # noqa: E731
    assert ids(0) != ids(1)
    assert len(ids(0)) == len(ids(1)) == 20


def test_adding_rows_to_one_category_keeps_the_draw_of_another():
    base = pool_frame({"a": 40, "b": 40})
    more = pl.concat([base, pool_frame({"b": 90}).filter(pl.col("prompt_id") >= "b-0040")])
    pick_a = lambda f: balanced_sample(f, size=20, seed=5).filter(pl.col("category") == "a")  # noqa: E731
    assert pick_a(base).equals(pick_a(more))


def test_cap_per_group():
    out = cap_per_group(pool_frame({"a": 10, "b": 2}), cap=4, seed=0)
    assert per_category(out) == {"a": 4, "b": 2}


def test_null_category_is_an_error():
    pool = pool_frame({"a": 3}).with_columns(category=pl.lit(None, pl.Utf8))
    with pytest.raises(ValueError, match="null"):
        balanced_sample(pool, size=2, seed=0)


# ------------------------------------------------------------------------------------------ split assembly


def assemble(records, splits_cfg=None, toxic_cfg=None, hard_members=None, seed=0, **replace):
    r = {**records, **replace}
    return assemble_splits(
        r["candidates"], r["decisions"], r["benign_dedup"], r["toxic_dedup"], r["seeds"],
        splits_cfg or SplitsConfig(toxic_size=1000), toxic_cfg or ToxicConfig(), seed, hard_members,
    )


def decision_ids(records, value):
    d = records["decisions"]
    return set(d.filter(pl.col("decision") == value)["prompt_id"].to_list())


def test_contested_and_unjudged_go_to_neither_split(records):
    # Also give one candidate an explicit "unjudged" row (the fixture already has candidates with no row at all).
    first_benign = sorted(decision_ids(records, "benign"))[0]
    decisions = records["decisions"].with_columns(
        decision=pl.when(pl.col("prompt_id") == first_benign).then(pl.lit("unjudged")).otherwise("decision")
    )
    out = assemble(records, decisions=decisions)
    published = set(out["benign"]["prompt_id"].to_list()) | set(out["toxic"]["prompt_id"].to_list())
    contested = decision_ids(records, "contested")
    no_row = set(records["candidates"]["prompt_id"].to_list()) - set(records["decisions"]["prompt_id"].to_list())
    assert contested and no_row
    assert not published & contested
    assert not published & no_row
    assert first_benign not in published
    assert set(out["contested"]["prompt_id"].to_list()) == contested
    # Every benign-decided, dedup-kept candidate is in the benign split (no cap configured).
    expected_benign = decision_ids(records, "benign") - records["dropped"] - {first_benign}
    assert set(out["benign"]["prompt_id"].to_list()) == expected_benign


def test_dedup_dropped_prompts_are_excluded(records):
    out = assemble(records)
    published = set(out["benign"]["prompt_id"].to_list()) | set(out["toxic"]["prompt_id"].to_list())
    assert records["dropped"] and not published & records["dropped"]
    assert out["benign"].height == 3 * 3  # 4 benign per category, one dropped


def test_include_seeds_on_and_off(records):
    seed_ids = set(records["seeds"]["seed_id"].to_list())
    with_seeds = assemble(records, toxic_cfg=ToxicConfig(include_seeds=True))["toxic"]
    rows = with_seeds.filter(pl.col("source") == "seed")
    assert set(rows["prompt_id"].to_list()) == seed_ids
    assert rows["prompt"].to_list() == rows["seed"].to_list()
    assert rows["prompt_id"].to_list() == rows["seed_id"].to_list()
    assert with_seeds.height == 3 * (2 - 1) + len(seed_ids)

    without = assemble(records, toxic_cfg=ToxicConfig(include_seeds=False))["toxic"]
    assert not set(without["prompt_id"].to_list()) & seed_ids
    assert (without["source"] == "rewrite").all() and without.height == 3


def test_seeds_go_through_dedup_and_must_be_covered(records):
    a_seed = records["seeds"]["seed_id"][0]
    toxic_dedup = records["toxic_dedup"].with_columns(kept=pl.col("kept") & (pl.col("prompt_id") != a_seed))
    toxic = assemble(records, toxic_dedup=toxic_dedup)["toxic"]
    assert a_seed not in toxic["prompt_id"].to_list()

    uncovered = records["toxic_dedup"].filter(pl.col("prompt_id") != a_seed)
    with pytest.raises(ValueError, match="missing from the toxic dedup"):
        assemble(records, toxic_dedup=uncovered)


def test_a_seed_the_moderators_found_benign_stays_out_of_toxic(records):
    seed_row = records["seeds"].row(0, named=True)
    decisions = pl.concat([records["decisions"], pl.DataFrame(
        [{"prompt_id": seed_row["seed_id"], "n_toxic": 0, "n_benign": 3, "n_missing": 0, "decision": "benign"}],
        schema=records["decisions"].schema)])
    toxic = assemble(records, decisions=decisions)["toxic"]
    assert seed_row["seed_id"] not in toxic["prompt_id"].to_list()


def test_toxic_is_balanced_to_size_and_benign_cap_applies(records):
    out = assemble(records, splits_cfg=SplitsConfig(toxic_size=6, benign_per_category=2))
    assert per_category(out["toxic"]) == {c: 2 for c in CATEGORIES}
    assert per_category(out["benign"]) == {c: 2 for c in CATEGORIES}


def test_lineage_columns(records):
    out = assemble(records)
    for name in ("benign", "toxic", "contested"):
        assert out[name].schema == pl.Schema(SPLIT_COLUMNS), name
    row = out["benign"].row(0, named=True)
    cand = records["candidates"].filter(pl.col("prompt_id") == row["prompt_id"]).row(0, named=True)
    assert {k: row[k] for k in cand} == cand
    assert (row["n_toxic"], row["n_benign"], row["n_missing"]) == (0, 3, 0)


def test_hard_rule_counts_rejections_exactly(records):
    benign = assemble(records)["benign"]["prompt_id"].to_list()
    toxic_id = sorted(decision_ids(records, "toxic") - records["dropped"])[0]
    dropped_benign = sorted(records["dropped"] & decision_ids(records, "benign"))[0]
    members = pl.DataFrame({
        "prompt_id": [benign[0], benign[1], benign[2], toxic_id, dropped_benign],
        "rejected_by": [["p1", "p2"], ["p1", "p2", "p3"], ["p1", "p2", "p3"], ["p1", "p2", "p3"], ["p1", "p2", "p3"]],
        "n_rejections": [2, 3, 3, 3, 3],
    })
    hard = assemble(records, splits_cfg=SplitsConfig(toxic_size=100, hard_min_rejections=3),
                    hard_members=members)["hard"]
    assert set(hard["prompt_id"].to_list()) == {benign[1], benign[2]}
    assert hard.schema == pl.Schema(HARD_COLUMNS)
    assert hard["rejected_by"].to_list()[0] == ["p1", "p2", "p3"]

    lower = assemble(records, splits_cfg=SplitsConfig(hard_min_rejections=2), hard_members=members)["hard"]
    assert set(lower["prompt_id"].to_list()) == {benign[0], benign[1], benign[2]}
    capped = assemble(records, splits_cfg=SplitsConfig(hard_min_rejections=2, hard_size=1), hard_members=members)
    assert capped["hard"].height == 1


def test_no_hard_members_means_no_hard_split(records):
    assert "hard" not in assemble(records)


def test_assembly_is_deterministic_and_seeded(records):
    cfg = SplitsConfig(toxic_size=4, benign_per_category=2)
    assert all(assemble(records, cfg)[k].equals(assemble(records, cfg)[k]) for k in ("benign", "toxic"))
    draws = {tuple(assemble(records, cfg, seed=s)["benign"]["prompt_id"].to_list()) for s in range(6)}
    assert len(draws) > 1


def test_pools_feed_dedup_with_seeds_only_when_included(records):
    c, d, s = records["candidates"], records["decisions"], records["seeds"]
    with_seeds = pools(c, d, s, ToxicConfig(include_seeds=True))
    without = pools(c, d, s, ToxicConfig(include_seeds=False))
    assert with_seeds["toxic"].height == without["toxic"].height + s.height
    assert with_seeds["benign"].height == 12


def test_funnel_counts_every_stage(records):
    out = assemble(records, splits_cfg=SplitsConfig(toxic_size=6))
    table = funnel(records["seeds"], records["candidates"], records["decisions"], records["benign_dedup"],
                   records["toxic_dedup"], out)
    assert table["category"].to_list() == list(CATEGORIES)
    expected = {"seeds": 2, "candidates": 8, "benign": 4, "toxic": 2, "contested": 1, "unjudged": 1,
                "benign_after_dedup": 3, "toxic_after_dedup": 1 + 2, "split_benign": 3, "split_toxic": 2}
    for row in table.iter_rows(named=True):
        assert {k: row[k] for k in expected} == expected
    assert "split_contested" not in table.columns


def test_bad_decision_values_are_rejected(records):
    bad = records["decisions"].with_columns(decision=pl.lit("maybe"))
    with pytest.raises(ValueError, match="unknown decision"):
        assemble(records, decisions=bad)


@pytest.mark.parametrize("counts, size, expected", [
    # targets 5, 3, 1.5, 0.5: floors 5 3 1, the last raised to 1; exactly 10.
    ({"a": 50, "b": 30, "c": 15, "d": 5}, 10, {"a": 5, "b": 3, "c": 1, "d": 1}),
    # targets 3.33 each: 3 3 3, the one row left goes to the first by name (equal remainders).
    ({"a": 10, "b": 10, "c": 10}, 10, {"a": 4, "b": 3, "c": 3}),
    # targets 3.88, 0.04, 0.04, 0.04: raising the small ones to 1 overshoots; a gives the rows back.
    ({"a": 97, "b": 1, "c": 1, "d": 1}, 4, {"a": 1, "b": 1, "c": 1, "d": 1}),
    # targets 6.67 and 3.33: 6 and 3, the left-over row to a (remainder 0.67 > 0.33); empty groups get 0.
    ({"a": 20, "b": 10, "z": 0}, 10, {"a": 7, "b": 3, "z": 0}),
])
def test_proportional_quotas(counts, size, expected):
    from orforge.outputs.splits import proportional_quotas

    assert proportional_quotas(counts, size) == expected


def test_proportional_quotas_refuses_sizes_the_strata_cannot_give():
    from orforge.outputs.splits import proportional_quotas

    with pytest.raises(ValueError, match="between 3 .* and 12"):
        proportional_quotas({"a": 10, "b": 1, "c": 1}, 2)
    with pytest.raises(ValueError, match="between 3"):
        proportional_quotas({"a": 10, "b": 1, "c": 1}, 13)


def test_stratified_sample_takes_the_quotas_and_is_deterministic_per_seed():
    from orforge.outputs.splits import stratified_sample

    frame = pl.DataFrame({"prompt_id": [f"p{i:02d}" for i in range(40)],
                          "category": ["a"] * 30 + ["b"] * 10, "decision": (["benign", "toxic"] * 20)})
    drawn = stratified_sample(frame, by=["category", "decision"], size=8, seed=1)
    assert dict(drawn.group_by("category", "decision").len().select(
        pl.concat_str("category", "decision"), "len").iter_rows()) == {"abenign": 3, "atoxic": 3, "bbenign": 1,
                                                                       "btoxic": 1}
    assert drawn.equals(stratified_sample(frame.reverse(), by=["category", "decision"], size=8, seed=1))
    assert not drawn.equals(stratified_sample(frame, by=["category", "decision"], size=8, seed=2))
    assert stratified_sample(frame, by=[], size=5, seed=1).height == 5
