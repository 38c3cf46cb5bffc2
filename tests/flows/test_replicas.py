"""A build whose moderators sit behind a list of replicas, through the CLI and real Prefect."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from orforge.flows.cli import app
from tests.fakeserver import FakeServer
from tests.flows.pipeline import pipeline_responder, stage_of, write_config

pytestmark = pytest.mark.slow

DEAD_URL = "http://127.0.0.1:9/v1"


def test_moderators_on_replicas_spread_the_votes_and_the_release_says_who_did_what(prefect_harness, tmp_path):
    with FakeServer(pipeline_responder) as a, FakeServer(pipeline_responder) as b:
        config = write_config(tmp_path, a.url + "/v1", panel=None,
                              categories={"preset": "orbench", "include": ["privacy"]})
        raw = yaml.safe_load(config.read_text())
        replicas = [a.url + "/v1", b.url + "/v1", DEAD_URL]
        for moderator in raw["moderation"]["moderators"]:
            moderator.update(base_url=replicas, max_concurrency=2, max_retries=0)
        config.write_text(yaml.safe_dump(raw))

        result = CliRunner().invoke(app, ["build", "--config", str(config), "--output", str(tmp_path / "release")])
        assert result.exit_code == 0, result.output

        votes_at = {s: [r for r in s.chat_requests if stage_of(r.body) == "ModerationVerdict"] for s in (a, b)}
        assert votes_at[a] and votes_at[b]
        assert len(b.chat_requests) == len(votes_at[b])  # only the moderators were sent to the second server

        manifest = json.loads((tmp_path / "release" / "manifest.json").read_text())
        rows = {row["url"]: row for row in manifest["notes"]["replicas"]}
        assert list(rows) == replicas
        assert rows[a.url + "/v1"]["requests"] == len(votes_at[a])
        assert rows[b.url + "/v1"]["requests"] == len(votes_at[b])
        assert rows[DEAD_URL]["taken_out"] and not rows[a.url + "/v1"]["taken_out"]
        assert "connection error" in rows[DEAD_URL]["why"]
        assert manifest["failures"]["total"] == 0  # what the dead replica was given was answered by the others
        # The end-of-run summary: a table of the replicas, and why one was taken out.
        assert "replicas" in result.output and "taken out" in result.output
        assert f"note: replica {DEAD_URL} taken out: connection error" in result.output
        report = (tmp_path / "release" / "report.html").read_text()
        assert "replicas" in report and b.url in report

        # The same moderators on one URL: the cache and the stored shards serve everything, nothing is sent.
        for moderator in raw["moderation"]["moderators"]:
            moderator.update(base_url=b.url + "/v1")
        config.write_text(yaml.safe_dump(raw))
        sent = len(a.chat_requests), len(b.chat_requests)
        result = CliRunner().invoke(app, ["build", "--config", str(config), "--output", str(tmp_path / "again")])
        assert result.exit_code == 0, result.output
        assert (len(a.chat_requests), len(b.chat_requests)) == sent
        votes = [(tmp_path / folder / "votes.parquet").read_bytes() for folder in ("release", "again")]
        assert votes[0] == votes[1]
