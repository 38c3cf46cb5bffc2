"""Audit files: the moderator-agreement tables of `moderators.agreement` as CSVs, plus the pairwise kappa heatmap;
the blinded sample people label and its key; and the card's quote of their agreement figures.

The statistics are computed in moderators/ (pure tables); writing and drawing them is release-file work, so it lives
here, one layer up, and moderators/ never imports outputs/.

A human-audit sample (`audit_sample`) is two files. `audit_sample.csv` is what people see: `item_id`, `prompt`, an
empty label column whose header states the allowed values (LABEL_COLUMN) and an empty `comment` column; rows are
shuffled with the seed, and nothing in it says how any model judged the prompt. `audit_key.csv` maps each item back:
prompt_id, prompt, category, the ensemble's decision, the published splits that hold it, each moderator's vote
(`vote_<moderator>`), and the panel's refusals (`panel_n_refusals`, `panel_refused_by`; empty when the panel did not
answer it). `audit_sample.json` records the draw (release, n, seed, strata and the rows allocated to each).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import polars as pl

from orforge.moderators.agreement import ALL, VERDICTS
from orforge.moderators.panel import hard_members
from orforge.outputs.atomic import atomic_folder, write_bytes, write_csv, write_json
from orforge.outputs.plots import kappa_heatmap
from orforge.outputs.release import CARD, amend_card
from orforge.outputs.splits import PUBLISHED_SPLITS, stratified_sample

AUDIT_FOLDER = "audit"
HEATMAP = "agreement_heatmap.png"


def csv_ready(frame: pl.DataFrame) -> pl.DataFrame:
    """List columns (who voted toxic) joined as "a; b" strings, which CSV can hold."""
    lists = [c for c, t in frame.schema.items() if isinstance(t, pl.List)]
    return frame.with_columns(pl.col(c).list.join("; ") for c in lists) if lists else frame


def write_audit(folder: Path | str, result: dict[str, pl.DataFrame]) -> Path:
    """Write every table of `result` (from `moderators.agreement.agreement`, plus e.g. result["human"] =
    human_agreement(...)) as `<folder>/audit/<name>.csv`, and the pairwise kappa heatmap as `agreement_heatmap.png`.
    Each file is written atomically. Returns the audit folder."""
    audit = Path(folder) / AUDIT_FOLDER
    audit.mkdir(parents=True, exist_ok=True)
    for name, table in result.items():
        write_csv(audit / f"{name}.csv", csv_ready(table))
    if "pairwise" in result:
        write_bytes(audit / HEATMAP, kappa_heatmap(result["pairwise"]))
    return audit


# ---------------------------------------------------------------------------------------------------- human audit

SAMPLE_FILE = "audit_sample.csv"
KEY_FILE = "audit_key.csv"
SAMPLE_FACTS = "audit_sample.json"
LABEL_COLUMN = "label (toxic or benign)"
STRATA = ("category", "decision", "split")
NO_SPLIT = "none"
VOTE_PREFIX = "vote_"
CARD_START, CARD_END = "<!-- orforge:human-audit -->", "<!-- /orforge:human-audit -->"


def audit_population(candidates: pl.DataFrame, votes: pl.DataFrame, splits: dict[str, pl.DataFrame],
                     responses: pl.DataFrame | None) -> pl.DataFrame:
    """Every candidate put to the moderators (whatever the vote decided, `unjudged` when it has no decision), with
    what the key records: prompt_id, prompt, category, decision,
    split (the published splits holding it, "benign, hard", or "none"), `vote_<moderator>` per moderator, and the
    panel's `panel_n_refusals` and `panel_refused_by` (null when the panel did not answer it)."""
    population = candidates.select("prompt_id", "prompt", "category",
                                   pl.col("decision").fill_null("unjudged")).unique("prompt_id", keep="first")
    held = [frame.select("prompt_id").unique().with_columns(split=pl.lit(name))
            for name, frame in splits.items() if name in PUBLISHED_SPLITS]
    if held:
        order = {name: i for i, name in enumerate(PUBLISHED_SPLITS)}
        where = (pl.concat(held).with_columns(__order=pl.col("split").replace_strict(order, return_dtype=pl.Int64))
                 .sort("__order").group_by("prompt_id", maintain_order=True).agg(pl.col("split").str.join(", ")))
        population = population.join(where, on="prompt_id", how="left")
    else:
        population = population.with_columns(split=pl.lit(None, dtype=pl.Utf8))
    population = population.with_columns(pl.col("split").fill_null(NO_SPLIT))
    for moderator in sorted(votes["moderator"].unique().to_list()):
        mine = votes.filter(pl.col("moderator") == moderator).select("prompt_id", pl.col("verdict")
                                                                      .alias(VOTE_PREFIX + moderator))
        population = population.join(mine, on="prompt_id", how="left")
    if responses is not None and responses.height:
        panel = hard_members(responses).select("prompt_id", pl.col("n_rejections").alias("panel_n_refusals"),
                                               pl.col("rejected_by").list.join("; ").alias("panel_refused_by"))
        population = population.join(panel, on="prompt_id", how="left")
    else:
        population = population.with_columns(panel_n_refusals=pl.lit(None, dtype=pl.Int64),
                                             panel_refused_by=pl.lit(None, dtype=pl.Utf8))
    return population.sort("prompt_id")


def audit_sample(population: pl.DataFrame, n: int, stratify: list[str], seed: int
                 ) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """(blinded sample, key, rows per stratum) for `n` rows of `population` (from `audit_population`).

    With `stratify` (columns of STRATA), rows are allocated by `outputs.splits.proportional_quotas`: in proportion
    to each stratum's size, at least one per non-empty stratum, the remainder by largest fraction. Rows are then
    shuffled by a hash of (seed, prompt_id) and numbered `item-001`, ...: the same release, n, strata and seed give
    the same files. Raises ValueError (one line) for an n the strata cannot give or an unknown stratum column."""
    stratify = list(dict.fromkeys(stratify))
    unknown = [c for c in stratify if c not in STRATA]
    if unknown:
        raise ValueError(f"--stratify {','.join(stratify)}: unknown column(s) {unknown}; choose from {list(STRATA)}")
    if n < 1 or n > population.height:
        raise ValueError(f"--n {n}: the release has {population.height} judged prompts to sample from")
    drawn = stratified_sample(population, by=stratify, size=n, seed=seed)
    allocation = {"all": drawn.height}
    if stratify:
        strata = drawn.group_by(stratify).len().sort(stratify)
        allocation = {" / ".join(str(v) for v in row[:-1]): row[-1] for row in strata.iter_rows()}
    order = [hashlib.sha256(f"{seed}\x00order\x00{p}".encode()).hexdigest() for p in drawn["prompt_id"]]
    width = max(3, len(str(drawn.height)))
    drawn = (drawn.with_columns(pl.Series("__order", order)).sort("__order").drop("__order")
             .with_row_index("__i", offset=1)
             .with_columns(item_id=pl.format("item-{}", pl.col("__i").cast(pl.Utf8).str.zfill(width))).drop("__i"))
    sample = drawn.select("item_id", "prompt", pl.lit(None, dtype=pl.Utf8).alias(LABEL_COLUMN),
                          pl.lit(None, dtype=pl.Utf8).alias("comment"))
    key = drawn.select("item_id", *[c for c in drawn.columns if c != "item_id"])
    return sample, key, allocation


def write_audit_sample(out: Path, sample: pl.DataFrame, key: pl.DataFrame, facts: dict) -> Path:
    """The sample, its key and the facts of the draw in a new folder `out` (built aside, renamed into place)."""
    with atomic_folder(out) as tmp:
        write_csv(tmp / SAMPLE_FILE, sample)
        write_csv(tmp / KEY_FILE, key)
        write_json(tmp / SAMPLE_FACTS, facts)
    return out


def _read_csv_strings(path: Path, what: str) -> pl.DataFrame:
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        return pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ValueError(f"{what} {path}: cannot read it: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def is_labelled_sample(path: Path) -> bool:
    """Whether a --human file is a filled-in `audit_sample.csv` (it has `item_id`) rather than an id/prompt file."""
    try:
        return "item_id" in pl.read_csv(path, n_rows=0, infer_schema=False).columns
    except (OSError, pl.exceptions.PolarsError):
        return False


def read_labelled_sample(sample_path: Path, key_path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(labels as `id` (prompt_id), `label`; the key rows of the labelled items) from a filled-in sample and its
    key. Rows may be deleted from the sample (only the rest are scored); every remaining row needs a label of
    toxic or benign (any case). Raises ValueError (one line) for a missing file, a missing column, a label that is
    not allowed or empty, a repeated item, or an item or prompt text the key does not have."""
    sample = _read_csv_strings(sample_path, "--human")
    key = _read_csv_strings(key_path, "--key")
    label_columns = [c for c in sample.columns if re.fullmatch(r"label( \(.*\))?", c.strip().lower())]
    if "item_id" not in sample.columns or len(label_columns) != 1:
        raise ValueError(f"--human {sample_path}: need the columns item_id and {LABEL_COLUMN!r} of {SAMPLE_FILE}; "
                         f"found {sample.columns}")
    missing = [c for c in ("item_id", "prompt_id", "prompt", "category") if c not in key.columns]
    if missing:
        raise ValueError(f"--key {key_path}: not an audit key (no column(s) {missing})")
    rows = sample.select(pl.col("item_id").str.strip_chars(),
                         pl.col(label_columns[0]).str.strip_chars().str.to_lowercase().alias("label"),
                         *([pl.col("prompt")] if "prompt" in sample.columns else [])).with_row_index("__row", offset=2)
    rows = rows.filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != ""))
    repeated = rows.filter(pl.col("item_id").is_duplicated())
    if repeated.height:
        raise ValueError(f"--human {sample_path}: item {repeated['item_id'][0]!r} appears more than once")
    unlabelled = rows.filter(pl.col("label").is_null() | (pl.col("label") == ""))
    if unlabelled.height:
        raise ValueError(f"--human {sample_path}: {unlabelled.height} row(s) have no label, e.g. row "
                         f"{unlabelled['__row'][0]} ({unlabelled['item_id'][0]}); label them or delete the rows")
    bad = rows.filter(~pl.col("label").is_in(VERDICTS))
    if bad.height:
        raise ValueError(f"--human {sample_path}: {bad.height} label(s) other than toxic/benign, e.g. row "
                         f"{bad['__row'][0]}: {bad['label'][0]!r}")
    if rows.height == 0:
        raise ValueError(f"--human {sample_path}: no labelled rows")
    joined = rows.join(key.select("item_id", "prompt_id", pl.col("prompt").alias("__key_prompt")), on="item_id",
                       how="left")
    stray = joined.filter(pl.col("prompt_id").is_null())
    if stray.height:
        raise ValueError(f"--human {sample_path} does not match --key {key_path}: item {stray['item_id'][0]!r} "
                         f"(row {stray['__row'][0]}) is not in the key")
    if "prompt" in joined.columns:
        changed = joined.filter(pl.col("prompt").str.strip_chars() != pl.col("__key_prompt").str.strip_chars())
        if changed.height:
            raise ValueError(f"--human {sample_path} does not match --key {key_path}: the prompt of item "
                             f"{changed['item_id'][0]!r} differs from the key's")
    labels = joined.select(pl.col("prompt_id").alias("id"), "label")
    return labels, key.join(labels.select(pl.col("id").alias("prompt_id")), on="prompt_id", how="semi")


def card_with_human_audit(card: str, human: pl.DataFrame, source: str) -> str:
    """The card text with a "Human audit" section (between CARD_START and CARD_END, replacing an earlier one) that
    quotes every rater's overall accuracy and Cohen's kappa against the people, with n; placed before "## Intended
    use" when the card has it."""
    overall = human.filter(pl.col("category") == ALL)
    n_labelled = overall["n_human"].max() if overall.height else 0

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    intro = (f"People labelled {n_labelled} prompts of this release as toxic or benign ({source}); how often each "
             "moderator, the moderators' vote (ensemble) and the refusal panel agreed with them, on the prompts "
             "each one judged (n). Per category: `audit/human.csv`.")
    lines = [CARD_START, "## Human audit", "", intro, "", "| rater | n | accuracy | Cohen's kappa |", "|---|---|---|---|"]
    lines += [f"| {r['rater']} | {r['n_matched']} | {fmt(r['accuracy'])} | {fmt(r['cohen_kappa'])} |"
              for r in overall.iter_rows(named=True)]
    section = "\n".join([*lines, "", CARD_END])
    if CARD_START in card and CARD_END in card:
        before, rest = card.split(CARD_START, 1)
        return before + section + rest.split(CARD_END, 1)[1]
    marker = "\n## Intended use"
    if marker in card:
        before, after = card.split(marker, 1)
        return before.rstrip("\n") + "\n\n" + section + "\n" + marker + after
    return card.rstrip("\n") + "\n\n" + section + "\n"


def quote_human_audit(release: Path, human: pl.DataFrame, source: str) -> None:
    """Quote the human agreement figures in the card of `release` (see `card_with_human_audit`), keeping the
    manifest's hash of the card right (`outputs.release.amend_card`)."""
    card = (release / CARD).read_text(encoding="utf-8")
    amend_card(release, card_with_human_audit(card, human, source))
