"""Embedding checks on concept questions (SELECT recipe): near-duplicate removal within each concept, and flagging
questions that fit a sibling or the parent as well as their own concept (those would put a question in the wrong
split).

Both take an embedder: anything with `encode(texts) -> (n, d)` unit-norm rows (`dedup.embed.Embedder`), or that
function itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from orforge.dedup.near import dedup_per_pool

Encoder = Callable[[list[str]], np.ndarray]


def _encoder(embedder: Any) -> Encoder:
    return embedder.encode if hasattr(embedder, "encode") else embedder


def dedup_within(frame: pl.DataFrame, group_col: str, text_col: str, threshold: float, embedder: Any,
                 id_col: str = "question_id") -> pl.DataFrame:
    """`frame` with `kept`, `duplicate_of` and `similarity` added (same rows, same order): greedy keep-first
    near-duplicate removal by cosine similarity of `text_col`, run separately inside each value of `group_col`, so a
    question is only ever a duplicate of an earlier question of its own concept. `duplicate_of` holds `id_col`."""
    for col in (group_col, text_col, id_col):
        if col not in frame.columns:
            raise ValueError(f"dedup_within: no column {col!r} in {frame.columns}")
    clash = {"kept", "duplicate_of", "similarity"} & set(frame.columns)
    if clash:
        raise ValueError(f"dedup_within: the frame already has {sorted(clash)}")
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, pl.Boolean).alias("kept"), pl.lit(None, pl.Utf8).alias("duplicate_of"),
                                  pl.lit(None, pl.Float64).alias("similarity"))
    vectors = _encoder(embedder)(frame[text_col].to_list())
    records = frame.select(pl.col(id_col).cast(pl.Utf8).alias("prompt_id"), pl.col(group_col))
    result = dedup_per_pool(records, vectors, threshold, group_col)
    return frame.with_columns(result.records.select("kept", "duplicate_of", "similarity").get_columns())


def concept_label(name: str, context: list[str]) -> str:
    """The text a question is compared with: the concept's name with its ancestor path, "Rivers (Places > Water
    bodies)". On MiniLM the path separates a question's own concept from its parent better than the name alone."""
    return f"{name} ({' > '.join(context)})" if context else name


def flag_leaks(questions: pl.DataFrame, tree_frame: pl.DataFrame, embedder: Any, margin: float) -> pl.DataFrame:
    """`questions` with `leak_flag`, `leak_with` and `leak_similarity` set (other columns and row order kept).

    A question is compared (cosine of MiniLM embeddings) with the label of its own concept and with the labels of
    its rivals: the concept's siblings (roots: the other roots) and its parent. It is flagged when the closest
    rival is within `margin` of its own concept or closer: `rival >= own - margin`. A flagged row names that rival
    in `leak_with` with its cosine in `leak_similarity`; an unflagged row has `leak_flag` False and both null. A
    concept with no rival (a lone root) is never flagged. `tree_frame` needs `concept_id`, `name`, `parent_id`.
    """
    for col in ("concept_id", "question"):
        if col not in questions.columns:
            raise ValueError(f"flag_leaks: questions need a {col!r} column")
    for col in ("concept_id", "name", "parent_id"):
        if col not in tree_frame.columns:
            raise ValueError(f"flag_leaks: the tree frame needs a {col!r} column")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    nodes = {r["concept_id"]: r for r in tree_frame.iter_rows(named=True)}
    unknown = set(questions["concept_id"].to_list()) - set(nodes)
    if unknown:
        raise ValueError(f"flag_leaks: questions name concepts not in the tree: {sorted(unknown)[:5]}")

    def context(cid: str) -> list[str]:
        names, parent = [], nodes[cid]["parent_id"]
        while parent is not None:
            names.append(nodes[parent]["name"])
            parent = nodes[parent]["parent_id"]
        return names[::-1]

    children: dict[str | None, list[str]] = {}
    for cid, node in nodes.items():
        children.setdefault(node["parent_id"], []).append(cid)
    rivals = {cid: [s for s in children[node["parent_id"]] if s != cid]
              + ([node["parent_id"]] if node["parent_id"] is not None else []) for cid, node in nodes.items()}

    encode = _encoder(embedder)
    label_ids = list(nodes)
    label_vectors = np.asarray(encode([concept_label(nodes[c]["name"], context(c)) for c in label_ids]),
                               dtype=np.float32)
    row_of = {cid: i for i, cid in enumerate(label_ids)}
    question_vectors = np.asarray(encode(questions["question"].to_list()), dtype=np.float32)

    flags, leak_with, leak_sim = [], [], []
    for vector, cid in zip(question_vectors, questions["concept_id"].to_list()):
        own = float(label_vectors[row_of[cid]] @ vector)
        if not rivals[cid]:
            flags.append(False), leak_with.append(None), leak_sim.append(None)
            continue
        sims = label_vectors[[row_of[r] for r in rivals[cid]]] @ vector
        best = int(np.argmax(sims))
        flagged = float(sims[best]) >= own - margin
        flags.append(flagged)
        leak_with.append(rivals[cid][best] if flagged else None)
        leak_sim.append(round(float(sims[best]), 6) if flagged else None)
    return questions.with_columns(pl.Series("leak_flag", flags, dtype=pl.Boolean),
                                  pl.Series("leak_with", leak_with, dtype=pl.Utf8),
                                  pl.Series("leak_similarity", leak_sim, dtype=pl.Float64))
