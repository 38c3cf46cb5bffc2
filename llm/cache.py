"""The request cache: every successful answer is stored the moment it arrives, keyed by content.

SQLite in WAL mode with synchronous=NORMAL: a committed row survives a killed process, and a crash loses at most
the requests that were in flight. Failures are never stored, so a rerun asks again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from core.config import ModelSpec


def cache_key(spec: ModelSpec, messages: list[dict], schema: dict | None, sample_index: int) -> str:
    """Hash of what determines the answer. Leaves out secrets, base_url/port, concurrency, timeouts, retries."""
    material = {
        "backend": spec.backend,
        "model": spec.model,
        "messages": messages,
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
        "extra": spec.extra,
        "dialect": spec.dialect if schema is not None else None,
        "schema": schema,
        "sample_index": sample_index,
    }
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


class Cache:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, backend TEXT, model TEXT, text TEXT, finish_reason TEXT,"
            " prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = self._db.execute(
                    "SELECT key, text, finish_reason, prompt_tokens, completion_tokens FROM responses"
                    f" WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for key, text, finish, pt, ct in rows:
                    found[key] = {"text": text, "finish_reason": finish, "prompt_tokens": pt, "completion_tokens": ct}
        return found

    def put(self, key: str, spec: ModelSpec, text: str, finish_reason: str | None, prompt_tokens: int,
            completion_tokens: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, spec.backend, spec.model, text, finish_reason, prompt_tokens, completion_tokens, time.time()),
            )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute(
                "SELECT backend, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens)"
                " FROM responses GROUP BY backend, model ORDER BY backend, model"
            ).fetchall()
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
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
            n = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            self._db.execute("DELETE FROM responses")
            self._db.execute("VACUUM")
        return n

    def close(self) -> None:
        with self._lock:
            self._db.close()
