"""Near-duplicate removal: greedy keep-first over cosine similarity, exact, with a faiss flat inner-product index.

Rows are visited in the order given. A row is dropped when its cosine similarity with a row kept before it, or with
any prompt of an earlier release (`against`), reaches the threshold; otherwise it is kept and joins the index.
The work is done a batch at a time: the batch is searched against the index of everything kept so far, duplicates
inside the batch are resolved among the rows that survived that search, and the batch's survivors are added.
The result is the same for every batch size. The search is exact, so the cost is one float32 product per
(row, kept row) pair: n^2/2 x 384 multiply-adds, compute bound. Measured on 2 AVX-512 cores: 5 s for 50K rows,
18-20 s for 100K (benchmarks/dedup_scaling.py).

Similarities are computed in float32. A similarity within `SIMILARITY_TOLERANCE` below the threshold counts as
reaching it, so two vectors built to have cosine exactly 0.9 are duplicates at threshold 0.9 however float32
rounding lands.

Approximate search (`index="ivf"`): the index of kept rows is a faiss inverted file (IndexIVFFlat, spherical k-means
centroids trained on evenly spaced rows of the input, fixed seed) probed at `nprobe` lists. Only the search for
earlier kept rows changes; similarities are still exact inner products and duplicates inside a batch are still
found exactly, so every drop is a true pair at or above the threshold. What IVF can do is miss a pair whose rows
fall in lists that are not probed: that row is kept, and (greedy) may then drop a later row exact search would have
kept. The result is deterministic (same input, batch size and settings give the same drops whatever the thread
count); unlike exact search it can change with the batch size. `index="auto"` uses exact search below
`EXACT_BELOW` rows (input plus earlier releases), where it is fast, and IVF above. HNSW is not offered: faiss
builds its graph with several threads in an order that varies run to run, so its drops would not be reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import polars as pl

from orforge.core.records import DEDUP, StageResult, empty

SIMILARITY_TOLERANCE = 1e-6
DEFAULT_BATCH_SIZE = 2048  # queries per faiss search: below ~1000 faiss search runs several times slower here
INDEX_KINDS = ("auto", "exact", "ivf")
EXACT_BELOW = 50_000  # rows; exact search takes ~5 s at 50K and grows with n^2 (benchmarks/dedup_scaling.py)
IVF_SEED = 1234


def dedup(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    threshold: float,
    against: np.ndarray | None = None,
    against_ids: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    index: str = "auto",
    nprobe: int | None = None,
) -> StageResult:
    """One `DEDUP` row per input row, same order.

    `records` needs a `prompt_id` column; `embeddings[i]` is the vector of row i (normalised here if it is not
    unit length). `against` holds vectors of earlier releases' prompts and `against_ids` their prompt ids; those
    are never part of the output. `duplicate_of` names the most similar kept or earlier prompt at or above the
    threshold, `similarity` is that cosine; both are null for kept rows. `index` is "exact", "ivf" or "auto" (see
    the module docstring); `nprobe` overrides the IVF lists probed per query.
    """
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    if "prompt_id" not in records.columns:
        raise ValueError(f"records need a prompt_id column, got {records.columns}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = records.height
    vectors = _unit_rows(embeddings, "embeddings")
    if vectors.shape[0] != n:
        raise ValueError(f"{n} records but {vectors.shape[0]} embeddings")
    dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[0] else None

    earlier_ids: list[str] = []
    earlier = None
    if against is not None or against_ids is not None:
        if against is None or against_ids is None:
            raise ValueError("against and against_ids go together")
        earlier = _unit_rows(against, "against")
        earlier_ids = [str(i) for i in against_ids]
        if earlier.shape[0] != len(earlier_ids):
            raise ValueError(f"{earlier.shape[0]} against vectors but {len(earlier_ids)} against_ids")
        if earlier.shape[0] and dim is not None and earlier.shape[1] != dim:
            raise ValueError(f"against vectors have {earlier.shape[1]} dimensions, embeddings {dim}")

    if n == 0:
        return StageResult(records=empty(DEDUP), notes=_notes(0, 0, 0, threshold, len(earlier_ids)))

    cutoff = np.float32(threshold) - np.float32(SIMILARITY_TOLERANCE)
    prompt_ids = records.get_column("prompt_id").cast(pl.Utf8).to_list()

    n_total = n + len(earlier_ids)
    kind = index if index != "auto" else ("exact" if n_total < EXACT_BELOW else "ivf")
    if kind == "exact":
        kept_index: _FlatKept | _IVFKept = _FlatKept(dim)
    else:
        kept_index = _IVFKept(_training_rows(vectors, earlier), ivf_lists(n_total), nprobe)
    # index_ids[k] is the prompt id of the k-th vector in the index: earlier releases first, then kept rows.
    index_ids: list[str] = []
    if earlier is not None and earlier.shape[0]:
        for start in range(0, earlier.shape[0], batch_size):
            part = earlier[start : start + batch_size]
            kept_index.add(part, kept_index.assign(part))
        index_ids.extend(earlier_ids)
    n_earlier = len(index_ids)

    kept = np.zeros(n, dtype=bool)
    duplicate_of: list[str | None] = [None] * n
    similarity = np.full(n, np.nan, dtype=np.float64)
    dropped_by_earlier = 0

    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = vectors[start:stop]
        size = stop - start

        # Against everything kept before this batch (and earlier releases).
        lists = kept_index.assign(batch)
        if kept_index.ntotal:
            best_sim, best_at = kept_index.best(batch, lists)
        else:
            best_sim = np.full(size, -np.inf, dtype=np.float32)
            best_at = np.full(size, -1, dtype=np.int64)
        hit_index = best_sim >= cutoff

        # Inside the batch: row i against the rows j < i that are still kept. Only rows with such a neighbour need
        # the sequential pass; the status of every other row is already final.
        batch_kept = ~hit_index
        in_batch_match = np.full(size, -1, dtype=np.int64)
        in_batch_sim = np.zeros(size, dtype=np.float32)
        for i, js, sims in _close_earlier_pairs(batch, cutoff):
            alive = batch_kept[js]
            if not alive.any():
                continue
            batch_kept[i] = False
            k = int(np.argmax(np.where(alive, sims, -np.inf)))
            if sims[k] > best_sim[i]:  # report the closest kept prompt, wherever it is
                in_batch_match[i], in_batch_sim[i] = js[k], sims[k]

        for i in np.flatnonzero(~batch_kept):
            row = start + i
            j = in_batch_match[i]
            if j >= 0:
                duplicate_of[row] = prompt_ids[start + j]
                similarity[row] = float(in_batch_sim[i])
            else:
                at = int(best_at[i])
                duplicate_of[row] = index_ids[at]
                similarity[row] = float(best_sim[i])
                dropped_by_earlier += at < n_earlier

        kept[start:stop] = batch_kept
        survivors = np.flatnonzero(batch_kept)
        if survivors.size:
            kept_index.add(np.ascontiguousarray(batch[survivors]), kept_index.pick(lists, survivors))
            index_ids.extend(prompt_ids[start + i] for i in survivors)

    out = pl.DataFrame(
        {
            "prompt_id": prompt_ids,
            "kept": kept,
            "duplicate_of": duplicate_of,
            "similarity": pl.Series(similarity).fill_nan(None),
        },
        schema=DEDUP,
    )
    notes = _notes(n, int(kept.sum()), dropped_by_earlier, threshold, n_earlier)
    notes["index"] = kept_index.describe()
    return StageResult(records=out, notes=notes)


def dedup_per_pool(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    threshold: float,
    pool_column: str,
    against: np.ndarray | None = None,
    against_ids: Sequence[str] | None = None,
    against_pools: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    index: str = "auto",
) -> StageResult:
    """`dedup` run separately inside each value of `records[pool_column]` (e.g. benign and toxic).

    A prompt is only ever a duplicate of a prompt in its own pool. With `against_pools` (one pool name per
    `against` row) earlier prompts are matched within their pool too; without it every pool is checked against
    all of `against`. Output rows follow the input order; `notes["pools"]` has each pool's counts.
    """
    if pool_column not in records.columns:
        raise ValueError(f"records have no column {pool_column!r}")
    vectors = np.asarray(embeddings)
    if vectors.shape[0] != records.height:
        raise ValueError(f"{records.height} records but {vectors.shape[0]} embeddings")
    if against_pools is not None:
        if against is None or against_ids is None:
            raise ValueError("against_pools needs against and against_ids")
        if len(against_pools) != len(against_ids):
            raise ValueError(f"{len(against_pools)} against_pools but {len(against_ids)} against_ids")
        earlier_pools = np.asarray([str(p) for p in against_pools], dtype=object)

    pools = records.get_column(pool_column).cast(pl.Utf8).fill_null("").to_numpy()
    parts: list[pl.DataFrame] = []
    positions: list[np.ndarray] = []
    notes: dict = {"threshold": threshold, "pools": {}}
    for pool in dict.fromkeys(pools.tolist()):  # first-appearance order
        rows = np.flatnonzero(pools == pool)
        pool_against, pool_against_ids = against, against_ids
        if against_pools is not None:
            pick = np.flatnonzero(earlier_pools == pool)
            pool_against = np.asarray(against)[pick]
            pool_against_ids = [against_ids[k] for k in pick]
        result = dedup(
            records[rows.tolist()], vectors[rows], threshold, pool_against, pool_against_ids, batch_size, index
        )
        parts.append(result.records)
        positions.append(rows)
        notes["pools"][pool] = result.notes

    if not parts:
        return StageResult(records=empty(DEDUP), notes=notes)
    order = np.argsort(np.concatenate(positions), kind="stable")
    merged = pl.concat(parts)[order.tolist()]
    notes["input"] = merged.height
    notes["kept"] = int(merged.get_column("kept").sum())
    notes["dropped"] = notes["input"] - notes["kept"]
    return StageResult(records=merged, notes=notes)


class _FlatKept:
    """Exact: every kept vector is compared with every query."""

    def __init__(self, dim: int):
        self.index = faiss.IndexFlatIP(dim)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def assign(self, vectors: np.ndarray) -> None:
        return None

    def pick(self, lists: None, rows: np.ndarray) -> None:
        return None

    def best(self, queries: np.ndarray, lists: None) -> tuple[np.ndarray, np.ndarray]:
        sims, found = self.index.search(queries, 1)
        return sims[:, 0], found[:, 0]

    def add(self, vectors: np.ndarray, lists: None) -> None:
        self.index.add(vectors)

    def describe(self) -> dict:
        return {"kind": "exact"}


class _IVFKept:
    """Approximate: kept vectors sit in the inverted list of their closest centroid; a query scans its `nprobe`
    closest lists. The coarse assignment of a batch is computed once and serves both its search and its add."""

    def __init__(self, training: np.ndarray, nlist: int, nprobe: int | None):
        size, dim = training.shape
        self.nlist = min(nlist, size)
        self.nprobe = min(self.nlist, nprobe if nprobe is not None else ivf_nprobe(self.nlist))
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.quantizer = faiss.IndexFlatIP(dim)  # kept referenced here: the IVF index does not own it in Python
        self.index = faiss.IndexIVFFlat(self.quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.spherical = True
        self.index.cp.niter = 10
        self.index.cp.seed = IVF_SEED
        self.index.cp.max_points_per_centroid = max(1, size // self.nlist + 1)  # faiss must not subsample again
        self.index.cp.min_points_per_centroid = 1
        self.index.train(training)
        self.index.nprobe = self.nprobe

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.quantizer.search(vectors, self.nprobe)

    def pick(self, lists, rows: np.ndarray):
        return lists[0][rows], lists[1][rows]

    def best(self, queries: np.ndarray, lists) -> tuple[np.ndarray, np.ndarray]:
        centroid_sims, centroid_ids = lists
        sims, found = self.index.search_preassigned(queries, 1, centroid_ids, centroid_sims)
        return sims[:, 0], found[:, 0]

    def add(self, vectors: np.ndarray, lists) -> None:
        closest = np.ascontiguousarray(lists[1][:, 0], dtype=np.int64)
        start = self.index.ntotal  # ids are positions in the index, as with the flat index
        ids = np.arange(start, start + vectors.shape[0], dtype=np.int64)
        self.index.add_core(vectors.shape[0], faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(closest))

    def describe(self) -> dict:
        return {"kind": "ivf", "nlist": self.nlist, "nprobe": self.nprobe}


def ivf_lists(size: int) -> int:
    """Inverted lists for `size` vectors: a power of two near 2 x sqrt(size), 16 to 4096."""
    return int(min(4096, max(16, 2 ** round(np.log2(2 * np.sqrt(max(size, 1)))))))


def ivf_nprobe(nlist: int) -> int:
    """Lists probed per query by default: 1/64 of them, at least 8 (measured recall in benchmarks/dedup_scaling.py)."""
    return max(8, nlist // 64)


def _training_rows(vectors: np.ndarray, earlier: np.ndarray | None, per_list: int = 32) -> np.ndarray:
    """Evenly spaced rows of earlier releases and input together, up to `per_list` per inverted list: a sample
    fixed by the input alone, so training is the same every run."""
    everything_size = vectors.shape[0] + (earlier.shape[0] if earlier is not None else 0)
    want = min(everything_size, per_list * ivf_lists(everything_size))
    picks = np.unique(np.linspace(0, everything_size - 1, want).astype(np.int64))
    n_earlier = everything_size - vectors.shape[0]
    parts = []
    if n_earlier:
        parts.append(earlier[picks[picks < n_earlier]])
    parts.append(vectors[picks[picks >= n_earlier] - n_earlier])
    return np.ascontiguousarray(np.concatenate(parts))


def _close_earlier_pairs(batch: np.ndarray, cutoff: np.float32):
    """For each row i of the batch with rows j < i at or above the cutoff: (i, those j ascending, their cosines).

    A throwaway faiss index of the batch answers a range search, so all the arithmetic runs in faiss (one BLAS
    and one thread pool, and no batch x batch matrix in Python).
    """
    local = faiss.IndexFlatIP(batch.shape[1])
    local.add(batch)
    # faiss keeps inner products strictly above the radius; one float32 step lower keeps those equal to the cutoff.
    lims, sims, ids = local.range_search(batch, float(np.nextafter(cutoff, np.float32(-np.inf))))
    rows = np.repeat(np.arange(batch.shape[0]), np.diff(lims.astype(np.int64)))
    earlier = (ids < rows) & (sims >= cutoff)
    rows, ids, sims = rows[earlier], ids[earlier], sims[earlier]
    order = np.lexsort((ids, rows))
    rows, ids, sims = rows[order], ids[order], sims[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if rows.size else np.zeros(0, dtype=np.int64)
    for first, last in zip(starts, np.r_[starts[1:], rows.size]):
        yield int(rows[first]), ids[first:last], sims[first:last]


def _unit_rows(values: np.ndarray, name: str) -> np.ndarray:
    """C-contiguous float32 rows of unit length; a copy only when the input is not already that."""
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array, got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not array.shape[0]:
        return array
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    norms = np.sqrt(np.einsum("ij,ij->i", array, array, dtype=np.float64))
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.flatnonzero(norms == 0)[0])} is all zeros; cosine is undefined")
    if np.abs(norms - 1.0).max() > 1e-6:
        array = (array / norms[:, None]).astype(np.float32)
    return array


def _notes(n: int, kept: int, dropped_by_earlier: int, threshold: float, n_earlier: int) -> dict:
    return {
        "input": n,
        "kept": kept,
        "dropped": n - kept,
        "dropped_as_earlier_release": dropped_by_earlier,
        "against_size": n_earlier,
        "threshold": threshold,
    }
