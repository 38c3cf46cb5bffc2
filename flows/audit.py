"""The `audit` flow: how far the moderators of a release agree, and (with human labels) how right they are; and
`audit_sample`, the blinded sample people label (outputs.audit describes its files).

Human labels come either as a filled-in `audit_sample.csv` with its `audit_key.csv`, or as any CSV with `label` and
`id` (a prompt_id) or `prompt`. Either way every moderator, the ensemble and the refusal panel (refused by at least
`splits.hard_min_rejections` members, on the labelled prompts the panel answered) are scored against the people per
category and overall (`audit/human.csv`), and the release's card quotes the overall figures.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import flow
from prefect.artifacts import create_table_artifact

from orforge.moderators.agreement import agreement, human_agreement, read_human_labels
from orforge.moderators.panel import hard_members
from orforge.outputs.audit import (
    KEY_FILE,
    audit_population,
    audit_sample,
    is_labelled_sample,
    quote_human_audit,
    read_labelled_sample,
    write_audit,
    write_audit_sample,
)
from orforge.outputs.release import read_manifest
from orforge.outputs.report import write_report


class AuditInputError(ValueError):
    """The release or the human labels cannot be audited (exit code 2)."""


def release_prompts(release: Path) -> pl.DataFrame:
    """prompt_id, prompt, category of every judged item: an orbench release's candidates, or for an alert release
    every (prompt, target) pair its newest evaluation's judges classified (id `<prompt_id>/<model>`)."""
    evaluation = judged_evaluation(release)
    if evaluation is None:
        return pl.read_parquet(release / "candidates.parquet", columns=["prompt_id", "prompt", "category"])
    prompts = pl.concat([pl.read_parquet(release / f"{s}.parquet", columns=["prompt_id", "prompt", "category"])
                         for s in ("base", "adversarial")])
    pairs = pl.read_parquet(evaluation / "responses.parquet", columns=["prompt_id", "model"])
    return pairs.join(prompts, on="prompt_id").select(
        pl.concat_str("prompt_id", pl.lit("/"), "model").alias("prompt_id"), "prompt", "category")


def judged_evaluation(release: Path) -> Path | None:
    """The newest `evaluations/<time>/` of an alert release whose judges' verdicts were written as votes, or None for
    a release whose votes are its own (orbench's moderators)."""
    if (release / "votes.parquet").is_file() or not (release / "evaluations").is_dir():
        return None
    runs = sorted(p for p in (release / "evaluations").iterdir() if (p / "votes.parquet").is_file())
    return runs[-1] if runs else None


def votes_path(release: Path) -> Path:
    evaluation = judged_evaluation(release)
    return (evaluation or release) / "votes.parquet"


def default_key(human: Path) -> Path:
    """The key beside a filled-in sample: `audit_key.csv` in the sample's folder."""
    return human.parent / KEY_FILE


def check_inputs(release: Path, human: Path | None, key: Path | None = None) -> pl.DataFrame | None:
    """The human labels (`label` and `id` or `prompt`) when given, after checking the release can be audited; raises
    AuditInputError (one line) otherwise. A filled-in sample is read through its key (`key`, default: beside it),
    whose prompts must be this release's."""
    if key is not None and human is None:
        raise AuditInputError("--key goes with --human (the filled-in audit_sample.csv)")
    if judged_evaluation(release) is not None and human is not None:
        raise AuditInputError("--human labels are compared with moderator votes of an orbench release; an alert "
                              "release's votes are its safety judges'")
    if judged_evaluation(release) is None:
        for name in ("votes.parquet", "candidates.parquet"):
            if not (release / name).is_file():
                raise AuditInputError(f"{release}: no votes to audit (no {name}; an alert release needs an "
                                      "`orforge evaluate` first)")
    if human is None:
        return None
    if not human.is_file():
        raise AuditInputError(f"--human {human}: no such file")
    try:
        # A filled-in sample has item_id, or sits beside its key (even with the item_id column lost).
        if key is None and not is_labelled_sample(human) and not default_key(human).is_file():
            return read_human_labels(human)
        labels, key_rows = read_labelled_sample(human, key or default_key(human))
    except ValueError as e:
        raise AuditInputError(str(e)) from None
    known = pl.read_parquet(release / "candidates.parquet", columns=["prompt_id"])
    foreign = key_rows.join(known, on="prompt_id", how="anti")
    if foreign.height:
        raise AuditInputError(f"--key {key or default_key(human)}: {foreign.height} item(s) are not prompts of "
                              f"{release}, e.g. {foreign['item_id'][0]}; the sample was drawn from another release")
    return labels


def panel_threshold(release: Path) -> int:
    """The release's hard rule: refused by at least `splits.hard_min_rejections` panel members (1 when unknown)."""
    value = (read_manifest(release).config.get("splits") or {}).get("hard_min_rejections")
    return value if isinstance(value, int) else 1


def audit(release: Path, human: Path | None = None, key: Path | None = None) -> tuple[Path, dict[str, pl.DataFrame]]:
    labels = check_inputs(release, human, key)
    votes = pl.read_parquet(votes_path(release))
    prompts = release_prompts(release)
    result = agreement(votes, prompts)
    if labels is not None and judged_evaluation(release) is None:
        decisions = pl.read_parquet(release / "candidates.parquet", columns=["prompt_id", "decision"])
        responses = release / "responses.parquet"
        panel = hard_members(pl.read_parquet(responses)) if responses.is_file() else None
        result["human"] = human_agreement(votes, labels, decisions, prompts, panel, panel_threshold(release))
    folder = write_audit(release, result)
    if "human" in result:
        quote_human_audit(release, result["human"], f"`{human.name}`")
    write_report(release)
    return folder, result


def sample_inputs(release: Path) -> pl.DataFrame:
    """The population a human-audit sample is drawn from (outputs.audit.audit_population): every candidate put to
    the moderators. Raises AuditInputError for a release without candidates and votes."""
    check_inputs(release, None)
    if judged_evaluation(release) is not None:
        raise AuditInputError(f"--release {release}: human-audit samples are drawn from an orbench release's "
                              "moderated candidates")
    splits = {name: pl.read_parquet(path, columns=["prompt_id"]) for name in ("benign", "toxic", "hard")
              if (path := release / f"{name}.parquet").is_file()}
    responses = release / "responses.parquet"
    return audit_population(pl.read_parquet(release / "candidates.parquet"), pl.read_parquet(release / "votes.parquet"),
                            splits, pl.read_parquet(responses) if responses.is_file() else None)


def default_seed(release: Path) -> int:
    seed = read_manifest(release).config.get("seed")
    return seed if isinstance(seed, int) else 0


def default_sample_folder(release: Path, n: int, seed: int) -> Path:
    return release / "audit" / f"human-sample-n{n}-seed{seed}"


def plan_sample(release: Path, n: int, stratify: list[str], seed: int, out: Path
                ) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Everything `sample` writes, checked and computed before anything is written; AuditInputError otherwise."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AuditInputError(f"--out {out} exists; choose a new folder (people may be labelling the old sample)")
    population = sample_inputs(release)
    try:
        drawn, key, allocation = audit_sample(population, n, stratify, seed)
    except ValueError as e:
        raise AuditInputError(str(e)) from None
    facts = {"release": release.resolve().name, "n": drawn.height, "seed": seed, "stratify": stratify,
             "population": population.height, "allocation": allocation}
    return drawn, key, facts


def sample(release: Path, n: int, stratify: list[str], seed: int | None = None, out: Path | None = None
           ) -> tuple[Path, dict]:
    """Write a blinded human-audit sample of `release` and its key; returns (folder, facts of the draw)."""
    seed = default_seed(release) if seed is None else seed
    out = out or default_sample_folder(release, n, seed)
    drawn, key, facts = plan_sample(release, n, stratify, seed, out)
    return write_audit_sample(out, drawn, key, facts), facts


@flow(name="orforge-audit", persist_result=False)
def audit_flow(release: str, human: str | None = None, key: str | None = None) -> str:
    folder, result = audit(Path(release), Path(human) if human else None, Path(key) if key else None)
    overall = result["pairwise"].filter(pl.col("category") == "all")
    create_table_artifact(key="orforge-audit-pairwise", table=overall.to_dicts(),
                          description=f"Moderator agreement (Cohen's kappa) for {release}")
    if "human" in result:
        create_table_artifact(key="orforge-audit-human", table=result["human"].to_dicts(),
                              description=f"Moderators against human labels for {release}")
    return str(folder)
