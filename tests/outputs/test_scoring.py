from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from orforge.core.records import RESPONSES, frame
from orforge.outputs.plots import PALETTE, PNG_SIGNATURE
from orforge.outputs.intervals import wilson_interval
from orforge.outputs.scoring import ALL, category_plot, scatter_plot, score, scoring_frame, summary


def responses(model: str, split: str, refusals: list[bool | None], categories: list[str] | None = None) -> pl.DataFrame:
    categories = categories or ["privacy"] * len(refusals)
    return pl.DataFrame(
        {
            "prompt_id": [f"{split}-{i}" for i in range(len(refusals))],
            "split": [split] * len(refusals),
            "category": categories,
            "model": [model] * len(refusals),
            "refusal": refusals,
        },
        schema={"prompt_id": pl.Utf8, "split": pl.Utf8, "category": pl.Utf8, "model": pl.Utf8,
                "refusal": pl.Boolean},
    )


def row(scores: pl.DataFrame, model: str, split: str, category: str = ALL) -> dict:
    rows = scores.filter((pl.col("model") == model) & (pl.col("split") == split) & (pl.col("category") == category))
    assert rows.height == 1
    return rows.row(0, named=True)


def three_models() -> pl.DataFrame:
    rng = np.random.default_rng(5)
    parts = []
    for model, rates in {"cautious": (0.8, 0.98), "balanced": (0.3, 0.9), "loose": (0.05, 0.4)}.items():
        for split, p in zip(("hard", "toxic"), rates):
            refusals = [bool(x) for x in rng.random(120) < p]
            categories = [("privacy", "violence", "harassment")[i % 3] for i in range(120)]
            parts.append(responses(model, split, refusals, categories))
    return pl.concat(parts)


# ---------------------------------------------------------------------------------------------------- rates


def test_rate_and_interval_bracket_the_point_estimate():
    refusals = [True] * 37 + [False] * 63
    r = row(score(responses("m", "hard", refusals)), "m", "hard")
    assert (r["n"], r["n_refused"], r["n_undecided"]) == (100, 37, 0)
    assert r["rejection_rate"] == pytest.approx(0.37)
    assert r["ci_low"] < 0.37 < r["ci_high"]
    # Wilson at 37 of 100: 0.2818 to 0.4678 (about the normal approximation's +-0.095, pulled towards 0.5).
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.2818, 0.4678), abs=1e-4)


def test_more_prompts_give_a_narrower_interval():
    small = row(score(responses("m", "hard", [True] * 6 + [False] * 14)), "m", "hard")
    large = row(score(responses("m", "hard", [True] * 300 + [False] * 700)), "m", "hard")
    assert small["rejection_rate"] == large["rejection_rate"] == pytest.approx(0.3)
    assert large["ci_high"] - large["ci_low"] < (small["ci_high"] - small["ci_low"]) / 3


def test_scores_do_not_depend_on_row_order_or_on_other_groups():
    data = three_models()
    first = score(data)
    assert first.equals(score(data.sample(fraction=1.0, shuffle=True, seed=1)))
    alone = score(data.filter(pl.col("model") == "balanced"))
    assert row(alone, "balanced", "hard") == row(first, "balanced", "hard")


def test_all_or_none_refused_keeps_an_interval_with_a_width():
    scores = score(pl.concat([responses("m", "toxic", [True] * 12), responses("m", "hard", [False] * 12)]))
    toxic, hard = row(scores, "m", "toxic"), row(scores, "m", "hard")
    assert toxic["rejection_rate"] == 1.0 and hard["rejection_rate"] == 0.0
    assert (toxic["ci_low"], toxic["ci_high"]) == pytest.approx((0.7575, 1.0), abs=1e-4)
    assert (hard["ci_low"], hard["ci_high"]) == pytest.approx((0.0, 0.2425), abs=1e-4)


def test_a_tiny_category_is_not_reported_as_certain():
    # Two prompts in a category, neither refused: the percentile bootstrap said 0.000 - 0.000.
    data = responses("m", "hard", [False, False, True, True, False], ["tiny", "tiny", "big", "big", "big"])
    tiny = row(score(data), "m", "hard", "tiny")
    assert (tiny["n"], tiny["n_refused"], tiny["rejection_rate"]) == (2, 0, 0.0)
    assert (tiny["ci_low"], tiny["ci_high"]) == pytest.approx((0.0, 0.658), abs=1e-3)
    overall = row(score(data), "m", "hard")
    assert (overall["ci_low"], overall["ci_high"]) == pytest.approx(wilson_interval(2, 5))


def test_undecided_rows_are_counted_but_left_out_of_the_rate():
    r = row(score(responses("m", "hard", [True, True, True, False, None, None])), "m", "hard")
    assert (r["n"], r["n_undecided"], r["n_refused"]) == (6, 2, 3)
    assert r["rejection_rate"] == pytest.approx(0.75)
    nothing = row(score(responses("m", "hard", [None, None])), "m", "hard")
    assert nothing["rejection_rate"] is None and nothing["ci_low"] is None and nothing["n_undecided"] == 2


def test_per_category_rows_follow_the_overall_row():
    data = responses("m", "hard", [True, False, True, True], ["privacy", "privacy", "violence", "violence"])
    scores = score(pl.concat([data, responses("m", "toxic", [True]), responses("a", "hard", [False])]))
    assert scores.select("model", "split", "category").rows() == [
        ("a", "hard", ALL), ("a", "hard", "privacy"),
        ("m", "hard", ALL), ("m", "hard", "privacy"), ("m", "hard", "violence"),
        ("m", "toxic", ALL), ("m", "toxic", "privacy"),
    ]
    assert row(scores, "m", "hard", "privacy")["rejection_rate"] == 0.5
    assert row(scores, "m", "hard", "violence")["rejection_rate"] == 1.0
    assert row(scores, "m", "hard")["rejection_rate"] == 0.75


def test_bad_input_is_rejected():
    data = responses("m", "hard", [True, False])
    with pytest.raises(ValueError, match="lack column"):
        score(data.drop("split"))
    with pytest.raises(ValueError, match="repeat 1"):
        score(pl.concat([data, data.head(1)]))


def test_scoring_frame_scores_a_prompt_in_every_split_that_holds_it():
    splits = {
        "benign": pl.DataFrame({"prompt_id": ["a", "b"], "category": ["privacy", "violence"]}),
        "hard": pl.DataFrame({"prompt_id": ["b"], "category": ["violence"]}),
    }
    answers = frame(
        [{"prompt_id": p, "member": member, "model": f"{member}-model", "response": "r", "refusal": refused,
          "label": None, "method": "keyword"}
         for p, member, refused in [("a", "t1", False), ("b", "t1", True), ("zz", "t1", True), ("b", "t2", None)]],
        RESPONSES,
    )
    table = scoring_frame(answers, splits)
    assert sorted(table.select("split", "prompt_id", "model").rows()) == [
        ("benign", "a", "t1"), ("benign", "b", "t1"), ("benign", "b", "t2"), ("hard", "b", "t1"), ("hard", "b", "t2"),
    ]
    scores = score(table)
    assert row(scores, "t1", "hard")["rejection_rate"] == 1.0
    assert row(scores, "t1", "benign")["rejection_rate"] == 0.5
    assert summary(scores).filter(pl.col("model") == "t1").select("hard_rate", "benign_rate").row(0) == (1.0, 0.5)


# ---------------------------------------------------------------------------------------------------- plots


def colours(path) -> set[tuple[int, ...]]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return {c for _, c in image.getcolors(maxcolors=1 << 20)}


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_scatter_plot_draws_one_coloured_point_per_model(tmp_path):
    scores = score(three_models())
    path = scatter_plot(scores, tmp_path / "scatter.png")
    seen = colours(path)
    assert len(seen) > 50
    # One series colour per model, in sorted model order.
    for i in range(3):
        assert rgb(PALETTE[i]) in seen
    assert rgb(PALETTE[3]) not in seen


def test_category_plot_has_a_panel_per_split(tmp_path):
    scores = score(three_models())
    one = category_plot(scores.filter(pl.col("split") == "hard"), tmp_path / "one.png")
    two = category_plot(scores, tmp_path / "two.png")
    assert len(colours(two)) > 50 and rgb(PALETTE[2]) in colours(two)
    assert Image.open(two).height > Image.open(one).height * 1.5


def test_plots_of_nothing_still_write_a_png(tmp_path):
    empty = score(responses("m", "hard", []))
    for draw in (scatter_plot, category_plot):
        path = draw(empty, tmp_path / f"{draw.__name__}.png")
        assert len(colours(path)) > 1


# ---------------------------------------------------------------------------------------------------- contrast pairs


def test_contrast_pairs_come_from_the_benign_lineage():
    from orforge.core.records import CONTRAST_PAIRS
    from orforge.outputs.contrast import contrast_pairs, pair_id

    benign = pl.DataFrame({"prompt_id": ["b2", "b1", "b3"], "prompt": ["benign two", "benign one", "benign three"],
                           "category": ["privacy", "privacy", "crime"], "seed_id": ["s1", "s1", None],
                           "seed": ["toxic one", "toxic one", None], "source": ["rewrite"] * 3})
    pairs = contrast_pairs(benign)
    assert pairs.schema == pl.Schema(CONTRAST_PAIRS)
    assert pairs.select("prompt_id", "seed_id", "seed").rows() == [("b1", "s1", "toxic one"), ("b2", "s1", "toxic one")]
    assert pairs["pair_id"].to_list() == [pair_id("b1", "s1"), pair_id("b2", "s1")]
    assert pairs["pair_id"].n_unique() == 2
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['seed_id', 'seed'\]"):
        contrast_pairs(benign.drop("seed_id", "seed"))


def test_contrast_scores_count_the_four_ways_a_pair_goes_with_wilson_intervals():
    from orforge.outputs.scoring import contrast_scores

    pairs = pl.DataFrame({"pair_id": [f"q{i}" for i in range(7)], "category": ["a"] * 4 + ["b"] * 3,
                          "prompt_id": [f"b{i}" for i in range(7)], "prompt": ["x"] * 7,
                          "seed_id": ["s0", "s0", "s1", "s2", "s3", "s4", "s5"], "seed": ["y"] * 7})
    # benign b0..b6 refused?  F F T F T F None; seeds s0..s5 refused?  T T F F (no answer for s4) T
    # -> b0/s0 wanted, b1/s0 wanted, b2/s1 refuses both, b3/s2 answers both, b4/s3 reverse, b5/s4 and b6/s5
    #    undecided (one side has no decided answer).
    refused = {"b0": False, "b1": False, "b2": True, "b3": False, "b4": True, "b5": False, "b6": None,
               "s0": True, "s1": True, "s2": False, "s3": False, "s5": True}
    rows = [{"prompt_id": p, "member": "A", "model": "m", "response": "r", "refusal": r, "label": None,
             "method": "keyword"} for p, r in refused.items()]
    table = contrast_scores(pairs, frame(rows, RESPONSES))
    overall = {r["meaning"]: r for r in table.filter(pl.col("category") == ALL).iter_rows(named=True)}
    assert {m: r["n"] for m, r in overall.items()} == {"wanted": 2, "over-refusal": 1, "unsafe": 1, "reverse": 1}
    assert {r["n_pairs"] for r in overall.values()} == {5} and {r["n_undecided"] for r in overall.values()} == {2}
    assert overall["wanted"]["rate"] == pytest.approx(0.4)
    assert (overall["wanted"]["ci_low"], overall["wanted"]["ci_high"]) == pytest.approx(wilson_interval(2, 5), abs=1e-9)
    assert table.filter(pl.col("category") == ALL)["outcome"].to_list() == [
        "answer_benign_refuse_seed", "refuse_both", "answer_both", "refuse_benign_answer_seed"]
    b = {r["meaning"]: r for r in table.filter(pl.col("category") == "b").iter_rows(named=True)}
    assert b["reverse"]["n"] == 1 and b["reverse"]["n_pairs"] == 1 and b["reverse"]["n_undecided"] == 2
    # A target that answered none of the benign prompts has no pairs.
    assert contrast_scores(pairs, frame(rows, RESPONSES).filter(pl.col("prompt_id").str.starts_with("s"))).is_empty()
