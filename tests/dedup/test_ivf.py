"""Approximate (faiss IVF) search for earlier kept rows: the greedy rule it keeps, its recall on planted near-duplicates
against exact search, reproducibility across thread counts, and the size at which `auto` switches to it."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from orforge.dedup import near
from orforge.dedup.near import dedup
from tests.dedup.test_near import clustered_vectors, frame, reference_greedy, unit


def planted(n: int, copies: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random unit rows, `copies` of them (in the second half) replaced by noisy copies (cosine ~0.93-0.99) of rows of
    the first half. Returns the vectors and the copies' positions."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, dim)))
    targets = np.sort(rng.choice(np.arange(n // 2, n), copies, replace=False))
    sources = rng.integers(0, n // 2, copies)
    noise = rng.uniform(0.1, 0.35, (copies, 1)) * rng.standard_normal((copies, dim)) / np.sqrt(dim)
    vectors[targets] = unit(vectors[sources] + noise)
    return vectors.astype(np.float32), targets


def kept_of(result) -> np.ndarray:
    return result.records.get_column("kept").to_numpy()


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_probing_every_list_is_the_exact_greedy_rule(batch_size):
    # With nprobe = nlist nothing can be missed, so IVF's bookkeeping (ids, preassigned lists, adds) must give the
    # row-by-row definition exactly, earlier releases included.
    threshold = 0.9
    vectors = clustered_vectors(3, threshold)
    earlier, rows = vectors[:40], vectors[40:]
    expected_kept, expected_match, _ = reference_greedy(rows, threshold, earlier)
    result = dedup(frame(len(rows)), rows, threshold, against=earlier, against_ids=[f"e{k}" for k in range(40)],
                   batch_size=batch_size, index="ivf", nprobe=10_000)
    assert result.notes["index"]["kind"] == "ivf"
    assert result.notes["index"]["nprobe"] == result.notes["index"]["nlist"] > 1
    assert kept_of(result).tolist() == expected_kept.tolist()
    names = [None if m is None else (f"e{-1 - m}" if m < 0 else f"p{m}") for m in expected_match]
    assert result.records.get_column("duplicate_of").to_list() == names


def test_recall_on_planted_duplicates_against_exact_search():
    vectors, targets = planted(6000, 300)
    exact = dedup(frame(len(vectors)), vectors, 0.9, index="exact")
    approx = dedup(frame(len(vectors)), vectors, 0.9, index="ivf")
    assert approx.notes["index"]["nprobe"] < approx.notes["index"]["nlist"]  # really approximate
    exact_drops, ivf_drops = ~kept_of(exact), ~kept_of(approx)
    assert exact_drops[targets].all() and exact_drops.sum() == len(targets)
    assert (ivf_drops & exact_drops).sum() / exact_drops.sum() >= 0.97
    # Every drop IVF makes is a real pair: its reported cosine is the exact one, at or above the threshold.
    out = approx.records.with_row_index("row").filter(~approx.records["kept"])
    partner = out.get_column("duplicate_of").str.slice(1).cast(int).to_numpy()
    cosines = np.einsum("ij,ij->i", vectors[out["row"].to_numpy()], vectors[partner])
    assert np.allclose(cosines, out.get_column("similarity").to_numpy(), atol=1e-5)
    assert (cosines >= 0.9 - 1e-6).all()


def test_same_drops_run_to_run_and_whatever_the_thread_count(monkeypatch):
    vectors, _ = planted(5000, 250, seed=4)
    before = faiss.omp_get_max_threads()
    try:
        runs = []
        for threads in (1, 2, 1):
            faiss.omp_set_num_threads(threads)  # k-means and the coarse assignment
            monkeypatch.setattr(near, "THREADS", threads)  # the products
            result = dedup(frame(len(vectors)), vectors, 0.9, index="ivf", nprobe=2)
            runs.append(result.records)
    finally:
        faiss.omp_set_num_threads(before)
    # The decisions are identical; a cosine may differ in its last float32 bit (BLAS sums in blocks per thread).
    for other in runs[1:]:
        assert other.select("prompt_id", "kept", "duplicate_of").equals(runs[0].select("prompt_id", "kept",
                                                                                        "duplicate_of"))
        assert np.allclose(other["similarity"].fill_null(0).to_numpy(), runs[0]["similarity"].fill_null(0).to_numpy(),
                           rtol=0, atol=1e-6)
    assert (~runs[0]["kept"]).sum() > 200


def test_the_drops_do_not_depend_on_the_batch_size():
    # The pairs compared are fixed by the input and its lists, not by where batches begin: a batch of one row, odd
    # sizes and one batch for everything give the same rows, matches and cosines. Tight clusters (many pairs inside
    # a batch) and a few probes (many pairs missed) make a difference show if there is one.
    threshold = 0.9
    vectors = np.concatenate([clustered_vectors(s, threshold) for s in (5, 6, 7)] + [planted(1500, 150, dim=16)[0]])
    earlier = unit(np.random.default_rng(3).standard_normal((60, vectors.shape[1]))).astype(np.float32)
    earlier[:20] = vectors[:20]  # some rows are earlier releases' prompts
    runs = [dedup(frame(len(vectors)), vectors, threshold, against=earlier, against_ids=[f"e{k}" for k in range(60)],
                  batch_size=size, index="ivf", nprobe=2).records for size in (1, 37, 500, len(vectors))]
    assert (~runs[0]["kept"]).sum() > 150 and runs[0]["duplicate_of"].str.starts_with("e").sum() >= 20
    for other in runs[1:]:
        assert other.select("kept", "duplicate_of").equals(runs[0].select("kept", "duplicate_of"))
        assert np.allclose(other["similarity"].fill_null(0).to_numpy(), runs[0]["similarity"].fill_null(0).to_numpy(),
                           rtol=0, atol=1e-6)


def test_auto_uses_exact_below_the_switch_size_and_ivf_from_it(monkeypatch):
    vectors, _ = planted(400, 20)
    assert dedup(frame(400), vectors, 0.9).notes["index"] == {"kind": "exact"}  # EXACT_BELOW is far above 400
    monkeypatch.setattr(near, "EXACT_BELOW", 500)
    assert dedup(frame(400), vectors, 0.9).notes["index"]["kind"] == "exact"
    # Earlier releases count towards the size: 400 rows + 100 earlier reach the switch.
    earlier = unit(np.random.default_rng(9).standard_normal((100, 64))).astype(np.float32)
    switched = dedup(frame(400), vectors, 0.9, against=earlier, against_ids=[f"e{k}" for k in range(100)])
    assert switched.notes["index"]["kind"] == "ivf"
    assert dedup(frame(400), vectors, 0.9, index="exact", against=earlier,
                 against_ids=[f"e{k}" for k in range(100)]).notes["index"] == {"kind": "exact"}


def test_unknown_index_is_refused():
    vectors, _ = planted(10, 1)
    with pytest.raises(ValueError, match="index must be one of"):
        dedup(frame(10), vectors, 0.9, index="hnsw")


def test_config_names_the_search_and_the_encoder():
    from pydantic import ValidationError

    from orforge.core.config import DedupConfig

    spec = DedupConfig()
    assert (spec.index, spec.encoder) == ("auto", "torch")
    assert DedupConfig(index="ivf", encoder="onnx").index == "ivf"
    with pytest.raises(ValidationError, match="index"):
        DedupConfig(index="hnsw")
    with pytest.raises(ValidationError, match="encoder"):
        DedupConfig(encoder="openvino")
