"""Greedy keep-first near-duplicate removal on vectors built with known cosines (no model needed)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from orforge.core.records import DEDUP
from orforge.dedup.near import dedup, dedup_per_pool

DIM = 384


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def pair_with_cosine(rng: np.random.Generator, cosine: float, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors whose exact cosine is `cosine`, in a random orientation (so rounding is not trivial)."""
    a = unit(rng.standard_normal((1, dim)))[0]
    ortho = rng.standard_normal(dim)
    ortho = unit((ortho - ortho.dot(a) * a)[None])[0]
    return a, cosine * a + np.sqrt(1.0 - cosine**2) * ortho


def frame(n: int, prefix: str = "p") -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": [f"{prefix}{i}" for i in range(n)], "prompt": [f"text {i}" for i in range(n)]})


def reference_greedy(vectors: np.ndarray, threshold: float, earlier: np.ndarray | None = None):
    """Row by row in float64, the definition itself: (kept, index of the most similar kept/earlier row, cosine).

    Earlier-release rows are numbered -1, -2, ... so they cannot be confused with input rows.
    """
    n = len(vectors)
    sims = vectors @ vectors.T
    kept = np.zeros(n, dtype=bool)
    match, cos = [None] * n, [None] * n
    for i in range(n):
        candidates = [(sims[i, j], j) for j in range(i) if kept[j] and sims[i, j] >= threshold]
        if earlier is not None:
            earlier_sims = earlier @ vectors[i]
            candidates += [(s, -1 - k) for k, s in enumerate(earlier_sims) if s >= threshold]
        if candidates:
            cos[i], match[i] = max(candidates)
        else:
            kept[i] = True
    return kept, match, cos


def clustered_vectors(seed: int, threshold: float, n: int = 300, dim: int = 16) -> np.ndarray:
    """Noisy copies of a few centres: chains where a~b and b~c but not a~c appear often.

    Rows in a pair within 1e-3 of the threshold are left out, so float32 and float64 agree on every decision.
    """
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n // 8, dim)))
    owner = rng.integers(0, len(centres), n)
    noise = rng.choice([0.05, 0.2, 0.35, 0.5, 1.0], n)[:, None] * rng.standard_normal((n, dim)) / np.sqrt(dim)
    vectors = unit(centres[owner] + noise)
    borderline = np.triu(np.abs(vectors @ vectors.T - threshold) < 1e-3, k=1)
    return vectors[~borderline.any(axis=0)]


def test_output_follows_the_schema_one_row_per_input_in_order():
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((50, DIM)))
    records = frame(50)
    result = dedup(records, vectors, 0.9)
    assert result.records.schema == pl.Schema(DEDUP)
    assert result.records.get_column("prompt_id").to_list() == records.get_column("prompt_id").to_list()
    # 50 random directions in 384 dimensions are far apart: nothing is a duplicate.
    assert result.records.get_column("kept").all()
    assert result.records.get_column("duplicate_of").null_count() == 50
    assert result.records.get_column("similarity").null_count() == 50
    assert result.notes["kept"] == 50 and result.notes["dropped"] == 0


@pytest.mark.parametrize("batch_size", [1, 64])
def test_threshold_edge_exact_cosine_reaches_the_threshold(batch_size):
    # Enough pairs that float32 rounding puts some computed cosines just below 0.9 (and some just above).
    pairs_count = 200
    rng = np.random.default_rng(1)
    pairs = [pair_with_cosine(rng, 0.9) for _ in range(pairs_count)]
    vectors = np.stack([v for pair in pairs for v in pair]).astype(np.float32)
    records = frame(len(vectors))

    at = dedup(records, vectors, 0.9, batch_size=batch_size).records
    assert at.get_column("kept").to_list() == [True, False] * pairs_count
    assert at.get_column("duplicate_of").to_list()[1::2] == [f"p{2 * k}" for k in range(pairs_count)]
    assert np.allclose(at.get_column("similarity").to_numpy()[1::2], 0.9, atol=1e-6)

    just_above = dedup(records, vectors, 0.9001, batch_size=batch_size).records
    assert just_above.get_column("kept").all()
    just_below = dedup(records, vectors, 0.8999, batch_size=batch_size).records
    assert just_below.get_column("kept").to_list() == [True, False] * pairs_count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [1, 2, 7, 64, 1000])
def test_matches_the_row_by_row_definition_for_every_batch_size(seed, batch_size):
    threshold = 0.9
    vectors = clustered_vectors(seed, threshold)
    expected_kept, expected_match, expected_cos = reference_greedy(vectors, threshold)
    assert 20 < (~expected_kept).sum() < 250, "the data should exercise both outcomes"

    out = dedup(frame(len(vectors)), vectors.astype(np.float32), threshold, batch_size=batch_size).records
    assert out.get_column("kept").to_list() == expected_kept.tolist()
    assert out.get_column("duplicate_of").to_list() == [None if m is None else f"p{m}" for m in expected_match]
    got_cos = out.get_column("similarity").to_list()
    for got, want in zip(got_cos, expected_cos):
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, abs=1e-5)


def chain() -> np.ndarray:
    """a, b, c with cos(a,b) = cos(b,c) = 0.95 and cos(a,c) = cos(2 * 18.19 deg) ~ 0.805."""
    angle = np.arccos(0.95)
    a = np.zeros(DIM)
    a[0] = 1
    b = np.zeros(DIM)
    b[0], b[1] = np.cos(angle), np.sin(angle)
    c = np.zeros(DIM)
    c[0], c[1] = np.cos(2 * angle), np.sin(2 * angle)
    return np.stack([a, b, c]).astype(np.float32)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_greedy_chain_a_dropped_row_does_not_drop_others(batch_size):
    # b duplicates a and goes; c is close only to b, which was not kept, so c stays.
    out = dedup(frame(3), chain(), 0.9, batch_size=batch_size).records
    assert out.get_column("kept").to_list() == [True, False, True]
    assert out.get_column("duplicate_of").to_list() == [None, "p0", None]


def test_keep_first_depends_on_the_given_order():
    vectors = chain()[:2]
    forward = dedup(frame(2), vectors, 0.9).records
    assert forward.get_column("kept").to_list() == [True, False]
    assert forward.get_column("duplicate_of").to_list() == [None, "p0"]

    reversed_records = frame(2)[::-1]
    backward = dedup(reversed_records, vectors[::-1], 0.9).records
    assert backward.get_column("prompt_id").to_list() == ["p1", "p0"]
    assert backward.get_column("kept").to_list() == [True, False]
    assert backward.get_column("duplicate_of").to_list() == [None, "p1"]


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_duplicates_inside_and_across_batches(batch_size):
    rng = np.random.default_rng(3)
    originals = unit(rng.standard_normal((6, DIM)))
    # Positions chosen so that with batch_size=4 one copy sits in its original's batch and others in later ones.
    order = [0, 1, 2, ("copy", 0), 3, ("copy", 2), 4, 5, ("copy", 4), ("copy", 1)]
    rows = []
    for item in order:
        if isinstance(item, tuple):
            rows.append(originals[item[1]] + 0.005 * rng.standard_normal(DIM))  # cos ~0.995
        else:
            rows.append(originals[item])
    vectors = unit(np.stack(rows)).astype(np.float32)
    out = dedup(frame(len(rows)), vectors, 0.9, batch_size=batch_size).records
    position = {item: i for i, item in enumerate(order) if not isinstance(item, tuple)}
    expected_dup = [None if not isinstance(item, tuple) else f"p{position[item[1]]}" for item in order]
    assert out.get_column("duplicate_of").to_list() == expected_dup
    assert out.get_column("kept").to_list() == [d is None for d in expected_dup]
    sims = out.get_column("similarity").to_numpy()
    assert (sims[~out.get_column("kept").to_numpy()] > 0.99).all()


def test_against_drops_prompts_of_an_earlier_release():
    rng = np.random.default_rng(4)
    earlier = unit(rng.standard_normal((5, DIM))).astype(np.float32)
    new = unit(rng.standard_normal((4, DIM)))
    # Rows 1 and 3 are near-copies of earlier prompts e2 and e4; rows 0 and 2 are new.
    current = unit(np.stack([new[0], earlier[2] + 0.01 * rng.standard_normal(DIM), new[2], earlier[4]]))
    result = dedup(frame(4), current.astype(np.float32), 0.9, against=earlier,
                   against_ids=[f"e{i}" for i in range(5)])
    out = result.records
    assert out.get_column("prompt_id").to_list() == ["p0", "p1", "p2", "p3"]  # earlier prompts are not output
    assert out.get_column("kept").to_list() == [True, False, True, False]
    assert out.get_column("duplicate_of").to_list() == [None, "e2", None, "e4"]
    assert out.get_column("similarity")[3] == pytest.approx(1.0, abs=1e-6)
    assert result.notes["dropped_as_earlier_release"] == 2
    assert result.notes["against_size"] == 5

    without = dedup(frame(4), current.astype(np.float32), 0.9).records
    assert without.get_column("kept").all()


def in_plane(degrees: float) -> np.ndarray:
    v = np.zeros(DIM)
    v[0], v[1] = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return v


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("query_degrees, expected", [(12, "p0"), (18, "e1")])
def test_duplicate_of_names_the_closest_match_kept_or_earlier(batch_size, query_degrees, expected):
    # p0 at 0 deg is kept (cos 30 deg = 0.866 with e1); the query is within 25.8 deg (cos 0.9) of both p0 and e1,
    # e0 is far from everything. With batch_size=8 p0 is found inside the batch, e1 in the index.
    earlier = np.stack([in_plane(90), in_plane(30)]).astype(np.float32)
    vectors = np.stack([in_plane(0), in_plane(query_degrees)]).astype(np.float32)
    out = dedup(frame(2), vectors, 0.9, against=earlier, against_ids=["e0", "e1"], batch_size=batch_size).records
    assert out.get_column("kept").to_list() == [True, False]
    assert out.get_column("duplicate_of").to_list() == [None, expected]
    closest = min(query_degrees, 30 - query_degrees)
    assert out.get_column("similarity")[1] == pytest.approx(np.cos(np.radians(closest)), abs=1e-6)


def test_vectors_that_are_not_unit_length_are_normalised():
    vectors = clustered_vectors(7, 0.9).astype(np.float32)
    scales = np.random.default_rng(7).uniform(0.1, 10, (len(vectors), 1)).astype(np.float32)
    plain = dedup(frame(len(vectors)), vectors, 0.9).records
    scaled = dedup(frame(len(vectors)), vectors * scales, 0.9).records
    assert scaled.get_column("kept").to_list() == plain.get_column("kept").to_list()
    assert scaled.get_column("duplicate_of").to_list() == plain.get_column("duplicate_of").to_list()


def test_empty_input_gives_an_empty_frame_with_the_schema():
    result = dedup(frame(0), np.zeros((0, DIM), dtype=np.float32), 0.9)
    assert result.records.height == 0
    assert result.records.schema == pl.Schema(DEDUP)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda v: dedup(frame(3), v, 0.9), "3 records but 4 embeddings"),
        (lambda v: dedup(frame(4), v, 0.0), "threshold"),
        (lambda v: dedup(frame(4).drop("prompt_id"), v, 0.9), "prompt_id"),
        (lambda v: dedup(frame(4), v, 0.9, against=v), "together"),
        (lambda v: dedup(frame(4), v, 0.9, against=v, against_ids=["x"]), "4 against vectors but 1"),
        (lambda v: dedup(frame(4), v[:, :10], 0.9, against=v, against_ids=list("abcd")), "dimensions"),
        (lambda v: dedup(frame(4), np.zeros_like(v), 0.9), "all zeros"),
        (lambda v: dedup(frame(4), v[0], 0.9), "2-d"),
    ],
)
def test_invalid_input_is_refused_with_a_message(call, message):
    vectors = unit(np.random.default_rng(8).standard_normal((4, DIM))).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        call(vectors)


def test_pools_are_deduplicated_separately_and_keep_the_input_order():
    angle = np.arccos(0.95)
    base = np.zeros(DIM)
    base[0] = 1
    near = np.zeros(DIM)
    near[0], near[1] = np.cos(angle), np.sin(angle)
    other = np.zeros(DIM)
    other[2] = 1
    # benign: b0, b1 (dup of b0); toxic: t0 is the same vector as b0 but in another pool, t1 (dup of t0).
    records = pl.DataFrame({
        "prompt_id": ["b0", "t0", "b1", "t1", "b2"],
        "prompt": ["x"] * 5,
        "pool": ["benign", "toxic", "benign", "toxic", "benign"],
    })
    vectors = np.stack([base, base, near, near, other]).astype(np.float32)
    result = dedup_per_pool(records, vectors, 0.9, "pool")
    out = result.records
    assert out.schema == pl.Schema(DEDUP)
    assert out.get_column("prompt_id").to_list() == ["b0", "t0", "b1", "t1", "b2"]
    assert out.get_column("kept").to_list() == [True, True, False, False, True]
    assert out.get_column("duplicate_of").to_list() == [None, None, "b0", "t0", None]
    assert result.notes["pools"]["benign"]["dropped"] == 1
    assert result.notes["pools"]["toxic"]["dropped"] == 1
    assert result.notes["kept"] == 3

    # An earlier release's toxic prompt removes only toxic copies when pools are given for `against`.
    earlier = np.stack([other, near]).astype(np.float32)
    scoped = dedup_per_pool(records, vectors, 0.9, "pool", against=earlier, against_ids=["old_t", "old_b"],
                            against_pools=["toxic", "benign"]).records
    # b0 (cos 0.95 with old_b) and then b1 (identical to old_b) go; b2 equals old_t, which is toxic: kept.
    assert scoped.get_column("kept").to_list() == [False, True, False, False, True]
    assert scoped.get_column("duplicate_of").to_list() == ["old_b", None, "old_b", "t0", None]
    unscoped = dedup_per_pool(records, vectors, 0.9, "pool", against=earlier,
                              against_ids=["old_t", "old_b"]).records
    assert unscoped.get_column("duplicate_of").to_list()[4] == "old_t"
