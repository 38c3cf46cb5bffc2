"""Rewrites: each toxic seed becomes `rewrites_per_seed` prompts that look harmful but can be answered harmlessly.

Input: core.records.SEEDS. Output: core.records.CANDIDATES, one row per distinct rewrite (exact duplicates within a
category, after normalisation, are kept once: the first in seed order).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from orforge.core.config import RewritesConfig, stable_hash
from orforge.core.records import CANDIDATES, FAILURES, StageResult, frame
from orforge.core.templates import load_template, normalize
from orforge.generators.seeds import prompt_list_model
from orforge.llm.hub import LLM
from orforge.llm.types import LLMRequest

TEMPLATE = Path(__file__).parent / "templates" / "rewrite.md"


def prompt_id(category: str, text: str) -> str:
    """A rewrite's content-hash id: the same text (after normalisation) in the same category is the same prompt."""
    return stable_hash(["prompt", category, normalize(text)])


def rewrite(seeds: pl.DataFrame, spec: RewritesConfig, llm: LLM, on_progress=None) -> StageResult:
    template = load_template(TEMPLATE)
    response_model = prompt_list_model("Rewrites", spec.rewrites_per_seed)
    seed_rows = list(seeds.iter_rows(named=True))
    requests = []
    for s in seed_rows:
        system, user = template.render(category=s["category"], seed=s["seed"], count=spec.rewrites_per_seed)
        requests.append(LLMRequest.chat(user, system=system, response_model=response_model, item_id=s["seed_id"]))
    rows, failures, seen = [], [], set()
    for s, res in zip(seed_rows, llm.generate(requests, on_progress)):
        if not res.ok:
            failures.append({"stage": "rewrites", "role": llm.role, "model": llm.label, "item_id": s["seed_id"],
                             "reason": res.error})
            continue
        for text in res.parsed.prompts:  # the schema caps the list at rewrites_per_seed
            pid = prompt_id(s["category"], text)
            if pid in seen:
                continue
            seen.add(pid)
            rows.append({"prompt_id": pid, "prompt": text, "category": s["category"], "seed_id": s["seed_id"],
                         "seed": s["seed"], "model": llm.label, "template_sha256": template.sha256})
    return StageResult(frame(rows, CANDIDATES), frame(failures, FAILURES))
