"""`orforge plan`: what a build will send, before anything is sent.

Each recipe lists its model stages as `Planned` rows: a count of requests (expected, and an upper bound), a
sample of the requests themselves and the reply size to expect. The requests are the stages' own: every stage
function is run on representative inputs with a `RecordingModel`, which keeps what it is asked and answers nothing
(each request comes back failed), so the rendered templates, schemas and call budgets are exactly those of a build
and no model is started, no request sent and nothing written. A stage that asks again until it has enough (seeds,
questions) shows its whole call budget that way: the upper bound.

Tokens are estimated, not counted: every message is `ceil(characters / 4) + 4` tokens (the spec's system prompt and,
for `structured_output: none`, the schema text included, as the hub adds them). Texts a model writes and a later
stage reads (a seed, a rewrite, a question) are stood in for by a `REPRESENTATIVE_PROMPT_CHARS`-character text. The
expected reply is the JSON (or answer) a stage asks for, at that size, capped at `max_tokens`; the upper bound is
`max_tokens` for every request. Costs are tokens x the spec's `price` (per million).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from rich.table import Table

from orforge.core.config import ModelSpec, RecipeConfig
from orforge.llm.dialects import schema_instruction
from orforge.llm.hub import response_schema
from orforge.llm.types import LLMRequest, LLMResult

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # role markers and separators around each message
REPRESENTATIVE_PROMPT_CHARS = 120  # a generated prompt, seed, rewrite or question (the schemas allow 8-400)
FREE_ANSWER_TOKENS = 300  # a free-text answer (a panel member's reply), before the cap of max_tokens
TOKEN_RULE = (f"tokens ~ characters / {CHARS_PER_TOKEN} + {TOKENS_PER_MESSAGE} per message; a generated text is "
              f"taken as {REPRESENTATIVE_PROMPT_CHARS} characters, a free answer as {FREE_ANSWER_TOKENS} tokens; "
              "'up to' = every budgeted call made, each reply at max_tokens")


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def representative_text(kind: str = "prompt", chars: int = REPRESENTATIVE_PROMPT_CHARS) -> str:
    """A stand-in of `chars` characters for a text a model will write."""
    words = f"a representative {kind} of typical length, written by a model for the next stage of the build; "
    return (words * (chars // len(words) + 1))[:chars].rstrip()


class RecordingHub:
    """Stands in for the `LLMHub` of `llm.hub.generate_together` while planning: each model records its own job."""

    def generate_together(self, jobs: list[tuple[RecordingModel, list[LLMRequest]]], on_progress=None
                          ) -> list[list[LLMResult]]:
        return [model.generate(requests, on_progress) for model, requests in jobs]


class RecordingModel:
    """Stands in for an `llm.hub.LLM` while planning: keeps every request a stage makes and sends none (each comes
    back failed, so a stage that asks again shows its whole call budget)."""

    hub = RecordingHub()  # one for every stand-in, so a stage may ask several of them together

    def __init__(self, spec: ModelSpec, role: str):
        self.spec, self.role = spec, role
        self.requests: list[LLMRequest] = []

    @property
    def label(self) -> str:
        return self.spec.label

    def generate(self, requests: list[LLMRequest], on_progress=None) -> list[LLMResult]:
        self.requests += requests
        return [LLMResult(r, False, error="planned: not sent") for r in requests]


def request_tokens(spec: ModelSpec, request: LLMRequest) -> int:
    """Estimated prompt tokens of one request as the hub sends it for `spec` (system prompt, schema as text)."""
    contents = [m["content"] for m in request.messages]
    if spec.system_prompt:
        if request.messages and request.messages[0]["role"] == "system":
            contents[0] = spec.system_prompt + "\n\n" + contents[0]
        else:
            contents.insert(0, spec.system_prompt)
    if request.response_model is not None and spec.dialect == "none":
        contents[-1] += schema_instruction(response_schema(request.response_model))
    return sum(estimate_tokens(c) + TOKENS_PER_MESSAGE for c in contents)


def json_reply_tokens(reply: dict) -> int:
    """Estimated tokens of a structured reply shaped like `reply`."""
    return estimate_tokens(json.dumps(reply))


def list_reply(key: str, items: int, kind: str = "prompt", chars: int = REPRESENTATIVE_PROMPT_CHARS) -> int:
    return json_reply_tokens({key: [representative_text(kind, chars)] * items})


@dataclass
class Planned:
    """One stage x role x model: `requests` expected (`up_to` at most), each about `input_tokens` in (the mean over
    the rendered requests given to `of`) and `output_tokens` out (expected; `spec.max_tokens` at most)."""

    stage: str
    role: str
    spec: ModelSpec
    requests: int
    up_to: int
    input_tokens: float
    output_tokens: int
    note: str = ""

    @classmethod
    def of(cls, stage: str, role: str, spec: ModelSpec, requests: int, up_to: int, sample: list[LLMRequest],
           output_tokens: int, note: str = "") -> Planned:
        per_request = sum(request_tokens(spec, r) for r in sample) / len(sample) if sample else 0.0
        return cls(stage, role, spec, requests, max(up_to, requests), per_request,
                   min(output_tokens, spec.max_tokens), note)

    # -- totals ---------------------------------------------------------------------------------------------------
    @property
    def total_input(self) -> int:
        return round(self.requests * self.input_tokens)

    @property
    def total_output(self) -> int:
        return self.requests * self.output_tokens

    @property
    def max_input(self) -> int:
        return round(self.up_to * self.input_tokens)

    @property
    def max_output(self) -> int:
        return self.up_to * self.spec.max_tokens

    @property
    def cost(self) -> float | None:
        return self.spec.cost(self.total_input, self.total_output)

    @property
    def max_cost(self) -> float | None:
        return self.spec.cost(self.max_input, self.max_output)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "role": self.role, "model": self.spec.label, "requests": self.requests,
                "requests_up_to": self.up_to, "input_tokens_per_request": round(self.input_tokens, 1),
                "output_tokens_per_request": self.output_tokens, "max_tokens": self.spec.max_tokens,
                "input_tokens": self.total_input, "output_tokens": self.total_output,
                "input_tokens_up_to": self.max_input, "output_tokens_up_to": self.max_output,
                "cost": self.cost, "cost_up_to": self.max_cost, "note": self.note}


@dataclass
class Plan:
    recipe: str
    config_name: str
    rows: list[Planned]
    currency: str | None
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        def total(values: list) -> float | None:
            priced = [v for v in values if v is not None]
            return sum(priced) if priced else None

        return {"requests": sum(r.requests for r in self.rows), "requests_up_to": sum(r.up_to for r in self.rows),
                "input_tokens": sum(r.total_input for r in self.rows),
                "output_tokens": sum(r.total_output for r in self.rows),
                "input_tokens_up_to": sum(r.max_input for r in self.rows),
                "output_tokens_up_to": sum(r.max_output for r in self.rows),
                "cost": total([r.cost for r in self.rows]), "cost_up_to": total([r.max_cost for r in self.rows]),
                "unpriced_rows": sum(r.spec.price is None for r in self.rows)}

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "name": self.config_name, "currency": self.currency,
                "token_rule": TOKEN_RULE, "rows": [r.as_dict() for r in self.rows], "total": self.totals(),
                "notes": self.notes}

    def table(self) -> Table:
        table = Table(title=f"orforge plan: {self.recipe} build '{self.config_name}', estimated (nothing sent)",
                      caption=TOKEN_RULE)
        money = f"cost {self.currency}" if self.currency else "cost"
        table.add_column("stage / role / model", ratio=1, overflow="fold")
        for col in ("requests", "input tok", "output tok", money):
            table.add_column(f"{col}\n[dim]up to[/]", justify="right", no_wrap=True)

        def cells(expected: tuple, most: tuple) -> list[str]:
            return [f"{a}\n[dim]{b}[/]" for a, b in zip(expected, most)]

        for r in self.rows:
            where = r.stage if r.stage == r.role else f"{r.stage} / {r.role}"
            table.add_row(f"{where} / {r.spec.label}", *cells(
                (_count(r.requests), _count(r.total_input), _count(r.total_output), _money(r.cost)),
                (_count(r.up_to), _count(r.max_input), _count(r.max_output), _money(r.max_cost))))
        t = self.totals()
        table.add_section()
        table.add_row("[bold]total[/]", *cells(
            (_count(t["requests"]), _count(t["input_tokens"]), _count(t["output_tokens"]), _money(t["cost"])),
            (_count(t["requests_up_to"]), _count(t["input_tokens_up_to"]), _count(t["output_tokens_up_to"]),
             _money(t["cost_up_to"]))))
        return table


def _count(n: int) -> str:
    """Compact for the table (12,345 -> 12.3k, 4,500,000 -> 4.5M); --json has the exact numbers."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if n >= size:
            return f"{n / (size if unit != 'k' else 1e3):.1f}{unit}"
    return f"{n:,}"


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.4f}"


PlanFn = Callable[[RecipeConfig], list[Planned]]


def make_plan(cfg: RecipeConfig, stages: PlanFn) -> Plan:
    """The recipe's stage list (its `plan` entry in flows/recipes.py) costed and totalled."""
    rows = [r for r in stages(cfg) if r.up_to > 0]
    notes = list(dict.fromkeys(f"{r.stage}/{r.role}: {r.note}" for r in rows if r.note))
    unpriced = sorted({f"{r.role} '{r.spec.label}'" for r in rows if r.spec.price is None})
    if unpriced and len(unpriced) < len({(r.role, r.spec.label) for r in rows}):
        notes.append("no price (left out of the cost): " + ", ".join(unpriced))
    return Plan(cfg.recipe, cfg.name, rows, cfg.price_currency(), notes)


# -- the stage lists each recipe feeds in ----------------------------------------------------------------------------
def seeds_planned(cfg, categories) -> Planned:
    """The seeds stage (OR-Bench, ALERT): per category, calls until enough distinct seeds; expected is the calls a
    full delivery needs, the upper bound the call budget."""
    from orforge.generators import seeds as seeds_stage

    spec = cfg.seeds
    model = RecordingModel(spec.model, "seeds")
    for cat in categories:
        frame = pl.DataFrame({"category": [cat.name], "description": [cat.description], "examples": [cat.examples]},
                             schema={"category": pl.Utf8, "description": pl.Utf8, "examples": pl.List(pl.Utf8)})
        seeds_stage.generate_seeds(frame, spec, model)
    per_category = math.ceil(spec.seeds_per_category / spec.seeds_per_call)
    return Planned.of("seeds", "seeds", spec.model, per_category * len(categories), len(model.requests),
                      model.requests, list_reply("prompts", spec.seeds_per_call, "seed"))


def orbench_stages(cfg) -> list[Planned]:
    """Seeds -> rewrites -> moderation -> panel (and the refusal judge). The counts after the seeds assume every call
    delivers in full and distinct texts (candidates = seeds x rewrites_per_seed); the panel answers at most every
    candidate (all benign), or at most its sample: those counts are upper bounds."""
    from orforge.core.categories import resolve_categories
    from orforge.generators import rewrites as rewrites_stage
    from orforge.moderators import ensemble, panel, refusal

    categories = resolve_categories(cfg.categories)
    rows = [seeds_planned(cfg, categories)] if cfg.seeds is not None else []
    seeds = cfg.seeds.seeds_per_category * len(categories) if cfg.seeds is not None else 0
    if getattr(cfg, "seed_file", None) is not None:  # seeds from the user's file, besides or instead of generated
        from orforge.flows.prompt_files import read_seed_file

        seeds += read_seed_file(cfg.seed_file, [c.name for c in categories]).height
    seed_rows = pl.DataFrame({"seed_id": [c.name for c in categories], "category": [c.name for c in categories],
                              "seed": [representative_text("seed")] * len(categories)})
    rewriter = RecordingModel(cfg.rewrites.model, "rewrites")
    rewrites_stage.rewrite(seed_rows, cfg.rewrites, rewriter)
    n_rewrites = cfg.rewrites.rewrites_per_seed
    rows.append(Planned.of("rewrites", "rewrites", cfg.rewrites.model, seeds, seeds, rewriter.requests,
                           list_reply("prompts", n_rewrites)))

    candidates = seeds * n_rewrites
    verdict = ensemble.verdict_model([c.name for c in categories], cfg.moderation.explain)
    sample = [ensemble.moderation_request(representative_text(), c.name, categories, cfg.moderation.explain, verdict)
              for c in categories]
    reply = {"verdict": "benign", "category": max((c.name for c in categories), key=len)}
    if cfg.moderation.explain:
        reply = {"rationale": representative_text("rationale", 200), **reply}
    rows += [Planned.of("moderation", "moderator", m, candidates, candidates, sample, json_reply_tokens(reply))
             for m in cfg.moderation.moderators]

    if cfg.panel is not None:
        answered = min(cfg.panel.sample, candidates) if cfg.panel.sample else candidates
        prompts = pl.DataFrame({"prompt_id": ["p"], "prompt": [representative_text()]})
        for member in cfg.panel.members:
            model = RecordingModel(member, "panel")
            panel.answer(prompts, [model])
            rows.append(Planned.of("panel", "panel", member, answered, answered, model.requests,
                                   FREE_ANSWER_TOKENS, "answers the benign prompts left after the vote and dedup, "
                                   + (f"at most its sample of {cfg.panel.sample}" if cfg.panel.sample
                                      else "at most every candidate")))
        judge_spec = cfg.refusal.judge
        if judge_spec is not None and cfg.refusal.method != "keyword":
            judge = RecordingModel(judge_spec, "judge")
            reply_chars = min(FREE_ANSWER_TOKENS, min(m.max_tokens for m in cfg.panel.members)) * CHARS_PER_TOKEN
            refusal.classify_refusals(pl.DataFrame({"prompt": [representative_text()],
                                                    "response": [representative_text("answer", reply_chars)]}),
                                      "judge", judge)
            members = len(cfg.panel.members)
            reply = {"reason": representative_text("reason", 80), "label": "indirect_refusal"}
            rows.append(Planned.of("panel", "judge", judge_spec, answered * members, answered * members,
                                   judge.requests, json_reply_tokens(reply),
                                   "judges every panel answer" if cfg.refusal.method == "judge" else
                                   "judges the answers the keywords leave unsure: at most every one"))
    return rows


def select_stages(cfg) -> list[Planned]:
    """Concept tree (when grown) -> questions per needed concept -> answers to the training questions. A pinned tree
    gives the exact concepts; a grown one is taken at full size (every node gets all its children)."""
    from orforge.flows.select import load_tree, needed_concepts, target_ids
    from orforge.generators import concept_tree as tree_stage
    from orforge.generators import questions as questions_stage

    rows: list[Planned] = []
    spec = cfg.questions
    tree = load_tree(cfg)
    if tree is None:
        grow = cfg.concepts.grow
        model = RecordingModel(grow.model, "concepts")
        # Every name is its own direction, so nothing is a near duplicate and no embedding model is loaded.
        tree_stage.grow_concept_tree(grow.roots, model, lambda names: np.eye(len(names), dtype=np.float32),
                                     children_per_node=grow.children_per_node, depth=grow.depth,
                                     instances_per_leaf=grow.instances_per_leaf,
                                     similarity_threshold=grow.similarity_threshold)
        roots, k = len(grow.roots), grow.children_per_node
        inner = sum(roots * k ** d for d in range(grow.depth))
        leaves = roots * k ** grow.depth
        children = [r for r in model.requests if "#children#" in r.item_id and r.sample_index == 0]
        instances = [r for r in model.requests if r.item_id.endswith("#instances")]
        names = k + tree_stage.EXTRA_NAMES_PER_CALL
        rows.append(Planned.of("concept-tree", "concepts", grow.model, inner, inner * 2, children,
                               list_reply("concepts", names, "name", 20), "a second call per node when the first "
                               "left it short of children (up to)"))
        if grow.instances_per_leaf:
            rows.append(Planned.of("concept-tree", "concepts", grow.model, leaves, leaves, instances,
                                   list_reply("instances", grow.instances_per_leaf, "name", 20)))
        n_concepts = inner + leaves
        frame = pl.DataFrame({"concept_id": [tree_stage.slugify(r) for r in grow.roots], "name": grow.roots,
                              "parent_id": [None] * roots, "ancestor_ids": [[]] * roots},
                             schema={"concept_id": pl.Utf8, "name": pl.Utf8, "parent_id": pl.Utf8,
                                     "ancestor_ids": pl.List(pl.Utf8)})
        context = {}
    else:
        needed = needed_concepts(tree, target_ids(cfg, tree))
        n_concepts = len(needed)
        frame = tree.to_frame().filter(pl.col("concept_id").is_in(needed))
        context = {c: tree.context_names(c) for c in needed}
    model = RecordingModel(spec.model, "questions")
    questions_stage.generate_questions(frame, context, spec, model)
    wanted = spec.eval_per_concept + spec.train_per_concept
    first_wave = math.ceil(wanted / spec.per_call)
    budget = questions_stage.question_call_budget(spec)
    rows.append(Planned.of("questions", "questions", spec.model, first_wave * n_concepts, budget * n_concepts,
                           model.requests, list_reply("questions", spec.per_call, "question")))
    if cfg.answers is not None:
        train = spec.train_per_concept * n_concepts
        rows.append(Planned.of("answers", "answers", cfg.answers, train, train,
                               [LLMRequest.chat(representative_text("question"))], FREE_ANSWER_TOKENS,
                               "one answer per training question kept after dedup: at most every one"))
    return rows


def alert_stages(cfg) -> list[Planned]:
    """Seeds per category and/or the ingested file (the keyword rules run for real, so the classifier's count is
    exact), then paraphrases of the top-up templates. Attacks are rule-based and call no model."""
    from orforge.core.categories import resolve_categories
    from orforge.core.taxonomy import load_keyword_rules, load_taxonomy
    from orforge.flows.alert import TAXONOMY
    from orforge.flows.prompt_files import ingest_prompt_file
    from orforge.generators import topup as topup_stage
    from orforge.moderators import categorize as categorize_stage

    categories = resolve_categories(cfg.categories)
    taxonomy = load_taxonomy(TAXONOMY)
    rows: list[Planned] = []
    names = [c.name for c in categories]
    have: dict[str, int] = dict.fromkeys(names, 0)
    if cfg.seeds is not None:
        rows.append(seeds_planned(cfg, categories))
        have = dict.fromkeys(names, cfg.seeds.seeds_per_category)
    ingested = None
    if cfg.ingest is not None:
        ingested = ingest_prompt_file(cfg.ingest.path).records
        rules = load_keyword_rules(cfg.ingest.rules, taxonomy)
        if cfg.ingest.classifier is not None:
            model = RecordingModel(cfg.ingest.classifier, "classifier")
            categorize_stage.categorize(ingested, taxonomy, rules, model, cfg.ingest.min_confidence)
            reply = {"category": max(taxonomy.leaves(), key=len), "confidence": 0.85}
            rows.append(Planned.of("categorize", "classifier", cfg.ingest.classifier, len(model.requests),
                                   len(model.requests), model.requests, json_reply_tokens(reply),
                                   "the rows the file's categories and the keyword rules leave"))
        decided = categorize_stage.categorize(ingested, taxonomy, rules, None, cfg.ingest.min_confidence).records
        for category, n in decided.group_by("category").len().iter_rows():
            if category in have:
                have[category] += n
    if cfg.topup is not None and cfg.topup.paraphrase is not None:
        harmful = pl.DataFrame({"category": [c for c, n in have.items() for _ in range(n)],
                                "prompt": [f"{c} {i}" for c, n in have.items() for i in range(n)]},
                               schema={"category": pl.Utf8, "prompt": pl.Utf8})
        expected = RecordingModel(cfg.topup.paraphrase, "paraphrase")
        topup_stage.top_up(harmful, names, cfg.topup.template_list(), taxonomy, cfg.topup.minimum, cfg.seed,
                           expected)
        empty = harmful.clear()
        most = RecordingModel(cfg.topup.paraphrase, "paraphrase")
        topup_stage.top_up(empty, names, cfg.topup.template_list(), taxonomy, cfg.topup.minimum, cfg.seed, most)
        rows.append(Planned.of("topup", "paraphrase", cfg.topup.paraphrase, len(expected.requests),
                               len(most.requests), most.requests,
                               json_reply_tokens({"paraphrase": representative_text()}),
                               "expected: the categories short of the minimum when seeds and file deliver in "
                               "full; up to: every category filled from templates alone"))
    return rows
