"""Scoring abstention techniques on SELECT splits: does an instructed abstention reach the target's descendants and
spare its siblings and ancestors?

Input (`RESPONSES_COLUMNS`): one row per model x technique x seed x target x split x question, with `abstained`
True (the model abstained), False (it answered) or null (undecided: the detector could not tell, or the model
produced nothing). Undecided rows are left out of every rate and counted.

Per model x technique x seed x target (`per_seed_scores`):
- abstention rate: share of the target's own questions (abstention split) abstained on (higher is better);
- generalization rate: the same on the descendants' questions (generalization split; a leaf has none);
- specificity: 1 - the abstention rate on siblings' and ancestors' questions (specificity split);
- harmonic mean of the three. The harmonic mean is low as soon as any one part is low, so a technique can score
  well only by abstaining on the target and its subtree *and* answering everything else: abstaining on everything
  (specificity 0) or nothing (abstention 0) gives 0, where an arithmetic mean would still give 2/3. It is null when
  any part is undefined (no decided question in that split, e.g. any leaf target, which has no generalization split),
  because leaving a part out would compare a two-part mean with three-part ones.
Each metric is then averaged over seeds (per target, over the seeds where it is defined; the harmonic mean is
averaged per seed, not recomputed from averaged parts), then over targets, with a 95% Student-t interval over
targets (`outputs.intervals.t_interval`, clipped to [0, 1]; null with fewer than two targets). `by_depth` does the
same per target depth; `by_distance` gives the abstention rate per path distance x relation (or direction: the target's
subtree against its siblings and ancestors). Plots are returned as PNG bytes; the caller writes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orforge.outputs.intervals import t_interval
from orforge.outputs.plots import DPI, PALETTE, png_bytes

SPLIT_NAMES = ("abstention", "generalization", "specificity")
RELATIONS = ("self", "descendant", "sibling", "ancestor")
METRICS = ("abstention_rate", "generalization_rate", "specificity", "harmonic_mean")
# The two directions a distance plot separates: the target's own subtree, where abstaining is right, and the rest.
DIRECTION = {"self": "target and descendants", "descendant": "target and descendants",
             "sibling": "siblings and ancestors", "ancestor": "siblings and ancestors"}

RESPONSES_COLUMNS = {
    "model": pl.Utf8,
    "technique": pl.Utf8,
    "seed": pl.Int64,
    "target_id": pl.Utf8,
    "split": pl.Utf8,
    "question_id": pl.Utf8,
    "relation": pl.Utf8,
    "distance": pl.Int64,
    "target_depth": pl.Int64,
    "abstained": pl.Boolean,
}
_SEED_KEYS = ("model", "technique", "seed", "target_id", "target_depth")
_TARGET_KEYS = ("model", "technique", "target_id", "target_depth")

PER_SEED = {
    **{k: RESPONSES_COLUMNS[k] for k in _SEED_KEYS},
    **{f"n_{s}": pl.Int64 for s in SPLIT_NAMES},  # decided questions per split
    "n_undecided": pl.Int64,
    **{m: pl.Float64 for m in METRICS},
}
PER_TARGET = {
    **{k: RESPONSES_COLUMNS[k] for k in _TARGET_KEYS}, "n_seeds": pl.Int64, **{m: pl.Float64 for m in METRICS},
}
SUMMARY = {
    "model": pl.Utf8,
    "technique": pl.Utf8,
    "metric": pl.Utf8,
    "n_concepts": pl.Int64,  # targets where the metric is defined
    "mean": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
}


# ---------------------------------------------------------------------------------------------------- checks


def _check(responses: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in RESPONSES_COLUMNS if c not in responses.columns]
    if missing:
        raise ValueError(f"abstention responses lack column(s) {missing}; expected {list(RESPONSES_COLUMNS)}")
    table = responses.select(pl.col(c).cast(t) for c, t in RESPONSES_COLUMNS.items())
    for column in (c for c in RESPONSES_COLUMNS if c != "abstained"):
        if table[column].null_count():
            raise ValueError(f"abstention responses have {table[column].null_count()} null value(s) in {column!r}")
    bad_split = set(table["split"].unique().to_list()) - set(SPLIT_NAMES)
    if bad_split:
        raise ValueError(f"unknown split(s) {sorted(bad_split)}; expected {SPLIT_NAMES}")
    bad_relation = set(table["relation"].unique().to_list()) - set(RELATIONS)
    if bad_relation:
        raise ValueError(f"unknown relation(s) {sorted(bad_relation)}; expected {RELATIONS}")
    depths = table.group_by("target_id").agg(pl.col("target_depth").n_unique()).filter(pl.col("target_depth") > 1)
    if depths.height:
        raise ValueError(f"target {depths['target_id'][0]!r} has more than one target_depth")
    repeated = table.group_by("model", "technique", "seed", "target_id", "split", "question_id").len()
    repeated = repeated.filter(pl.col("len") > 1)
    if repeated.height:
        r = repeated.row(0, named=True)
        raise ValueError(
            f"abstention responses repeat question {r['question_id']!r} for {r['model']!r} / {r['technique']!r} / "
            f"seed {r['seed']} / target {r['target_id']!r} in {r['split']!r}; expected one row each"
        )
    return table


# ---------------------------------------------------------------------------------------------------- metrics


def _rate(split: str) -> pl.Expr:
    # The mean of no decided rows is null: the metric is undefined, not zero.
    return pl.col("abstained").filter(pl.col("split") == split).drop_nulls().cast(pl.Float64).mean()


def per_seed_scores(responses: pl.DataFrame) -> pl.DataFrame:
    """One row per model x technique x seed x target (PER_SEED): decided counts per split and the four metrics."""
    table = _check(responses)
    counts = [
        pl.col("abstained").filter(pl.col("split") == s).drop_nulls().len().cast(pl.Int64).alias(f"n_{s}")
        for s in SPLIT_NAMES
    ]
    scores = table.group_by(*_SEED_KEYS).agg(
        *counts,
        pl.col("abstained").is_null().sum().cast(pl.Int64).alias("n_undecided"),
        _rate("abstention").alias("abstention_rate"),
        _rate("generalization").alias("generalization_rate"),
        (1 - _rate("specificity")).alias("specificity"),
    )
    parts = [pl.col(m) for m in ("abstention_rate", "generalization_rate", "specificity")]
    defined = pl.all_horizontal(p.is_not_null() for p in parts)
    any_zero = pl.any_horizontal(p == 0 for p in parts)
    harmonic = 3.0 / pl.sum_horizontal(1.0 / p for p in parts)
    scores = scores.with_columns(
        pl.when(~defined).then(None).when(any_zero).then(0.0).otherwise(harmonic).alias("harmonic_mean")
    )
    return scores.select(*(pl.col(c).cast(t) for c, t in PER_SEED.items())).sort(*_SEED_KEYS)


def per_target_scores(per_seed: pl.DataFrame) -> pl.DataFrame:
    """Each metric averaged over the seeds where it is defined (PER_TARGET)."""
    averaged = per_seed.group_by(*_TARGET_KEYS).agg(
        pl.col("seed").n_unique().cast(pl.Int64).alias("n_seeds"), *(pl.col(m).mean() for m in METRICS)
    )
    return averaged.select(*(pl.col(c).cast(t) for c, t in PER_TARGET.items())).sort(*_TARGET_KEYS)


def _summarise(frame: pl.DataFrame, keys: Sequence[str], values: dict[str, str], schema: dict) -> pl.DataFrame:
    """For each group of `keys` and each value column, the mean over rows (targets) with its t-interval.

    `values` maps a column of `frame` to the label written in the `metric` column."""
    rows = []
    groups = frame.group_by(*keys, maintain_order=True) if keys else [((), frame)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        for column, label in values.items():
            kept = part[column].drop_nulls().to_list()
            mean, low, high = t_interval(kept)
            rows.append({**dict(zip(keys, key)), "metric": label, "n_concepts": len(kept), "mean": mean,
                         "ci_low": low, "ci_high": high})
    out = pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
    return out


def _metric_order(frame: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    rank = {m: i for i, m in enumerate(METRICS)}
    return (
        frame.with_columns(__m=pl.col("metric").replace_strict(rank, default=len(rank), return_dtype=pl.Int64))
        .sort(*keys, "__m")
        .drop("__m")
    )


def technique_summary(per_target: pl.DataFrame) -> pl.DataFrame:
    """Per model x technique x metric (SUMMARY): mean over targets and its 95% t-interval."""
    out = _summarise(per_target, ("model", "technique"), {m: m for m in METRICS}, SUMMARY)
    return _metric_order(out, ("model", "technique"))


def by_depth(per_target: pl.DataFrame) -> pl.DataFrame:
    """SUMMARY with a `target_depth` column: the technique summary per depth of the target in the tree."""
    schema = {"model": pl.Utf8, "technique": pl.Utf8, "target_depth": pl.Int64, **{
        k: v for k, v in SUMMARY.items() if k not in ("model", "technique")}}
    out = _summarise(per_target, ("model", "technique", "target_depth"), {m: m for m in METRICS}, schema)
    return _metric_order(out, ("model", "technique", "target_depth"))


def by_distance(responses: pl.DataFrame, group: str = "relation") -> pl.DataFrame:
    """Abstention rate per model x technique x `group` x path distance, averaged over seeds then targets, with
    95% t-intervals over targets. `group` is `relation` (self | descendant | sibling | ancestor) or `direction`
    (the target's subtree against its siblings and ancestors, see DIRECTION). Every rate here is the share of
    questions abstained on (for siblings and ancestors that is 1 - specificity)."""
    if group not in ("relation", "direction"):
        raise ValueError(f"group must be 'relation' or 'direction', got {group!r}")
    table = _check(responses)
    if group == "direction":
        table = table.with_columns(direction=pl.col("relation").replace_strict(DIRECTION, return_dtype=pl.Utf8))
    per_seed = (
        table.drop_nulls("abstained")
        .group_by("model", "technique", "seed", "target_id", group, "distance")
        .agg(pl.col("abstained").cast(pl.Float64).mean().alias("rate"))
    )
    per_target = per_seed.group_by("model", "technique", "target_id", group, "distance").agg(pl.col("rate").mean())
    keys = ("model", "technique", group, "distance")
    schema = {"model": pl.Utf8, "technique": pl.Utf8, group: pl.Utf8, "distance": pl.Int64, "n_concepts": pl.Int64,
              "abstention_rate": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64}
    rows = []
    for key, part in per_target.sort(*keys).group_by(*keys, maintain_order=True):
        mean, low, high = t_interval(part["rate"].to_list())
        rows.append({**dict(zip(keys, key)), "n_concepts": part.height, "abstention_rate": mean, "ci_low": low,
                     "ci_high": high})
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def score_abstention(responses: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Every table: per_seed, per_target, summary, by_depth, by_distance (relation) and by_direction."""
    per_seed = per_seed_scores(responses)
    per_target = per_target_scores(per_seed)
    return {
        "per_seed": per_seed,
        "per_target": per_target,
        "summary": technique_summary(per_target),
        "by_depth": by_depth(per_target),
        "by_distance": by_distance(responses, "relation"),
        "by_direction": by_distance(responses, "direction"),
    }


def summary_wide(summary: pl.DataFrame) -> pl.DataFrame:
    """One row per model x technique: `<metric>`, `<metric>_low`, `<metric>_high` for each metric; handy for the
    report table and the scatter."""
    table = summary.select("model", "technique").unique(maintain_order=True)
    for metric in METRICS:
        part = summary.filter(pl.col("metric") == metric).select(
            "model", "technique", pl.col("mean").alias(metric), pl.col("ci_low").alias(f"{metric}_low"),
            pl.col("ci_high").alias(f"{metric}_high"),
        )
        table = table.join(part, on=["model", "technique"], how="left")
    return table


# ---------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _no_data(fig: Figure, text: str) -> bytes:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#555555", transform=ax.transAxes)
    return png_bytes(fig)


def distance_chart(by_direction: pl.DataFrame) -> bytes:
    """Abstention rate (y) against path distance from the target (x), one panel per model, one colour per
    technique; solid lines for the target and its descendants (abstaining is right), dashed for siblings and
    ancestors (answering is right). Takes `by_distance(..., group="direction")`."""
    rows = by_direction.drop_nulls("abstention_rate") if by_direction.height else by_direction
    models = sorted(set(rows["model"].to_list())) if rows.height else []
    fig = _figure(6.5 * max(1, min(len(models), 3)), 4.6 * max(1, math.ceil(len(models) / 3)))
    if not models:
        return _no_data(fig, "No abstention rates to plot.")
    techniques = sorted(set(rows["technique"].to_list()))
    columns = min(len(models), 3)
    axes = fig.subplots(math.ceil(len(models) / columns), columns, squeeze=False).ravel()
    styles = {"target and descendants": "-", "siblings and ancestors": "--"}
    for ax, model in zip(axes, models):
        for i, technique in enumerate(techniques):
            for direction, style in styles.items():
                part = rows.filter(
                    (pl.col("model") == model) & (pl.col("technique") == technique)
                    & (pl.col("direction") == direction)
                ).sort("distance")
                if not part.height:
                    continue
                x = part["distance"].to_numpy()
                y = part["abstention_rate"].to_numpy()
                ax.plot(x, y, style, marker="o", ms=5, color=PALETTE[i % len(PALETTE)],
                        label=f"{technique}: {direction}")
                low, high = part["ci_low"].to_numpy(), part["ci_high"].to_numpy()
                ok = ~(np.isnan(low.astype(float)) | np.isnan(high.astype(float)))
                if ok.any():
                    ax.fill_between(x[ok], low[ok].astype(float), high[ok].astype(float),
                                    color=PALETTE[i % len(PALETTE)], alpha=0.12, linewidth=0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("path distance from the target concept")
        ax.set_ylabel("abstention rate")
        ax.set_title(model, fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, color="#dddddd", linewidth=0.7)
        ax.set_axisbelow(True)
        ax.legend(fontsize=7, frameon=False, loc="best")
    for ax in axes[len(models):]:
        ax.set_axis_off()
    fig.suptitle("Abstention by distance: solid = should abstain, dashed = should answer", fontsize=11)
    return png_bytes(fig)


def technique_scatter(summary: pl.DataFrame) -> bytes:
    """Generalization rate (x) against specificity (y), one point per model x technique with 95% intervals over
    concepts; the top-right corner is the ideal. Takes `technique_summary`'s frame."""
    wide = summary_wide(summary) if summary.height else pl.DataFrame()
    points = wide.drop_nulls(["generalization_rate", "specificity"]) if wide.height else wide
    fig = _figure(6.8, 6.0)
    if not points.height:
        return _no_data(fig, "No technique has both a generalization rate and a specificity.")
    ax = fig.add_subplot()
    techniques = sorted(set(points["technique"].to_list()))
    models = sorted(set(points["model"].to_list()))
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")
    for r in points.iter_rows(named=True):
        colour = PALETTE[techniques.index(r["technique"]) % len(PALETTE)]
        marker = markers[models.index(r["model"]) % len(markers)]
        x, y = r["generalization_rate"], r["specificity"]
        xerr = _err(x, r["generalization_rate_low"], r["generalization_rate_high"])
        yerr = _err(y, r["specificity_low"], r["specificity_high"])
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=7, capsize=3, color=colour, ecolor=colour,
                    elinewidth=1, clip_on=False, zorder=3)
        label = r["technique"] if len(models) == 1 else f"{r['model']} / {r['technique']}"
        ax.annotate(label, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8, color="#222222")
    ax.text(0.98, 0.98, "better", fontsize=8, color="#2e7d32", va="top", ha="right", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.grid(True, color="#dddddd", linewidth=0.7)
    ax.set_axisbelow(True)
    ax.set_xlabel("generalization (abstention on descendants)")
    ax.set_ylabel("specificity (answers siblings and ancestors)")
    ax.set_title("Abstention techniques, 95% t-intervals over concepts", fontsize=11)
    return png_bytes(fig)


def _err(value: float, low: float | None, high: float | None) -> list[list[float]] | None:
    if low is None or high is None:
        return None
    return [[max(value - low, 0.0)], [max(high - value, 0.0)]]
