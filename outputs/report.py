"""The release report: one self-contained `report.html` built from what a release folder holds.

Everything comes from the folder: `manifest.json` (a `core.manifest.Manifest`, read with `outputs.release.read_manifest`),
the split parquets, `votes.parquet`, `failures.parquet`, and when present `audit/` (the moderator audit) and the
newest `evaluations/<timestamp>/scores.csv` (from orforge.outputs.scoring.score). Charts are embedded as base64 PNGs
and the CSS is included inline, so the file opens anywhere without a network; the page carries a
Content-Security-Policy that forbids scripts and any fetch.

The HTML comes from jinja2 templates in `outputs/templates/` with autoescaping on: the prompts are adversarial by
construction, and every value reaches the page through `{{ ... }}`, so it is escaped by the template engine rather
than by remembering to call an escape function. Python only prepares values (numbers formatted, tables as rows of
cells, images as base64); the markup lives in the templates.

How the page is put together: `report.html.j2` is the frame (head, navigation, footer) and renders a list of
`Section`s in order, each as `<section><h2 id=...>` around the partial `sections/<template>` with the section's
`context` as `ctx`. Which sections a release gets depends on its manifest's `recipe`: a function registered with
`@recipe_sections("<recipe>")` turns a `ReportInputs` into the list. A new recipe (SELECT, ALERT) adds its own
sections without touching OR-Bench's: write `templates/sections/<name>.html.j2` (import `_macros.html.j2` for
tables, notes and images), a builder that returns `Section("<id>", "<Title>", "<name>.html.j2", {...})`, and
register a function that returns the shared sections it wants plus its own, e.g.

    def _with_interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


@recipe_sections("select")
    def select_sections(inputs: ReportInputs) -> list[Section]:
        return [overview(inputs), funnel_section(inputs), select_scores(inputs), samples(inputs)]

OR-Bench's sections, each an <h2> with a stable id (`SECTION_IDS`): overview, funnel, quality, funnel-chart,
agreement, tokens, failures, samples, diversity, evaluation.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from orforge.core.config import QUALITY_RULES
from orforge.core.manifest import Manifest
from orforge.moderators.agreement import UNKNOWN_CATEGORY, agreement
from orforge.outputs.atomic import write_text
from orforge.outputs.diversity import method_note, summary_rows
from orforge.outputs.plots import category_chart, funnel_chart, kappa_heatmap, scatter_chart
from orforge.outputs.release import flat_items, read_manifest, with_total

REPORT = "report.html"
SECTION_IDS = ("overview", "funnel", "quality", "funnel-chart", "agreement", "tokens", "failures", "samples",
               "diversity", "evaluation")
EVALUATIONS = "evaluations"
SAMPLE_ROWS = 5
CONTESTED_SHOWN = 5
TEMPLATES = Path(__file__).parent / "templates"

# Loaded once; autoescape on for every template, and an undefined name is an error rather than an empty string.
_ENV = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                   keep_trailing_newline=True)


@dataclass(frozen=True)
class Section:
    """One <section> of the report: its anchor id, its <h2> title, the partial under templates/sections/ that renders
    its body, and the values that partial reads as `ctx`."""

    id: str
    title: str
    template: str
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportInputs:
    """What every section builder may read: the folder, its typed manifest and the frames it holds."""

    folder: Path
    manifest: Manifest
    splits: dict[str, pl.DataFrame]
    votes: pl.DataFrame | None
    failures: pl.DataFrame | None
    seed: int


SectionsBuilder = Callable[[ReportInputs], list[Section]]
_RECIPES: dict[str, SectionsBuilder] = {}


def recipe_sections(recipe: str) -> Callable[[SectionsBuilder], SectionsBuilder]:
    """Register the function that lists a recipe's report sections (see the module docstring)."""

    def register(builder: SectionsBuilder) -> SectionsBuilder:
        if recipe in _RECIPES:
            raise ValueError(f"report sections for recipe {recipe!r} are already registered")
        _RECIPES[recipe] = builder
        return builder

    return register


# ---------------------------------------------------------------------------------------------------- values


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) if not isinstance(v, str) else v for v in value) or "\u2013"
    return str(value)


def table_view(frame: pl.DataFrame, text_columns: tuple[str, ...] = (), total: bool = False) -> dict | None:
    """A table for `_macros.html.j2`'s `table`: formatted header and cells with their CSS class; None when empty.
    With `total`, the last row is styled as a total."""
    if frame.height == 0:
        return None
    numeric = {c for c, t in frame.schema.items() if t.is_numeric()}
    # Headers read as words ("benign after dedup") and may wrap, so wide tables stay on the page.
    head = [{"text": c.replace("_", " "), "cls": "num" if c in numeric else ""} for c in frame.columns]
    rows = []
    for row in frame.iter_rows():
        rows.append([
            {"text": _fmt(value),
             "cls": "num" if column in numeric or _is_number(value) else "text" if column in text_columns else ""}
            for column, value in zip(frame.columns, row)
        ])
    return {"head": head, "rows": rows, "total": total}


def _image(png: bytes, alt: str) -> dict[str, str]:
    return {"data": base64.b64encode(png).decode("ascii"), "alt": alt}


def _records_table(records: list[dict[str, Any]]) -> dict | None:
    """A table from a list of mappings (columns: the union of keys, in first-seen order; nested values flattened)."""
    flat = [dict(flat_items(r)) for r in records]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    if not columns:
        return None
    frame = pl.DataFrame([{c: _cell(r.get(c)) for c in columns} for r in flat], infer_schema_length=None,
                         strict=False)
    return table_view(frame)


def _cell(value: Any) -> Any:
    # A column holds one type: numbers stay numbers (right-aligned, grouped), anything else reads as text.
    return value if value is None or _is_number(value) else _fmt(value)


def _note_items(notes: dict[str, Any]) -> list[dict[str, Any]]:
    """Each note as text, or as a table when it is a mapping or a list of mappings: never as a Python repr."""
    items = []
    for key, value in notes.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items.append({"key": key, "text": None, "table": _records_table(value)})
        elif isinstance(value, dict) and value:
            pairs = flat_items(value)
            frame = pl.DataFrame({"what": [k for k, _ in pairs], "value": [_fmt(v) for _, v in pairs]})
            items.append({"key": key, "text": None, "table": table_view(frame)})
        else:
            items.append({"key": key, "text": _fmt(value), "table": None})
    return items


# ---------------------------------------------------------------------------------------------------- reading


def _read_parquet(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.is_file() else None


def _read_csv(path: Path) -> pl.DataFrame | None:
    return pl.read_csv(path, infer_schema_length=None) if path.is_file() else None


def _splits(folder: Path, manifest: Manifest) -> dict[str, pl.DataFrame]:
    out = {}
    for entry in manifest.splits:
        frame = _read_parquet(folder / entry.parquet)
        if frame is not None:
            out[entry.name] = frame
    return out


def newest_scores(folder: Path) -> Path | None:
    """`evaluations/<timestamp>/scores.csv` with the latest timestamp (folder names sort as times), or None."""
    root = folder / EVALUATIONS
    if not root.is_dir():
        return None
    runs = sorted((p for p in root.iterdir() if (p / "scores.csv").is_file()), key=lambda p: p.name)
    return runs[-1] / "scores.csv" if runs else None


def _prompts(splits: dict[str, pl.DataFrame]) -> pl.DataFrame:
    parts = [
        f.select(pl.col("prompt_id").cast(pl.Utf8), pl.col("prompt").cast(pl.Utf8), pl.col("category").cast(pl.Utf8))
        for f in splits.values()
        if {"prompt_id", "prompt", "category"} <= set(f.columns)
    ]
    if not parts:
        return pl.DataFrame(schema={"prompt_id": pl.Utf8, "prompt": pl.Utf8, "category": pl.Utf8})
    return pl.concat(parts).unique("prompt_id", keep="first", maintain_order=True)


# ---------------------------------------------------------------------------------------------------- sections


def overview(inputs: ReportInputs) -> Section:
    manifest = inputs.manifest
    code = manifest.code
    version = f"orforge {code.orforge}"
    if code.git_commit:
        version += f", commit {code.git_commit[:12]}" + (" (uncommitted changes)" if code.git_dirty else "")
    facts = [
        ("Release", manifest.name),
        ("Recipe", manifest.recipe),
        ("Created", manifest.created),
        ("License", manifest.license),
        ("Code", version),
        ("Config sha256", manifest.config_hash),
    ]
    embedding = manifest.libraries.embedding_model
    if embedding is not None:
        facts.append(("Embedding model", f"{embedding.name} ({embedding.key})"
                      + (f", sha256 {embedding.sha256[:16]}\u2026" if embedding.sha256 else "")))
    if manifest.parent is not None:
        parent = manifest.parent
        facts.append(("Grown from", parent.folder + (f" (created {parent.created})" if parent.created else "")))
    models = [{"role": role, **m.model_dump()} for role, specs in manifest.models.items() for m in specs]
    splits = [{"split": s.name, "rows": s.rows, "csv": s.csv or "\u2013", "dataset config": s.config}
              for s in manifest.splits]
    packages = manifest.libraries.packages
    context = {
        "facts": [(k, _fmt(v)) for k, v in facts],
        "models": table_view(pl.DataFrame(models)) if models else None,
        "splits": table_view(pl.DataFrame(splits, schema_overrides={"rows": pl.Int64})) if splits else None,
        "libraries": table_view(pl.DataFrame({"package": list(packages), "version": list(packages.values())}))
        if packages else None,
        "notes": _note_items(manifest.notes),
    }
    return Section("overview", "Overview", "sections/overview.html.j2", context)


def _funnel_table(inputs: ReportInputs) -> tuple[pl.DataFrame | None, str | None]:
    rows = inputs.manifest.counts.funnel
    if rows:
        return pl.DataFrame(rows), None
    published = {n: f for n, f in inputs.splits.items() if n != "contested" and "category" in f.columns}
    if not published:
        return None, "The manifest records no funnel and the release has no split frames to count."
    categories = sorted(set().union(*(set(f["category"].drop_nulls().to_list()) for f in published.values())))
    table = pl.DataFrame({"category": categories}, schema={"category": pl.Utf8})
    for name, frame in published.items():
        counts = frame.group_by("category").len(name=f"split_{name}").cast({"category": pl.Utf8})
        table = table.join(counts, on="category", how="left")
    table = table.with_columns(pl.exclude("category").fill_null(0).cast(pl.Int64))
    return table, "The manifest records no funnel; these are the rows per split, counted from the split files."


FUNNEL_EXPLAINED = {
    "orbench": "Prompts per category at each stage: seeds, rewritten candidates, the vote's decisions (benign, toxic, "
               "contested, unjudged), what survived near-duplicate removal, and the rows of each split.",
    "alert": "Per micro category: prompts written by a model, ingested from a file, made from slot templates or "
             "paraphrased from them, those kept after near-duplicate removal (base), and their adversarial variants.",
    "select": "Per root concept: the concepts the targets' splits needed, the questions written for them, those kept "
              "after near-duplicate removal within each concept, those flagged as fitting a neighbour, and the rows "
              "of each split (by the target's root).",
}


def funnel_section(inputs: ReportInputs) -> Section:
    table, note = _funnel_table(inputs)
    context = {"note": note, "explain": FUNNEL_EXPLAINED.get(inputs.manifest.recipe, "Rows at each stage."),
               "table": table_view(with_total(table), total=True) if table is not None else None}
    return Section("funnel", "Funnel", "sections/funnel.html.j2", context)


def funnel_chart_section(inputs: ReportInputs) -> Section:
    table, _ = _funnel_table(inputs)
    image = _image(funnel_chart(table), "Prompts at each stage, stacked by category") if table is not None else None
    return Section("funnel-chart", "Funnel chart", "sections/funnel_chart.html.j2", {"image": image})


def agreement_section(inputs: ReportInputs) -> Section:
    audit = inputs.folder / "audit"
    tables: dict[str, pl.DataFrame] = {}
    context: dict[str, Any] = {"empty": None, "single": False}
    if (audit / "pairwise.csv").is_file():
        for name in ("pairwise", "fleiss", "toxic_rate", "contested", "human"):
            frame = _read_csv(audit / f"{name}.csv")
            if frame is not None:
                tables[name] = frame
        context["source"] = "From the audit in audit/."
    elif inputs.votes is not None and inputs.votes.height:
        tables = agreement(inputs.votes, _prompts(inputs.splits))
        context["source"] = "Computed from votes.parquet (no audit/ folder in this release)."
    else:
        context["empty"] = "No moderator votes in this release."
        return Section("agreement", "Moderator agreement", "sections/agreement.html.j2", context)
    pairwise = tables["pairwise"].with_columns(pl.col("cohen_kappa").cast(pl.Float64))
    overall = pairwise.filter(pl.col("category") == "all")
    if overall.height == 0:
        context["single"] = True
        return Section("agreement", "Moderator agreement", "sections/agreement.html.j2", context)
    context["heatmap"] = _image(kappa_heatmap(pairwise), "Cohen's kappa between every pair of moderators")
    context["pairs"] = table_view(overall.select("moderator_a", "moderator_b", "n", "raw_agreement", "cohen_kappa"))
    context["fleiss"] = context["toxic_rate"] = context["contested"] = context["human"] = None
    if "fleiss" in tables:
        fleiss = tables["fleiss"]
        unknown = (f" {UNKNOWN_CATEGORY}: prompts that reached no split, so the release does not hold their category."
                   if UNKNOWN_CATEGORY in fleiss["category"].to_list() else "")
        context["fleiss_note"] = "Over the prompts every moderator judged; one row per category." + unknown
        context["fleiss"] = table_view(fleiss.select([c for c in ("category", "n_moderators", "n", "fleiss_kappa")
                                                      if c in fleiss.columns]))
    if "toxic_rate" in tables:
        rates = tables["toxic_rate"].filter(pl.col("category") == "all").select("moderator", "n", "toxic_rate")
        context["toxic_rate"] = table_view(rates)
    if "contested" in tables and tables["contested"].height:
        top = tables["contested"].head(CONTESTED_SHOWN)
        top = top.with_columns(
            pl.col(c).list.join(", ") for c in ("toxic_by", "benign_by") if isinstance(top.schema.get(c), pl.List)
        )
        if "prompt_id" in top.columns:
            # Only prompts that reached a split (or the contested frame) have their text in the release.
            top = top.with_columns(
                pl.col("prompt").fill_null(pl.lit("[text not in this release] id ") + pl.col("prompt_id").cast(pl.Utf8))
            )
        shown = ("prompt", "category", "n_toxic", "n_benign", "toxic_by", "benign_by")
        context["contested"] = table_view(top.select([c for c in shown if c in top.columns]), text_columns=("prompt",))
        context["contested_shown"] = top.height
        context["contested_total"] = tables["contested"].height
    if "human" in tables:
        context["human"] = table_view(tables["human"])
    return Section("agreement", "Moderator agreement", "sections/agreement.html.j2", context)


_USAGE_COLUMNS = ("requests", "cached", "failures", "prompt_tokens", "completion_tokens", "cost")


def _usage_frame(rows: list[dict[str, Any]], keys: tuple[str, ...], currency: str | None = None) -> pl.DataFrame:
    # A count no row recorded is left out rather than shown as a column of dashes (so is the cost of an unpriced run).
    counted = [c for c in _USAGE_COLUMNS if any(r.get(c) is not None for r in rows)]
    schema = {**{k: pl.Utf8 for k in keys}, **{c: pl.Float64 if c == "cost" else pl.Int64 for c in counted}}
    frame = pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)
    return frame.rename({"cost": f"cost ({currency})"}) if currency and "cost" in frame.columns else frame


def tokens_section(inputs: ReportInputs) -> Section:
    manifest = inputs.manifest
    context: dict[str, Any] = {"by_role": None, "by_model": None}
    if manifest.tokens:
        table = _usage_frame([{"role": role, **u.model_dump()} for role, u in manifest.tokens.items()], ("role",),
                             manifest.currency)
        numeric = [c for c in table.columns if c != "role"]
        total = len(table) > 1 and bool(numeric)
        if total:
            table = pl.concat([table, table.select(pl.lit("total").alias("role"), *[pl.col(c).sum()
                                                                                   for c in numeric])])
        context["by_role"] = table_view(table, total=total)
    if manifest.usage:
        context["by_model"] = table_view(_usage_frame([u.model_dump() for u in manifest.usage], ("role", "model"),
                                                      manifest.currency))
        if context["by_role"] is None:
            context["by_role"] = context["by_model"]
            context["by_model"] = None
    return Section("tokens", "Token usage", "sections/tokens.html.j2", context)


def failures_section(inputs: ReportInputs) -> Section:
    failures = inputs.failures
    if failures is None or failures.height == 0:
        total = inputs.manifest.failures.total
        empty = ("No failed requests recorded." if not total
                 else f"{total} failures in the manifest; failures.parquet is missing.")
        return Section("failures", "Failures", "sections/failures.html.j2", {"empty": empty})
    keys = [c for c in ("stage", "role", "model", "reason") if c in failures.columns]
    detail = (
        failures.group_by(keys).len(name="n").cast({"n": pl.Int64})
        .sort(["n", *keys], descending=[True] + [False] * len(keys))
    )
    by_stage = failures.group_by("stage").len(name="n").cast({"n": pl.Int64}).sort("stage") if "stage" in keys else None
    context = {
        "empty": None,
        "summary": f"{failures.height:,} requests failed; a failed request leaves no record, only this trace.",
        "by_stage": table_view(by_stage) if by_stage is not None else None,
        "detail": table_view(detail),
    }
    return Section("failures", "Failures", "sections/failures.html.j2", context)


def samples_section(inputs: ReportInputs) -> Section:
    shown = []
    for name, frame in inputs.splits.items():
        label = f"{name} (kept for the record, not published)" if name == "contested" else name
        table = None
        if frame.height:
            sample = frame.sample(n=min(SAMPLE_ROWS, frame.height), seed=inputs.seed)
            if "rejected_by" in sample.columns and isinstance(sample.schema["rejected_by"], pl.List):
                sample = sample.with_columns(pl.col("rejected_by").list.join(", "))
            columns = [c for c in ("prompt", "category", "attack_type", "source", "n_toxic", "n_benign", "n_missing",
                                   "rejected_by")
                       if c in sample.columns]
            table = table_view(sample.select(columns), text_columns=("prompt",))
        shown.append({"label": label, "rows": f"{frame.height:,}", "table": table})
    context = {"splits": shown, "rows": SAMPLE_ROWS, "seed": inputs.seed}
    return Section("samples", "Sample rows", "sections/samples.html.j2", context)


def evaluation_section(inputs: ReportInputs) -> Section:
    folder = inputs.folder
    path = newest_scores(folder)
    if path is None:
        return Section("evaluation", "Evaluation", "sections/evaluation.html.j2", {"source": None})
    scores = pl.read_csv(path, infer_schema_length=None, schema_overrides={"category": pl.Utf8, "model": pl.Utf8,
                                                                        "split": pl.Utf8})
    for column in ("rejection_rate", "ci_low", "ci_high"):
        if column in scores.columns:
            scores = scores.with_columns(pl.col(column).cast(pl.Float64))
    overall = scores.filter(pl.col("category") == "all")
    columns = [c for c in ("model", "split", "n", "n_undecided", "rejection_rate", "ci_low", "ci_high")
               if c in overall.columns]
    by_category = (_image(category_chart(scores), "Rejection rate per category and model")
                   if scores.filter(pl.col("category") != "all").height else None)
    contrast = _read_csv(path.parent / "contrast.csv")
    if contrast is not None and contrast.height:
        contrast = contrast.filter(pl.col("category").cast(pl.Utf8) == "all").select(
            "model", pl.col("meaning").alias("pair outcome"), "outcome", "n", "n_pairs", "n_undecided",
            *[pl.col(c).cast(pl.Float64) for c in ("rate", "ci_low", "ci_high")])
    context = {
        "source": path.relative_to(folder).as_posix(),
        "scatter": _image(scatter_chart(scores),
                          "Rejection rate on hard prompts against rejection rate on toxic prompts"),
        "rates": table_view(overall.select(columns)),
        "by_category": by_category,
        "contrast": table_view(contrast) if contrast is not None else None,
    }
    return Section("evaluation", "Evaluation", "sections/evaluation.html.j2", context)


def diversity_section(inputs: ReportInputs) -> Section:
    """Self-BLEU, Distinct-1/2, mean cosine and clusters per split and group (the manifest's `diversity`), beside
    the published reference figures."""
    diversity = inputs.manifest.diversity
    if diversity is None or not diversity.rows:
        context = {"table": None, "note": "Not measured for this release (diversity.enabled off, or a release "
                                          "written before orforge measured it); `orforge stats FILE` measures any "
                                          "split file."}
    else:
        context = {"table": table_view(pl.DataFrame(summary_rows(diversity))), "note": method_note(diversity)}
    return Section("diversity", "Diversity", "sections/diversity.html.j2", context)


def quality_section(inputs: ReportInputs) -> Section:
    """The quality gate: generated texts rejected per stage, category and rule (the manifest's
    `counts.quality_rejections`), and one rejected text per rule from quality_rejections.parquet."""
    counts = inputs.manifest.counts.quality_rejections
    context: dict[str, Any] = {"counts": None, "examples": None}
    if counts is None:
        context["note"] = "No quality gate ran for this release (built before orforge had one)."
        return Section("quality", "Quality gate", "sections/quality.html.j2", context)
    mended = inputs.manifest.counts.quality_repairs or []
    repaired = (f" {sum(c.n for c in mended):,} texts were kept after a repair (list numbering, a label, quotes or "
                "an ellipsis taken off a complete request; counts.quality_repairs in the manifest)."
                if mended else "")
    if not counts:
        context["note"] = "Every generated text passed every rule of the quality gate." + repaired
        return Section("quality", "Quality gate", "sections/quality.html.j2", context)
    frame = pl.DataFrame([c.model_dump() for c in counts]).with_columns(pl.col("category").fill_null("\u2013"))
    rules = [r for r in QUALITY_RULES if r in set(frame["rule"])] + sorted(
        set(frame["rule"]) - set(QUALITY_RULES))
    wide = (frame.pivot(on="rule", index=["stage", "category"], values="n").fill_null(0)
            .select("stage", "category", *rules).sort("stage", "category"))
    wide = wide.with_columns(pl.sum_horizontal(rules).alias("total"))
    total = wide.select(pl.lit("total").alias("stage"), pl.lit("").alias("category"),
                        *[pl.col(c).sum() for c in [*rules, "total"]])
    by_stage = frame.group_by("stage").agg(pl.col("n").sum()).sort("stage")
    context["note"] = (f"{int(frame['n'].sum()):,} generated texts failed the quality gate ("
                       + ", ".join(f"{n:,} {stage}" for stage, n in by_stage.iter_rows())
                       + ") and went no further: a rejected text is never moderated, deduplicated or published. "
                       "Each counts under the first rule it failed, in the order of the columns; "
                       "quality_rejections.parquet holds every one with its reason." + repaired)
    context["counts"] = table_view(pl.concat([wide, total]), total=True)
    rows = _read_parquet(inputs.folder / "quality_rejections.parquet")
    if rows is not None and rows.height:
        first = (rows.sort("stage", "rule", "id").unique(["stage", "rule"], keep="first", maintain_order=True)
                 .with_columns(pl.col("rule").replace_strict({r: i for i, r in enumerate(rules)}, default=len(rules),
                                                             return_dtype=pl.Int64).alias("_order"))
                 .sort("stage", "_order").select("stage", "rule", "category", "text", "detail"))
        context["examples"] = table_view(first, text_columns=("text", "detail"))
    return Section("quality", "Quality gate", "sections/quality.html.j2", context)


@recipe_sections("orbench")
def orbench_sections(inputs: ReportInputs) -> list[Section]:
    return [
        overview(inputs),
        funnel_section(inputs),
        quality_section(inputs),
        funnel_chart_section(inputs),
        agreement_section(inputs),
        tokens_section(inputs),
        failures_section(inputs),
        samples_section(inputs),
        diversity_section(inputs),
        evaluation_section(inputs),
    ]


# ---------------------------------------------------------------------------------------------------- SELECT

SELECT_SPLITS = ("abstention", "generalization", "specificity")


def select_splits_section(inputs: ReportInputs) -> Section:
    """Rows per target and split, leak flags, and sample questions of each split with their relation and distance."""
    present = [inputs.splits[s] for s in SELECT_SPLITS if s in inputs.splits]
    rows = pl.concat(present) if present else None
    per_target = None
    if rows is not None and rows.height:
        per_target = (rows.group_by("target_id", "split").len().pivot(on="split", index="target_id", values="len")
                      .fill_null(0).sort("target_id"))
        per_target = per_target.select("target_id", *[s for s in SELECT_SPLITS if s in per_target.columns])
    questions = _read_parquet(inputs.folder / "questions.parquet")
    leaked = None
    if questions is not None and "leak_flag" in questions.columns:
        flagged = questions.filter(pl.col("leak_flag").fill_null(False))
        leaked = {"n": flagged.height, "of": questions.height,
                  "table": table_view(flagged.head(SAMPLE_ROWS).select("concept_id", "question", "leak_with",
                                                                       "leak_similarity"),
                                      text_columns=("question",)) if flagged.height else None}
    samples = []
    for name in SELECT_SPLITS:
        frame = inputs.splits.get(name)
        if frame is None:
            continue
        table = None
        if frame.height:
            sample = frame.sample(n=min(SAMPLE_ROWS, frame.height), seed=inputs.seed).sort("target_id", "distance")
            table = table_view(sample.select("target_id", "relation", "distance", "concept_id", "question"),
                               text_columns=("question",))
        samples.append({"label": name, "rows": f"{frame.height:,}", "table": table})
    context = {"per_target": table_view(with_total(per_target), total=True) if per_target is not None else None,
               "leaked": leaked, "samples": samples, "rows": SAMPLE_ROWS, "seed": inputs.seed}
    return Section("splits", "Splits and questions", "sections/select_splits.html.j2", context)


def abstention_section(inputs: ReportInputs) -> Section:
    """The newest evaluation: the technique table (abstention, generalization, specificity, harmonic mean with 95%
    t-intervals over concepts), abstention rate against path distance, and the technique scatter."""
    path = newest_scores(inputs.folder)
    if path is None:
        return Section("evaluation", "Abstention evaluation", "sections/abstention.html.j2", {"source": None})
    run = path.parent
    summary = _read_csv(run / "scores.csv")
    if summary is not None:  # one cell per metric: mean [95% interval]
        metrics = [c for c in ("abstention_rate", "generalization_rate", "specificity", "harmonic_mean")
                   if c in summary.columns]
        summary = pl.DataFrame([
            {"model": row["model"], "technique": row["technique"],
             **{m.replace("_", " "): _with_interval(row[m], row.get(f"{m}_low"), row.get(f"{m}_high"))
                for m in metrics}}
            for row in summary.iter_rows(named=True)])
    by_depth = _read_csv(run / "by_depth.csv")
    images = {name: _image((run / f"{name}.png").read_bytes(), alt)
              for name, alt in (("distance", "Abstention rate against path distance from the target"),
                                ("techniques", "Generalization against specificity per technique"))
              if (run / f"{name}.png").is_file()}
    context = {"source": run.relative_to(inputs.folder).as_posix(),
               "summary": table_view(summary) if summary is not None else None,
               "by_depth": table_view(by_depth) if by_depth is not None else None,
               "distance": None, "techniques": None, **images}
    return Section("evaluation", "Abstention evaluation", "sections/abstention.html.j2", context)


def _with_interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


@recipe_sections("select")
def select_sections(inputs: ReportInputs) -> list[Section]:
    return [
        overview(inputs),
        funnel_section(inputs),
        quality_section(inputs),
        select_splits_section(inputs),
        diversity_section(inputs),
        tokens_section(inputs),
        failures_section(inputs),
        abstention_section(inputs),
    ]


# ---------------------------------------------------------------------------------------------------- ALERT


def safety_section(inputs: ReportInputs) -> Section:
    """The newest evaluation of an ALERT release: safety scores per model and attack type, the per-category chart and
    the category x attack heatmap."""
    path = newest_scores(inputs.folder)
    if path is None:
        return Section("evaluation", "Safety evaluation", "sections/safety.html.j2", {"source": None})
    run = path.parent
    scores = _read_csv(run / "safety_scores.csv")
    overall = policy = None
    if scores is not None:
        shown = scores.filter(pl.col("dimension").is_in(["overall", "attack_type", "macro_category"]))
        overall = table_view(shown.select([c for c in ("model", "dimension", "group", "n", "n_undecided",
                                                       "safety_score", "ci_low", "ci_high") if c in shown.columns]))
    if (run / "scores_policy.csv").is_file():
        policy_scores = _read_csv(run / "scores_policy.csv")
        policy = table_view(policy_scores.filter(pl.col("dimension") == "overall"))
    images = {name: _image((run / f"{name}.png").read_bytes(), alt)
              for name, alt in (("categories", "Safety score per category and model"),
                                ("attacks", "Safety score per category and attack type"))
              if (run / f"{name}.png").is_file()}
    context = {"source": run.relative_to(inputs.folder).as_posix(), "scores": overall, "policy": policy,
               "categories": None, "attacks": None, **images}
    return Section("evaluation", "Safety evaluation", "sections/safety.html.j2", context)


@recipe_sections("alert")
def alert_sections(inputs: ReportInputs) -> list[Section]:
    return [
        overview(inputs),
        funnel_section(inputs),
        quality_section(inputs),
        agreement_section(inputs),
        tokens_section(inputs),
        failures_section(inputs),
        samples_section(inputs),
        diversity_section(inputs),
        safety_section(inputs),
    ]


# ---------------------------------------------------------------------------------------------------- entry point


def render_report(name: str, created: str, sections: list[Section]) -> str:
    """The page around `sections`, in order (the frame template `report.html.j2`)."""
    ids = [s.id for s in sections]
    if len(set(ids)) != len(ids):
        raise ValueError(f"report section ids must be unique, got {ids}")
    return _ENV.get_template("report.html.j2").render(name=name, created=created, sections=sections)


def build_report(release_dir: Path | str, seed: int | None = None) -> str:
    """The report's HTML for the release at `release_dir` (see the module docstring)."""
    folder = Path(release_dir)
    manifest = read_manifest(folder)
    if manifest.recipe not in _RECIPES:
        raise ValueError(f"{folder}: no report sections for recipe {manifest.recipe!r} "
                         f"(known: {', '.join(sorted(_RECIPES))})")
    if seed is None:
        config_seed = manifest.config.get("seed")
        seed = config_seed if isinstance(config_seed, int) else 0
    splits = _splits(folder, manifest)
    inputs = ReportInputs(folder, manifest, splits, _read_parquet(folder / "votes.parquet"),
                          _read_parquet(folder / "failures.parquet"), seed)
    return render_report(manifest.name or folder.name, manifest.created, _RECIPES[manifest.recipe](inputs))


def write_report(release_dir: Path | str, seed: int | None = None) -> Path:
    """Write `report.html` into the release folder (atomically) and return its path.

    The manifest does not list report.html (a derived file, `outputs.release.DERIVED`), so `verify_release` ignores it.
    """
    folder = Path(release_dir)
    return write_text(folder / REPORT, build_report(folder, seed))
