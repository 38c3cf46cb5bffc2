"""A damaged request cache (a failing disk, a copy cut short) costs some answers, never the build."""

from __future__ import annotations

import logging
import random
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from pydantic import BaseModel

from orforge.core.config import ModelSpec
from orforge.llm.cache import Cache
from orforge.llm.hub import LLMHub
from orforge.llm.types import LLMRequest
from tests.conftest import FAKE_MODEL
from tests.fakeserver import FakeServer

ROWS = 800
DAMAGED = re.compile(r"request cache was damaged: kept (\d+) of (\d+|an unknown number of) readable answers, "
                     r"damaged copy at (\S+)")


class Verdict(BaseModel):
    label: str
    reason: str


def long_answer(body: dict) -> str:
    # About 800 bytes a row, so the file spans a couple of hundred pages and a few KiB of damage hits some of them.
    return "An answer about " + body["messages"][-1]["content"] + ". " + "It goes on for a while. " * 32


def requests(n: int = ROWS) -> list[LLMRequest]:
    return [LLMRequest.chat(f"question number {i}") for i in range(n)]


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory) -> Path:
    """A cache of ROWS answers written through the hub against its own loopback server, once per module."""
    path = tmp_path_factory.mktemp("filled") / "cache.sqlite"
    with FakeServer(models=[FAKE_MODEL]) as server:
        server.responder = long_answer
        spec = ModelSpec(backend="openai", base_url=server.url + "/v1", model=FAKE_MODEL, max_concurrency=32)
        with LLMHub(path) as hub:
            assert all(r.ok for r in hub.model(spec, "seeds").generate(requests()))
        assert len(server.chat_requests) == ROWS
    assert not path.with_name(path.name + "-wal").exists()  # checkpointed on close: one file to damage
    return path


def fill_cache(filled_cache: Path, fake_server, cache_path: Path) -> None:
    """This test's copy of the filled cache; its fake server answers what the cache cannot."""
    fake_server.responder = long_answer
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(filled_cache, cache_path)


def overwrite_middle(path: Path, nbytes: int = 8192, seed: int = 7) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(random.Random(seed).randbytes(nbytes))


def sqlite_finds_damage(path: Path) -> bool:
    raw = sqlite3.connect(path)
    try:
        return raw.execute("PRAGMA quick_check").fetchall() != [("ok",)]
    except sqlite3.DatabaseError:
        return True
    finally:
        raw.close()


def damage_warnings(caplog) -> list[re.Match]:
    return [m for r in caplog.records if r.levelno == logging.WARNING and (m := DAMAGED.search(r.getMessage()))]


def test_a_damaged_cache_is_repaired_on_open_and_keeps_what_can_be_read(filled_cache, fake_server, make_spec,
                                                                         cache_path, caplog):
    fill_cache(filled_cache, fake_server, cache_path)
    overwrite_middle(cache_path)
    assert sqlite_finds_damage(cache_path)

    caplog.set_level(logging.WARNING, logger="orforge.llm")
    with LLMHub(cache_path) as hub:
        found = damage_warnings(caplog)
        assert len(found) == 1, [r.getMessage() for r in caplog.records]
        kept, total, copy = int(found[0].group(1)), int(found[0].group(2)), Path(found[0].group(3))
        assert 0 < kept < total == ROWS
        assert copy.exists() and copy.parent == cache_path.parent and ".damaged-" in copy.name
        assert copy.stat().st_size > 0

        # The hub works: the kept answers are hits, the lost ones are asked again, every request succeeds.
        before = len(fake_server.chat_requests)
        results = hub.model(make_spec(max_concurrency=32), "seeds").generate(requests())
        assert all(r.ok for r in results)
        assert sum(r.cached for r in results) == kept
        assert len(fake_server.chat_requests) - before == ROWS - kept
        assert all(r.text == long_answer({"messages": [{"content": r.request.messages[-1]["content"]}]})
                   for r in results)

    # The repaired file is sound and complete again: a third run sends nothing and warns nothing.
    caplog.clear()
    with sqlite3.connect(cache_path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with LLMHub(cache_path) as hub:
        sent = len(fake_server.chat_requests)
        assert all(r.cached for r in hub.model(make_spec(), "seeds").generate(requests()))
        assert len(fake_server.chat_requests) == sent
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_file_that_is_not_a_database_any_more_starts_an_empty_cache(filled_cache, fake_server, make_spec,
                                                                     cache_path, caplog):
    fill_cache(filled_cache, fake_server, cache_path)
    with cache_path.open("r+b") as f:  # the header is gone, as after a copy cut short at the start
        f.write(b"\0" * 4096)
    caplog.set_level(logging.WARNING, logger="orforge.llm")
    with LLMHub(cache_path) as hub:
        [found] = damage_warnings(caplog)
        assert found.group(1) == "0"
        assert Path(found.group(3)).exists()
        results = hub.model(make_spec(), "seeds").generate(requests(5))
        assert all(r.ok and not r.cached for r in results)


def test_damage_found_while_reading_makes_misses_not_a_crash(filled_cache, fake_server, make_spec, cache_path,
                                                            caplog):
    fill_cache(filled_cache, fake_server, cache_path)
    caplog.set_level(logging.WARNING, logger="orforge.llm")
    with LLMHub(cache_path) as hub:  # opened while sound: the check passes
        assert not damage_warnings(caplog)
        overwrite_middle(cache_path)
        # Another connection's write makes the open one drop its page cache and read the damaged file.
        with sqlite3.connect(cache_path) as other:
            other.execute("CREATE TABLE touched (x)")
        before = len(fake_server.chat_requests)
        results = hub.model(make_spec(max_concurrency=32), "seeds").generate(requests())
        assert all(r.ok for r in results)
        hits = sum(r.cached for r in results)
        assert 0 < hits < ROWS
        assert len(fake_server.chat_requests) - before == ROWS - hits
    unreadable = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(unreadable) == 1  # one line, not one per row


def test_a_stored_answer_damaged_into_invalid_json_is_asked_again(fake_server, make_spec, cache_path):
    fake_server.responder = lambda body: {"label": "benign", "reason": body["messages"][-1]["content"]}
    ask = [LLMRequest.chat("is this fine?", response_model=Verdict)]
    with LLMHub(cache_path) as hub:
        assert hub.model(make_spec(), "moderator").generate(ask)[0].ok
    with sqlite3.connect(cache_path) as raw:  # bytes flipped inside the row: SQLite reads it without complaint
        raw.execute("UPDATE responses SET text = substr(text, 1, 10)")
    with LLMHub(cache_path) as hub:
        [result] = hub.model(make_spec(), "moderator").generate(ask)
    assert result.ok and not result.cached and result.parsed == Verdict(label="benign", reason="is this fine?")
    assert len(fake_server.chat_requests) == 2


def test_opening_a_sound_cache_changes_nothing(cache_path, caplog):
    cache = Cache(cache_path)
    cache.close()
    caplog.set_level(logging.WARNING, logger="orforge.llm")
    cache = Cache(cache_path)
    assert cache.recovered is None
    cache.close()
    assert [p.name for p in cache_path.parent.iterdir() if ".damaged-" in p.name] == []
    assert not caplog.records
