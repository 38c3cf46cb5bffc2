"""Split assembly: pure functions from judged, deduplicated records to the frames a release publishes.

Sampling is seeded and keyed on content: a row's place in the draw is the sha256 of (seed, its id), so the same
seed and input give the same rows in any input order, and adding rows to one category does not reshuffle which
rows another category keeps.

Split frames carry their lineage (`SPLIT_COLUMNS`; the hard split adds `HARD_COLUMNS`). `source` says whether a row
is a rewrite (a candidate) or a toxic seed carried into the toxic split as is; for seeds `prompt_id` is the
`seed_id`, `prompt` is the seed text, `model` and `template_sha256` are the seed generator's, and the vote counts
are null unless the seeds were moderated too.
"""

from __future__ import annotations

import hashlib

import polars as pl

from orforge.core.config import SplitsConfig, ToxicConfig

SPLIT_COLUMNS = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "category": pl.Utf8,
    "source": pl.Utf8,  # rewrite | seed
    "seed_id": pl.Utf8,
    "seed": pl.Utf8,
    "model": pl.Utf8,
    "template_sha256": pl.Utf8,
    "n_toxic": pl.Int64,
    "n_benign": pl.Int64,
    "n_missing": pl.Int64,
}
HARD_COLUMNS = {**SPLIT_COLUMNS, "rejected_by": pl.List(pl.Utf8), "n_rejections": pl.Int64}

# Splits a release publishes (CSV + a `configs:` entry), in card order; other frames are kept for the record only.
PUBLISHED_SPLITS = ("benign", "toxic", "hard")
DECISION_VALUES = ("benign", "toxic", "contested", "unjudged")

_RANK = "__rank"


def _rank(seed: int, key: object) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _with_rank(frame: pl.DataFrame, seed: int, key: str) -> pl.DataFrame:
    if key not in frame.columns:
        raise ValueError(f"sampling needs a '{key}' column; the frame has {frame.columns}")
    ranks = [_rank(seed, k) for k in frame[key].to_list()]
    return frame.with_columns(pl.Series(_RANK, ranks, dtype=pl.Utf8))


def _check_group_column(frame: pl.DataFrame, by: str) -> None:
    if by not in frame.columns:
        raise ValueError(f"sampling groups by '{by}', which the frame does not have ({frame.columns})")
    if frame[by].null_count():
        raise ValueError(f"column '{by}' has {frame[by].null_count()} null values; every row needs a group")


def category_quotas(counts: dict[str, int], size: int, seed: int) -> dict[str, int]:
    """Rows to take per group so the total is min(size, sum(counts)) and shares are as equal as the counts allow.

    Groups holding no more than an equal share give all their rows; what they leave is shared among the rest,
    repeatedly. When the leftover does not divide evenly, which groups get one extra row is drawn with `seed`.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    quotas: dict[str, int] = {}
    left = {g: n for g, n in counts.items() if n > 0}
    remaining = size
    while left:
        share = remaining // len(left)
        small = {g: n for g, n in left.items() if n <= share}
        if not small:
            break
        for g, n in small.items():
            quotas[g] = n
            remaining -= n
            del left[g]
    if left:
        share, extra = divmod(remaining, len(left))
        for i, g in enumerate(sorted(left, key=lambda g: _rank(seed, g))):
            quotas[g] = share + (1 if i < extra else 0)
    return {g: quotas.get(g, 0) for g in counts}


def _take_quotas(frame: pl.DataFrame, by: str, key: str, seed: int, quotas: dict[str, int]) -> pl.DataFrame:
    ranked = _with_rank(frame, seed, key).sort([by, _RANK, key])
    quota_frame = pl.DataFrame(
        {by: list(quotas), "__quota": list(quotas.values())}, schema={by: frame.schema[by], "__quota": pl.Int64}
    )
    return (
        ranked.with_columns(pl.int_range(pl.len()).over(by).alias("__i"))
        .join(quota_frame, on=by, how="left")
        .filter(pl.col("__i") < pl.col("__quota").fill_null(0))
        .drop(_RANK, "__i", "__quota")
        .sort([by, key])
    )


def balanced_sample(
    frame: pl.DataFrame, *, by: str = "category", size: int, seed: int, key: str = "prompt_id"
) -> pl.DataFrame:
    """A seeded sample of up to `size` rows, balanced over the groups in `by` (see `category_quotas`).

    Deterministic for a given seed and set of rows (input order does not matter); sorted by `by`, then `key`.
    """
    _check_group_column(frame, by)
    counts = dict(frame.group_by(by).len().iter_rows())
    return _take_quotas(frame, by, key, seed, category_quotas(counts, size, seed))


def cap_per_group(
    frame: pl.DataFrame, *, by: str = "category", cap: int, seed: int, key: str = "prompt_id"
) -> pl.DataFrame:
    """At most `cap` rows per group, drawn with `seed`; sorted by `by`, then `key`."""
    _check_group_column(frame, by)
    counts = dict(frame.group_by(by).len().iter_rows())
    return _take_quotas(frame, by, key, seed, {g: min(n, cap) for g, n in counts.items()})


def proportional_quotas(counts: dict[str, int], size: int) -> dict[str, int]:
    """Rows to take per group for a sample of `size` rows allocated in proportion to the group sizes, with at least
    one row from every non-empty group (an audit should see every stratum).

    Exactly: each group's target is size * n_g / N. It first gets floor(target), raised to 1 when that is 0. Rows
    still missing go one each to the groups with the largest fractional remainder (target - quota) that have rows
    left; rows over `size` (from the raises to 1) are taken back one each from the groups with the smallest
    remainder whose quota is above 1. Ties go by group name, so the quotas depend on the counts only. Raises
    ValueError when `size` is below the number of non-empty groups or above their total.
    """
    groups = sorted(g for g, n in counts.items() if n > 0)
    total = sum(counts[g] for g in groups)
    if size < len(groups) or size > total:
        raise ValueError(f"a stratified sample of {size} needs between {len(groups)} (one per stratum) and {total} "
                         "(every row) rows")
    target = {g: size * counts[g] / total for g in groups}
    quotas = {g: max(1, int(target[g])) for g in groups}
    while (missing := size - sum(quotas.values())) != 0:
        if missing > 0:
            open_groups = [g for g in groups if quotas[g] < counts[g]]
            g = min(open_groups, key=lambda g: (quotas[g] - target[g], g))
            quotas[g] += 1
        else:
            g = min((g for g in groups if quotas[g] > 1), key=lambda g: (target[g] - quotas[g], g))
            quotas[g] -= 1
    return {g: quotas.get(g, 0) for g in counts}


def stratified_sample(frame: pl.DataFrame, *, by: list[str], size: int, seed: int,
                      key: str = "prompt_id") -> pl.DataFrame:
    """A seeded sample of `size` rows, allocated over the strata (the combinations of the `by` columns' values) by
    `proportional_quotas`; with no `by`, a simple random sample. Which rows a stratum gives is drawn with `seed` on
    `key` (content-keyed, so input order does not matter). Sorted by `key`."""
    if not by:
        return _with_rank(frame, seed, key).sort(_RANK, key).head(size).drop(_RANK).sort(key)
    for column in by:
        _check_group_column(frame, column)
    stratum = "__stratum"
    keyed = frame.with_columns(pl.concat_str([pl.col(c).cast(pl.Utf8) for c in by], separator="\x1f").alias(stratum))
    counts = dict(keyed.group_by(stratum).len().iter_rows())
    return _take_quotas(keyed, stratum, key, seed, proportional_quotas(counts, size)).drop(stratum).sort(key)


def _judged(candidates: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
    """Candidates with their vote counts and decision; a candidate without a decision row is `unjudged`."""
    dupes = decisions.height - decisions["prompt_id"].n_unique()
    if dupes:
        raise ValueError(f"decisions has {dupes} repeated prompt_id rows; expected one row per candidate")
    bad = set(decisions["decision"].drop_nulls().unique().to_list()) - set(DECISION_VALUES)
    if bad:
        raise ValueError(f"decisions has unknown decision values {sorted(bad)}; expected one of {DECISION_VALUES}")
    counts = decisions.select("prompt_id", "n_toxic", "n_benign", "n_missing", "decision")
    return (
        candidates.join(counts, on="prompt_id", how="left")
        .with_columns(pl.col("decision").fill_null("unjudged"), source=pl.lit("rewrite"))
        .select(*SPLIT_COLUMNS, "decision")
        .cast(SPLIT_COLUMNS)
    )


def _seed_rows(seeds: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
    """Seeds in split shape. A seed the moderators judged (its seed_id is in `decisions`) is kept only if toxic."""
    counts = decisions.select("prompt_id", "n_toxic", "n_benign", "n_missing", "decision")
    rows = (
        seeds.with_columns(prompt_id=pl.col("seed_id"), prompt=pl.col("seed"), source=pl.lit("seed"))
        .join(counts, on="prompt_id", how="left")
        .filter(pl.col("decision").is_null() | (pl.col("decision") == "toxic"))
    )
    return rows.select(*SPLIT_COLUMNS).cast(SPLIT_COLUMNS)


def pools(
    candidates: pl.DataFrame, decisions: pl.DataFrame, seeds: pl.DataFrame, toxic_cfg: ToxicConfig
) -> dict[str, pl.DataFrame]:
    """The frames that go to dedup, before it: `benign` (decided benign) and `toxic` (decided toxic, plus the
    seeds when `toxic.include_seeds`), with lineage (`SPLIT_COLUMNS`). Feed each to its dedup pass; seeds share
    the toxic pass so a rewrite that barely changed its seed counts as a duplicate of it."""
    judged = _judged(candidates, decisions)
    benign = judged.filter(pl.col("decision") == "benign").drop("decision")
    toxic = judged.filter(pl.col("decision") == "toxic").drop("decision")
    if toxic_cfg.include_seeds and seeds.height:
        toxic = pl.concat([toxic, _seed_rows(seeds, decisions)])
    return {"benign": benign, "toxic": toxic}


def _kept(pool: pl.DataFrame, dedup: pl.DataFrame, name: str) -> pl.DataFrame:
    """Rows of `pool` that dedup kept. Every pool row must appear in the dedup frame: a missing one means the
    pool and the dedup pass disagree, which a silent drop would hide."""
    missing = pool.join(dedup, on="prompt_id", how="anti")
    if missing.height:
        sample = missing["prompt_id"].head(3).to_list()
        raise ValueError(
            f"{missing.height} prompts of the {name} pool are missing from the {name} dedup results "
            f"(e.g. {sample}); dedup must see the whole pool (see outputs.splits.pools)"
        )
    kept_ids = dedup.filter(pl.col("kept")).select("prompt_id").unique()
    return pool.join(kept_ids, on="prompt_id", how="semi")


def assemble_splits(
    candidates: pl.DataFrame,
    decisions: pl.DataFrame,
    benign_dedup: pl.DataFrame,
    toxic_dedup: pl.DataFrame,
    seeds: pl.DataFrame,
    splits_cfg: SplitsConfig,
    toxic_cfg: ToxicConfig,
    seed: int,
    hard_members: pl.DataFrame | None = None,
) -> dict[str, pl.DataFrame]:
    """Build the split frames.

    - `benign`: candidates decided benign and kept by dedup; at most `benign_per_category` per category.
    - `toxic`: candidates decided toxic (plus seeds when `include_seeds`) kept by dedup, balanced up to
      `toxic_size`.
    - `hard` (only when `hard_members` is given: prompt_id, rejected_by, n_rejections): rows of the benign split
      that at least `hard_min_rejections` panel members refused, balanced up to `hard_size`.
    - `contested`: every candidate the vote left contested, for the record (never published as a split).

    Contested and unjudged candidates are in neither benign nor toxic.
    """
    pool = pools(candidates, decisions, seeds, toxic_cfg)
    benign = _kept(pool["benign"], benign_dedup, "benign")
    if splits_cfg.benign_per_category is not None:
        benign = cap_per_group(benign, cap=splits_cfg.benign_per_category, seed=seed)
    else:
        benign = benign.sort("category", "prompt_id")
    toxic = balanced_sample(_kept(pool["toxic"], toxic_dedup, "toxic"), size=splits_cfg.toxic_size, seed=seed)
    contested = (
        _judged(candidates, decisions).filter(pl.col("decision") == "contested").drop("decision")
    ).sort("category", "prompt_id")
    result = {"benign": benign, "toxic": toxic}
    if hard_members is not None:
        result["hard"] = hard_split(benign, hard_members, splits_cfg, seed)
    result["contested"] = contested
    return result


def hard_split(benign: pl.DataFrame, hard_members: pl.DataFrame, splits_cfg: SplitsConfig, seed: int) -> pl.DataFrame:
    """Benign rows refused by at least `hard_min_rejections` panel members, balanced up to `hard_size`."""
    dupes = hard_members.height - hard_members["prompt_id"].n_unique()
    if dupes:
        raise ValueError(f"hard_members has {dupes} repeated prompt_id rows; expected one row per prompt")
    members = hard_members.select(
        "prompt_id",
        pl.col("rejected_by").cast(pl.List(pl.Utf8)),
        pl.col("n_rejections").cast(pl.Int64),
    ).filter(pl.col("n_rejections") >= splits_cfg.hard_min_rejections)
    eligible = benign.join(members, on="prompt_id", how="inner").select(*HARD_COLUMNS)
    return balanced_sample(eligible, size=splits_cfg.hard_size, seed=seed)


def _per_category(ids: pl.DataFrame, lookup: pl.DataFrame, name: str) -> pl.DataFrame:
    return ids.join(lookup, on="prompt_id", how="inner").group_by("category").len(name=name)


def failed_gate(rejected: pl.DataFrame, stage: str, group: str = "category") -> pl.DataFrame:
    """Rows of `stage` the quality gate rejected, per `group` value: columns `group`, `<stage>_failed_gate`."""
    return (rejected.filter(pl.col("stage") == stage).group_by("category").len(name=f"{stage}_failed_gate")
            .rename({"category": group}).cast({group: pl.Utf8}))


def funnel(
    seeds: pl.DataFrame,
    candidates: pl.DataFrame,
    decisions: pl.DataFrame,
    benign_dedup: pl.DataFrame,
    toxic_dedup: pl.DataFrame,
    splits: dict[str, pl.DataFrame],
    rejected: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Counts per category at every stage: seeds, candidates, each decision, kept by each dedup pass, and each
    split (`split_<name>`). One row per category, sorted; every count is an Int64, zero when nothing got there.
    With `rejected` (the quality gate's rows, core.records.QUALITY_REJECTIONS), `seeds_failed_gate` follows `seeds`
    and `rewrites_failed_gate` follows `candidates` (`seeds` and `candidates` count the rows that passed)."""
    judged = _judged(candidates, decisions)
    lookup = pl.concat(
        [
            candidates.select("prompt_id", "category"),
            seeds.select(pl.col("seed_id").alias("prompt_id"), "category"),
        ]
    ).unique("prompt_id", keep="first")
    parts = [seeds.group_by("category").len(name="seeds")]
    if rejected is not None:
        parts.append(failed_gate(rejected, "seeds"))
    parts.append(candidates.group_by("category").len(name="candidates"))
    if rejected is not None:
        parts.append(failed_gate(rejected, "rewrites"))
    for value in DECISION_VALUES:
        parts.append(judged.filter(pl.col("decision") == value).group_by("category").len(name=value))
    parts.append(_per_category(benign_dedup.filter(pl.col("kept")), lookup, "benign_after_dedup"))
    parts.append(_per_category(toxic_dedup.filter(pl.col("kept")), lookup, "toxic_after_dedup"))
    split_names = [n for n in PUBLISHED_SPLITS if n in splits] + [
        n for n in splits if n not in PUBLISHED_SPLITS and n != "contested"
    ]
    for name in split_names:
        parts.append(splits[name].group_by("category").len(name=f"split_{name}"))

    categories = sorted(set().union(*(p["category"].to_list() for p in parts)) - {None})
    table = pl.DataFrame({"category": categories}, schema={"category": pl.Utf8})
    for part in parts:
        table = table.join(part.cast({"category": pl.Utf8}), on="category", how="left")
    counts = [c for c in table.columns if c != "category"]
    return table.with_columns(pl.col(counts).fill_null(0).cast(pl.Int64)).sort("category")
