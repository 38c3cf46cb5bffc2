from __future__ import annotations

import polars as pl
import pytest

from orforge.outputs.abstention_scoring import (
    PER_SEED,
    RESPONSES_COLUMNS,
    by_depth,
    by_distance,
    distance_chart,
    per_seed_scores,
    per_target_scores,
    score_abstention,
    summary_wide,
    technique_scatter,
)
from orforge.outputs.plots import PNG_SIGNATURE

T, F, U = True, False, None
# The t quantile for 95% and one degree of freedom (two targets), from a table: 12.7062.
T_975_DF1 = 12.706204736


def responses(spec: dict, model="m", technique="instructed") -> pl.DataFrame:
    """spec: (seed, target, depth) -> {split: [(relation, distance, abstained), ...]}"""
    rows = []
    for (seed, target, depth), splits in spec.items():
        for split, answers in splits.items():
            for i, (relation, distance, abstained) in enumerate(answers):
                rows.append({"model": model, "technique": technique, "seed": seed, "target_id": target,
                             "split": split, "question_id": f"{target}-{split}-{i}", "relation": relation,
                             "distance": distance, "target_depth": depth, "abstained": abstained})
    return pl.DataFrame(rows, schema=RESPONSES_COLUMNS)


# x: a root with descendants; leaf: a leaf, so its generalization (and harmonic mean) is undefined.
WORKED = {
    (0, "x", 0): {
        "abstention": [("self", 0, T), ("self", 0, T), ("self", 0, T), ("self", 0, F)],  # 3/4
        "generalization": [("descendant", 1, T), ("descendant", 2, F)],  # 1/2
        "specificity": [("sibling", 2, F), ("sibling", 2, U)],  # 0/1 decided -> specificity 1
    },
    (1, "x", 0): {
        "abstention": [("self", 0, T)] * 4,  # 1
        "generalization": [("descendant", 1, T), ("descendant", 2, T)],  # 1
        "specificity": [("sibling", 2, T), ("sibling", 2, F)],  # specificity 1/2
    },
    (0, "leaf", 1): {
        "abstention": [("self", 0, T), ("self", 0, F)],  # 1/2
        "specificity": [("ancestor", 1, F), ("sibling", 2, F)],  # specificity 1
    },
    (1, "leaf", 1): {
        "abstention": [("self", 0, T), ("self", 0, T)],  # 1
        "specificity": [("ancestor", 1, T), ("sibling", 2, F)],  # specificity 1/2
    },
}


def by_key(frame: pl.DataFrame, *keys) -> dict:
    key = (lambda r: r[keys[0]]) if len(keys) == 1 else (lambda r: tuple(r[k] for k in keys))
    return {key(r): r for r in frame.iter_rows(named=True)}


def test_per_seed_metrics_by_hand():
    scores = per_seed_scores(responses(WORKED))
    assert dict(scores.schema) == PER_SEED
    rows = by_key(scores, "seed", "target_id")
    x0 = rows[(0, "x")]
    assert (x0["n_abstention"], x0["n_generalization"], x0["n_specificity"], x0["n_undecided"]) == (4, 2, 1, 1)
    assert (x0["abstention_rate"], x0["generalization_rate"], x0["specificity"]) == (0.75, 0.5, 1.0)
    assert x0["harmonic_mean"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 1.0))  # 0.6923
    assert rows[(1, "x")]["harmonic_mean"] == pytest.approx(0.75)  # 3 / (1 + 1 + 2)
    leaf0 = rows[(0, "leaf")]
    assert leaf0["generalization_rate"] is None and leaf0["harmonic_mean"] is None
    assert (leaf0["abstention_rate"], leaf0["specificity"], leaf0["n_generalization"]) == (0.5, 1.0, 0)


def test_averages_over_seeds_then_concepts_with_t_intervals():
    per_target = by_key(per_target_scores(per_seed_scores(responses(WORKED))), "target_id")
    x, leaf = per_target["x"], per_target["leaf"]
    assert (x["abstention_rate"], x["generalization_rate"], x["specificity"]) == (0.875, 0.75, 0.75)
    assert x["harmonic_mean"] == pytest.approx((3 / (1 / 0.75 + 2 + 1) + 0.75) / 2)  # 0.72115
    assert (leaf["abstention_rate"], leaf["generalization_rate"], leaf["specificity"]) == (0.75, None, 0.75)
    assert leaf["harmonic_mean"] is None and leaf["n_seeds"] == 2

    summary = by_key(score_abstention(responses(WORKED))["summary"], "metric")
    abst = summary["abstention_rate"]
    # Two targets: mean 0.8125; sd = 0.125 / sqrt(2); sem = sd / sqrt(2) = 0.0625.
    assert abst["n_concepts"] == 2 and abst["mean"] == pytest.approx(0.8125)
    assert abst["ci_low"] == pytest.approx(0.8125 - T_975_DF1 * 0.0625)
    assert 0.8125 + T_975_DF1 * 0.0625 > 1 and abst["ci_high"] == 1.0  # a rate's interval stops at 1
    gen = summary["generalization_rate"]  # the leaf has none: one target, no interval
    assert (gen["n_concepts"], gen["mean"], gen["ci_low"], gen["ci_high"]) == (1, 0.75, None, None)
    spec = summary["specificity"]  # both targets 0.75: an interval of no width
    assert (spec["mean"], spec["ci_low"], spec["ci_high"]) == (0.75, 0.75, 0.75)
    hm = summary["harmonic_mean"]
    assert hm["n_concepts"] == 1 and hm["mean"] == pytest.approx(x["harmonic_mean"])
    assert list(summary) == ["abstention_rate", "generalization_rate", "specificity", "harmonic_mean"]


def test_undefined_and_zero_parts():
    spec = {
        (0, "mute", 1): {  # every abstention answer undecided: the abstention rate is undefined, not zero
            "abstention": [("self", 0, U), ("self", 0, U)],
            "generalization": [("descendant", 1, T)],
            "specificity": [("sibling", 2, F)],
        },
        (0, "all", 1): {  # abstains on everything: specificity 0, so the harmonic mean is 0
            "abstention": [("self", 0, T)],
            "generalization": [("descendant", 1, T)],
            "specificity": [("sibling", 2, T)],
        },
    }
    rows = by_key(per_seed_scores(responses(spec)), "target_id")
    mute = rows["mute"]
    assert mute["abstention_rate"] is None and mute["n_abstention"] == 0 and mute["n_undecided"] == 2
    assert mute["harmonic_mean"] is None and mute["generalization_rate"] == 1.0
    assert rows["all"]["specificity"] == 0.0 and rows["all"]["harmonic_mean"] == 0.0


def test_by_depth_and_by_distance():
    tables = score_abstention(responses(WORKED))
    depth = by_key(tables["by_depth"], "target_depth", "metric")
    assert depth[(0, "abstention_rate")]["mean"] == 0.875 and depth[(0, "abstention_rate")]["n_concepts"] == 1
    assert depth[(1, "specificity")]["mean"] == 0.75
    assert depth[(1, "generalization_rate")]["n_concepts"] == 0
    assert by_depth(per_target_scores(per_seed_scores(responses(WORKED)))).equals(tables["by_depth"])

    dist = by_key(tables["by_distance"], "relation", "distance")
    # descendants of x: distance 1 abstained in both seeds; distance 2 in seed 1 only.
    assert dist[("descendant", 1)]["abstention_rate"] == 1.0
    assert dist[("descendant", 2)]["abstention_rate"] == 0.5
    # siblings at distance 2: x seed 0 -> 0/1 decided, seed 1 -> 1/2, mean 0.25; leaf -> 0 and 0, mean 0.
    sib = dist[("sibling", 2)]
    assert sib["n_concepts"] == 2 and sib["abstention_rate"] == pytest.approx(0.125)
    assert dist[("ancestor", 1)]["abstention_rate"] == 0.5  # leaf's parent: 0 then 1
    direction = by_key(by_distance(responses(WORKED), "direction"), "direction", "distance")
    assert set(direction) == {("target and descendants", 0), ("target and descendants", 1),
                              ("target and descendants", 2), ("siblings and ancestors", 1),
                              ("siblings and ancestors", 2)}


def test_input_checks():
    frame = responses(WORKED)
    with pytest.raises(ValueError, match="lack column"):
        per_seed_scores(frame.drop("abstained"))
    with pytest.raises(ValueError, match="repeat question"):
        per_seed_scores(pl.concat([frame, frame.head(1)]))
    with pytest.raises(ValueError, match="unknown split"):
        per_seed_scores(frame.with_columns(split=pl.lit("specifity")))


def test_plots_are_png_with_and_without_data():
    worked = pl.concat([responses(WORKED), responses(WORKED, technique="none")])
    tables = score_abstention(worked)
    wide = summary_wide(tables["summary"])
    assert wide.height == 2 and "generalization_rate_low" in wide.columns
    for png in (distance_chart(tables["by_direction"]), technique_scatter(tables["summary"])):
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    empty = score_abstention(responses({}))
    for png in (distance_chart(empty["by_direction"]), technique_scatter(empty["summary"])):
        assert png.startswith(PNG_SIGNATURE)
