"""Stages overlap per category: one category's moderation runs while another category is still being rewritten;
a rerun finds every shard the overlapped run stored and writes the same release."""

from __future__ import annotations

import pytest

from tests.fakeserver import Fault
from tests.flows.pipeline import _user, pipeline_responder, stage_of, write_config

pytestmark = pytest.mark.slow

SLOW_S = 6.0  # violence's rewrites are answered this late: long enough for privacy to reach moderation


def test_a_category_is_moderated_while_another_is_still_rewritten(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow

    def responder(body: dict):
        if stage_of(body) == "Rewrites" and "violence" in _user(body).lower():
            return Fault.delay(SLOW_S)  # the normal reply, late
        return pipeline_responder(body)

    fake_server.responder = responder
    config = write_config(tmp_path, fake_server.url + "/v1")  # client timeout 10 s > SLOW_S
    build_flow(config_path=str(config), output=str(tmp_path / "out"))

    chats = fake_server.chat_requests
    slow = [r for r in chats if r.fault == "delay"]
    assert slow, "no violence rewrite was slowed: the test does not test anything"
    last_slow_reply = max(r.time for r in slow) + SLOW_S
    early_votes = [r for r in chats if stage_of(r.body) == "ModerationVerdict" and r.time < last_slow_reply]
    assert early_votes, "moderation waited for every category's rewrites"

    # Rebuilt from the stored shards alone: the overlapped run stored them under the keys a rerun looks up.
    sent = len(chats)
    build_flow(config_path=str(config), output=str(tmp_path / "again"))
    assert len(fake_server.chat_requests) == sent
    for name in ("benign.csv", "toxic.csv", "votes.parquet", "dedup.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
