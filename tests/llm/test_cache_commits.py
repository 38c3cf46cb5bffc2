"""Answers are committed in groups, not one transaction each, and none waits long: another process reading the
cache file sees every answer of a batch once generate() returns, and an answer of a batch that is still running
within about FLUSH_S."""

from __future__ import annotations

import sqlite3
import threading
import time

from orforge.llm.cache import FLUSH_S
from orforge.llm.hub import LLMHub
from orforge.llm.types import LLMRequest
from tests.fakeserver import Fault


def committed(path) -> int:
    """Rows another connection sees: only what was committed."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    finally:
        db.close()


def test_every_answer_of_a_batch_is_committed_when_generate_returns(fake_server, make_spec, cache_path):
    with LLMHub(cache_path) as hub:
        results = hub.model(make_spec(max_concurrency=8), "m").generate(
            [LLMRequest.chat(f"question {i}") for i in range(40)])
        assert all(r.ok for r in results)
        assert committed(cache_path) == 40  # before close: the batch's end committed them
        assert hub.cache.pending == 0


def test_an_answer_is_committed_while_its_batch_still_waits_for_another(fake_server, make_spec, cache_path):
    fake_server.fail_next(Fault.delay(FLUSH_S * 12))  # the first request to arrive is answered late
    with LLMHub(cache_path) as hub:
        llm = hub.model(make_spec(max_concurrency=2), "m")
        done = threading.Event()
        worker = threading.Thread(target=lambda: (llm.generate([LLMRequest.chat("a"), LLMRequest.chat("b")]),
                                                  done.set()))
        worker.start()
        seen_while_running = False
        deadline = time.monotonic() + FLUSH_S * 10
        while time.monotonic() < deadline and not done.is_set():
            if committed(cache_path) == 1:
                seen_while_running = not done.is_set()
                break
            time.sleep(FLUSH_S / 5)
        worker.join(30)
        assert seen_while_running, "the prompt answer waited for the end of its batch to be committed"
        assert committed(cache_path) == 2


def test_an_answer_not_yet_committed_is_already_a_cache_hit(fake_server, make_spec, cache_path):
    with LLMHub(cache_path) as hub:
        llm = hub.model(make_spec(), "m")
        hub.cache.put("f" * 64, llm.spec, "kept", "stop", 1, 1)
        assert hub.cache.pending == 1
        assert hub.cache.get_many(["f" * 64])["f" * 64]["text"] == "kept"
    assert committed(cache_path) == 1  # and close() commits it
