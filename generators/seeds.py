"""Toxic seeds: per category, ask a generator model for prompts it should refuse, until enough distinct ones exist.

Input: one row per category (`category`, `description`, `examples`: list of str). Output: core.records.SEEDS.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import polars as pl
from pydantic import BaseModel, Field, StringConstraints, create_model

from orforge.core.config import SeedsConfig, stable_hash
from orforge.core.records import FAILURES, SEEDS, StageResult, frame
from orforge.core.templates import load_template, normalize
from orforge.llm.hub import LLM
from orforge.llm.types import LLMRequest

TEMPLATE = Path(__file__).parent / "templates" / "seeds.md"
PromptText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=400)]


def prompt_list_model(name: str, max_items: int) -> type[BaseModel]:
    """`{"prompts": [str, ...]}` with at most `max_items` entries (the bound also reaches the decoder's grammar)."""
    return create_model(name, prompts=(list[PromptText], Field(min_length=1, max_length=max_items)))


def seed_id(category: str, text: str) -> str:
    """A seed's content-hash id: the same text (after normalisation) in the same category is the same seed."""
    return stable_hash(["seed", category, normalize(text)])


def call_budget(spec: SeedsConfig) -> int:
    return spec.max_calls_per_category or 3 * math.ceil(spec.seeds_per_category / spec.seeds_per_call)


def generate_seeds(categories: pl.DataFrame, spec: SeedsConfig, llm: LLM, on_progress=None) -> StageResult:
    template = load_template(TEMPLATE)
    response_model = prompt_list_model("SeedPrompts", spec.seeds_per_call)
    budget = call_budget(spec)
    rows, failures, exhausted = [], [], {}
    for cat in categories.iter_rows(named=True):
        examples = cat.get("examples") or []
        example_text = ("Examples of the kind of request meant:\n" + "\n".join(f"- {e}" for e in examples) + "\n"
                        if examples else "")
        system, user = template.render(category=cat["category"], description=cat["description"],
                                       examples=example_text, count=spec.seeds_per_call)
        seen: set[str] = set()
        kept: list[tuple[str, int]] = []
        calls = 0
        while len(kept) < spec.seeds_per_category and calls < budget:
            # Ask for as many calls as would fill the gap if each delivered in full; each has its own sample index.
            wave = min(math.ceil((spec.seeds_per_category - len(kept)) / spec.seeds_per_call), budget - calls)
            requests = [LLMRequest.chat(user, system=system, response_model=response_model, sample_index=calls + i,
                                        item_id=f"{cat['category']}#{calls + i}") for i in range(wave)]
            calls += wave
            for res in llm.generate(requests, on_progress):
                if not res.ok:
                    failures.append({"stage": "seeds", "role": llm.role, "model": llm.label,
                                     "item_id": res.request.item_id, "reason": res.error})
                    continue
                for text in res.parsed.prompts:
                    key = normalize(text)
                    if key and key not in seen and len(kept) < spec.seeds_per_category:
                        seen.add(key)
                        kept.append((text, res.request.sample_index))
        if len(kept) < spec.seeds_per_category:
            exhausted[cat["category"]] = {"wanted": spec.seeds_per_category, "got": len(kept), "calls": calls}
        for text, sample_index in kept:
            rows.append({"seed_id": seed_id(cat["category"], text),
                         "category": cat["category"], "seed": text, "model": llm.label,
                         "template_sha256": template.sha256, "sample_index": sample_index})
    notes = {"seed_budget_exhausted": exhausted} if exhausted else {}
    return StageResult(frame(rows, SEEDS), frame(failures, FAILURES), notes)


def seeds_from_file(ingested: pl.DataFrame, source: str, source_sha256: str) -> pl.DataFrame:
    """Seeds a user brought (core.records.INGESTED rows, every one with a category) as core.records.SEEDS rows.

    The id is the one a generated seed with the same text and category gets, so a seed that is both in the file and
    generated is kept once. `model` says where it came from (`file:<name>`), `template_sha256` carries the file's
    sha256 (what produced the row), `sample_index` its position among the file's seeds.
    """
    rows = [{"seed_id": seed_id(r["category"], r["prompt"]), "category": r["category"],
             "seed": r["prompt"], "model": f"file:{source}", "template_sha256": source_sha256, "sample_index": i}
            for i, r in enumerate(ingested.iter_rows(named=True))]
    return frame(rows, SEEDS).unique("seed_id", keep="first", maintain_order=True)
