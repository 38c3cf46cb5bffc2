"""The SELECT recipe (Vasisht et al., NAACL 2025) as Prefect flows over the shared stages.

Build: concept tree (a pinned file, or grown by a model) -> questions per concept with their ancestors as context
-> near-duplicate removal within each concept and leak flags (MiniLM) -> abstention / generalization / specificity
splits per target concept -> answers to the training questions -> release (splits, SELECT-format data.json and
taxonomy_plus.json, SFT rows and DPO pairs, card, manifest, report).

Evaluate: every target model x abstention technique x seed answers the evaluation splits; the configured detector
decides which replies abstain; scores per technique, depth and path distance go to `evaluations/<timestamp>/`.

Only the concepts the targets' splits need (each target, its descendants, siblings and ancestors) get questions,
so a demo over two targets of a 65-concept tree asks about 11 of them. Orchestration only: every stage is a function
in generators/, moderators/, dedup/ or outputs/, and every shard is stored under the work dir by its input hash.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from prefect import flow

from orforge.core.concepts import ConceptTree, ConceptTreeError
from orforge.core.config import ConfigError
from orforge.core.recipes import load_config
from orforge.core.records import FAILURES, QUESTIONS, StageResult, empty, frame
from orforge.core.select_config import SelectConfig
from orforge.dedup.concepts import dedup_within, flag_leaks
from orforge.dedup.embed import Embedder
from orforge.flows.common import (
    EvaluateInputError,
    RunContext,
    collect,
    gated,
    new_folder,
    rejections,
    release_diversity,
    release_folder,
    repairs,
    require_some,
    result_of,
    run_shard,
    shard_task,
    shards,
    tokens_by_role,
)
from orforge.flows.progress import reporter
from orforge.generators import concept_tree as tree_stage
from orforge.generators import quality
from orforge.generators import questions as questions_stage
from orforge.generators import techniques
from orforge.llm.hub import LLMHub
from orforge.llm.types import LLMRequest
from orforge.moderators.abstention import classify_abstentions
from orforge.outputs.abstention_scoring import distance_chart, score_abstention, summary_wide, technique_scatter
from orforge.outputs.atomic import atomic_folder, write_bytes, write_csv, write_parquet
from orforge.outputs.concept_splits import SPLIT_NAMES, assemble_select_splits, select_funnel
from orforge.outputs.diversity import Measured
from orforge.outputs.release import ManifestInfo, write_release
from orforge.outputs.report import write_report
from orforge.outputs.select_export import SELECT_LAYOUT, TREE_FILE, dpo_pairs, select_files, sft_rows

log = logging.getLogger("orforge.select")

ANSWERS = {"question_id": pl.Utf8, "answer": pl.Utf8, "model": pl.Utf8}
RESPONSE_KEYS = ["target_id", "split", "question_id", "concept_id", "relation", "distance", "target_depth"]
# One row per (target model, technique, seed, split row): the reply and whether the detector calls it an abstention.
EVAL_RESPONSES = {"model": pl.Utf8, "technique": pl.Utf8, "seed": pl.Int64, "target_id": pl.Utf8, "split": pl.Utf8,
                  "question_id": pl.Utf8, "concept_id": pl.Utf8, "relation": pl.Utf8, "distance": pl.Int64,
                  "target_depth": pl.Int64, "response": pl.Utf8, "abstained": pl.Boolean, "detector": pl.Utf8}


# -- the tree -------------------------------------------------------------------------------------------------------
def load_tree(cfg: SelectConfig) -> ConceptTree | None:
    """The pinned tree, or None when the config grows one. A bad tree file is a config error (exit 2)."""
    if cfg.compositions is not None:
        # The config model reads SELECT's relation templates, but the build does not compose concepts yet: refuse
        # rather than ignore a section the user wrote.
        raise ConfigError("compositions: composed concepts (idA#idB) are not built yet; remove the section")
    path = cfg.concepts.source_path()
    if path is None:
        return None
    try:
        tree = ConceptTree.load(path)
        target_ids(cfg, tree)
    except ConceptTreeError as err:
        raise ConfigError(f"concepts.source: {err}") from None
    return tree


def target_ids(cfg: SelectConfig, tree: ConceptTree) -> list[str]:
    return cfg.splits.target_ids(tree)


def needed_concepts(tree: ConceptTree, targets: list[str]) -> list[str]:
    """Every concept a target's splits draw on (itself, descendants, siblings, ancestors), in tree order."""
    needed: set[str] = set()
    for t in targets:
        needed |= {t, *tree.descendants(t), *tree.siblings(t), *tree.ancestors(t)}
    return [c for c in tree.ids() if c in needed]


@shard_task(name="concept-tree")
def grow_task(ctx: RunContext) -> StageResult:
    grow = ctx.cfg.concepts.grow
    llm = ctx.hub.model(grow.model, "concepts")
    key = ["concept-tree", grow.model_dump(exclude={"model"}), grow.model.records_key(),
           tree_stage.load_template(tree_stage.CHILDREN_TEMPLATE).sha256,
           tree_stage.load_template(tree_stage.INSTANCES_TEMPLATE).sha256]
    prog = reporter().stage("concepts", 0)

    def compute() -> StageResult:
        with Embedder(ctx.work_dir / "embeddings.sqlite", batch_size=64) as embedder:
            return tree_stage.grow_concept_tree(
                grow.roots, llm, embedder.encode, children_per_node=grow.children_per_node, depth=grow.depth,
                instances_per_leaf=grow.instances_per_leaf, similarity_threshold=grow.similarity_threshold,
                on_progress=prog)

    result = run_shard(ctx, "concept-tree", key, compute, prog)
    reporter().done("concepts")
    return result


def grown_tree(ctx: RunContext) -> tuple[ConceptTree, StageResult]:
    result = grow_task(ctx)
    require_some("concept tree", result.records.height, result.failures)
    return ConceptTree(tree_stage.grown_concepts(result.records), source="grown"), result


# -- questions ------------------------------------------------------------------------------------------------------
@shard_task(name="questions", task_run_name="questions-{root}-{shard}")
def questions_task(ctx: RunContext, concepts: pl.DataFrame, context: dict[str, list[str]], root: str, shard: int,
                   progress) -> StageResult:
    spec = ctx.cfg.questions
    llm = ctx.hub.model(spec.model, "questions")
    key = ["questions", concepts.rows(), {c: context[c] for c in concepts["concept_id"]},
           spec.model_dump(include={"eval_per_concept", "train_per_concept", "per_call"}), spec.model.records_key(),
           questions_stage.load_template(questions_stage.TEMPLATE).sha256]
    budget = questions_stage.question_call_budget(spec) * concepts.height
    generated = run_shard(ctx, "questions", key,
                          lambda: questions_stage.generate_questions(concepts, context, spec, llm, progress),
                          progress, budget)
    # The template's own text only: a question naturally repeats its concept's name and instances from the prompt.
    told = quality.Instruction.from_template(questions_stage.load_template(questions_stage.TEMPLATE))
    return gated(ctx, generated, "questions", "question", "question_id", told, category_column="concept_id",
                 rekey=lambda row: questions_stage.question_id(row["concept_id"], row["question"]))


@shard_task(name="question-checks")
def checks_task(ctx: RunContext, questions: pl.DataFrame, tree: ConceptTree) -> StageResult:
    """Near duplicates within each concept are dropped; questions that fit a sibling or the parent are flagged."""
    spec = ctx.cfg.questions
    key = ["question-checks", questions.select("question_id", "concept_id", "question").rows(),
           spec.dedup_threshold, spec.leak_margin, tree.tree_hash()]

    def compute() -> StageResult:
        with Embedder(ctx.work_dir / "embeddings.sqlite", batch_size=64) as embedder:
            checked = dedup_within(questions, "concept_id", "question", spec.dedup_threshold, embedder)
            kept = checked.filter(pl.col("kept")).drop("kept", "duplicate_of", "similarity")
            flagged = flag_leaks(kept, tree.to_frame(), embedder, spec.leak_margin)
        dropped = checked.filter(~pl.col("kept"))
        notes = {"questions": {"generated": questions.height, "near_duplicates_dropped": dropped.height,
                               "leak_flagged": int(flagged["leak_flag"].sum() or 0)}}
        return StageResult(flagged.select(list(QUESTIONS)), empty(FAILURES), notes)

    return run_shard(ctx, "question-checks", key, compute)


# -- answers to training questions (SFT / DPO) -----------------------------------------------------------------------
@shard_task(name="answers", task_run_name="answers-{shard}")
def answers_task(ctx: RunContext, questions: pl.DataFrame, shard: int, progress) -> StageResult:
    spec = ctx.cfg.answers
    llm = ctx.hub.model(spec, "answers")

    def compute() -> StageResult:
        results = llm.generate([LLMRequest.chat(q, item_id=qid) for qid, q in
                                questions.select("question_id", "question").iter_rows()], progress)
        rows = [{"question_id": r.request.item_id, "answer": r.text, "model": llm.label} for r in results if r.ok]
        failures = [{"stage": "answers", "role": "answers", "model": llm.label, "item_id": r.request.item_id,
                     "reason": r.error} for r in results if not r.ok]
        return StageResult(frame(rows, ANSWERS), frame(failures, FAILURES))

    key = ["answers", questions.select("question_id", "question").rows(), spec.records_key()]
    return run_shard(ctx, "answers", key, compute, progress, questions.height)


# -- the build ------------------------------------------------------------------------------------------------------
def build_select(cfg: SelectConfig, output: Path | None = None) -> Path:
    """Build a SELECT release; call it inside a flow run. Returns the release folder."""
    started = datetime.now(UTC)
    folder = output or release_folder(cfg, started)
    rep = reporter()
    failures: list[pl.DataFrame] = []
    notes: dict = {}
    with LLMHub(cfg.cache_path) as hub:
        ctx = RunContext(cfg, hub, cfg.work_dir)
        tree = load_tree(cfg)
        if tree is None:
            tree, grown = grown_tree(ctx)
            failures.append(grown.failures)
            notes["concept_tree"] = {k: v for k, v in grown.notes.items() if k in ("calls", "short", "rejected")}
        targets = target_ids(cfg, tree)
        needed = needed_concepts(tree, targets)
        concepts = tree.to_frame().filter(pl.col("concept_id").is_in(needed))
        context = {c: tree.context_names(c) for c in needed}

        # Questions, one task per root x shard of concepts.
        roots = {c: (tree.ancestors(c) or [c])[-1] for c in needed}
        concepts = concepts.with_columns(pl.col("concept_id").replace_strict(roots).alias("_root"))
        prog = rep.stage("questions", questions_stage.question_call_budget(cfg.questions) * concepts.height)
        futures = [questions_task.submit(ctx, part.drop("_root"), context, root, i, prog)
                   for root in concepts["_root"].unique(maintain_order=True).to_list()
                   for i, part in enumerate(shards(concepts.filter(pl.col("_root") == root), cfg.shard_size))]
        gate_rejected: list[pl.DataFrame] = []
        gate_repaired: list[pl.DataFrame] = []
        generated, question_failures, question_notes = collect(futures, QUESTIONS, gate_rejected, gate_repaired)
        rejected = rejections(gate_rejected)
        require_some("questions", generated.height, question_failures)
        failures.append(question_failures)
        rep.done("questions")

        checked = result_of(checks_task.submit(ctx, generated, tree))
        questions = checked.records
        notes.update(checked.notes)
        if question_notes.get("question_budget_exhausted"):
            notes["question_budget_exhausted"] = question_notes["question_budget_exhausted"]

        split_args = dict(tree=tree, questions=questions, targets=targets,
                          generalization_sample=cfg.splits.generalization_sample,
                          specificity_sample=cfg.splits.specificity_sample, seed=cfg.splits.seed,
                          exclude_leaked=cfg.splits.exclude_leaked)
        eval_splits = assemble_select_splits(**split_args, kind="eval")
        train_splits = assemble_select_splits(**split_args, kind="train")
        notes["splits"] = eval_splits.notes

        answers = empty(ANSWERS)
        if cfg.answers is not None:
            train_questions = questions.filter(pl.col("kind") == "train")
            prog = rep.stage("answers", train_questions.height)
            futures = [answers_task.submit(ctx, part, i, prog)
                       for i, part in enumerate(shards(train_questions, cfg.shard_size))]
            answers, answer_failures, _ = collect(futures, ANSWERS)
            failures.append(answer_failures)
            rep.done("answers")
        sft = sft_rows(train_splits.records, tree, answers, cfg.evaluation.phrase)
        dpo = dpo_pairs(train_splits.records, tree, answers, cfg.evaluation.phrase)
        notes["training"] = {"sft_rows": sft.records.height, "dpo_pairs": dpo.records.height,
                             "answer_rows_without_answer": sft.notes.get("dropped_no_answer", 0)}
        usage = hub.usage_rows()
        if replicas := hub.replica_rows():  # what each replica of a base_url list did
            notes["replicas"] = replicas
        notes["shards"] = {"reused": ctx.shards_reused, "run": ctx.shards_run}

    split_frames = {name: eval_splits.records.filter(pl.col("split") == name) for name in SPLIT_NAMES}
    funnel = select_funnel(tree, needed, generated, questions, eval_splits.records, rejected)
    tables = {"questions": questions, "concepts": tree.to_frame(), "train_splits": train_splits.records,
              "answers": answers, "sft": sft.records, "dpo": dpo.records}
    # Every kept question (by kind: eval, train), then each published split per target concept.
    measured = [Measured("questions", questions, column="question", by="kind"),
                *(Measured(name, split_frames[name], column="question", by="target_id") for name in SPLIT_NAMES)]
    info = ManifestInfo(config=cfg, funnel=funnel, tokens=tokens_by_role(usage), usage=usage, notes=notes,
                        name=cfg.name, created=started.isoformat(timespec="seconds"),
                        diversity=release_diversity(cfg, measured, cfg.questions.dedup_threshold), quality=rejected,
                        quality_repairs=repairs(gate_repaired))
    write_release(folder, split_frames, None, pl.concat(failures), info, layout=SELECT_LAYOUT, tables=tables,
                  files=select_files(tree, questions, sft.records, dpo.records))
    write_report(folder)
    return folder


@flow(name="orforge-select-build", persist_result=False, log_prints=True)
def select_build_flow(config_path: str, output: str | None = None) -> str:
    """Build a SELECT release from the config at `config_path`; returns the release folder."""
    cfg = load_config(config_path)
    return str(build_select(cfg, Path(output) if output else None))


# -- evaluation -----------------------------------------------------------------------------------------------------
@shard_task(name="abstention-eval", task_run_name="{target}-{technique}-seed{seed}-{shard}")
def evaluation_task(ctx: RunContext, rows: pl.DataFrame, spec, target: str, technique: str, seed: int,
                    tree: ConceptTree, train_questions: pl.DataFrame, answers: dict[str, str], shard: int,
                    progress) -> StageResult:
    """One target model answers a shard of split rows under one technique and seed; abstentions are detected."""
    evaluation = ctx.cfg.evaluation
    llm = ctx.hub.model(spec, "target")
    judge = ctx.hub.model(evaluation.judge, "abstention-judge") if evaluation.judge else None

    def compute() -> StageResult:
        requests = techniques.technique_requests(rows, technique, tree, train_questions, evaluation.phrase, seed,
                                                 answers)
        results = llm.generate(requests, progress)
        replies = [{"prompt": row["question"], "response": r.text if r.ok else None}
                   for row, r in zip(rows.iter_rows(named=True), results, strict=True)]
        failures = [{"stage": "evaluate", "role": "target", "model": llm.label, "item_id": r.request.item_id,
                     "reason": r.error} for r in results if not r.ok]
        detected = classify_abstentions(pl.DataFrame(replies, schema={"prompt": pl.Utf8, "response": pl.Utf8}),
                                        evaluation.detector, judge, evaluation.phrase)
        records = rows.select(RESPONSE_KEYS).with_columns(
            pl.lit(llm.label).alias("model"), pl.lit(technique).alias("technique"), pl.lit(seed).alias("seed"),
            detected.records["response"], detected.records["refusal"].alias("abstained"),
            detected.records["method"].alias("detector"))
        return StageResult(records.select(list(EVAL_RESPONSES)), pl.concat([frame(failures, FAILURES),
                                                                             detected.failures]))

    key = ["abstention-eval", rows.select("target_id", "question_id", "question").rows(), spec.records_key(),
           technique, techniques.technique_template_sha256(technique), seed, evaluation.phrase,
           evaluation.detector, evaluation.judge.records_key() if evaluation.judge else None,
           train_questions["question_id"].to_list(), sorted(answers.items())]
    return run_shard(ctx, "abstention-eval", key, compute, progress, rows.height)


def load_release_for_evaluation(release: Path) -> tuple[ConceptTree, pl.DataFrame, pl.DataFrame, dict[str, str]]:
    """The tree, the evaluation split rows, the training questions and the answers of a SELECT release."""
    missing = [n for n in (TREE_FILE, "questions.parquet", *(f"{s}.parquet" for s in SPLIT_NAMES))
               if not (release / n).is_file()]
    if missing:
        raise EvaluateInputError(f"{release}: not a SELECT release (no {missing[0]})")
    tree = ConceptTree.load(release / TREE_FILE)
    splits = pl.concat([pl.read_parquet(release / f"{s}.parquet") for s in SPLIT_NAMES])
    questions = pl.read_parquet(release / "questions.parquet")
    answers_path = release / "answers.parquet"
    answers = dict(pl.read_parquet(answers_path).select("question_id", "answer").iter_rows()) \
        if answers_path.is_file() else {}
    return tree, splits, questions.filter(pl.col("kind") == "train"), answers


def evaluate_select(release: Path, cfg: SelectConfig) -> Path:
    """Every target x technique x seed answers the release's evaluation splits; writes `evaluations/<timestamp>/`
    (responses, score tables as CSV, two plots) and refreshes the report. Call it inside a flow run."""
    if not cfg.targets:
        raise EvaluateInputError("the config names no targets: add models under `targets:` to evaluate")
    tree, splits, train_questions, answers = load_release_for_evaluation(release)
    evaluation = cfg.evaluation
    rep = reporter()
    with LLMHub(cfg.cache_path) as hub:
        ctx = RunContext(cfg, hub, cfg.work_dir)
        runs = [(spec, technique, seed) for spec in cfg.targets for technique in evaluation.techniques
                for seed in evaluation.seeds]
        prog = rep.stage("evaluate", splits.height * len(runs))
        futures = [evaluation_task.submit(ctx, part, spec, spec.label, technique, seed, tree, train_questions,
                                          answers, i, prog)
                   for spec, technique, seed in runs for i, part in enumerate(shards(splits, cfg.shard_size))]
        responses, failures, _ = collect(futures, EVAL_RESPONSES)
        require_some("evaluate", responses["response"].is_not_null().sum(), failures)
        rep.done("evaluate")
    responses = responses.sort("model", "technique", "seed", "target_id", "question_id")
    tables = score_abstention(responses.drop("response", "detector"))
    folder = new_folder(release / "evaluations")
    with atomic_folder(folder) as tmp:
        write_parquet(tmp / "responses.parquet", responses)
        write_parquet(tmp / "failures.parquet", failures)
        write_csv(tmp / "scores.csv", summary_wide(tables["summary"]))
        for name, table in tables.items():
            write_csv(tmp / f"{name}.csv", table)
        write_bytes(tmp / "distance.png", distance_chart(tables["by_direction"]))
        write_bytes(tmp / "techniques.png", technique_scatter(tables["summary"]))
    write_report(release)
    return folder


@flow(name="orforge-select-evaluate", persist_result=False)
def select_evaluate_flow(release: str, config_path: str) -> str:
    return str(evaluate_select(Path(release), load_config(config_path)))
