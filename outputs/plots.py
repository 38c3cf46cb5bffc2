"""Charts for the audit, the evaluation and the report, drawn as PNG bytes.

Every function takes a polars frame and returns the bytes of one PNG; callers write them with `outputs.atomic` or
embed them in HTML. Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas directly, never
through pyplot, so drawing neither needs a display nor changes the backend of whoever imported us (a notebook keeps
its own), and two threads may draw at once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 100
# Colour-blind-safe qualitative palette (Okabe and Ito); cycled when there are more series.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
SPLIT_ORDER = ("hard", "toxic", "benign")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _message(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#555555", transform=ax.transAxes)


def _ordered_splits(splits: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(splits))
    return [s for s in SPLIT_ORDER if s in present] + sorted(s for s in present if s not in SPLIT_ORDER)


# ---------------------------------------------------------------------------------------------------- agreement


def kappa_heatmap(pairwise: pl.DataFrame, category: str = "all") -> bytes:
    """Moderator x moderator matrix of Cohen's kappa (from `moderators.agreement` `pairwise`, one category).

    Cells show kappa and the number of prompts both moderators judged; an undefined kappa is grey and says n/a.
    The diagonal is left blank: a moderator's agreement with itself says nothing.
    """
    rows = pairwise.filter(pl.col("category") == category) if pairwise.height else pairwise
    moderators = sorted(set(rows["moderator_a"].to_list()) | set(rows["moderator_b"].to_list())) if rows.height else []
    size = max(3.2, 1.1 * len(moderators) + 2.2)
    fig = _figure(size + 1.2, size)
    if len(moderators) < 2:
        _message(fig, "Agreement needs at least two moderators.")
        return png_bytes(fig)
    index = {m: i for i, m in enumerate(moderators)}
    kappa = np.full((len(moderators), len(moderators)), np.nan)
    counts = np.zeros_like(kappa, dtype=int)
    for r in rows.iter_rows(named=True):
        i, j = index[r["moderator_a"]], index[r["moderator_b"]]
        value = np.nan if r["cohen_kappa"] is None else float(r["cohen_kappa"])
        kappa[i, j] = kappa[j, i] = value
        counts[i, j] = counts[j, i] = r["n"]
    ax = fig.add_subplot()
    cmap = _diverging_cmap()
    image = ax.imshow(np.ma.masked_invalid(kappa), cmap=cmap, vmin=-1, vmax=1)
    for i in range(len(moderators)):
        for j in range(len(moderators)):
            if i == j:
                ax.add_patch(_cell(i, j, "#ffffff"))
                continue
            if math.isnan(kappa[i, j]):
                ax.add_patch(_cell(i, j, "#d9d9d9"))
                label, colour = f"n/a\nn={counts[i, j]}", "#333333"
            else:
                label = f"{kappa[i, j]:.2f}\nn={counts[i, j]}"
                colour = "white" if abs(kappa[i, j]) > 0.6 else "#111111"
            ax.text(j, i, label, ha="center", va="center", fontsize=9, color=colour)
    ax.set_xticks(range(len(moderators)), labels=moderators, rotation=30, ha="right")
    ax.set_yticks(range(len(moderators)), labels=moderators)
    ax.set_title(f"Cohen's kappa between moderators ({category})", fontsize=11)
    fig.colorbar(image, ax=ax, shrink=0.8, label="kappa")
    return png_bytes(fig)


def _diverging_cmap():
    from matplotlib import colormaps

    return colormaps["RdBu"].with_extremes(bad="#d9d9d9")


def _cell(i: int, j: int, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=colour, edgecolor="white")


# ---------------------------------------------------------------------------------------------------- funnel


def funnel_chart(funnel: pl.DataFrame, stages: Sequence[str] | None = None) -> bytes:
    """Horizontal bars, one per stage (top to bottom in pipeline order), stacked by category, total at the end."""
    stages = [s for s in (stages or [c for c in funnel.columns if c != "category"]) if s in funnel.columns]
    categories = funnel["category"].to_list() if funnel.height else []
    fig = _figure(9, max(2.5, 0.45 * len(stages) + 1.6))
    if not stages or not categories:
        _message(fig, "No funnel counts recorded.")
        return png_bytes(fig)
    ax = fig.add_subplot()
    y = np.arange(len(stages))
    left = np.zeros(len(stages))
    for i, category in enumerate(categories):
        row = funnel.filter(pl.col("category") == category).row(0, named=True)
        values = np.array([row[s] or 0 for s in stages], dtype=float)
        ax.barh(y, values, left=left, color=_colour(i), label=str(category), height=0.7)
        left += values
    top = left.max() if left.max() > 0 else 1
    for yi, total in zip(y, left):
        ax.text(total + top * 0.01, yi, f"{int(total):,}", va="center", fontsize=9)
    ax.set_yticks(y, labels=[s.replace("_", " ") for s in stages])
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.12)
    ax.set_xlabel("prompts")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("Prompts at each stage, stacked by category", fontsize=11)
    if len(categories) > 1:
        ax.legend(fontsize=8, loc="lower right", ncols=2 if len(categories) > 6 else 1, frameon=False)
    return png_bytes(fig)


# ---------------------------------------------------------------------------------------------------- scores


def _overall(scores: pl.DataFrame) -> pl.DataFrame:
    if "category" in scores.columns:
        return scores.filter(pl.col("category") == "all")
    return scores


def _point(frame: pl.DataFrame, model: str, split: str) -> dict | None:
    rows = frame.filter((pl.col("model") == model) & (pl.col("split") == split))
    if rows.height == 0 or rows["rejection_rate"][0] is None:
        return None
    return rows.row(0, named=True)


def scatter_chart(scores: pl.DataFrame) -> bytes:
    """OR-Bench's picture: x = rejection rate on the hard split (over-refusal, lower is better), y = rejection rate
    on the toxic split (safety, higher is better), one labelled point per model with its 95% intervals.

    A release without a hard split puts the benign split on x instead, and says so on the axis.
    """
    overall = _overall(scores)
    splits = set(overall["split"].to_list()) if overall.height else set()
    x_split = "hard" if "hard" in splits else "benign"
    fig = _figure(7, 6.2)
    models = sorted(set(overall["model"].to_list())) if overall.height else []
    points = []
    for m in models:
        x, y = _point(overall, m, x_split), _point(overall, m, "toxic")
        if x is not None and y is not None:
            points.append((m, x, y))
    if not points:
        _message(fig, f"No model has rejection rates on both the {x_split} and the toxic split.")
        return png_bytes(fig)
    ax = fig.add_subplot()
    # The ideal model sits in the top-left corner: refuses toxic prompts, answers the rest.
    ax.text(0.02, 0.98, "better", fontsize=8, color="#2e7d32", va="top", transform=ax.transAxes)
    for i, (model, x, y) in enumerate(points):
        xerr = _err(x)
        yerr = _err(y)
        ax.errorbar(x["rejection_rate"], y["rejection_rate"], xerr=xerr, yerr=yerr, fmt="o", ms=7, capsize=3,
                    color=_colour(i), ecolor=_colour(i), elinewidth=1, clip_on=False, zorder=3)
        # Keep a label inside the axes: below a point near the top, left of a point near the right edge.
        px, py = x["rejection_rate"], y["rejection_rate"]
        dx, ha = (-6, "right") if px > 0.85 else (6, "left")
        dy, va = (-6, "top") if py > 0.93 else (6, "bottom")
        ax.annotate(model, (px, py), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=9,
                    color="#222222", zorder=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.grid(True, color="#dddddd", linewidth=0.7)
    ax.set_axisbelow(True)
    label = "hard" if x_split == "hard" else "benign (no hard split)"
    ax.set_xlabel(f"rejection rate on {label} prompts (over-refusal, lower is better)")
    ax.set_ylabel("rejection rate on toxic prompts (safety, higher is better)")
    ax.set_title("Over-refusal against safety, 95% Wilson intervals", fontsize=11, pad=12)
    return png_bytes(fig)


def _err(row: dict) -> list[list[float]] | None:
    rate, low, high = row["rejection_rate"], row.get("ci_low"), row.get("ci_high")
    if low is None or high is None:
        return None
    return [[max(rate - low, 0.0)], [max(high - rate, 0.0)]]


def category_chart(scores: pl.DataFrame) -> bytes:
    """Rejection rate per category (x) with one bar per model, one panel per split present, 95% intervals."""
    rows = scores.filter(pl.col("category") != "all") if scores.height else scores
    splits = _ordered_splits(rows["split"].to_list()) if rows.height else []
    models = sorted(set(rows["model"].to_list())) if rows.height else []
    n_categories = rows["category"].n_unique() if rows.height else 0
    width = min(16, max(7, 0.35 * n_categories * max(1, len(models)) + 3))
    fig = _figure(width, max(3.2, 3.1 * len(splits) + 0.4))
    if not splits:
        _message(fig, "No per-category scores.")
        return png_bytes(fig)
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    bar = 0.8 / max(1, len(models))
    for ax, split in zip(axes, splits):
        part = rows.filter(pl.col("split") == split)
        categories = sorted(set(part["category"].to_list()))
        x = np.arange(len(categories))
        for i, model in enumerate(models):
            by_cat = {r["category"]: r for r in part.filter(pl.col("model") == model).iter_rows(named=True)}
            heights, lows, highs = [], [], []
            for c in categories:
                r = by_cat.get(c)
                rate = r["rejection_rate"] if r and r["rejection_rate"] is not None else np.nan
                heights.append(rate)
                lows.append(rate - r["ci_low"] if r and r.get("ci_low") is not None else 0.0)
                highs.append(r["ci_high"] - rate if r and r.get("ci_high") is not None else 0.0)
            offset = (i - (len(models) - 1) / 2) * bar
            ax.bar(x + offset, np.nan_to_num(heights), width=bar, color=_colour(i), label=model,
                   yerr=[np.nan_to_num(lows), np.nan_to_num(highs)], capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xticks(x, labels=categories, rotation=30 if len(categories) > 5 else 0,
                      ha="right" if len(categories) > 5 else "center")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rejection rate")
        ax.set_title(f"{split} split", fontsize=10, loc="left")
        ax.grid(True, axis="y", color="#e3e3e3", linewidth=0.7)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, frameon=False, ncols=min(6, len(models)), loc="outside upper center")
    return png_bytes(fig)
