"""Abstention techniques (SELECT recipe): how a (target concept, question) pair becomes the chat sent to a target
model. Each technique is registered by name:

- `none`: the question alone (the baseline: how often the model declines without being asked to).
- `instructed`: a system message telling the model to reply with the fixed token (`phrase`) on any question about
  the target concept, its sub-kinds and its instances, and to answer everything else.
- `instructed_fewshot`: the same instruction, then worked exchanges from the target's own neighbourhood before the
  real question: the token for a question about the target and one about a descendant; an answer for a sibling, an
  ancestor and one unrelated concept (another root's subtree when there is one). A relation the target lacks
  (a root has no ancestor, a leaf no descendant) is left out.

Examples come only from the *train* questions (`kind == "train"` when the column is there), so an evaluation
question never appears as an example; a request whose own question would be one of its examples drops that
example. Answers shown for the answer examples come from `answers` (question_id -> text) when given, else
`ANSWER_MARKER`, a neutral stand-in that shows "answer normally" without teaching any facts or style.

The examples are chosen once per (seed, target), so every question of a target sees the same exchanges, and each
request carries `sample_index=seed`, so seeds are also separate samples in the cache.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from orforge.core.config import stable_hash
from orforge.core.templates import load_template
from orforge.llm.types import LLMRequest

TEMPLATES = Path(__file__).parent / "templates"
# What an answer example says when no real answer is supplied: plainly a stand-in, and nothing like the token.
ANSWER_MARKER = "[A complete, helpful answer to this question.]"

ABSTAIN_RELATIONS = ("target", "descendant")
ANSWER_RELATIONS = ("sibling", "ancestor", "unrelated")


@dataclass(frozen=True)
class Example:
    relation: str  # target | descendant | sibling | ancestor | unrelated
    concept_id: str
    question_id: str
    question: str
    reply: str


@dataclass(frozen=True)
class Technique:
    name: str
    template: Path | None  # None: no instruction (the baseline)
    uses_examples: bool


_TECHNIQUES: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    _TECHNIQUES[technique.name] = technique
    return technique


register(Technique("none", None, False))
register(Technique("instructed", TEMPLATES / "technique_instructed.md", False))
register(Technique("instructed_fewshot", TEMPLATES / "technique_instructed_fewshot.md", True))


def techniques() -> tuple[str, ...]:
    return tuple(_TECHNIQUES)


def technique(name: str) -> Technique:
    if name not in _TECHNIQUES:
        raise ValueError(f"unknown technique {name!r}; known: {', '.join(_TECHNIQUES)}")
    return _TECHNIQUES[name]


def technique_template_sha256(name: str) -> str | None:
    """The sha256 of the technique's template file (None for `none`), for the evaluation's lineage."""
    t = technique(name)
    return load_template(t.template).sha256 if t.template else None


def concept_path(tree: Any, concept_id: str) -> str:
    context = list(tree.context_names(concept_id))
    return "within " + " > ".join(context) if context else "a top-level topic"


def _train_pool(train_questions: pl.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """concept_id -> [(question_id, question)] sorted by question_id, so the pick ignores the frame's row order."""
    for col in ("question_id", "concept_id", "question"):
        if col not in train_questions.columns:
            raise ValueError(f"train questions need a {col!r} column")
    train = train_questions.filter(pl.col("kind") == "train") if "kind" in train_questions.columns \
        else train_questions
    pool: dict[str, list[tuple[str, str]]] = {}
    for row in train.sort("question_id").iter_rows(named=True):
        pool.setdefault(row["concept_id"], []).append((row["question_id"], row["question"]))
    return pool


def fewshot_examples(tree: Any, target_id: str, pool: dict[str, list[tuple[str, str]]], phrase: str, seed: int,
                     answers: dict[str, str] | None = None) -> list[Example]:
    """The worked exchanges for one target, in the order they are shown (shuffled, deterministic for the seed)."""
    rng = random.Random(int(stable_hash(["fewshot", seed, target_id]), 16))
    ancestors = list(tree.ancestors(target_id))
    descendants = list(tree.descendants(target_id))
    siblings = list(tree.siblings(target_id))
    near = {target_id, *ancestors, *descendants, *siblings}
    own_root = ([target_id, *ancestors])[-1]
    others = [c for c in tree.ids() if c not in near and pool.get(c)]
    # Unrelated: another root's subtree when there is one, else anything outside the neighbourhood.
    far = [c for c in others if ([c, *tree.ancestors(c)])[-1] != own_root] or others
    candidates = {"target": [target_id], "descendant": descendants, "sibling": siblings, "ancestor": ancestors,
                  "unrelated": far}
    examples = []
    for relation in (*ABSTAIN_RELATIONS, *ANSWER_RELATIONS):
        with_questions = [c for c in candidates[relation] if pool.get(c)]
        if not with_questions:
            continue
        concept_id = rng.choice(with_questions)
        question_id, question = rng.choice(pool[concept_id])
        reply = phrase if relation in ABSTAIN_RELATIONS else (answers or {}).get(question_id, ANSWER_MARKER)
        examples.append(Example(relation, concept_id, question_id, question, reply))
    rng.shuffle(examples)
    return examples


def technique_messages(name: str, tree: Any, target_id: str, question: str, phrase: str,
                       examples: Sequence[Example] = ()) -> tuple[dict[str, str], ...]:
    t = technique(name)
    if t.template is None:
        return ({"role": "user", "content": question},)
    template = load_template(t.template)
    system, user = template.render(name=tree.get(target_id).name, path=concept_path(tree, target_id), phrase=phrase,
                                   question=question)
    turns = [{"role": "system", "content": system}]
    for ex in examples if t.uses_examples else ():
        turns += [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.reply}]
    return (*turns, {"role": "user", "content": user})


def technique_requests(splits: pl.DataFrame, technique_name: str, tree: Any, train_questions: pl.DataFrame,
                       phrase: str, seed: int, answers: dict[str, str] | None = None) -> list[LLMRequest]:
    """One request per split row (`target_id`, `question_id`, `question`), in row order, with item_id
    `<target_id>/<question_id>` and sample_index `seed`."""
    t = technique(technique_name)
    if not phrase or not phrase.strip():
        raise ValueError("the abstention phrase must not be empty")
    for col in ("target_id", "question_id", "question"):
        if col not in splits.columns:
            raise ValueError(f"splits need a {col!r} column")
    pool = _train_pool(train_questions) if t.uses_examples else {}
    by_target: dict[str, list[Example]] = {}
    requests = []
    for row in splits.iter_rows(named=True):
        target_id = row["target_id"]
        examples: list[Example] = []
        if t.uses_examples:
            if target_id not in by_target:
                by_target[target_id] = fewshot_examples(tree, target_id, pool, phrase, seed, answers)
            examples = [e for e in by_target[target_id]
                        if e.question_id != row["question_id"] and e.question != row["question"]]
        messages = technique_messages(technique_name, tree, target_id, row["question"], phrase, examples)
        requests.append(LLMRequest(messages, sample_index=seed, item_id=f"{target_id}/{row['question_id']}"))
    return requests

