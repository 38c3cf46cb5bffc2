"""The `audit` flow: how far the moderators of a release agree, and (with human labels) how right they are."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import flow
from prefect.artifacts import create_table_artifact

from orforge.moderators.agreement import agreement, human_agreement, read_human_labels
from orforge.outputs.audit import write_audit
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


def check_inputs(release: Path, human: Path | None) -> pl.DataFrame | None:
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
    try:
        return read_human_labels(human)
    except ValueError as e:
        raise AuditInputError(str(e)) from None


def audit(release: Path, human: Path | None = None) -> tuple[Path, dict[str, pl.DataFrame]]:
    labels = check_inputs(release, human)
    votes = pl.read_parquet(votes_path(release))
    prompts = release_prompts(release)
    result = agreement(votes, prompts)
    if labels is not None and judged_evaluation(release) is None:
        decisions = pl.read_parquet(release / "candidates.parquet", columns=["prompt_id", "decision"])
        result["human"] = human_agreement(votes, labels, decisions, prompts)
    folder = write_audit(release, result)
    write_report(release)
    return folder, result


@flow(name="orforge-audit", persist_result=False)
def audit_flow(release: str, human: str | None = None) -> str:
    folder, result = audit(Path(release), Path(human) if human else None)
    overall = result["pairwise"].filter(pl.col("category") == "all")
    create_table_artifact(key="orforge-audit-pairwise", table=overall.to_dicts(),
                          description=f"Moderator agreement (Cohen's kappa) for {release}")
    if "human" in result:
        create_table_artifact(key="orforge-audit-human", table=result["human"].to_dicts(),
                              description=f"Moderators against human labels for {release}")
    return str(folder)
