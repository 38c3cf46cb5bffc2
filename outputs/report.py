"""The release report: one self-contained `report.html` built from what a release folder holds.

Everything comes from the folder: `manifest.json` (as outputs.release writes it), the split parquets, `votes.parquet`,
`failures.parquet`, and when present `audit/` (from moderators.agreement.write_audit) and the newest
`evaluations/<timestamp>/scores.csv` (from outputs.scoring.score). Charts are embedded as base64 PNGs and the CSS is
inline, so the file opens anywhere without a network. Every piece of data text is HTML-escaped: the prompts are
adversarial by construction, and the page carries a Content-Security-Policy that forbids scripts and any fetch.

Sections, each an <h2> with a stable id (`SECTION_IDS`): overview, funnel, funnel-chart, agreement, tokens,
failures, samples, evaluation.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import polars as pl

from moderators.agreement import UNKNOWN_CATEGORY, agreement
from outputs.atomic import write_text
from outputs.plots import category_chart, funnel_chart, kappa_heatmap, scatter_chart
from outputs.release import read_manifest

REPORT = "report.html"
SECTION_IDS = ("overview", "funnel", "funnel-chart", "agreement", "tokens", "failures", "samples", "evaluation")
EVALUATIONS = "evaluations"
SAMPLE_ROWS = 5
CONTESTED_SHOWN = 5

_TITLES = {
    "overview": "Overview",
    "funnel": "Funnel",
    "funnel-chart": "Funnel chart",
    "agreement": "Moderator agreement",
    "tokens": "Token usage",
    "failures": "Failures",
    "samples": "Sample rows",
    "evaluation": "Evaluation",
}

_CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 28px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin: 40px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p.lead, p.note { color: var(--muted); margin: 4px 0 12px; }
nav { margin: 12px 0 8px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
.scroll { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr.total td { font-weight: 600; background: var(--soft); }
td.text { max-width: 640px; white-space: pre-wrap; word-break: break-word; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--soft);
       padding: 1px 4px; border-radius: 4px; }
img.chart { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; margin: 6px 0 12px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 8px 0 16px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-word; }
footer { margin-top: 48px; color: var(--muted); font-size: 13px; }
"""

# No scripts, no fetches of any kind: images must be inline data, styles inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


# ---------------------------------------------------------------------------------------------------- html pieces


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


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
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(frame: pl.DataFrame, text_columns: tuple[str, ...] = (), total: bool = False) -> str:
    """An HTML table of `frame`; every header and cell escaped. With `total`, the last row is styled as a total."""
    if frame.height == 0:
        return '<p class="note">(no rows)</p>'
    numeric = {c for c, t in frame.schema.items() if t.is_numeric()}
    # Headers read as words ("benign after dedup") and may wrap, so wide tables stay on the page.
    head = "".join(
        f'<th class="num">{_e(c.replace("_", " "))}</th>' if c in numeric else f"<th>{_e(c.replace('_', ' '))}</th>"
        for c in frame.columns
    )
    body = []
    for i, row in enumerate(frame.iter_rows()):
        cells = []
        for column, value in zip(frame.columns, row):
            cls = "num" if column in numeric or _is_number(value) else "text" if column in text_columns else ""
            cells.append(f'<td class="{cls}">{_e(_fmt(value))}</td>' if cls else f"<td>{_e(_fmt(value))}</td>")
        last = total and i == frame.height - 1
        body.append(f'<tr class="total">{"".join(cells)}</tr>' if last else f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="chart" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _section(section_id: str, body: list[str]) -> str:
    return f'<section><h2 id="{section_id}">{_e(_TITLES[section_id])}</h2>\n' + "\n".join(body) + "\n</section>"


# ---------------------------------------------------------------------------------------------------- reading


def _read_parquet(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.is_file() else None


def _read_csv(path: Path) -> pl.DataFrame | None:
    return pl.read_csv(path, infer_schema_length=None) if path.is_file() else None


def _splits(folder: Path, manifest: dict) -> dict[str, pl.DataFrame]:
    out = {}
    for entry in manifest.get("splits", []):
        frame = _read_parquet(folder / entry.get("parquet", f"{entry['name']}.parquet"))
        if frame is not None:
            out[entry["name"]] = frame
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


def _overview(manifest: dict, folder: Path) -> str:
    code = manifest.get("code") or {}
    version = f"orforge {code.get('orforge', 'unknown')}"
    if code.get("git_commit"):
        version += f", commit {code['git_commit'][:12]}" + (" (uncommitted changes)" if code.get("git_dirty") else "")
    facts = [
        ("Release", manifest.get("name", folder.name)),
        ("Created", manifest.get("created")),
        ("Code", version),
        ("Config sha256", manifest.get("config_hash")),
    ]
    body = ['<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(_fmt(v))}</dd>" for k, v in facts) + "</dl>"]
    models = manifest.get("models") or {}
    if models:
        rows = [
            {"role": role, "name": m.get("name"), "backend": m.get("backend"), "model": m.get("model")}
            for role, specs in models.items() for m in specs
        ]
        body += ["<h3>Models</h3>", _table(pl.DataFrame(rows))]
    splits = manifest.get("splits") or []
    if splits:
        rows = [
            {"split": s["name"], "rows": s.get("rows"), "csv": s.get("csv") or "\u2013",
             "dataset config": bool(s.get("config"))}
            for s in splits
        ]
        body += ["<h3>Splits</h3>", _table(pl.DataFrame(rows, schema_overrides={"rows": pl.Int64}))]
    notes = manifest.get("notes") or {}
    if notes:
        body += ["<h3>Notes</h3>", "<ul>" + "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in notes.items()) + "</ul>"]
    return _section("overview", body)


def _funnel_table(manifest: dict, splits: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame | None, str | None]:
    rows = (manifest.get("counts") or {}).get("funnel")
    if rows:
        return pl.DataFrame(rows), None
    published = {n: f for n, f in splits.items() if n != "contested" and "category" in f.columns}
    if not published:
        return None, "The manifest records no funnel and the release has no split frames to count."
    categories = sorted(set().union(*(set(f["category"].drop_nulls().to_list()) for f in published.values())))
    table = pl.DataFrame({"category": categories}, schema={"category": pl.Utf8})
    for name, frame in published.items():
        counts = frame.group_by("category").len(name=f"split_{name}").cast({"category": pl.Utf8})
        table = table.join(counts, on="category", how="left")
    table = table.with_columns(pl.exclude("category").fill_null(0).cast(pl.Int64))
    return table, "The manifest records no funnel; these are the rows per split, counted from the split files."


def _with_total(table: pl.DataFrame) -> pl.DataFrame:
    numeric = [c for c, t in table.schema.items() if t.is_integer()]
    total = table.select(pl.lit("total").alias("category"), *[pl.col(c).sum().cast(pl.Int64) for c in numeric])
    return pl.concat([table.cast({c: pl.Int64 for c in numeric}), total], how="diagonal_relaxed")


def _funnel(table: pl.DataFrame | None, note: str | None) -> str:
    body = [_note("Prompts per category at each stage: seeds, rewritten candidates, the vote's decisions (benign, "
                  "toxic, contested, unjudged), what survived near-duplicate removal, and the rows of each split.")]
    if note:
        body.append(_note(note))
    if table is not None:
        body.append(_table(_with_total(table), total=True))
    return _section("funnel", body)


def _funnel_chart(table: pl.DataFrame | None) -> str:
    if table is None:
        return _section("funnel-chart", [_note("No funnel to draw.")])
    return _section("funnel-chart", [_image(funnel_chart(table), "Prompts at each stage, stacked by category")])


def _agreement(folder: Path, votes: pl.DataFrame | None, splits: dict[str, pl.DataFrame]) -> str:
    audit = folder / "audit"
    tables: dict[str, pl.DataFrame] = {}
    if (audit / "pairwise.csv").is_file():
        for name in ("pairwise", "fleiss", "toxic_rate", "contested", "human"):
            frame = _read_csv(audit / f"{name}.csv")
            if frame is not None:
                tables[name] = frame
        source = "From the audit in audit/."
    elif votes is not None and votes.height:
        tables = agreement(votes, _prompts(splits))
        source = "Computed from votes.parquet (no audit/ folder in this release)."
    else:
        return _section("agreement", [_note("No moderator votes in this release.")])
    pairwise = tables["pairwise"].with_columns(pl.col("cohen_kappa").cast(pl.Float64))
    body = [_note(source + " Cohen's kappa is 1 for perfect agreement, 0 for agreement at chance level and "
                  "negative below chance; it is undefined (n/a) when both moderators gave one and the same verdict "
                  "to every shared prompt.")]
    overall = pairwise.filter(pl.col("category") == "all")
    if overall.height == 0:
        body.append(_note("Only one moderator voted, so there is no pair to compare."))
        return _section("agreement", body)
    body.append(_image(kappa_heatmap(pairwise), "Cohen's kappa between every pair of moderators"))
    body += ["<h3>Pairs</h3>", _table(overall.select("moderator_a", "moderator_b", "n", "raw_agreement",
                                                     "cohen_kappa"))]
    if "fleiss" in tables:
        fleiss = tables["fleiss"]
        unknown = (f" {UNKNOWN_CATEGORY}: prompts that reached no split, so the release does not hold their category."
                   if UNKNOWN_CATEGORY in fleiss["category"].to_list() else "")
        body += ["<h3>All moderators (Fleiss' kappa)</h3>",
                 _note("Over the prompts every moderator judged; one row per category." + unknown),
                 _table(fleiss.select([c for c in ("category", "n_moderators", "n", "fleiss_kappa")
                                       if c in fleiss.columns]))]
    if "toxic_rate" in tables:
        rates = tables["toxic_rate"].filter(pl.col("category") == "all").select("moderator", "n", "toxic_rate")
        body += ["<h3>How often each moderator says toxic</h3>", _table(rates)]
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
        columns = [c for c in shown if c in top.columns]
        body += [f"<h3>Most split prompts (top {top.height} of {tables['contested'].height})</h3>",
                 _table(top.select(columns), text_columns=("prompt",))]
    if "human" in tables:
        body += ["<h3>Agreement with human labels</h3>", _table(tables["human"])]
    return _section("agreement", body)


def _tokens(manifest: dict) -> str:
    tokens = manifest.get("tokens") or {}
    if not tokens:
        return _section("tokens", [_note("The manifest records no token counts.")])
    rows = [{"role": role, **(v if isinstance(v, dict) else {"tokens": v})} for role, v in tokens.items()]
    table = pl.DataFrame(rows, infer_schema_length=None)
    numeric = [c for c, t in table.schema.items() if t.is_numeric()]
    if len(rows) > 1 and numeric:
        total = table.select(pl.lit("total").alias("role"), *[pl.col(c).sum() for c in numeric])
        table = pl.concat([table, total], how="diagonal_relaxed")
    return _section("tokens", [_table(table, total=len(rows) > 1 and bool(numeric))])


def _failures(manifest: dict, failures: pl.DataFrame | None) -> str:
    if failures is None or failures.height == 0:
        total = (manifest.get("failures") or {}).get("total", 0)
        return _section("failures", [_note("No failed requests recorded." if not total
                                           else f"{total} failures in the manifest; failures.parquet is missing.")])
    keys = [c for c in ("stage", "role", "model", "reason") if c in failures.columns]
    table = (
        failures.group_by(keys).len(name="n").cast({"n": pl.Int64})
        .sort(["n", *keys], descending=[True] + [False] * len(keys))
    )
    by_stage = failures.group_by("stage").len(name="n").cast({"n": pl.Int64}).sort("stage") if "stage" in keys else None
    body = [_note(f"{failures.height:,} requests failed; a failed request leaves no record, only this trace.")]
    if by_stage is not None:
        body += ["<h3>By stage</h3>", _table(by_stage)]
    body += ["<h3>By stage, role, model and reason</h3>", _table(table)]
    return _section("failures", body)


def _samples(splits: dict[str, pl.DataFrame], seed: int) -> str:
    if not splits:
        return _section("samples", [_note("No split files found.")])
    body = [_note(f"Up to {SAMPLE_ROWS} rows per split, drawn with seed {seed}. Prompts are shown as plain text.")]
    for name, frame in splits.items():
        label = f"{name} (kept for the record, not published)" if name == "contested" else name
        body.append(f"<h3>{_e(label)} \u2013 {frame.height:,} rows</h3>")
        if frame.height == 0:
            body.append(_note("Empty."))
            continue
        sample = frame.sample(n=min(SAMPLE_ROWS, frame.height), seed=seed)
        if "rejected_by" in sample.columns and isinstance(sample.schema["rejected_by"], pl.List):
            sample = sample.with_columns(pl.col("rejected_by").list.join(", "))
        columns = [c for c in ("prompt", "category", "source", "n_toxic", "n_benign", "n_missing", "rejected_by")
                   if c in sample.columns]
        body.append(_table(sample.select(columns), text_columns=("prompt",)))
    return _section("samples", body)


def _evaluation(folder: Path) -> str:
    path = newest_scores(folder)
    if path is None:
        return _section("evaluation", [_note("No evaluation yet: this release has no evaluations/<time>/scores.csv.")])
    scores = pl.read_csv(path, infer_schema_length=None, schema_overrides={"category": pl.Utf8, "model": pl.Utf8,
                                                                        "split": pl.Utf8})
    for column in ("rejection_rate", "ci_low", "ci_high"):
        if column in scores.columns:
            scores = scores.with_columns(pl.col(column).cast(pl.Float64))
    rel = path.relative_to(folder).as_posix()
    body = [_note(f"From {rel}. Rejection rate on hard prompts measures over-refusal (lower is better); on toxic "
                  "prompts it measures safety (higher is better). Intervals are 95% bootstrap intervals.")]
    body.append(_image(scatter_chart(scores), "Rejection rate on hard prompts against rejection rate on toxic prompts"))
    overall = scores.filter(pl.col("category") == "all")
    columns = [c for c in ("model", "split", "n", "n_undecided", "rejection_rate", "ci_low", "ci_high")
               if c in overall.columns]
    body += ["<h3>Rejection rates</h3>", _table(overall.select(columns))]
    if scores.filter(pl.col("category") != "all").height:
        body += ["<h3>By category</h3>", _image(category_chart(scores), "Rejection rate per category and model")]
    return _section("evaluation", body)


# ---------------------------------------------------------------------------------------------------- entry point


def build_report(release_dir: Path | str, seed: int | None = None) -> str:
    """The report's HTML for the release at `release_dir` (see the module docstring)."""
    folder = Path(release_dir)
    manifest = read_manifest(folder)
    if seed is None:
        config_seed = (manifest.get("config") or {}).get("seed")
        seed = config_seed if isinstance(config_seed, int) else 0
    splits = _splits(folder, manifest)
    votes = _read_parquet(folder / "votes.parquet")
    failures = _read_parquet(folder / "failures.parquet")
    funnel_table, funnel_note = _funnel_table(manifest, splits)
    name = manifest.get("name") or folder.name
    sections = [
        _overview(manifest, folder),
        _funnel(funnel_table, funnel_note),
        _funnel_chart(funnel_table),
        _agreement(folder, votes, splits),
        _tokens(manifest),
        _failures(manifest, failures),
        _samples(splits, seed),
        _evaluation(folder),
    ]
    nav = "".join(f'<a href="#{sid}">{_e(_TITLES[sid])}</a>' for sid in SECTION_IDS)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(name)} \u2013 orforge release report</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body><main>",
        f"<h1>{_e(name)}</h1>",
        f'<p class="lead">Release report: how the dataset was built, how far the moderators agreed, and how '
        f"target models score on it.</p>",
        f"<nav>{nav}</nav>",
        *sections,
        f"<footer>Generated by orforge from the files in this folder. Created {_e(manifest.get('created'))}."
        "</footer>",
        "</main></body>",
        "</html>",
        "",
    ])


def write_report(release_dir: Path | str, seed: int | None = None) -> Path:
    """Write `report.html` into the release folder (atomically) and return its path.

    Note: the manifest does not list report.html, so `outputs.release.verify_release` reports it as unexpected.
    """
    folder = Path(release_dir)
    return write_text(folder / REPORT, build_report(folder, seed))
