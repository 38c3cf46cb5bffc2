"""How far the moderators agree: pairwise and Fleiss' kappa, toxic rates, category crossings, the most split prompts,
and agreement with human labels.

`agreement(votes, prompts)` reads votes in the core.records.VOTES shape (prompt_id, moderator, verdict, vote_category)
and a prompts frame (prompt_id, prompt, category) and returns plain tables:

- `pairwise`: moderator_a, moderator_b (a < b), category ("all", then each category), n (prompts both judged),
  raw_agreement, cohen_kappa (sklearn). Kappa is null where it is undefined (no shared prompts, or both moderators
  gave the same single verdict to every shared prompt, so chance agreement is already 1).
- `fleiss`: category, n_moderators, n (prompts every moderator judged), fleiss_kappa (statsmodels); null when
  undefined (fewer than two moderators, no such prompt, or a single verdict throughout).
- `toxic_rate`: moderator, category, n, toxic_rate.
- `category_confusion`: moderator_a, moderator_b, category_a, category_b, n: how the two moderators' vote_category
  labels cross on the prompts both judged.
- `contested`: prompts the moderators split on (at least one toxic and one benign vote), most evenly split first:
  prompt_id, prompt, category, n_toxic, n_benign, toxic_by, benign_by (lists of moderator names).

A vote whose prompt_id is not in `prompts` is kept with category "(unknown)" and no prompt text. Moderators and
categories are sorted by name; every table is deterministic for a given input.

`human_agreement` compares each moderator, and the ensemble's decisions, with a human-labelled file. Writing the
tables and the kappa heatmap is `orforge.outputs.audit.write_audit`: this module only computes.
"""

from __future__ import annotations

import math
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import accuracy_score, cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa

ALL = "all"
UNKNOWN_CATEGORY = "(unknown)"
VERDICTS = ("benign", "toxic")
ENSEMBLE = "ensemble"
PANEL_RATER = "panel (refused by at least {k})"

PAIRWISE = {
    "moderator_a": pl.Utf8,
    "moderator_b": pl.Utf8,
    "category": pl.Utf8,
    "n": pl.Int64,
    "raw_agreement": pl.Float64,
    "cohen_kappa": pl.Float64,
}
FLEISS = {"category": pl.Utf8, "n_moderators": pl.Int64, "n": pl.Int64, "fleiss_kappa": pl.Float64}
TOXIC_RATE = {"moderator": pl.Utf8, "category": pl.Utf8, "n": pl.Int64, "toxic_rate": pl.Float64}
CATEGORY_CONFUSION = {
    "moderator_a": pl.Utf8,
    "moderator_b": pl.Utf8,
    "category_a": pl.Utf8,
    "category_b": pl.Utf8,
    "n": pl.Int64,
}
CONTESTED = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "category": pl.Utf8,
    "n_toxic": pl.Int64,
    "n_benign": pl.Int64,
    "toxic_by": pl.List(pl.Utf8),
    "benign_by": pl.List(pl.Utf8),
}
HUMAN = {
    "rater": pl.Utf8,  # a moderator's name, "ensemble" for the vote rule's decisions, or the panel (PANEL_RATER)
    "category": pl.Utf8,  # "all", then each category of the labelled prompts
    "n_human": pl.Int64,  # rows in the human file ("all"), or labelled rows of this category
    "n_unmatched": pl.Int64,  # human rows whose id / prompt is not in the run at all ("all" rows only)
    "n_matched": pl.Int64,  # human rows the rater gave a benign/toxic answer for: the ones scored (the n)
    "n_no_vote": pl.Int64,  # matched prompts this moderator did not vote on, or the panel did not answer
    "n_contested": pl.Int64,  # matched prompts the vote left contested (ensemble only)
    "n_unjudged": pl.Int64,  # matched prompts with no decision or an unjudged one (ensemble only)
    "accuracy": pl.Float64,
    "cohen_kappa": pl.Float64,
    "human_toxic_rate": pl.Float64,  # on the scored rows
    "rater_toxic_rate": pl.Float64,
}


def _frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa over the two verdict lists; None when undefined (empty, or chance agreement already 1)."""
    if not a:
        return None
    with warnings.catch_warnings():
        # sklearn warns (and returns nan) when both raters used one and the same label throughout.
        warnings.simplefilter("ignore")
        return _finite(cohen_kappa_score(a, b, labels=list(VERDICTS)))


# ---------------------------------------------------------------------------------------------------- inputs


def _check_votes(votes: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("prompt_id", "moderator", "verdict") if c not in votes.columns]
    if missing:
        raise ValueError(f"votes lack column(s) {missing}; expected core.records.VOTES")
    if "vote_category" not in votes.columns:
        votes = votes.with_columns(vote_category=pl.lit(None, dtype=pl.Utf8))
    votes = votes.select(
        pl.col("prompt_id").cast(pl.Utf8),
        pl.col("moderator").cast(pl.Utf8),
        pl.col("verdict").cast(pl.Utf8),
        pl.col("vote_category").cast(pl.Utf8).fill_null("none"),
    )
    bad = votes.filter(~pl.col("verdict").is_in(VERDICTS) | pl.col("verdict").is_null())
    if bad.height:
        raise ValueError(
            f"votes have {bad.height} verdict(s) other than toxic/benign, e.g. {bad['verdict'][0]!r} "
            f"from {bad['moderator'][0]!r} on {bad['prompt_id'][0]!r}"
        )
    repeated = votes.group_by("prompt_id", "moderator").len().filter(pl.col("len") > 1)
    if repeated.height:
        r = repeated.row(0, named=True)
        raise ValueError(
            f"votes repeat {repeated.height} (prompt_id, moderator) pair(s), e.g. {r['moderator']!r} voted "
            f"{r['len']} times on {r['prompt_id']!r}; expected one vote per moderator and prompt"
        )
    return votes


def _check_prompts(prompts: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("prompt_id", "category") if c not in prompts.columns]
    if missing:
        raise ValueError(f"prompts lack column(s) {missing}; expected prompt_id, prompt, category")
    if "prompt" not in prompts.columns:
        prompts = prompts.with_columns(prompt=pl.lit(None, dtype=pl.Utf8))
    return prompts.select(
        pl.col("prompt_id").cast(pl.Utf8), pl.col("prompt").cast(pl.Utf8), pl.col("category").cast(pl.Utf8)
    ).unique("prompt_id", keep="first", maintain_order=True)


def _labelled(votes: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    return votes.join(prompts.select("prompt_id", "category"), on="prompt_id", how="left").with_columns(
        pl.col("category").fill_null(UNKNOWN_CATEGORY)
    )


# ---------------------------------------------------------------------------------------------------- tables


def _pairwise(labelled: pl.DataFrame, moderators: list[str], categories: list[str]) -> pl.DataFrame:
    rows = []
    for a, b in combinations(moderators, 2):
        both = (
            labelled.filter(pl.col("moderator") == a)
            .select("prompt_id", "category", verdict_a="verdict")
            .join(labelled.filter(pl.col("moderator") == b).select("prompt_id", verdict_b="verdict"), on="prompt_id")
        )
        for category in [ALL, *categories]:
            part = both if category == ALL else both.filter(pl.col("category") == category)
            va, vb = part["verdict_a"].to_list(), part["verdict_b"].to_list()
            raw = float(np.mean(np.array(va) == np.array(vb))) if va else None
            rows.append({"moderator_a": a, "moderator_b": b, "category": category, "n": len(va),
                         "raw_agreement": raw, "cohen_kappa": _kappa(va, vb)})
    return _frame(rows, PAIRWISE)


def _fleiss(labelled: pl.DataFrame, moderators: list[str], categories: list[str]) -> pl.DataFrame:
    per_prompt = labelled.group_by("prompt_id").agg(
        pl.col("category").first(),
        pl.col("moderator").n_unique().alias("n_votes"),
        (pl.col("verdict") == "benign").sum().alias("benign"),
        (pl.col("verdict") == "toxic").sum().alias("toxic"),
    )
    complete = per_prompt.filter(pl.col("n_votes") == len(moderators))
    rows = []
    for category in [ALL, *categories]:
        part = complete if category == ALL else complete.filter(pl.col("category") == category)
        kappa = None
        if len(moderators) >= 2 and part.height:
            table = part.select("benign", "toxic").to_numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                kappa = _finite(fleiss_kappa(table, method="fleiss"))
        rows.append({"category": category, "n_moderators": len(moderators), "n": part.height, "fleiss_kappa": kappa})
    return _frame(rows, FLEISS)


def _toxic_rate(labelled: pl.DataFrame) -> pl.DataFrame:
    def rates(by: list[str]) -> pl.DataFrame:
        return labelled.group_by(by).agg(
            pl.len().cast(pl.Int64).alias("n"), (pl.col("verdict") == "toxic").mean().alias("toxic_rate")
        )

    overall = rates(["moderator"]).with_columns(category=pl.lit(ALL))
    table = pl.concat([overall.select(*TOXIC_RATE), rates(["moderator", "category"]).select(*TOXIC_RATE)])
    return table.cast(TOXIC_RATE).sort(
        "moderator", pl.col("category") != ALL, "category"
    ) if table.height else pl.DataFrame(schema=TOXIC_RATE)


def _category_confusion(labelled: pl.DataFrame, moderators: list[str]) -> pl.DataFrame:
    parts = []
    for a, b in combinations(moderators, 2):
        crossed = (
            labelled.filter(pl.col("moderator") == a)
            .select("prompt_id", category_a="vote_category")
            .join(labelled.filter(pl.col("moderator") == b).select("prompt_id", category_b="vote_category"),
                  on="prompt_id")
            .group_by("category_a", "category_b")
            .len(name="n")
            .with_columns(moderator_a=pl.lit(a), moderator_b=pl.lit(b))
        )
        parts.append(crossed.select(*CATEGORY_CONFUSION).cast(CATEGORY_CONFUSION))
    if not parts:
        return pl.DataFrame(schema=CATEGORY_CONFUSION)
    return pl.concat(parts).sort("moderator_a", "moderator_b", "category_a", "category_b")


def _contested(labelled: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    per_prompt = labelled.sort("moderator").group_by("prompt_id").agg(
        (pl.col("verdict") == "toxic").sum().cast(pl.Int64).alias("n_toxic"),
        (pl.col("verdict") == "benign").sum().cast(pl.Int64).alias("n_benign"),
        pl.col("moderator").filter(pl.col("verdict") == "toxic").alias("toxic_by"),
        pl.col("moderator").filter(pl.col("verdict") == "benign").alias("benign_by"),
        pl.col("category").first(),
    )
    split = per_prompt.filter((pl.col("n_toxic") > 0) & (pl.col("n_benign") > 0))
    # Most split first: the larger the minority side, the more contested; ties go to the closer split, then to
    # the prompt more moderators saw, then to the id so the order is stable.
    ordered = split.with_columns(
        __minority=pl.min_horizontal("n_toxic", "n_benign"),
        __gap=(pl.col("n_toxic") - pl.col("n_benign")).abs(),
    ).sort(["__minority", "__gap", "n_toxic", "prompt_id"], descending=[True, False, True, False])
    out = ordered.join(prompts.select("prompt_id", "prompt"), on="prompt_id", how="left", maintain_order="left")
    return out.select(*CONTESTED).cast(CONTESTED)


def agreement(votes: pl.DataFrame, prompts: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """All agreement tables for one run (see the module docstring for their columns)."""
    votes = _check_votes(votes)
    prompts = _check_prompts(prompts)
    labelled = _labelled(votes, prompts)
    moderators = sorted(labelled["moderator"].unique().to_list())
    categories = sorted(labelled["category"].unique().to_list())
    return {
        "pairwise": _pairwise(labelled, moderators, categories),
        "fleiss": _fleiss(labelled, moderators, categories),
        "toxic_rate": _toxic_rate(labelled),
        "category_confusion": _category_confusion(labelled, moderators),
        "contested": _contested(labelled, prompts),
    }


# ---------------------------------------------------------------------------------------------------- humans


def read_human_labels(path: Path | str) -> pl.DataFrame:
    """Read a human-label CSV (columns `label` and `id` or `prompt`); raise ValueError with one line if unreadable."""
    path = Path(path)
    try:
        human = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ValueError(f"cannot read human labels {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return _check_human(human, str(path))


def _check_human(human: pl.DataFrame, source: str = "human labels") -> pl.DataFrame:
    columns = {c.strip().lower(): c for c in human.columns}
    if "label" not in columns or not ({"id", "prompt"} & set(columns)):
        raise ValueError(
            f"{source}: need a 'label' column and an 'id' or 'prompt' column; found {list(human.columns)}"
        )
    key = "id" if "id" in columns else "prompt"
    table = human.select(
        pl.col(columns[key]).cast(pl.Utf8).alias(key),
        pl.col(columns["label"]).cast(pl.Utf8).str.strip_chars().str.to_lowercase().alias("label"),
    ).with_row_index("__row", offset=2)  # row 1 of the file is the header
    bad = table.filter(~pl.col("label").is_in(VERDICTS) | pl.col("label").is_null())
    if bad.height:
        r = bad.row(0, named=True)
        raise ValueError(
            f"{source}: {bad.height} row(s) have a label other than toxic/benign, e.g. row {r['__row']}: {r['label']!r}"
        )
    empty = table.filter(pl.col(key).is_null() | (pl.col(key).str.strip_chars() == ""))
    if empty.height:
        raise ValueError(f"{source}: {empty.height} row(s) have an empty {key!r}, e.g. row {empty['__row'][0]}")
    repeated = table.group_by(key).agg(pl.col("__row").sort()).filter(pl.col("__row").list.len() > 1)
    if repeated.height:
        rows = repeated["__row"][0].to_list()
        raise ValueError(f"{source}: {repeated.height} {key}(s) appear more than once, e.g. on rows {rows[:3]}")
    return table.drop("__row")


def _scores(human: list[str], rater: list[str]) -> dict:
    if not human:
        return {"accuracy": None, "cohen_kappa": None, "human_toxic_rate": None, "rater_toxic_rate": None}
    return {
        "accuracy": float(accuracy_score(human, rater)),
        "cohen_kappa": _kappa(human, rater),
        "human_toxic_rate": human.count("toxic") / len(human),
        "rater_toxic_rate": rater.count("toxic") / len(rater),
    }


def human_agreement(
    votes: pl.DataFrame,
    human: pl.DataFrame,
    decisions: pl.DataFrame | None = None,
    prompts: pl.DataFrame | None = None,
    panel: pl.DataFrame | None = None,
    panel_k: int = 1,
) -> pl.DataFrame:
    """Accuracy and Cohen's kappa against humans of each moderator, of the ensemble's decisions (when given) and of
    the refusal panel (when given), overall (category "all") and per category.

    `human` has `label` (toxic/benign, any case) and `id` (a prompt_id) or `prompt` (exact prompt text, matched
    through `prompts`, which must then be given). With both, `id` is used. Categories come from `prompts`
    (UNKNOWN_CATEGORY without it). A human row whose prompt the run never saw is counted in `n_unmatched`; for the
    ensemble, contested and unjudged prompts are counted apart and left out of accuracy and kappa. `panel` is
    `moderators.panel.hard_members(responses)` (prompt_id, n_rejections, one row per prompt the panel answered): the
    panel says toxic when at least `panel_k` members refused, and is scored on the labelled prompts it answered.
    Raises ValueError (one line) on a malformed human table.
    """
    votes = _check_votes(votes)
    table = _check_human(human).with_row_index("__human")
    known = set(votes["prompt_id"].to_list())
    if decisions is not None:
        known |= set(decisions["prompt_id"].cast(pl.Utf8).to_list())
    if prompts is not None and "id" in table.columns:
        known |= set(_check_prompts(prompts)["prompt_id"].to_list())
    if "id" in table.columns:
        labelled = table.rename({"id": "prompt_id"})
    else:
        if prompts is None or "prompt" not in prompts.columns:
            raise ValueError("human labels: matching by 'prompt' text needs the prompts frame (prompt_id, prompt)")
        by_text = prompts.select(pl.col("prompt_id").cast(pl.Utf8), pl.col("prompt").cast(pl.Utf8)).unique()
        known |= set(by_text["prompt_id"].to_list())
        # Exact text; a text shared by several prompt ids labels each of them.
        labelled = table.join(by_text, on="prompt", how="left").drop("prompt")
    matched = labelled.filter(pl.col("prompt_id").is_in(list(known)))
    if prompts is not None and "category" in prompts.columns:
        matched = matched.join(_check_prompts(prompts).select("prompt_id", "category"), on="prompt_id", how="left")
    else:
        matched = matched.with_columns(category=pl.lit(None, dtype=pl.Utf8))
    matched = matched.with_columns(pl.col("category").fill_null(UNKNOWN_CATEGORY))
    n_human = table.height
    n_unmatched = n_human - matched["__human"].n_unique()
    categories = sorted(matched["category"].unique().to_list())

    def rows_for(rater: str, answers: pl.DataFrame, answer: str, counts) -> list[dict]:
        """One row per category ("all" first) for a rater whose benign/toxic answers are `answers[answer]`;
        `counts(part, joined)` adds the rater's own counts of prompts it left out."""
        joined = matched.join(answers, on="prompt_id", how="left")
        out = []
        for category in [ALL, *categories]:
            part = joined if category == ALL else joined.filter(pl.col("category") == category)
            scored = part.filter(pl.col(answer).is_in(VERDICTS))
            out.append({
                "rater": rater, "category": category,
                "n_human": n_human if category == ALL else part["__human"].n_unique(),
                "n_unmatched": n_unmatched if category == ALL else None, "n_matched": scored.height,
                "n_no_vote": None, "n_contested": None, "n_unjudged": None, **counts(part),
                **_scores(scored["label"].to_list(), scored[answer].to_list()),
            })
        return out

    rows = []
    for moderator in sorted(votes["moderator"].unique().to_list()):
        mine = votes.filter(pl.col("moderator") == moderator).select("prompt_id", "verdict")
        rows += rows_for(moderator, mine, "verdict", lambda part: {"n_no_vote": part["verdict"].null_count()})
    if decisions is not None:
        decided = decisions.select(pl.col("prompt_id").cast(pl.Utf8), pl.col("decision").cast(pl.Utf8))
        rows += rows_for(ENSEMBLE, decided, "decision", lambda part: {
            "n_contested": part.filter(pl.col("decision") == "contested").height,
            "n_unjudged": part.filter(pl.col("decision").is_null() | (pl.col("decision") == "unjudged")).height})
    if panel is not None:
        said = panel.select(pl.col("prompt_id").cast(pl.Utf8), pl.when(pl.col("n_rejections") >= panel_k)
                            .then(pl.lit("toxic")).otherwise(pl.lit("benign")).alias("panel"))
        rows += rows_for(PANEL_RATER.format(k=panel_k), said, "panel",
                         lambda part: {"n_no_vote": part["panel"].null_count()})
    return _frame(rows, HUMAN)
