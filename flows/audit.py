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
    """prompt_id, prompt, category of every judged candidate (all of them, not only those kept in a split)."""
    return pl.read_parquet(release / "candidates.parquet", columns=["prompt_id", "prompt", "category"])


def check_inputs(release: Path, human: Path | None) -> pl.DataFrame | None:
    for name in ("votes.parquet", "candidates.parquet"):
        if not (release / name).is_file():
            raise AuditInputError(f"{release}: not a release folder with votes (no {name})")
    if human is None:
        return None
    try:
        return read_human_labels(human)
    except ValueError as e:
        raise AuditInputError(str(e)) from None


def audit(release: Path, human: Path | None = None) -> tuple[Path, dict[str, pl.DataFrame]]:
    labels = check_inputs(release, human)
    votes = pl.read_parquet(release / "votes.parquet")
    prompts = release_prompts(release)
    result = agreement(votes, prompts)
    if labels is not None:
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
