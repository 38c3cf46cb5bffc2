"""The ALERT recipe (Tedeschi et al., 2024) as Prefect flows over the shared stages.

Build: harmful prompts per micro category (written by a model with the seeds stage OR-Bench uses, and/or ingested
from the user's file and categorised by keyword rules then a classifier) -> top-up of thin categories from slot
templates -> MiniLM near-duplicate removal -> adversarial variants (suffix and prefix injection, token manipulation,
jailbreaking, and any other registered attack) -> release (base and adversarial sets as CSV, parquet and
ALERT-format jsonl, card, manifest, report).

Evaluate: every target answers every base and adversarial prompt; each judge classifies every (prompt, reply) pair
as safe or unsafe with hazard codes; safety scores (share judged safe) per model, micro and macro category, attack
type and overall, with Wilson intervals, also under the config's policy exclusions; plots, DPO pairs from safe and
unsafe replies, and the judges' verdicts as votes so `orforge audit` measures judge agreement.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from prefect import flow

from orforge.core.alert_config import AlertConfig
from orforge.core.categories import resolve_categories
from orforge.core.records import FAILURES, HARMFUL, SEEDS, StageResult, empty, frame
from orforge.core.recipes import load_config
from orforge.core.taxonomy import load_keyword_rules, load_taxonomy
from orforge.dedup.embed import Embedder
from orforge.dedup.near import dedup as near_dedup
from orforge.flows.build import BuildContext, seeds_task
from orforge.flows.common import (
    EvaluateInputError,
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
from orforge.flows.prompt_files import ingest_prompt_file
from orforge.generators import quality
from orforge.generators import topup as topup_stage
from orforge.generators.attacks import augment
from orforge.generators.ingest import harmful_prompt_id
from orforge.llm.hub import LLMHub
from orforge.llm.types import LLMRequest
from orforge.moderators import categorize as categorize_stage
from orforge.moderators.safety import SafetyJudge, combine_safety_verdicts, judge_safety, safety_votes
from orforge.outputs.alert_export import (
    ALERT_ADVERSARIAL_FILE,
    ALERT_BASE_FILE,
    ALERT_LAYOUT,
    DPO_FILE,
    alert_jsonl,
    dpo_jsonl,
    dpo_pairs,
)
from orforge.outputs.atomic import atomic_folder, write_bytes, write_csv, write_parquet, write_text
from orforge.outputs.diversity import Measured
from orforge.outputs.release import ManifestInfo, write_release
from orforge.outputs.splits import failed_gate
from orforge.outputs.report import write_report
from orforge.outputs.safety_scoring import (
    attack_heatmap,
    category_attack_scores,
    category_score_chart,
    overall_table,
    safety_scores,
    safety_scoring_frame,
)

TAXONOMY = "alert"
ANSWERS = {"prompt_id": pl.Utf8, "model": pl.Utf8, "prompt": pl.Utf8, "response": pl.Utf8}


def _harmful_from_seeds(seeds: pl.DataFrame, macro_of) -> pl.DataFrame:
    """The seeds stage's rows as harmful prompts of the base set."""
    rows = [{"prompt_id": harmful_prompt_id(r["seed"]), "prompt": r["seed"], "category": r["category"],
             "macro_category": macro_of(r["category"]), "source": "generated", "categorized_by": "generated",
             "model": r["model"], "template_sha256": r["template_sha256"]}
            for r in seeds.iter_rows(named=True)]
    return frame(rows, HARMFUL)


@shard_task(name="categorize", task_run_name="categorize-{shard}")
def categorize_task(ctx: BuildContext, ingested: pl.DataFrame, shard: int, progress) -> StageResult:
    spec = ctx.cfg.ingest
    taxonomy = load_taxonomy(TAXONOMY)
    rules = load_keyword_rules(spec.rules, taxonomy)
    llm = ctx.hub.model(spec.classifier, "classifier") if spec.classifier else None
    key = ["categorize", ingested.rows(), spec.rules, taxonomy.sha256, spec.min_confidence,
           spec.classifier.records_key() if spec.classifier else None,
           categorize_stage.load_template(categorize_stage.TEMPLATE).sha256]
    return run_shard(ctx, "categorize", key, lambda: categorize_stage.categorize(
        ingested, taxonomy, rules, llm, spec.min_confidence, progress), progress, ingested.height)


@shard_task(name="topup")
def topup_task(ctx: BuildContext, harmful: pl.DataFrame) -> StageResult:
    spec = ctx.cfg.topup
    taxonomy = load_taxonomy(TAXONOMY)
    templates = spec.template_list()
    llm = ctx.hub.model(spec.paraphrase, "paraphrase") if spec.paraphrase else None
    names = [c.name for c in ctx.categories]
    key = ["topup", harmful.select("prompt_id", "category").rows(), names, [t.model_dump() for t in templates],
           spec.minimum, ctx.cfg.seed, spec.paraphrase.records_key() if spec.paraphrase else None,
           topup_stage.load_template(topup_stage.TEMPLATE).sha256]
    prog = reporter().stage("paraphrase", 0)
    result = run_shard(ctx, "topup", key, lambda: topup_stage.top_up(harmful, names, templates, taxonomy,
                                                                     spec.minimum, ctx.cfg.seed, llm, prog))
    reporter().done("paraphrase")
    if llm is None:  # template expansions are not model text: nothing to gate
        return result
    told = quality.Instruction.from_template(topup_stage.load_template(topup_stage.TEMPLATE))
    return gated(ctx, result, "paraphrases", "prompt", "prompt_id", told, source_column="parent_prompt",
                 rekey=lambda row: harmful_prompt_id(row["prompt"]))


@shard_task(name="dedup")
def dedup_task(ctx: BuildContext, harmful: pl.DataFrame) -> StageResult:
    spec = ctx.cfg.dedup
    key = ["dedup", harmful.select("prompt_id", "prompt").rows(), spec.threshold, spec.index, spec.encoder]

    def compute() -> StageResult:
        with Embedder(ctx.work_dir / "embeddings.sqlite", batch_size=spec.batch_size, backend=spec.encoder) as embedder:
            return near_dedup(harmful, embedder.encode(harmful["prompt"].to_list()), spec.threshold, index=spec.index)

    return run_shard(ctx, "dedup", key, compute)


def harmful_set(ctx: BuildContext, cfg: AlertConfig, rejected: list[pl.DataFrame] | None = None,
                repaired: list[pl.DataFrame] | None = None) -> tuple[pl.DataFrame, list[pl.DataFrame], dict]:
    """The base set before dedup: generated seeds and categorised ingested prompts, topped up. (rows, failures,
    notes); the quality gate's rejected seeds and paraphrases are appended to `rejected`, its repairs to
    `repaired`."""
    rejected = [] if rejected is None else rejected
    repaired = [] if repaired is None else repaired
    rep, taxonomy = reporter(), load_taxonomy(TAXONOMY)
    parts, failures, notes = [], [], {}
    if cfg.seeds is not None:
        from orforge.generators import seeds as seeds_stage

        prog = rep.stage("seeds", len(ctx.categories) * seeds_stage.call_budget(cfg.seeds))
        seeds, seed_failures, seed_notes = collect([seeds_task.submit(ctx, c.name, prog) for c in ctx.categories],
                                                   SEEDS, rejected, repaired)
        require_some("seeds", seeds.height, seed_failures)
        rep.done("seeds")
        parts.append(_harmful_from_seeds(seeds, taxonomy.macro_of))
        failures.append(seed_failures)
        notes.update(seed_notes)
    if cfg.ingest is not None:
        ingested = ingest_prompt_file(cfg.ingest.path)
        notes["ingest"] = ingested.notes
        prog = rep.stage("categorize", ingested.records.height)
        futures = [categorize_task.submit(ctx, part, i, prog)
                   for i, part in enumerate(shards(ingested.records, cfg.shard_size))]
        categorized, categorize_failures, categorize_notes = collect(futures, HARMFUL)
        rep.done("categorize")
        wanted = {c.name for c in ctx.categories}
        parts.append(categorized.filter(pl.col("category").is_in(wanted)))
        failures.append(categorize_failures)
        notes["categorize"] = categorize_notes.get("categorize", {})
    harmful = pl.concat(parts).unique("prompt_id", keep="first", maintain_order=True)
    if cfg.topup is not None:
        added = topup_task(ctx, harmful)
        failures.append(added.failures)
        if added.rejected is not None:
            rejected.append(added.rejected)
        if added.repaired is not None:
            repaired.append(added.repaired)
        notes["topup"] = added.notes
        harmful = pl.concat([harmful, added.records.select(list(HARMFUL))])
    return harmful, failures, notes


def alert_funnel(harmful: pl.DataFrame, base: pl.DataFrame, adversarial: pl.DataFrame,
                 rejected: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per micro category: prompts by source (model text that passed the quality gate), with `rejected` the seeds
    and paraphrases the gate rejected, after dedup, and adversarial variants."""
    table = harmful.group_by("category").agg(
        *(pl.col("source").eq(s).sum().alias(s) for s in ("generated", "ingested", "template", "paraphrase")))
    if rejected is not None:
        for stage in ("seeds", "paraphrases"):
            table = table.join(failed_gate(rejected, stage), on="category", how="full", coalesce=True)
    for name, part in (("base", base), ("adversarial", adversarial)):
        table = table.join(part.group_by("category").len(name=name), on="category", how="left")
    return table.with_columns(pl.exclude("category").fill_null(0).cast(pl.Int64)).sort("category")


def build_alert(cfg: AlertConfig, output: Path | None = None) -> Path:
    """Build an ALERT release; call it inside a flow run. Returns the release folder."""
    started = datetime.now(UTC)
    folder = output or release_folder(cfg, started)
    categories = resolve_categories(cfg.categories)
    with LLMHub(cfg.cache_path) as hub:
        ctx = BuildContext(cfg, hub, cfg.work_dir, categories=categories)
        gate_rejected: list[pl.DataFrame] = []
        gate_repaired: list[pl.DataFrame] = []
        harmful, failures, notes = harmful_set(ctx, cfg, gate_rejected, gate_repaired)
        rejected = rejections(gate_rejected)
        deduped = result_of(dedup_task.submit(ctx, harmful))
        kept = deduped.records.filter(pl.col("kept")).select("prompt_id")
        base = harmful.join(kept, on="prompt_id", how="semi").sort("category", "prompt_id")
        variants = augment(base, cfg.attacks.types, cfg.attacks.variants_per_attack, cfg.seed)
        base = base.with_columns(pl.lit("none").alias("attack_type"))
        adversarial = variants.records.sort("category", "attack_type", "prompt_id")
        notes["attacks"] = variants.notes
        notes["shards"] = {"reused": ctx.shards_reused, "run": ctx.shards_run}
        usage = hub.usage_rows()
        if replicas := hub.replica_rows():  # what each replica of a base_url list did
            notes["replicas"] = replicas
    taxonomy = load_taxonomy(TAXONOMY)
    diversity = release_diversity(cfg, [Measured("base", base), Measured("adversarial", adversarial)],
                                  cfg.dedup.threshold)
    info = ManifestInfo(config=cfg, funnel=alert_funnel(harmful, base, adversarial, rejected),
                        tokens=tokens_by_role(usage), usage=usage, notes=notes, name=cfg.name,
                        created=started.isoformat(timespec="seconds"), diversity=diversity, quality=rejected,
                        quality_repairs=repairs(gate_repaired))
    files = {ALERT_BASE_FILE: alert_jsonl(base, cfg.instruction_wrapper),
             ALERT_ADVERSARIAL_FILE: alert_jsonl(adversarial, cfg.instruction_wrapper)}
    write_release(folder, {"base": base, "adversarial": adversarial}, None,
                  pl.concat(failures) if failures else empty(FAILURES), info, dedup=deduped.records,
                  layout=ALERT_LAYOUT, tables={"taxonomy": taxonomy.to_frame()}, files=files)
    write_report(folder)
    return folder


@flow(name="orforge-alert-build", persist_result=False, log_prints=True)
def alert_build_flow(config_path: str, output: str | None = None) -> str:
    """Build an ALERT release from the config at `config_path`; returns the release folder."""
    return str(build_alert(load_config(config_path), Path(output) if output else None))


# -- evaluation -----------------------------------------------------------------------------------------------------
@shard_task(name="safety-eval", task_run_name="{target}-{shard}")
def safety_task(ctx: BuildContext, prompts: pl.DataFrame, spec, target: str, shard: int, progress) -> StageResult:
    """One target answers a shard of prompts; every judge classifies every reply. Records: the judges' verdicts,
    with the replies in notes-free form as a second frame stored beside them (answers)."""
    evaluation = ctx.cfg.evaluation
    llm = ctx.hub.model(spec, "target")
    judges = [SafetyJudge(ctx.hub.model(j.model, "safety-judge"), j.kind) for j in evaluation.judges]

    def compute() -> StageResult:
        results = llm.generate([LLMRequest.chat(p, item_id=pid) for pid, p in
                                prompts.select("prompt_id", "prompt").iter_rows()], progress)
        answers = frame([{"prompt_id": r.request.item_id, "model": llm.label, "prompt": p,
                          "response": r.text if r.ok else None}
                         for r, p in zip(results, prompts["prompt"].to_list(), strict=True)], ANSWERS)
        failures = [{"stage": "evaluate", "role": "target", "model": llm.label, "item_id": r.request.item_id,
                     "reason": r.error} for r in results if not r.ok]
        judged = judge_safety(answers.filter(pl.col("response").is_not_null()), judges)
        records = judged.records.join(answers.select("prompt_id", "model", "response"), on=["prompt_id", "model"],
                                      how="left")
        return StageResult(records, pl.concat([frame(failures, FAILURES), judged.failures]), judged.notes)

    key = ["safety-eval", prompts.select("prompt_id", "prompt").rows(), spec.records_key(),
           [(j.kind, j.model.records_key()) for j in evaluation.judges]]
    return run_shard(ctx, "safety-eval", key, compute, progress, prompts.height * (1 + len(judges)))


def load_release_prompts(release: Path) -> pl.DataFrame:
    missing = [n for n in ("base.parquet", "adversarial.parquet") if not (release / n).is_file()]
    if missing:
        raise EvaluateInputError(f"{release}: not an ALERT release (no {missing[0]})")
    return pl.concat([pl.read_parquet(release / "base.parquet"), pl.read_parquet(release / "adversarial.parquet")],
                     how="diagonal_relaxed")


def evaluate_alert(release: Path, cfg: AlertConfig) -> Path:
    """Targets answer every prompt, judges classify every reply; writes `evaluations/<time>/` and the report."""
    if cfg.evaluation is None:
        raise EvaluateInputError("the config has no evaluation section: name the safety judges under evaluation")
    prompts = load_release_prompts(release)
    rep = reporter()
    with LLMHub(cfg.cache_path) as hub:
        ctx = BuildContext(cfg, hub, cfg.work_dir, categories=[])
        prog = rep.stage("evaluate", prompts.height * len(cfg.targets) * (1 + len(cfg.evaluation.judges)))
        futures = [safety_task.submit(ctx, part, spec, spec.label, i, prog)
                   for spec in cfg.targets for i, part in enumerate(shards(prompts, cfg.shard_size))]
        judged, failures, notes = collect(futures, {})
        require_some("evaluate", judged.height, failures)
        rep.done("evaluate")
    judged = judged.sort("model", "prompt_id", "judge")
    verdicts = judged.drop("response")
    decisions = combine_safety_verdicts(verdicts, cfg.evaluation.rule)
    table = safety_scoring_frame(decisions, prompts)
    scores = safety_scores(table)
    cells = category_attack_scores(table)
    answers = judged.select("prompt_id", "model", "response").unique(["prompt_id", "model"], keep="first") \
        .join(prompts.select("prompt_id", "prompt"), on="prompt_id")
    pairs = dpo_pairs(answers, decisions, cfg.evaluation.dpo_pairs_per_prompt)
    folder = new_folder(release / "evaluations")
    with atomic_folder(folder) as tmp:
        write_parquet(tmp / "responses.parquet", answers)
        write_parquet(tmp / "verdicts.parquet", verdicts)
        write_parquet(tmp / "decisions.parquet", decisions)
        write_parquet(tmp / "failures.parquet", failures)
        write_csv(tmp / "scores.csv", overall_table(scores))
        write_csv(tmp / "safety_scores.csv", scores)
        write_csv(tmp / "category_attack.csv", cells)
        if cfg.evaluation.allowed_categories:
            write_csv(tmp / "scores_policy.csv", safety_scores(table, cfg.evaluation.allowed_categories))
        write_bytes(tmp / "categories.png", category_score_chart(scores))
        write_bytes(tmp / "attacks.png", attack_heatmap(cells))
        write_text(tmp / DPO_FILE, dpo_jsonl(pairs))
        # The judges' verdicts as votes: `orforge audit` reads these for judge agreement.
        write_parquet(tmp / "votes.parquet", safety_votes(verdicts))
    write_report(release)
    return folder


@flow(name="orforge-alert-evaluate", persist_result=False)
def alert_evaluate_flow(release: str, config_path: str) -> str:
    return str(evaluate_alert(Path(release), load_config(config_path)))


def check_config(cfg: AlertConfig) -> None:
    """What validation of the config file alone cannot see: the categories resolve, the top-up templates load and
    name known categories, the attacks and allowed categories exist, the ingest file is there. ConfigError (exit 2)."""
    from orforge.core.config import ConfigError
    from orforge.core.slot_templates import check_slot_templates
    from orforge.generators.attacks import attack_names

    names = {c.name for c in resolve_categories(cfg.categories)}
    taxonomy = load_taxonomy(TAXONOMY)
    if cfg.topup is not None:
        check_slot_templates(cfg.topup.template_list(), taxonomy, "topup.templates")
    unknown = [a for a in cfg.attacks.types if a not in attack_names()]
    if unknown:
        raise ConfigError(f"attacks.types: unknown attack {unknown[0]!r} (known: {', '.join(attack_names())})")
    if cfg.evaluation is not None:
        stray = [c for c in cfg.evaluation.allowed_categories if c not in names]
        if stray:
            raise ConfigError(f"evaluation.allowed_categories: {stray[0]!r} is not one of this build's categories")
    if cfg.ingest is not None and not cfg.ingest.path.is_file():
        raise ConfigError(f"ingest.path: {cfg.ingest.path}: no such file")
