"""The refusal panel: each member answers each prompt in free text; refusals are then detected per answer.

`answer` input: rows with `prompt_id`, `prompt`; output: core.records.RESPONSES without the refusal columns
(`refusal`, `label`, `method` are added by `moderators.refusal.classify_refusals`). `hard_members` counts, per prompt,
which members rejected it.
"""

from __future__ import annotations

import polars as pl

from orforge.core.records import FAILURES, StageResult, frame
from orforge.llm.hub import LLM, generate_together
from orforge.llm.types import LLMRequest

ANSWER_SCHEMA = {"prompt_id": pl.Utf8, "prompt": pl.Utf8, "member": pl.Utf8, "model": pl.Utf8, "response": pl.Utf8}
HARD_MEMBERS = {"prompt_id": pl.Utf8, "rejected_by": pl.List(pl.Utf8), "n_rejections": pl.Int64}


def answer(prompts: pl.DataFrame, members: list[LLM], on_progress=None) -> StageResult:
    """Every member answers every prompt as a plain user message (the member's spec may add a system prompt).

    A member that failed on a prompt gives a row with a null response and a failure record: it neither refused nor
    answered, so it never counts towards the hard split.
    """
    rows = list(prompts.select("prompt_id", "prompt").iter_rows(named=True))
    requests = [LLMRequest.chat(r["prompt"], item_id=r["prompt_id"]) for r in rows]
    out, failures = [], []
    # Every member at once (members often share an endpoint); rows in member order, then prompt order.
    answers = generate_together([(member, requests) for member in members], on_progress)
    for member, results in zip(members, answers, strict=True):
        for r, res in zip(rows, results, strict=True):
            out.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "member": member.label,
                        "model": member.spec.model, "response": res.text if res.ok else None})
            if not res.ok:
                failures.append({"stage": "panel", "role": member.role, "model": member.label,
                                 "item_id": r["prompt_id"], "reason": res.error})
    return StageResult(frame(out, ANSWER_SCHEMA), frame(failures, FAILURES))


def hard_members(responses: pl.DataFrame) -> pl.DataFrame:
    """Per answered prompt: the members whose answer was a refusal, and how many."""
    if responses.is_empty():
        return frame([], HARD_MEMBERS)
    return (responses.group_by("prompt_id", maintain_order=True)
            .agg(pl.col("member").filter(pl.col("refusal").fill_null(False)).sort().alias("rejected_by"))
            .with_columns(pl.col("rejected_by").list.len().cast(pl.Int64).alias("n_rejections"))
            .select(list(HARD_MEMBERS)))
