"""Questions for the hand-checkable concept tree (tests/core/test_concepts.py): per concept two evaluation
questions `<id>-e0`, `<id>-e1` and one training question `<id>-t0`; `birds-e1` is flagged as leaking."""

from __future__ import annotations

import polars as pl

from orforge.core.records import QUESTIONS, frame
from tests.core.test_concepts import ROWS, hand_tree  # noqa: F401  (re-exported for the tests)

LEAKED = "birds-e1"


def make_questions() -> pl.DataFrame:
    rows = []
    for cid, name, _ in ROWS:
        for kind, suffix, n in (("eval", "e", 2), ("train", "t", 1)):
            for i in range(n):
                qid = f"{cid}-{suffix}{i}"
                rows.append({
                    "question_id": qid, "concept_id": cid, "question": f"{kind} question {i} about {name}?",
                    "kind": kind, "ancestor_ids": [], "model": "writer", "template_sha256": "t" * 64,
                    "sample_index": i, "leak_flag": qid == LEAKED, "leak_with": "mammals" if qid == LEAKED else None,
                    "leak_similarity": 0.8 if qid == LEAKED else None,
                })
    return frame(rows, QUESTIONS)
