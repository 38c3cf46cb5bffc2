"""Concept questions (SELECT recipe): per concept, ask a generator model for everyday questions about it, written
with the concept's ancestors as context, until enough distinct ones exist for the evaluation and training sets.

Input: one row per concept (`concept_id`, `name`, `parent_id`, `depth`, `instances`, `ancestor_ids`) and a mapping
concept_id -> ancestor names, root first. Output: core.records.QUESTIONS, with the leak_* columns null (the leak
check runs later, in dedup/concepts.py).

The first `eval_per_concept` distinct questions a concept gets are `eval`, the next `train_per_concept` are `train`:
replies come back in request order and each call has its own sample index, so the split is the same on every run
that gets the same replies. Exact duplicates (after `core.templates.normalize`) are dropped; near duplicates are
left to `dedup.concepts.dedup_within`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import polars as pl
from pydantic import BaseModel, Field, StringConstraints, create_model

from orforge.core.config import stable_hash
from orforge.core.records import FAILURES, QUESTIONS, StageResult, frame
from orforge.core.templates import load_template, normalize
from orforge.llm.hub import LLM
from orforge.llm.types import LLMRequest

TEMPLATE = Path(__file__).parent / "templates" / "questions.md"
QuestionText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=300)]
# Sibling names in the prompt keep questions on their own concept; a handful is enough and keeps prompts short.
MAX_NAMED_NEIGHBOURS = 8
MAX_NAMED_INSTANCES = 5


class QuestionCounts(Protocol):
    """What the stage reads from its config (the SELECT `QuestionsConfig` has these fields)."""

    eval_per_concept: int
    train_per_concept: int
    per_call: int


@dataclass(frozen=True)
class QuestionPlan:
    """Plain counts, for callers without a config object. `max_calls_per_concept=None`: 3 x the calls needed."""

    eval_per_concept: int = 30
    train_per_concept: int = 20
    per_call: int = 10
    max_calls_per_concept: int | None = None


def question_list_model(max_items: int) -> type[BaseModel]:
    """`{"questions": [str, ...]}` with at most `max_items` entries (the bound reaches the decoder's grammar)."""
    return create_model("ConceptQuestions", questions=(list[QuestionText], Field(min_length=1, max_length=max_items)))


def question_call_budget(spec: QuestionCounts) -> int:
    wanted = spec.eval_per_concept + spec.train_per_concept
    return getattr(spec, "max_calls_per_concept", None) or 3 * math.ceil(wanted / spec.per_call)


def question_id(concept_id: str, text: str) -> str:
    return stable_hash(["question", concept_id, normalize(text)])


def _prompt_parts(concept: dict, context: list[str], siblings: list[str], count: int) -> dict[str, str]:
    path = " > ".join([*context, concept["name"]])
    instances = concept.get("instances") or []
    instance_text = ("Some well-known examples of " + concept["name"] + ": "
                     + ", ".join(instances[:MAX_NAMED_INSTANCES]) + ".\n" if instances else "")
    avoid = ("Neighbouring topics the questions must not be about: " + ", ".join(siblings[:MAX_NAMED_NEIGHBOURS])
             + ".\n" if siblings else "")
    return {"name": concept["name"], "path": path, "context": ", ".join(context) if context else "general knowledge",
            "instances": instance_text, "avoid": avoid, "count": str(count)}


def generate_questions(concepts: pl.DataFrame, context: dict[str, list[str]], spec: QuestionCounts, llm: LLM,
                       on_progress=None) -> StageResult:
    """`eval_per_concept + train_per_concept` distinct questions per concept, or fewer when the call budget runs out
    (then `notes["question_budget_exhausted"][concept_id]` says how many it got). Each wave sends one call per
    concept still short, for all concepts in one batch, so the endpoint's concurrency is used across concepts."""
    missing = {"concept_id", "name", "parent_id", "ancestor_ids"} - set(concepts.columns)
    if missing:
        raise ValueError(f"generate_questions needs concept columns {sorted(missing)}")
    for field_name in ("eval_per_concept", "train_per_concept", "per_call"):
        if getattr(spec, field_name) < (1 if field_name == "per_call" else 0):
            raise ValueError(f"{field_name} must be positive, got {getattr(spec, field_name)}")
    template = load_template(TEMPLATE)
    response_model = question_list_model(spec.per_call)
    wanted = spec.eval_per_concept + spec.train_per_concept
    budget = question_call_budget(spec)

    rows_in = concepts.to_dicts()
    names_by_parent: dict[str | None, list[str]] = {}
    for c in rows_in:
        names_by_parent.setdefault(c["parent_id"], []).append(c["name"])
    prompts: dict[str, tuple[str, str]] = {}
    for c in rows_in:
        siblings = [n for n in names_by_parent[c["parent_id"]] if n != c["name"]]
        prompts[c["concept_id"]] = template.render(
            **_prompt_parts(c, list(context.get(c["concept_id"], [])), siblings, spec.per_call))

    kept: dict[str, list[tuple[str, int]]] = {c["concept_id"]: [] for c in rows_in}
    seen: dict[str, set[str]] = {c["concept_id"]: set() for c in rows_in}
    calls: dict[str, int] = {c["concept_id"]: 0 for c in rows_in}
    failures: list[dict] = []
    while True:
        requests = []
        for cid in kept:
            gap = wanted - len(kept[cid])
            if gap <= 0 or calls[cid] >= budget:
                continue
            # As many calls as would fill the gap if each delivered in full; each has its own sample index.
            wave = min(math.ceil(gap / spec.per_call), budget - calls[cid])
            system, user = prompts[cid]
            requests += [LLMRequest.chat(user, system=system, response_model=response_model,
                                         sample_index=calls[cid] + i, item_id=f"{cid}#{calls[cid] + i}")
                         for i in range(wave)]
            calls[cid] += wave
        if not requests:
            break
        for res in llm.generate(requests, on_progress):
            cid = res.request.item_id.rsplit("#", 1)[0]
            if not res.ok:
                failures.append({"stage": "questions", "role": llm.role, "model": llm.label,
                                 "item_id": res.request.item_id, "reason": res.error})
                continue
            for text in res.parsed.questions:
                key = normalize(text)
                if key and key not in seen[cid] and len(kept[cid]) < wanted:
                    seen[cid].add(key)
                    kept[cid].append((text, res.request.sample_index))

    rows, exhausted = [], {}
    for c in rows_in:
        cid = c["concept_id"]
        if len(kept[cid]) < wanted:
            exhausted[cid] = {"wanted": wanted, "got": len(kept[cid]), "calls": calls[cid]}
        for position, (text, sample_index) in enumerate(kept[cid]):
            rows.append({"question_id": question_id(cid, text), "concept_id": cid, "question": text,
                         "kind": "eval" if position < spec.eval_per_concept else "train",
                         "ancestor_ids": list(c["ancestor_ids"] or []), "model": llm.label,
                         "template_sha256": template.sha256, "sample_index": sample_index,
                         "leak_flag": None, "leak_with": None, "leak_similarity": None})
    notes = {"question_calls": sum(calls.values())}
    if exhausted:
        notes["question_budget_exhausted"] = exhausted
    return StageResult(frame(rows, QUESTIONS), frame(failures, FAILURES), notes)
