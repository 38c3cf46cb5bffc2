"""Near-duplicate removal: greedy keep-first over cosine similarity, exact or over inverted lists (IVF).

Rows are visited in the order given. A row is dropped when its cosine similarity with a row kept before it, or with
any prompt of an earlier release (`against`), reaches the threshold; otherwise it is kept. Similarities are computed
in float32; a similarity within `SIMILARITY_TOLERANCE` below the threshold counts as reaching it, so two vectors
built to have cosine exactly 0.9 are duplicates at threshold 0.9 however float32 rounding lands.

Which earlier rows a row is compared with (`index`):
- "exact": all of them. The cost is one float32 product per (row, earlier row): n^2/2 x 384 multiply-adds.
- "ivf": every row sits in the inverted list of its closest centroid (spherical k-means, fixed seed, trained on
  evenly spaced rows of the input and earlier releases); a row is compared with the earlier rows of its `nprobe`
  closest lists. A near-duplicate pair is missed only when the earlier row's list is not among the later row's
  probed lists; that row is then kept and (greedy) may drop a later row exact search keeps. Every drop is
  still a true pair: the reported cosine is the exact inner product. About n x nprobe x (n / nlist) / 2 x 384
  multiply-adds, plus k-means and the coarse assignment.
- "auto": exact below `EXACT_BELOW` rows (input plus earlier releases), where it is fast, IVF from there.

Both are one algorithm: exact search is IVF with a single list. The vectors are stored list by list, by position
inside a list, so a batch is searched with one matrix product per probed list against a contiguous slice. Rows
before the batch have a final status (only kept ones count); pairs inside the batch are resolved in order. The set
of pairs compared is fixed by the input and the lists, so the result is the same for every batch size and thread
count (a reported cosine can differ in its last float32 bit between runs with other tilings). HNSW is not
offered: faiss builds its graph with several threads in an order that varies run to run, so its drops would not
be reproducible. Measured in benchmarks/dedup_scaling.py and docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import os
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits

from orforge.core.records import DEDUP, StageResult, empty

SIMILARITY_TOLERANCE = 1e-6
# Rows per batch by search kind. The result is the same for every size; a larger one costs fewer Python steps (IVF
# makes one product per probed list per batch) and more memory where a batch holds a tight cluster (its pairs inside
# the batch are kept until resolved: up to size^2 / 2 of them).
BATCH_SIZES = {"exact": 2048, "ivf": 8192}
THREADS = max(1, len(os.sched_getaffinity(0)))
INDEX_KINDS = ("auto", "exact", "ivf")
EXACT_BELOW = 50_000  # rows; exact search takes 12 s at 50K here (IVF 2.4 s) and grows with n^2 (docs/benchmarks.md)
IVF_SEED = 1234


def dedup(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    threshold: float,
    against: np.ndarray | None = None,
    against_ids: Sequence[str] | None = None,
    batch_size: int | None = None,
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
    if batch_size is not None and batch_size < 1:
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
    n_earlier = len(earlier_ids)

    n_total = n + n_earlier
    kind = index if index != "auto" else ("exact" if n_total < EXACT_BELOW else "ivf")
    lists = _Lists(vectors, earlier, kind, nprobe)
    batch_size = batch_size or BATCH_SIZES[kind]

    kept = np.zeros(n, dtype=bool)
    duplicate_of: list[str | None] = [None] * n
    similarity = np.full(n, np.nan, dtype=np.float64)
    dropped_by_earlier = 0

    def name(position: int) -> str:  # a position in "earlier releases, then this input"
        return earlier_ids[position] if position < n_earlier else prompt_ids[position - n_earlier]

    # Many small products (IVF) or a few large ones (exact): tiles on THREADS threads with single-threaded BLAS each,
    # several times faster here than one threaded BLAS on small products.
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(THREADS) as lists.pool:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            best_sim, best_at, pairs = lists.search(start, stop, cutoff)
            hit = best_sim >= cutoff

            # Rows with a kept earlier row at or above the cutoff are dropped; inside the batch, row i against the rows
            # j < i that are still kept, in order. Only rows with such a neighbour need the sequential pass.
            batch_kept = ~hit
            in_batch_match = np.full(stop - start, -1, dtype=np.int64)
            in_batch_sim = np.zeros(stop - start, dtype=np.float32)
            for i, js, sims in pairs:
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
                    duplicate_of[row] = name(at)
                    similarity[row] = float(best_sim[i])
                    dropped_by_earlier += at < n_earlier

            kept[start:stop] = batch_kept
            lists.drop(start + np.flatnonzero(~batch_kept))

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
    notes["index"] = lists.describe()
    return StageResult(records=out, notes=notes)


def dedup_per_pool(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    threshold: float,
    pool_column: str,
    against: np.ndarray | None = None,
    against_ids: Sequence[str] | None = None,
    against_pools: Sequence[str] | None = None,
    batch_size: int | None = None,
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


class _Lists:
    """Every row (earlier releases first, then the input) in the inverted list of its closest centroid, and each
    input row's `nprobe` closest lists. Exact search is the case of one list that every row probes.

    The vectors are stored once, list after list and by position inside a list, so "the rows of list L before
    position p" is a contiguous slice, and a batch's search is one matrix product per probed list: the batch's rows
    that probe it against the slice (in tiles). Rows before the batch have a final status, so only the kept ones
    count (`best`); rows inside it are returned as pairs for the caller's sequential pass.
    """

    TILE_ROWS = 2048  # a product tile is at most TILE_ROWS x TILE_COLS float32 (64 MB)
    TILE_COLS = 8192

    def __init__(self, vectors: np.ndarray, earlier: np.ndarray | None, kind: str, nprobe: int | None):
        self.vectors = vectors
        self.n_earlier = 0 if earlier is None else earlier.shape[0]
        n_total = self.n_earlier + vectors.shape[0]
        self.kind = kind
        if kind == "exact":
            self.nlist, self.nprobe = 1, 1
            self.home = np.zeros(n_total, dtype=np.int64)
            self.probes = np.zeros((vectors.shape[0], 1), dtype=np.int64)
        else:
            centroids = _centroids(_training_rows(vectors, earlier), ivf_lists(n_total))
            self.nlist = centroids.ntotal
            self.nprobe = min(self.nlist, nprobe if nprobe is not None else ivf_nprobe(self.nlist))
            if self.nprobe < 1:
                raise ValueError(f"nprobe must be >= 1, got {nprobe}")
            home = [] if not self.n_earlier else [_closest(centroids, earlier, 1)[:, 0]]
            self.probes = _closest(centroids, vectors, self.nprobe)
            self.home = np.concatenate(home + [self.probes[:, 0]])
        # order[k]: the position stored k-th (list by list, positions ascending); slot is its inverse.
        self.order = np.argsort(self.home, kind="stable")
        self.slot = np.empty(n_total, dtype=np.int64)
        self.slot[self.order] = np.arange(n_total)
        counts = np.bincount(self.home, minlength=self.nlist)
        self.list_start = np.concatenate([[0], np.cumsum(counts)])
        if kind == "exact" and not self.n_earlier:
            self.table = vectors  # already in position order
        else:
            self.table = np.empty((n_total, vectors.shape[1]), dtype=np.float32)
            for k in range(0, n_total, 65536):  # gathered in pieces: no second full-size temporary
                where = self.order[k : k + 65536]
                self.table[k : k + where.size] = self._rows(where, earlier)
        self.alive = np.ones(n_total, dtype=bool)  # by slot; a dropped input row is no longer a match
        self.pool: ThreadPoolExecutor | None = None  # set for the search loop (dedup)
        # Per list, how many of its rows come before the current batch (they lead its slice).
        self.before = np.bincount(self.home[: self.n_earlier], minlength=self.nlist)

    def _rows(self, positions: np.ndarray, earlier: np.ndarray | None) -> np.ndarray:
        """The vectors at these positions (earlier releases first, then the input)."""
        out = np.empty((positions.size, self.vectors.shape[1]), dtype=np.float32)
        early = positions < self.n_earlier
        out[~early] = self.vectors[positions[~early] - self.n_earlier]
        if early.any():
            out[early] = earlier[positions[early]]
        return out

    def search(self, start: int, stop: int, cutoff: np.float32):
        """Input rows start..stop: the best kept earlier row per row (cosine, position; -inf and -1 when none is
        probed), and the pairs inside the batch at or above the cutoff as (row, earlier rows ascending, cosines).

        Tiles run on `self.pool`; the result does not depend on the order they finish in: the best match is the
        highest cosine, then the lowest position, and pairs are sorted.
        """
        size = stop - start
        first = self.n_earlier + start  # positions of the batch: first .. first + size
        upto = self.before + np.bincount(self.home[first : first + size], minlength=self.nlist)
        probed = self.probes[start:stop].ravel()
        asking = np.repeat(np.arange(size), self.probes.shape[1])
        by_list = np.argsort(probed, kind="stable")
        probed, asking = probed[by_list], asking[by_list]
        cuts = np.flatnonzero(np.diff(probed)) + 1
        tiles = [(int(lst), rows[r0 : r0 + self.TILE_ROWS])
                 for rows, lst in zip(np.split(asking, cuts), probed[np.r_[0, cuts]] if probed.size else [])
                 if upto[lst]
                 for r0 in range(0, rows.size, self.TILE_ROWS)]
        def one(tile):
            return self._tile(*tile, start, first, upto, cutoff)

        parts = list(self.pool.map(one, tiles) if self.pool and len(tiles) > 1 else map(one, tiles))
        self.before = upto

        best_sim = np.full(size, -np.inf, dtype=np.float32)
        best_at = np.full(size, -1, dtype=np.int64)
        found = [p[0] for p in parts if p[0] is not None]
        if found:
            rows, value, at = (np.concatenate(x) for x in zip(*found))
            order = np.lexsort((at, -value, rows))  # per row: highest cosine first, then lowest position
            rows, value, at = rows[order], value[order], at[order]
            lead = np.r_[True, rows[1:] != rows[:-1]]
            best_sim[rows[lead]], best_at[rows[lead]] = value[lead], at[lead]
        pairs = [p[1] for p in parts if p[1] is not None]
        return best_sim, best_at, _grouped_pairs(*(list(x) for x in zip(*pairs))) if pairs else iter(())

    def _tile(self, lst: int, rows: np.ndarray, start: int, first: int, upto: np.ndarray, cutoff: np.float32):
        """One list against some batch rows that probe it: (rows, best kept cosine, its position) over the list's
        rows before the batch, and (rows, earlier batch rows, cosines) of its pairs inside the batch."""
        base, done, end = self.list_start[lst], self.before[lst], upto[lst]
        queries = self.vectors[start + rows]
        best = None
        pair_rows, pair_at, pair_sims = [], [], []
        for c0 in range(0, end, self.TILE_COLS):
            c1 = min(end, c0 + self.TILE_COLS)
            sims = queries @ self.table[base + c0 : base + c1].T
            if c0 < done:  # rows before the batch: the best kept one
                earlier = sims[:, : min(c1, done) - c0]
                dead = np.flatnonzero(~self.alive[base + c0 : base + c0 + earlier.shape[1]])
                if dead.size:
                    earlier[:, dead] = -np.inf
                col = np.argmax(earlier, axis=1)  # the first of equal cosines: the lowest position
                value = earlier[np.arange(col.size), col]
                if best is None or c0 == 0:
                    best = [value, col + c0]
                else:
                    better = value > best[0]
                    best[0][better], best[1][better] = value[better], col[better] + c0
            if c1 > done:  # rows inside the batch: every pair at or above the cutoff with an earlier row
                skip = max(c0, done) - c0
                r, c = np.nonzero(sims[:, skip:] >= cutoff)
                at = self.order[base + c0 + skip + c] - first
                earlier_row = at < rows[r]
                pair_rows.append(rows[r[earlier_row]].astype(np.int32))  # batch rows: int32 halves a tight
                pair_at.append(at[earlier_row].astype(np.int32))  # cluster's pairs
                pair_sims.append(sims[r[earlier_row], skip + c[earlier_row]])
        found = None if best is None else (rows, best[0], self.order[base + best[1]])
        pairs = (np.concatenate(pair_rows), np.concatenate(pair_at), np.concatenate(pair_sims)) if pair_rows else None
        return found, pairs

    def drop(self, rows: np.ndarray) -> None:
        """Input rows (by index) that were dropped: they match nothing after this."""
        self.alive[self.slot[self.n_earlier + rows]] = False

    def describe(self) -> dict:
        if self.kind == "exact":
            return {"kind": "exact"}
        return {"kind": "ivf", "nlist": self.nlist, "nprobe": self.nprobe}


def _grouped_pairs(rows: list[np.ndarray], at: list[np.ndarray], sims: list[np.ndarray]):
    """(row, its earlier rows ascending, their cosines) for each row that has any, rows ascending."""
    if not sum(r.size for r in rows):
        return
    rows_, at_, sims_ = np.concatenate(rows), np.concatenate(at), np.concatenate(sims)
    order = np.lexsort((at_, rows_))
    rows_, at_, sims_ = rows_[order], at_[order], sims_[order]
    starts = np.flatnonzero(np.r_[True, rows_[1:] != rows_[:-1]])
    for first, last in zip(starts, np.r_[starts[1:], rows_.size]):
        yield int(rows_[first]), at_[first:last], sims_[first:last]


def _centroids(training: np.ndarray, nlist: int) -> faiss.IndexFlatIP:
    """Spherical k-means centroids (fixed seed, every training row used), as a flat inner-product index."""
    size, dim = training.shape
    nlist = min(nlist, size)
    clustering = faiss.Clustering(dim, nlist)
    clustering.spherical = True
    clustering.niter = 10
    clustering.seed = IVF_SEED
    clustering.max_points_per_centroid = max(1, size // nlist + 1)  # faiss must not subsample again
    clustering.min_points_per_centroid = 1
    centroids = faiss.IndexFlatIP(dim)
    clustering.train(training, centroids)
    return centroids


def _closest(centroids: faiss.IndexFlatIP, vectors: np.ndarray, k: int) -> np.ndarray:
    """The k closest centroids of each row, closest first."""
    out = np.empty((vectors.shape[0], k), dtype=np.int64)
    for start in range(0, vectors.shape[0], 65536):
        out[start : start + 65536] = centroids.search(vectors[start : start + 65536], k)[1]
    return out


def ivf_lists(size: int) -> int:
    """Inverted lists for `size` vectors: a power of two near 2 x sqrt(size), 16 to 4096."""
    return int(min(4096, max(16, 2 ** round(np.log2(2 * np.sqrt(max(size, 1)))))))


def ivf_nprobe(nlist: int) -> int:
    """Lists probed per query by default: 8 (or all of them, when there are fewer). The work grows with nprobe and
    recall barely does: 0.992 at 100K rows with 8 of 512 lists (benchmarks/dedup_scaling.py)."""
    return min(nlist, 8)


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
