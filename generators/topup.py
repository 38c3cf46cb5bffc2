"""Topping up thin categories of a harmful set: slot templates expanded deterministically for a seed up to a minimum
per category, then each expansion paraphrased by a model so the added rows do not all read alike.

Input: core.records.HARMFUL (the rows so far; only `category` and `prompt` are read), the categories in scope, the
slot templates (core.slot_templates). Output records: core.records.HARMFUL, only the rows added:
- with a paraphrase model, `source` = paraphrase, `parent_id`/`parent_prompt` = the template row it rewrote;
- without one, `source` = template (the filled-in text itself).
Both carry `template_id`, `categorized_by` = template. A category whose templates cannot make enough distinct
prompts, or whose paraphrases failed, is noted in `topup_shortfall`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import polars as pl
from pydantic import StringConstraints, create_model

from orforge.core.config import stable_hash
from orforge.core.records import FAILURES, HARMFUL, StageResult, frame
from orforge.core.slot_templates import SlotTemplate, check_slot_templates
from orforge.core.taxonomy import Taxonomy
from orforge.core.templates import load_template, normalize
from orforge.generators.ingest import harmful_prompt_id
from orforge.llm.hub import LLM
from orforge.llm.types import LLMRequest

TEMPLATE = Path(__file__).parent / "templates" / "paraphrase.md"
# Above this many possible expansions of a category, a seeded sample of indices is drawn instead of a full shuffle.
FULL_SHUFFLE_LIMIT = 100_000

ParaphraseText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=400)]
Paraphrase = create_model("Paraphrase", paraphrase=(ParaphraseText, ...))


def expand_templates(templates: list[SlotTemplate], category: str, needed: int, seed: int,
                     taken: set[str] | None = None) -> list[tuple[str, str]]:
    """Up to `needed` distinct (template id, prompt) expansions of `category`'s templates, in a seeded order that
    depends only on the seed, the category and the templates. Prompts whose `normalize` key is in `taken` (the rows
    the category already has) are skipped; `taken` is not modified."""
    own = [t for t in templates if t.category == category]
    total = sum(t.size() for t in own)
    if needed <= 0 or total == 0:
        return []
    rng = random.Random(int(stable_hash(["topup", seed, category, [t.model_dump() for t in own]]), 16))
    if total <= FULL_SHUFFLE_LIMIT:
        order = list(range(total))
        rng.shuffle(order)
    else:  # a sample large enough that collisions with existing prompts rarely leave a gap
        order = rng.sample(range(total), min(total, 4 * needed + 100))
    starts, start = [], 0
    for t in own:
        starts.append(start)
        start += t.size()
    seen = set(taken or ())
    out: list[tuple[str, str]] = []
    for index in order:
        which = max(i for i, s in enumerate(starts) if s <= index)
        text = own[which].fill(index - starts[which])
        key = normalize(text)
        if key in seen:
            continue
        seen.add(key)
        out.append((own[which].id, text))
        if len(out) == needed:
            break
    return out


def top_up(harmful: pl.DataFrame, categories: list[str], templates: list[SlotTemplate], taxonomy: Taxonomy,
           minimum: int, seed: int, llm: LLM | None, on_progress=None) -> StageResult:
    """Rows added so that every category in `categories` has at least `minimum` (existing + added)."""
    check_slot_templates(templates, taxonomy, "top-up")
    template = load_template(TEMPLATE)
    existing = harmful.group_by("category").agg(pl.col("prompt")) if harmful.height else None
    prompts_of = {r["category"]: r["prompt"] for r in existing.iter_rows(named=True)} if existing is not None else {}
    taken_all = {normalize(p) for ps in prompts_of.values() for p in ps}
    base = {"categorized_by": "template", "category_rule": None, "category_confidence": None}
    rows, failures, shortfall, requests, made = [], [], {}, [], []
    for category in categories:
        have = len(prompts_of.get(category, []))
        needed = minimum - have
        if needed <= 0:
            continue
        expansions = expand_templates(templates, category, needed, seed, {normalize(p) for p in prompts_of.get(
            category, [])})
        for template_id, text in expansions:
            made.append({**base, "prompt_id": harmful_prompt_id(text), "prompt": text, "category": category,
                         "macro_category": taxonomy.macro_of(category), "source": "template", "model": None,
                         "template_id": template_id, "template_sha256": None, "parent_id": None,
                         "parent_prompt": None})
        if len(expansions) < needed:
            shortfall[category] = {"wanted": minimum, "had": have, "templates_made": len(expansions)}
    if llm is None:
        rows = made
    else:
        by_id = {m["prompt_id"]: m for m in made}
        for m in made:
            node = taxonomy.node(m["category"])
            system, user = template.render(category=m["category"], description=node.description, prompt=m["prompt"])
            requests.append(LLMRequest.chat(user, system=system, response_model=Paraphrase, item_id=m["prompt_id"]))
        kept = {}
        for res in llm.generate(requests, on_progress):
            parent = by_id[res.request.item_id]
            if not res.ok:
                failures.append({"stage": "topup", "role": llm.role, "model": llm.label,
                                 "item_id": res.request.item_id, "reason": res.error})
                continue
            text = res.parsed.paraphrase
            key = normalize(text)
            if key in taken_all or key in kept:  # a paraphrase that lands on a prompt already in the set adds nothing
                continue
            kept[key] = {**parent, "prompt_id": harmful_prompt_id(text), "prompt": text, "source": "paraphrase",
                         "model": llm.label, "template_sha256": template.sha256, "parent_id": parent["prompt_id"],
                         "parent_prompt": parent["prompt"]}
        position = {m["prompt_id"]: i for i, m in enumerate(made)}
        rows = sorted(kept.values(), key=lambda r: position[r["parent_id"]])
        for category in categories:
            got = sum(r["category"] == category for r in rows)
            have = len(prompts_of.get(category, []))
            if have + got < minimum:
                shortfall.setdefault(category, {"wanted": minimum, "had": have,
                                                "templates_made": sum(m["category"] == category for m in made)})
                shortfall[category]["paraphrased"] = got
    notes = {"topup_shortfall": shortfall} if shortfall else {}
    return StageResult(frame(rows, HARMFUL), frame(failures, FAILURES), notes)
