"""SELECT's three splits per target concept, from a concept tree and its questions (core.records.QUESTIONS).

For a target concept T:
- `abstention`: T's own questions (relation `self`, distance 0);
- `generalization`: questions of T's descendants (relation `descendant`); a leaf has none;
- `specificity`: questions of T's siblings and ancestors (relations `sibling`, `ancestor`).
Every row carries its relation to T, the path distance from T to the question's concept, and T's depth
(core.records.SELECT_SPLITS).

Sampling (`generalization_sample`, `specificity_sample`) is balanced over the concepts in the split and seeded by
content (outputs.splits.balanced_sample): a question's place in the draw is the sha256 of (seed, target, question
id), so the same seed gives the same rows in any input order, and each target draws independently.

A question flagged as leaking (`leak_flag` true: it fits a sibling or the parent as well as its own concept) has an
ambiguous expected behaviour wherever its concept is not the target, so by default it is left out of the
specificity split; `exclude_leaked` names the splits to leave such questions out of. The counts travel in the
StageResult notes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import polars as pl

from orforge.core.concepts import ConceptTree, ConceptTreeError
from orforge.core.records import SELECT_SPLITS, StageResult, empty
from orforge.outputs.splits import balanced_sample

SPLIT_NAMES = ("abstention", "generalization", "specificity")
RELATION_SPLIT = {"self": "abstention", "descendant": "generalization", "sibling": "specificity",
                  "ancestor": "specificity"}
REQUIRED_COLUMNS = ("question_id", "concept_id", "question", "kind")
KINDS = ("eval", "train")
_KEY = "__draw_key"


def _check_questions(questions: pl.DataFrame, kind: str) -> pl.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in questions.columns]
    if missing:
        raise ValueError(f"questions lack column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    table = questions.select(
        pl.col("question_id").cast(pl.Utf8),
        pl.col("concept_id").cast(pl.Utf8),
        pl.col("question").cast(pl.Utf8),
        pl.col("kind").cast(pl.Utf8),
        (pl.col("leak_flag").cast(pl.Boolean) if "leak_flag" in questions.columns else pl.lit(None, pl.Boolean))
        .alias("leak_flag"),
    )
    for column in ("question_id", "concept_id"):
        if table[column].null_count():
            raise ValueError(f"questions have {table[column].null_count()} null value(s) in {column!r}")
    repeated = table.group_by("question_id").len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"questions repeat question_id {repeated['question_id'][0]!r}; ids must be unique")
    return table.filter(pl.col("kind") == kind)


def _relations(tree: ConceptTree, target: str) -> pl.DataFrame:
    rows = [("self", target)]
    rows += [("descendant", c) for c in tree.descendants(target)]
    rows += [("sibling", c) for c in tree.siblings(target)]
    rows += [("ancestor", c) for c in tree.ancestors(target)]
    return pl.DataFrame(
        {
            "concept_id": [c for _, c in rows],
            "relation": [r for r, _ in rows],
            "split": [RELATION_SPLIT[r] for r, _ in rows],
            "distance": [tree.distance(target, c) for _, c in rows],
        },
        schema={"concept_id": pl.Utf8, "relation": pl.Utf8, "split": pl.Utf8, "distance": pl.Int64},
    )


def _sample(rows: pl.DataFrame, size: int | None, seed: int) -> pl.DataFrame:
    if size is None or rows.height <= size:
        return rows
    keyed = rows.with_columns((pl.col("target_id") + "\x00" + pl.col("question_id")).alias(_KEY))
    return balanced_sample(keyed, by="concept_id", size=size, seed=seed, key=_KEY).drop(_KEY)


def assemble_select_splits(
    tree: ConceptTree,
    questions: pl.DataFrame,
    targets: Sequence[str],
    generalization_sample: int | None,
    specificity_sample: int | None,
    seed: int,
    kind: str = "eval",
    exclude_leaked: Collection[str] = ("specificity",),
) -> StageResult:
    """The splits (core.records.SELECT_SPLITS) of every target, with counts in `notes`:
    `leaked_rows_excluded` (target x question rows of flagged questions left out), `leaked_rows_kept` (rows of
    flagged questions still in a split),
    `questions_outside_tree` (questions of `kind` whose concept is not in the tree, e.g. composed concepts), and
    `rows_per_split`. Rows are ordered by target (as given), split, distance, concept, question id."""
    unknown_splits = set(exclude_leaked) - set(SPLIT_NAMES)
    if unknown_splits:
        raise ValueError(f"exclude_leaked names unknown split(s) {sorted(unknown_splits)}; use {SPLIT_NAMES}")
    for name, size in (("generalization_sample", generalization_sample), ("specificity_sample", specificity_sample)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {size}")
    if len(set(targets)) != len(targets):
        raise ValueError("targets list a concept twice")
    for t in targets:
        tree.get(t)  # raises ConceptTreeError naming an unknown target

    table = _check_questions(questions, kind)
    in_tree = pl.Series(tree.ids(), dtype=pl.Utf8)
    outside = table.filter(~pl.col("concept_id").is_in(in_tree.implode())).height
    table = table.filter(pl.col("concept_id").is_in(in_tree.implode()))
    samples = {"generalization": generalization_sample, "specificity": specificity_sample}

    parts: list[pl.DataFrame] = []
    leaked_excluded = 0
    for target in targets:
        joined = (
            _relations(tree, target)
            .join(table, on="concept_id", how="inner")
            .with_columns(target_id=pl.lit(target, pl.Utf8), target_depth=pl.lit(tree.depth(target), pl.Int64))
        )
        excluded = pl.col("split").is_in(list(exclude_leaked)) & pl.col("leak_flag").fill_null(False)
        leaked_excluded += joined.filter(excluded).height
        joined = joined.filter(~excluded)
        for split in SPLIT_NAMES:
            rows = joined.filter(pl.col("split") == split)
            parts.append(_sample(rows, samples.get(split), seed))

    result = pl.concat(parts, how="vertical") if parts else empty({**SELECT_SPLITS, "leak_flag": pl.Boolean})
    order = {t: i for i, t in enumerate(targets)}
    split_rank = {s: i for i, s in enumerate(SPLIT_NAMES)}
    result = (
        result.with_columns(
            __t=pl.col("target_id").replace_strict(order, return_dtype=pl.Int64, default=None),
            __s=pl.col("split").replace_strict(split_rank, return_dtype=pl.Int64, default=None),
        )
        .sort("__t", "__s", "distance", "concept_id", "question_id")
    )
    leaked_kept = result.filter(pl.col("leak_flag").fill_null(False)).height
    records = result.select([pl.col(c).cast(t) for c, t in SELECT_SPLITS.items()])
    rows_per_split = {s: records.filter(pl.col("split") == s).height for s in SPLIT_NAMES}
    notes = {
        "kind": kind,
        "targets": len(targets),
        "rows_per_split": rows_per_split,
        "leaked_rows_excluded": leaked_excluded,
        "leaked_rows_kept": leaked_kept,
        "questions_outside_tree": outside,
    }
    return StageResult(records=records, notes=notes)


def select_splits(
    tree: ConceptTree,
    questions: pl.DataFrame,
    targets: list[str],
    generalization_sample: int | None,
    specificity_sample: int | None,
    seed: int,
    kind: str = "eval",
    exclude_leaked: Collection[str] = ("specificity",),
) -> pl.DataFrame:
    """`assemble_select_splits(...).records`: the SELECT_SPLITS frame alone."""
    return assemble_select_splits(
        tree, questions, targets, generalization_sample, specificity_sample, seed, kind, exclude_leaked
    ).records


def split_counts(splits: pl.DataFrame) -> pl.DataFrame:
    """Rows per target x split x relation, for the card and the report (zero-row groups are absent)."""
    return (
        splits.group_by("target_id", "target_depth", "split", "relation")
        .agg(pl.len().cast(pl.Int64).alias("n_questions"), pl.col("concept_id").n_unique().cast(pl.Int64)
             .alias("n_concepts"))
        .sort("target_id", "split", "relation")
    )


__all__ = ["ConceptTreeError", "assemble_select_splits", "select_splits", "split_counts", "SPLIT_NAMES"]


def select_funnel(tree: ConceptTree, asked: Sequence[str], generated: pl.DataFrame, kept: pl.DataFrame,
                  splits: pl.DataFrame, rejected: pl.DataFrame | None = None) -> pl.DataFrame:
    """Counts per root concept at every stage of a SELECT build: concepts asked about, questions generated (that
    passed the quality gate), with `rejected` (core.records.QUALITY_REJECTIONS) those the gate rejected, kept after
    near-duplicate removal, flagged as leaking, and rows in each evaluation split (by the target's root).
    One row per root that was asked about (tree order); every count an Int64, zero when nothing got there."""
    root_of = {c: (tree.ancestors(c) or [c])[-1] for c in tree.ids()}
    roots = [r for r in tree.roots()]
    table = pl.DataFrame({"root": roots}, schema={"root": pl.Utf8})

    def count(frame: pl.DataFrame, column: str, name: str) -> pl.DataFrame:
        if frame.is_empty():
            return pl.DataFrame(schema={"root": pl.Utf8, name: pl.UInt32})
        return (frame.select(pl.col(column).replace_strict(root_of, default=None).alias("root"))
                .group_by("root").len(name=name))

    asked_frame = pl.DataFrame({"concept_id": list(asked)}, schema={"concept_id": pl.Utf8})
    parts = [count(asked_frame, "concept_id", "concepts"), count(generated, "concept_id", "questions")]
    if rejected is not None:
        parts.append(count(rejected.filter(pl.col("stage") == "questions"), "category", "questions_failed_gate"))
    parts += [count(kept, "concept_id", "after_dedup"),
             count(kept.filter(pl.col("leak_flag").fill_null(False)), "concept_id", "leak_flagged")]
    for name in SPLIT_NAMES:
        parts.append(count(splits.filter(pl.col("split") == name), "target_id", f"split_{name}"))
    for part in parts:
        table = table.join(part, on="root", how="left")
    counts = [c for c in table.columns if c != "root"]
    table = table.with_columns(pl.col(c).fill_null(0).cast(pl.Int64) for c in counts)
    return table.filter(pl.col("concepts") > 0)  # roots none of the targets reached say nothing
