"""Audit files: the moderator-agreement tables of `moderators.agreement` as CSVs, plus the pairwise kappa heatmap.

The statistics are computed in moderators/ (pure tables); writing and drawing them is release-file work, so it lives
here, one layer up, and moderators/ never imports outputs/.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from orforge.outputs.atomic import write_bytes, write_csv
from orforge.outputs.plots import kappa_heatmap

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
