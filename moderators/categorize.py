"""Categorising ingested harmful prompts into a taxonomy's leaves: the file's own label when it is a leaf, else
keyword rules, else a model classifier; what fits nowhere is dropped.

Input: core.records.INGESTED. Output records: core.records.HARMFUL (`source` = ingested), one row per prompt kept.
- given: the row's `category` is a leaf of the taxonomy.
- keyword: the rules of exactly one leaf match (`category_rule` is the first pattern of that leaf that matched).
  A prompt whose matches point at two or more leaves is ambiguous and goes to the classifier, like one with none.
- model: the classifier's structured reply `{category, confidence}`; "none", or a confidence below
  `min_confidence`, drops the row. A request that failed drops the row and records a failure.
Notes count each route and each reason a row was dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import BaseModel, Field, create_model

from orforge.core.records import FAILURES, HARMFUL, StageResult, frame
from orforge.core.taxonomy import KeywordRules, Taxonomy
from orforge.core.templates import load_template
from orforge.llm.hub import LLM
from orforge.llm.types import LLMRequest

TEMPLATE = Path(__file__).parent / "templates" / "categorize.md"


def category_model(leaves: list[str]) -> type[BaseModel]:
    """`{category: one of the leaves or "none", confidence: 0..1}`; the enum reaches the decoder's grammar."""
    return create_model("PromptCategory",
                        category=(Literal[tuple(leaves) + ("none",)], ...),  # type: ignore[valid-type]
                        confidence=(float, Field(ge=0.0, le=1.0)))


def keyword_matches(prompt: str, rules: KeywordRules) -> dict[str, str]:
    """Leaf -> the first of its patterns that matches `prompt`, for every leaf with a match (rules' order)."""
    found: dict[str, str] = {}
    for category, patterns in rules.compiled().items():
        for pattern, regex in patterns:
            if regex.search(prompt):
                found[category] = pattern
                break
    return found


def category_listing(taxonomy: Taxonomy) -> str:
    """The leaves with their descriptions, grouped under their top-level category so the model sees the structure."""
    lines = []
    for root in taxonomy.roots():
        leaves = taxonomy.leaves_under(root)
        if leaves == [root]:
            lines.append(f"- {root}: {taxonomy.node(root).description}")
            continue
        lines.append(f"{taxonomy.node(root).name}:")
        lines += [f"- {leaf}: {taxonomy.node(leaf).description}" for leaf in leaves]
    return "\n".join(lines)


def categorize(prompts: pl.DataFrame, taxonomy: Taxonomy, rules: KeywordRules | None, llm: LLM | None,
               min_confidence: float = 0.5, on_progress=None) -> StageResult:
    """Keyword rules first, the classifier (`llm`) for the rest; `llm=None` drops what the rules leave."""
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be within 0 and 1, got {min_confidence}")
    leaves = taxonomy.leaves()
    leaf_set = set(leaves)
    base = {"source": "ingested", "category_rule": None, "category_confidence": None, "model": None,
            "template_id": None, "template_sha256": None, "parent_id": None, "parent_prompt": None}
    counts = {"given": 0, "keyword": 0, "keyword_ambiguous": 0, "model": 0, "unknown_given_category": 0,
              "dropped_none": 0, "dropped_low_confidence": 0, "dropped_no_classifier": 0, "dropped_failed": 0}
    rows, pending = [], []
    for r in prompts.select("prompt_id", "prompt", "category").iter_rows(named=True):
        given = r["category"]
        if given in leaf_set:
            counts["given"] += 1
            rows.append({**base, "prompt_id": r["prompt_id"], "prompt": r["prompt"], "category": given,
                         "macro_category": taxonomy.macro_of(given), "categorized_by": "given"})
            continue
        if given is not None:
            counts["unknown_given_category"] += 1
        matches = keyword_matches(r["prompt"], rules) if rules is not None else {}
        if len(matches) == 1:
            (category, pattern), = matches.items()
            counts["keyword"] += 1
            rows.append({**base, "prompt_id": r["prompt_id"], "prompt": r["prompt"], "category": category,
                         "macro_category": taxonomy.macro_of(category), "categorized_by": "keyword",
                         "category_rule": pattern})
            continue
        counts["keyword_ambiguous"] += len(matches) > 1
        pending.append(r)

    failures = []
    if pending and llm is None:
        counts["dropped_no_classifier"] = len(pending)
    elif pending:
        template = load_template(TEMPLATE)
        response_model = category_model(leaves)
        listing = category_listing(taxonomy)
        by_id = {r["prompt_id"]: r for r in pending}
        requests = []
        for r in pending:
            system, user = template.render(categories=listing, prompt=r["prompt"])
            requests.append(LLMRequest.chat(user, system=system, response_model=response_model,
                                            item_id=r["prompt_id"]))
        for res in llm.generate(requests, on_progress):
            if not res.ok:
                counts["dropped_failed"] += 1
                failures.append({"stage": "categorize", "role": llm.role, "model": llm.label,
                                 "item_id": res.request.item_id, "reason": res.error})
                continue
            reply = res.parsed
            if reply.category == "none":
                counts["dropped_none"] += 1
                continue
            if reply.confidence < min_confidence:
                counts["dropped_low_confidence"] += 1
                continue
            counts["model"] += 1
            r = by_id[res.request.item_id]
            rows.append({**base, "prompt_id": r["prompt_id"], "prompt": r["prompt"], "category": reply.category,
                         "macro_category": taxonomy.macro_of(reply.category), "categorized_by": "model",
                         "category_confidence": float(reply.confidence), "model": llm.label,
                         "template_sha256": template.sha256})
    order = {pid: i for i, pid in enumerate(prompts["prompt_id"].to_list())}
    rows.sort(key=lambda row: order[row["prompt_id"]])  # input order, whichever route a row took
    return StageResult(frame(rows, HARMFUL), frame(failures, FAILURES), {"categorize": counts})
