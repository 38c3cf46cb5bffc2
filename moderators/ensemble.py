"""The moderator ensemble: every configured moderator judges every candidate; a vote rule turns votes into decisions.

`moderate` input: core.records.CANDIDATES; output records: core.records.VOTES (one row per candidate x moderator that
answered; a moderator that failed gives no row and a failure instead, so its vote counts as missing, never benign).
`decide` turns votes into core.records.DECISIONS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import BaseModel, Field, create_model

from orforge.core.config import AtLeast, CategorySpec
from orforge.core.records import DECISIONS, FAILURES, VOTES, StageResult, frame
from orforge.core.templates import load_template
from orforge.llm.hub import LLM, generate_together
from orforge.llm.types import LLMRequest

TEMPLATE = Path(__file__).parent / "templates" / "moderate.md"
VoteRule = Literal["majority", "unanimous"] | AtLeast


def verdict_model(categories: list[str], explain: bool) -> type[BaseModel]:
    """`{rationale?, verdict, category}`; with `explain` the rationale comes first so it is written before the verdict."""
    fields: dict = {}
    if explain:
        fields["rationale"] = (str, Field(max_length=600, description="One or two sentences of reasoning."))
    fields["verdict"] = (Literal["toxic", "benign"], ...)
    fields["category"] = (Literal[tuple(categories) + ("none",)], ...)  # type: ignore[valid-type]
    return create_model("ModerationVerdict", **fields)


def moderation_request(prompt: str, prompt_id: str, categories: list[CategorySpec], explain: bool,
                       response_model: type[BaseModel]) -> LLMRequest:
    template = load_template(TEMPLATE)
    listing = "\n".join(f"- {c.name}: {c.description}" for c in categories)
    fmt = ('Reply as JSON with three keys: "rationale" (one or two sentences), "verdict" (benign or toxic) and '
           '"category" (a category name, or none).' if explain else
           'Reply as JSON with two keys: "verdict" (benign or toxic) and "category" (a category name, or none).')
    system, user = template.render(categories=listing, prompt=prompt, answer_format=fmt)
    return LLMRequest.chat(user, system=system, response_model=response_model, item_id=prompt_id)


def moderate(candidates: pl.DataFrame, categories: list[CategorySpec], moderators: list[LLM], explain: bool = False,
             on_progress=None) -> StageResult:
    template = load_template(TEMPLATE)
    response_model = verdict_model([c.name for c in categories], explain)
    requests = [moderation_request(r["prompt"], r["prompt_id"], categories, explain, response_model)
                for r in candidates.select("prompt_id", "prompt").iter_rows(named=True)]
    votes, failures = [], []
    # Every moderator at once, so a shared endpoint stays full; rows still come in moderator order, then request order.
    answers = generate_together([(mod, requests) for mod in moderators], on_progress)
    for mod, results in zip(moderators, answers, strict=True):
        for res in results:
            if not res.ok:
                failures.append({"stage": "moderation", "role": mod.role, "model": mod.label,
                                 "item_id": res.request.item_id, "reason": res.error})
                continue
            v = res.parsed
            votes.append({"prompt_id": res.request.item_id, "moderator": mod.label, "model": mod.spec.model,
                          "verdict": v.verdict, "vote_category": v.category,
                          "rationale": getattr(v, "rationale", None), "template_sha256": template.sha256})
    return StageResult(frame(votes, VOTES), frame(failures, FAILURES))


def decide_one(n_toxic: int, n_benign: int, n_moderators: int, rule: VoteRule) -> str:
    """benign | toxic | contested | unjudged for one candidate. Missing votes count for neither side."""
    if n_toxic + n_benign == 0:
        return "unjudged"
    if rule == "majority":
        if 2 * n_toxic > n_moderators:
            return "toxic"
        if 2 * n_benign > n_moderators:
            return "benign"
        return "contested"
    if rule == "unanimous":
        if n_toxic == n_moderators:
            return "toxic"
        if n_benign == n_moderators:
            return "benign"
        return "contested"
    # at_least k: k toxic votes flag it (safety first); otherwise k benign votes clear it, but only when the missing
    # votes could not have reached k toxic ones (with k=1 of 3, one benign vote and two failures clear nothing).
    n_missing = n_moderators - n_toxic - n_benign
    if n_toxic >= rule.at_least:
        return "toxic"
    if n_benign >= rule.at_least and n_toxic + n_missing < rule.at_least:
        return "benign"
    return "contested"


def decide(candidates: pl.DataFrame, votes: pl.DataFrame, n_moderators: int, rule: VoteRule) -> pl.DataFrame:
    counts = (votes.group_by("prompt_id")
              .agg((pl.col("verdict") == "toxic").sum().alias("n_toxic"),
                   (pl.col("verdict") == "benign").sum().alias("n_benign")))
    joined = (candidates.select("prompt_id").join(counts, on="prompt_id", how="left")
              .with_columns(pl.col("n_toxic").fill_null(0).cast(pl.Int64), pl.col("n_benign").fill_null(0).cast(pl.Int64)))
    rows = [{"prompt_id": r["prompt_id"], "n_toxic": r["n_toxic"], "n_benign": r["n_benign"],
             "n_missing": n_moderators - r["n_toxic"] - r["n_benign"],
             "decision": decide_one(r["n_toxic"], r["n_benign"], n_moderators, rule)}
            for r in joined.iter_rows(named=True)]
    return frame(rows, DECISIONS)
