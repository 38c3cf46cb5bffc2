"""The request cache: every successful answer is stored as it arrives, keyed by content.

SQLite in WAL mode with synchronous=NORMAL: a committed row survives a killed process. Answers are committed in
groups, not one transaction each (every commit runs on the hub's event loop, between two requests): a group is
committed when it reaches `FLUSH_ROWS` answers, when its oldest answer is `FLUSH_S` old (the hub arms a timer on
its loop), at the end of every `generate()` batch and on close. So a crash loses at most the requests that were in
flight and the answers of the last `FLUSH_S`. Answers waiting for their commit are already served to later
lookups. Failures are never stored, so a rerun asks again.

A damaged file (a failing disk, a copy cut short) never stops a build: opening runs `PRAGMA quick_check` (about
50 ms for a 50 MB cache; `integrity_check` takes 4-5 times as long and also compares indexes with the table, which a
cache that is rebuilt from its rows does not need) and, when it fails, moves the file aside, copies every row that
can still be read into a fresh file and logs one warning. Damage found later, while reading, makes the affected
answers cache misses: they are asked again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from orforge.core.config import ModelSpec

log = logging.getLogger("orforge.llm")

COLUMNS = ("key", "backend", "model", "text", "finish_reason", "prompt_tokens", "completion_tokens", "created")
_CREATE = ("CREATE TABLE IF NOT EXISTS responses ("
           " key TEXT PRIMARY KEY, backend TEXT, model TEXT, text TEXT, finish_reason TEXT,"
           " prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")
_KEY = re.compile(r"^[0-9a-f]{64}$")
SALVAGE_STEP = 500  # rowids read per query while salvaging; a range that fails is read again row by row
FLUSH_ROWS = 256  # answers committed together at most
FLUSH_S = 0.25  # the longest an answer waits for its commit while its batch is still running


def cache_key(answer_key: str, messages: list[dict], schema: dict | None, sample_index: int) -> str:
    """The request's key: the spec's `answer_key()` (everything in the spec that can change an answer, see
    core.config.AnswerSettings) with the final messages, the response schema and the sample index."""
    material = {"spec": answer_key, "messages": messages, "schema": schema, "sample_index": sample_index}
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


class Cache:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._read_failed = self._write_failed = False  # warn once per open cache, not once per row
        self._pending: dict[str, tuple] = {}  # rows waiting for their commit, by key (a later put replaces)
        self._oldest = 0.0  # time.monotonic() of the oldest pending row
        self.recovered: dict[str, Any] | None = None  # what the last recovery kept, for callers and tests
        damage = self._damage() if self.path.exists() else None
        if damage is not None:
            self.recovered = self._recover(damage)
        self._db = self._connect(self.path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_CREATE)
        return db

    def _damage(self) -> str | None:
        """None when the file is sound, else what SQLite said about it."""
        db = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            rows = db.execute("PRAGMA quick_check(1)").fetchall()
            if rows != [("ok",)]:
                return rows[0][0].replace("\n", " ") if rows else "quick_check returned nothing"
            db.execute(_CREATE)  # a sound file that is not a cache (or has another table shape) fails here
            db.execute(f"SELECT {', '.join(COLUMNS)} FROM responses LIMIT 0").fetchall()
            return None
        except sqlite3.DatabaseError as e:
            return str(e)
        finally:
            if db is not None:
                db.close()

    def _recover(self, damage: str) -> dict[str, Any]:
        """Move the damaged file (and its -wal/-shm) aside, copy its readable rows into a fresh file, warn once."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        # The -wal goes with its main file under the matching name, so opening the copy still applies it.
        for suffix in ("-wal", "-shm", ""):
            part = self.path.with_name(self.path.name + suffix)
            if part.exists():
                part.rename(aside.with_name(aside.name + suffix))
        total, rows = _salvage(aside)
        fresh = self._connect(self.path)
        try:
            fresh.execute("BEGIN")
            fresh.executemany(f"INSERT OR IGNORE INTO responses VALUES ({','.join('?' * len(COLUMNS))})", rows)
            fresh.execute("COMMIT")
        finally:
            fresh.close()
        kept = len(rows)
        of = f"{max(total, kept)}" if total is not None else "an unknown number of"
        log.warning("request cache was damaged: kept %d of %s readable answers, damaged copy at %s (sqlite: %s)",
                    kept, of, aside, damage[:120])
        return {"kept": kept, "total": total, "damaged_copy": aside, "damage": damage}

    # -- reads and writes -----------------------------------------------------------------------------------------
    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            for key in keys:
                if (row := self._pending.get(key)) is not None:
                    found[key] = {"text": row[3], "finish_reason": row[4], "prompt_tokens": row[5] or 0,
                                  "completion_tokens": row[6] or 0}
            keys = [k for k in keys if k not in found]
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                try:
                    rows = self._select(chunk)
                except sqlite3.DatabaseError as e:
                    # Damage found after opening: read the chunk key by key; an unreadable answer is a miss.
                    self._warn_read(e)
                    rows = []
                    for key in chunk:
                        try:
                            rows += self._select([key])
                        except sqlite3.DatabaseError:
                            continue
                for key, text, finish, pt, ct in rows:
                    if isinstance(text, str):
                        found[key] = {"text": text, "finish_reason": finish, "prompt_tokens": pt or 0,
                                      "completion_tokens": ct or 0}
        return found

    def _select(self, keys: list[str]) -> list[tuple]:
        return self._db.execute(
            "SELECT key, text, finish_reason, prompt_tokens, completion_tokens FROM responses"
            f" WHERE key IN ({','.join('?' * len(keys))})",
            keys,
        ).fetchall()

    def _warn_read(self, error: Exception) -> None:
        if not self._read_failed:
            self._read_failed = True
            log.warning("request cache %s could not be read (%s): unreadable answers are asked again; the file is "
                        "repaired the next time it is opened", self.path, error)

    def put(self, key: str, spec: ModelSpec, text: str, finish_reason: str | None, prompt_tokens: int,
            completion_tokens: int) -> None:
        """Keep an answer; it is committed with its group (see the module docstring), or at once past FLUSH_ROWS /
        FLUSH_S. The caller calls `flush()` at the end of its batch and FLUSH_S after a put that left rows pending
        (a put only checks the age of the group when it comes; a batch may wait long for its next answer)."""
        now = time.monotonic()
        with self._lock:
            if not self._pending:
                self._oldest = now
            self._pending[key] = (key, spec.backend, spec.model, text, finish_reason, prompt_tokens,
                                  completion_tokens, time.time())
            if len(self._pending) >= FLUSH_ROWS or now - self._oldest >= FLUSH_S:
                self._commit_pending()

    @property
    def pending(self) -> int:
        """Answers kept but not committed yet."""
        with self._lock:
            return len(self._pending)

    def flush(self) -> None:
        """Commit every pending answer in one transaction."""
        with self._lock:
            self._commit_pending()

    def _commit_pending(self) -> None:
        if not self._pending:
            return
        rows, self._pending = list(self._pending.values()), {}
        try:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(f"INSERT OR REPLACE INTO responses VALUES ({','.join('?' * len(COLUMNS))})",
                                     rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            # The answers still reached the caller; only their reuse by a later run is lost.
            if not self._write_failed:
                self._write_failed = True
                log.warning("request cache %s could not be written (%s): answers of this run are not kept",
                            self.path, e)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._commit_pending()
            rows = self._db.execute(
                "SELECT backend, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens)"
                " FROM responses GROUP BY backend, model ORDER BY backend, model"
            ).fetchall()
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file()
                   and ".damaged-" not in p.name)
        return {
            "path": str(self.path),
            "bytes": size,
            "entries": sum(r[2] for r in rows),
            "by_model": [
                {"backend": b, "model": m, "entries": n, "prompt_tokens": pt or 0, "completion_tokens": ct or 0}
                for b, m, n, pt, ct in rows
            ],
        }

    def clear(self) -> int:
        with self._lock:
            self._pending.clear()
            n = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            self._db.execute("DELETE FROM responses")
            self._db.execute("VACUUM")
        return n

    def close(self) -> None:
        with self._lock:
            self._commit_pending()
            self._db.close()


def _salvage(path: Path) -> tuple[int | None, list[tuple]]:
    """(rows the damaged file says it holds, or None when it cannot tell; every row that can still be read)."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.DatabaseError:
        return None, []
    try:
        total = _first_int(db, "SELECT COUNT(*) FROM responses")  # counted on the key index, a separate b-tree
        top = max((v for v in (_first_int(db, "SELECT max(rowid) FROM responses"),
                               _first_int(db, "SELECT max(rowid) FROM responses"
                                              " INDEXED BY sqlite_autoindex_responses_1")) if v is not None),
                  default=None)
        rows = {r[0]: r for r in _readable_rows(db, top)}
        # A damaged interior page can hide rows from the rowid walk without an error; the key index, a separate
        # b-tree, may still reach them.
        for key in _indexed_keys(db):
            if key not in rows:
                try:
                    found = db.execute(f"SELECT {', '.join(COLUMNS)} FROM responses WHERE key = ?", (key,)).fetchall()
                except sqlite3.DatabaseError:
                    continue
                rows.update((r[0], r) for r in found if _plausible(r))
        return total, list(rows.values())
    finally:
        db.close()


def _indexed_keys(db: sqlite3.Connection) -> Iterator[str]:
    """The keys in the primary-key index, in order, until the end or the first unreadable index page."""
    last = ""
    while True:
        try:
            keys = [k for (k,) in db.execute("SELECT key FROM responses INDEXED BY sqlite_autoindex_responses_1"
                                             " WHERE key > ? ORDER BY key LIMIT ?", (last, SALVAGE_STEP))]
        except sqlite3.DatabaseError:
            return
        yield from (k for k in keys if isinstance(k, str))
        if len(keys) < SALVAGE_STEP or not isinstance(keys[-1], str):
            return
        last = keys[-1]


def _first_int(db: sqlite3.Connection, sql: str) -> int | None:
    try:
        value = db.execute(sql).fetchone()[0]
    except sqlite3.DatabaseError:
        return None
    return value if isinstance(value, int) else None


def _readable_rows(db: sqlite3.Connection, top: int | None) -> Iterator[tuple]:
    """Rows by rowid range; a range that fails is read again one rowid at a time, skipping what cannot be read."""
    select = f"SELECT rowid, {', '.join(COLUMNS)} FROM responses WHERE rowid "
    if top is None:  # neither the table nor the index says how far rowids go: read in order until the first error
        last = 0
        while True:
            try:
                rows = db.execute(select + "> ? ORDER BY rowid LIMIT ?", (last, SALVAGE_STEP)).fetchall()
            except sqlite3.DatabaseError:
                return
            yield from (r[1:] for r in rows if _plausible(r[1:]))
            if len(rows) < SALVAGE_STEP:
                return
            last = rows[-1][0]
    for lo in range(1, top + 1, SALVAGE_STEP):
        hi = min(lo + SALVAGE_STEP - 1, top)
        try:
            rows = db.execute(select + "BETWEEN ? AND ?", (lo, hi)).fetchall()
        except sqlite3.DatabaseError:
            rows = []
            for rowid in range(lo, hi + 1):
                try:
                    rows += db.execute(select + "= ?", (rowid,)).fetchall()
                except sqlite3.DatabaseError:
                    continue
        yield from (r[1:] for r in rows if _plausible(r[1:]))


def _plausible(row: tuple) -> bool:
    """A row read from a damaged page can hold garbage that still parses; keep only rows shaped like ours."""
    key, backend, model, text, finish, pt, ct, created = row
    return (isinstance(key, str) and bool(_KEY.match(key)) and isinstance(text, str)
            and isinstance(backend, str) and isinstance(model, str)
            and (finish is None or isinstance(finish, str))
            and all(v is None or isinstance(v, int) for v in (pt, ct))
            and (created is None or isinstance(created, float | int)))
