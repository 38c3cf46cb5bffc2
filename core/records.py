"""Record schemas shared by every stage: column names and dtypes of the DataFrames stages read and return.

A stage takes polars DataFrames with these columns and returns a `StageResult`. Ids are content hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

SEEDS = {
    "seed_id": pl.Utf8,
    "category": pl.Utf8,
    "seed": pl.Utf8,
    "model": pl.Utf8,
    "template_sha256": pl.Utf8,
    "sample_index": pl.Int64,
}

CANDIDATES = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "category": pl.Utf8,
    "seed_id": pl.Utf8,
    "seed": pl.Utf8,
    "model": pl.Utf8,
    "template_sha256": pl.Utf8,
}

VOTES = {
    "prompt_id": pl.Utf8,
    "moderator": pl.Utf8,
    "model": pl.Utf8,
    "verdict": pl.Utf8,  # toxic | benign
    "vote_category": pl.Utf8,  # one of the categories, or "none"
    "rationale": pl.Utf8,
    "template_sha256": pl.Utf8,
}

# One row per candidate after the vote rule; `decision` is benign | toxic | contested | unjudged.
DECISIONS = {
    "prompt_id": pl.Utf8,
    "n_toxic": pl.Int64,
    "n_benign": pl.Int64,
    "n_missing": pl.Int64,
    "decision": pl.Utf8,
}

# One row per input prompt of a dedup pass; `duplicate_of` and `similarity` are null for kept rows.
DEDUP = {
    "prompt_id": pl.Utf8,
    "kept": pl.Boolean,
    "duplicate_of": pl.Utf8,
    "similarity": pl.Float64,
}

RESPONSES = {
    "prompt_id": pl.Utf8,
    "member": pl.Utf8,
    "model": pl.Utf8,
    "response": pl.Utf8,
    "refusal": pl.Boolean,
    "label": pl.Utf8,  # full_compliance | full_refusal | partial_refusal (XSTest's classes) | null when unknown
    "method": pl.Utf8,  # keyword | judge | failed
}

# One row per generated concept question (SELECT recipe). `kind` is eval | train; the leak_* columns are null until
# dedup.concepts.flag_leaks has compared the question with its concept's siblings and parent.
QUESTIONS = {
    "question_id": pl.Utf8,
    "concept_id": pl.Utf8,
    "question": pl.Utf8,
    "kind": pl.Utf8,
    "ancestor_ids": pl.List(pl.Utf8),
    "model": pl.Utf8,
    "template_sha256": pl.Utf8,
    "sample_index": pl.Int64,
    "leak_flag": pl.Boolean,
    "leak_with": pl.Utf8,
    "leak_similarity": pl.Float64,
}

# SELECT recipe: one row per concept of the tree (core.concepts.ConceptTree.to_frame); `ancestor_ids` nearest first.
CONCEPTS = {
    "concept_id": pl.Utf8,
    "name": pl.Utf8,
    "parent_id": pl.Utf8,  # null for a root
    "depth": pl.Int64,  # root = 0
    "instances": pl.List(pl.Utf8),
    "ancestor_ids": pl.List(pl.Utf8),
}

# SELECT recipe: one row per (target concept, question) a split holds (outputs.concept_splits.select_splits).
SELECT_SPLITS = {
    "target_id": pl.Utf8,
    "split": pl.Utf8,  # abstention | generalization | specificity
    "question_id": pl.Utf8,
    "question": pl.Utf8,
    "concept_id": pl.Utf8,  # the concept the question was written for
    "relation": pl.Utf8,  # self | descendant | sibling | ancestor (of concept_id to target_id)
    "distance": pl.Int64,  # edges on the tree path from target_id to concept_id
    "target_depth": pl.Int64,
    "kind": pl.Utf8,  # eval | train
}

FAILURES = {
    "stage": pl.Utf8,
    "role": pl.Utf8,
    "model": pl.Utf8,
    "item_id": pl.Utf8,
    "reason": pl.Utf8,
}


def empty(schema: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    """Rows to a DataFrame with exactly `schema`'s columns, in order (an empty list gives an empty frame)."""
    return pl.DataFrame(rows, schema=schema) if rows else empty(schema)


@dataclass
class StageResult:
    records: pl.DataFrame
    failures: pl.DataFrame = field(default_factory=lambda: empty(FAILURES))
    notes: dict = field(default_factory=dict)  # stage facts for the manifest, e.g. "calls budget spent"
    # Rows the quality gate took out of `records` (QUALITY_REJECTIONS); None for a stage that is not gated.
    rejected: pl.DataFrame | None = None
    # Rows of `records` whose text the gate's repair step changed (QUALITY_REPAIRS); None for a stage not gated.
    repaired: pl.DataFrame | None = None


# One row per generated text the quality gate (generators.quality.gate) rejected: where it came from, which rule
# rejected it and why. `source` is the text it was made from (a rewrite's seed, a paraphrase's template row), if any.
QUALITY_REJECTIONS = {
    "stage": pl.Utf8,  # seeds | rewrites | questions | paraphrases
    "category": pl.Utf8,  # the category (OR-Bench, ALERT) or concept id (SELECT) the row was written for
    "id": pl.Utf8,  # the row's content-hash id (seed_id, prompt_id, question_id)
    "text": pl.Utf8,
    "source": pl.Utf8,
    "rule": pl.Utf8,  # the first rule the row failed, in generators.quality.RULES order
    "detail": pl.Utf8,
}

# One row per generated text the quality gate's repair step (generators.quality.repair) changed and then kept: the
# model wrapped a real request in numbering, a label, quotes or an ellipsis. `id` is the repaired text's id, the one
# the row goes on with; `duplicate` is true when another kept row already had that id (the row is then kept once).
QUALITY_REPAIRS = {
    "stage": pl.Utf8,
    "category": pl.Utf8,
    "id": pl.Utf8,
    "original_id": pl.Utf8,
    "text": pl.Utf8,  # the repaired text
    "original": pl.Utf8,  # the text as the model wrote it
    "repairs": pl.Utf8,  # what was taken off, in order: "list marker", "label", "quotes", "ellipsis"
    "duplicate": pl.Boolean,
}


# ALERT recipe: prompts read from a user's file (generators.ingest.ingest_prompts), before categorisation.
# `category` is the file's own label when it had one (null otherwise); `source_id` is the file's own id column.
INGESTED = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "category": pl.Utf8,
    "source_id": pl.Utf8,
}

# ALERT recipe: one row per harmful prompt of the base set, whatever made it.
HARMFUL = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "category": pl.Utf8,  # a leaf (micro category) of the taxonomy
    "macro_category": pl.Utf8,  # its top-level ancestor
    "source": pl.Utf8,  # ingested | generated | template | paraphrase
    "categorized_by": pl.Utf8,  # given (the file's label) | keyword | model | generated | template
    "category_rule": pl.Utf8,  # the keyword pattern that matched (keyword rows), else null
    "category_confidence": pl.Float64,  # the classifier's confidence (model rows), else null
    "model": pl.Utf8,  # the model that categorised, generated or paraphrased the row, else null
    "template_id": pl.Utf8,  # the slot template a template or paraphrase row came from, else null
    "template_sha256": pl.Utf8,  # sha256 of the prompt template file the model was given, else null
    "parent_id": pl.Utf8,  # a paraphrase's template row, else null
    "parent_prompt": pl.Utf8,  # that template row's text, else null
}

# ALERT recipe: the safety judges' verdicts on (prompt, target reply) pairs, and their combination per pair.
SAFETY_VERDICTS = {
    "prompt_id": pl.Utf8,
    "model": pl.Utf8,  # the target whose reply was judged
    "judge": pl.Utf8,  # the judge's label
    "verdict": pl.Utf8,  # safe | unsafe | null (judge failed, or no reply to judge)
    "codes": pl.List(pl.Utf8),
    "raw": pl.Utf8,  # the judge's reply (capped); null when it was never asked or the call failed
}
SAFETY_DECISIONS = {
    "prompt_id": pl.Utf8,
    "model": pl.Utf8,
    "n_safe": pl.Int64,
    "n_unsafe": pl.Int64,
    "n_failed": pl.Int64,  # judges with no verdict for this pair
    "verdict": pl.Utf8,  # safe | unsafe | null when no judge gave a verdict
    "codes": pl.List(pl.Utf8),  # union of the codes the unsafe verdicts named, sorted S1..S14
}

# ALERT recipe: adversarial variants of the base prompts, one row per variant.
VARIANTS = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "parent_id": pl.Utf8,
    "category": pl.Utf8,
    "macro_category": pl.Utf8,
    "attack_type": pl.Utf8,
    "template_id": pl.Utf8,
    "template_sha256": pl.Utf8,
    "variant_index": pl.Int64,
}

# OR-Bench recipe: each benign rewrite beside the toxic seed it was written from (outputs.contrast.contrast_pairs).
CONTRAST_PAIRS = {
    "pair_id": pl.Utf8,  # content hash of (prompt_id, seed_id)
    "category": pl.Utf8,
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,  # the benign rewrite
    "seed_id": pl.Utf8,
    "seed": pl.Utf8,  # the toxic seed
}
