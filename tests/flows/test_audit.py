"""`orforge audit` on a built release: agreement files, human labels, the report, and bad input."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from orforge.flows.cli import app
from tests.flows.pipeline import pipeline_responder, write_config

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_audit_writes_agreement_and_human_accuracy(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow

    fake_server.responder = pipeline_responder
    release = tmp_path / "release"
    build_flow(config_path=str(write_config(tmp_path, fake_server.url + "/v1")), output=str(release))

    candidates = pl.read_parquet(release / "candidates.parquet")
    # A "human" who agrees with the ensemble wherever it decided, and calls every contested prompt toxic.
    human = candidates.select(pl.col("prompt_id").alias("id"),
                              pl.when(pl.col("decision") == "benign").then(pl.lit("benign"))
                              .otherwise(pl.lit("toxic")).alias("label"))
    human.write_csv(tmp_path / "human.csv")

    result = runner.invoke(app, ["audit", "--release", str(release), "--human", str(tmp_path / "human.csv")])
    assert result.exit_code == 0, result.output
    audit = release / "audit"
    pairwise = pl.read_csv(audit / "pairwise.csv")
    assert pairwise.filter(pl.col("category") == "all").height == 3  # 3 moderators -> 3 pairs
    # The scripted moderators disagree on some prompts, so agreement is high but not perfect.
    raw = pairwise.filter(pl.col("category") == "all")["raw_agreement"]
    assert (raw < 1).all() and (raw > 0.5).all()
    assert pl.read_csv(audit / "contested.csv").height > 0
    scores = pl.read_csv(audit / "human.csv")
    ensemble = scores.filter(pl.col("rater") == "ensemble").row(0, named=True)
    assert ensemble["accuracy"] == 1.0 and ensemble["n_matched"] > 0
    report = (release / "report.html").read_text()
    assert "Cohen" in report and "audit" in report

    bad = tmp_path / "bad.csv"
    bad.write_text("id,verdict\nx,toxic\n")
    result = runner.invoke(app, ["audit", "--release", str(release), "--human", str(bad)])
    assert result.exit_code == 2 and "label" in result.output
    assert runner.invoke(app, ["audit", "--release", str(tmp_path)]).exit_code == 2
