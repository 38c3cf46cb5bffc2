"""The `build` flow: toxic seeds -> rewrites -> moderator ensemble -> dedup -> refusal panel -> release.

Orchestration only. Each task runs one stage over one category x shard; its result is our own parquet file under
`work_dir/<stage>/<key>.parquet`, keyed by the hash of the stage's inputs, config and template, so a rerun or a
resumed run skips finished shards. A shard that had failures is not stored, so the next run retries just those
requests (the successful ones come from the request cache). See docs/design/build-flow.md.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from prefect import flow

from orforge.core.categories import resolve_categories
from orforge.core.config import BuildConfig, CategorySpec, ModelSpec
from orforge.core.records import CANDIDATES, FAILURES, RESPONSES, SEEDS, VOTES, StageResult, empty
from orforge.dedup.embed import Embedder
from orforge.dedup.near import dedup as near_dedup
from orforge.dedup.released import keep_released, unreleased
from orforge.flows.common import (
    Overlap,
    RunContext,
    collect,
    combine,
    gated,
    publish_funnel_artifact,
    published_diversity,
    read_released_prompts,
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
from orforge.flows.prompt_files import read_seed_file
from orforge.generators import quality
from orforge.generators import rewrites as rewrites_stage
from orforge.generators import seeds as seeds_stage
from orforge.llm.hub import LLMHub
from orforge.moderators import ensemble, panel, refusal
from orforge.outputs.contrast import contrast_release_files
from orforge.outputs.release import ManifestInfo, write_release
from orforge.outputs.report import write_report
from orforge.outputs.splits import assemble_splits, balanced_sample, funnel, pools

log = logging.getLogger("orforge.build")


def _spec_key(spec: ModelSpec | None) -> str | None:
    """A spec's part of a shard key: what changes its answers plus the label its records carry (ModelSpec.records_key;
    never the URL, key variable, concurrency, timeouts or retries)."""
    return spec.records_key() if spec is not None else None


# -- tasks: one stage over one category x shard -------------------------------------------------------------------
@shard_task(name="seeds", task_run_name="seeds-{category}")
def seeds_task(ctx: BuildContext, category: str, progress) -> StageResult:
    """A category's seeds: those from the seed file (`seed_file`), then the generated ones through the quality gate;
    a seed in both is kept once (same text and category, same id)."""
    brought = (ctx.brought_seeds.filter(pl.col("category") == category) if ctx.brought_seeds is not None
               else empty(SEEDS))
    if ctx.cfg.seeds is None:
        return StageResult(brought)
    spec = next(c for c in ctx.categories if c.name == category)
    cats = pl.DataFrame({"category": [spec.name], "description": [spec.description], "examples": [spec.examples]},
                        schema={"category": pl.Utf8, "description": pl.Utf8, "examples": pl.List(pl.Utf8)})
    llm = ctx.hub.model(ctx.cfg.seeds.model, "seeds")
    key = ["seeds", spec.model_dump(), ctx.cfg.seeds.model_dump(exclude={"model"}),
           _spec_key(ctx.cfg.seeds.model), seeds_stage.load_template(seeds_stage.TEMPLATE).sha256]
    generated = run_shard(ctx, "seeds", key, lambda: seeds_stage.generate_seeds(cats, ctx.cfg.seeds, llm, progress),
                          progress, seeds_stage.call_budget(ctx.cfg.seeds))
    # The gate sees what the model was told about the category, so a seed copying the description is an echo.
    told = quality.Instruction.from_template(seeds_stage.load_template(seeds_stage.TEMPLATE), category=spec.name,
                                             description=spec.description, examples="\n".join(spec.examples))
    result = gated(ctx, generated, "seeds", "seed", "seed_id", told,
                   rekey=lambda row: seeds_stage.seed_id(row["category"], row["seed"]))
    result.records = pl.concat([brought, result.records]).unique("seed_id", keep="first", maintain_order=True)
    return result


@shard_task(name="rewrites", task_run_name="rewrites-{category}-{shard}")
def rewrites_task(ctx: BuildContext, seeds: pl.DataFrame, category: str, shard: int, progress) -> StageResult:
    llm = ctx.hub.model(ctx.cfg.rewrites.model, "rewrites")
    key = ["rewrites", seeds["seed_id"].to_list(), ctx.cfg.rewrites.rewrites_per_seed,
           _spec_key(ctx.cfg.rewrites.model), rewrites_stage.load_template(rewrites_stage.TEMPLATE).sha256]
    generated = run_shard(ctx, "rewrites", key,
                          lambda: rewrites_stage.rewrite(seeds, ctx.cfg.rewrites, llm, progress), progress, seeds.height)
    # The template without the seed: a rewrite keeping its seed's words is judged by same_as_source, not as an echo.
    told = quality.Instruction.from_template(rewrites_stage.load_template(rewrites_stage.TEMPLATE), category=category)
    return gated(ctx, generated, "rewrites", "prompt", "prompt_id", told, source_column="seed",
                 rekey=lambda row: rewrites_stage.prompt_id(row["category"], row["prompt"]))


@shard_task(name="moderation", task_run_name="moderation-{category}-{shard}")
def moderation_task(ctx: BuildContext, candidates: pl.DataFrame, category: str, shard: int, progress) -> StageResult:
    mods = [ctx.hub.model(m, "moderator") for m in ctx.cfg.moderation.moderators]
    key = ["moderation", candidates.select("prompt_id", "prompt").rows(), [c.model_dump() for c in ctx.categories],
           ctx.cfg.moderation.explain, [_spec_key(m) for m in ctx.cfg.moderation.moderators],
           ensemble.load_template(ensemble.TEMPLATE).sha256]
    return run_shard(ctx, "moderation", key, lambda: ensemble.moderate(
        candidates, ctx.categories, mods, ctx.cfg.moderation.explain, progress), progress, candidates.height * len(mods))


@shard_task(name="dedup")
def dedup_task(ctx: BuildContext, pool_frames: dict[str, pl.DataFrame], against: pl.DataFrame) -> dict[str, StageResult]:
    """Both pools in one task: MiniLM loads once (only if some text is not in the embedding cache).

    Rows already released are kept (dedup.released): only the pool's new prompts are compared, with each other and
    with every earlier prompt.
    """
    spec = ctx.cfg.dedup
    with Embedder(ctx.work_dir / "embeddings.sqlite", batch_size=spec.batch_size, backend=spec.encoder) as embedder:
        results = {}
        for pool, records in pool_frames.items():
            new = unreleased(records, against)
            key = ["dedup", pool, new.select("prompt_id", "prompt").rows(), spec.threshold,
                   against["prompt_id"].to_list(), spec.index, spec.encoder]

            def compute(new=new) -> StageResult:
                return near_dedup(new, embedder.encode(new["prompt"].to_list()), spec.threshold,
                                  embedder.encode(against["prompt"].to_list()) if against.height else None,
                                  against["prompt_id"].to_list() if against.height else None, index=spec.index)

            result = run_shard(ctx, "dedup", key, compute)
            result.records = keep_released(records, result.records, against)
            results[pool] = result
    return results


@shard_task(name="answer", task_run_name="{role}-{category}-{shard}")
def answer_task(ctx: BuildContext, prompts: pl.DataFrame, specs: list, role: str, category: str, shard: int,
                progress) -> StageResult:
    """Panel members (or evaluation targets) answer a shard of prompts; refusals are detected per answer."""
    members = [ctx.hub.model(m, role) for m in specs]
    judge = ctx.hub.model(ctx.cfg.refusal.judge, "judge") if ctx.cfg.refusal.judge else None

    def compute() -> StageResult:
        answered = panel.answer(prompts, members, progress)
        classified = refusal.classify_refusals(answered.records, ctx.cfg.refusal.method, judge)
        records = classified.records.select(list(RESPONSES))
        return StageResult(records, pl.concat([answered.failures, classified.failures]))

    key = ["answer", prompts.select("prompt_id", "prompt").rows(), [_spec_key(m) for m in specs],
           ctx.cfg.refusal.method, _spec_key(ctx.cfg.refusal.judge), refusal.JUDGE_TEMPLATE_SHA256]
    return run_shard(ctx, "answers", key, compute, progress, prompts.height * len(members))


def answer_all(ctx: BuildContext, prompts: pl.DataFrame, specs: list, role: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every spec answers every prompt, in tasks per category x shard; returns (responses, failures)."""
    prog = reporter().stage(role, prompts.height * len(specs))
    futures = [answer_task.submit(ctx, part, specs, role, category, i, prog)
               for category in prompts["category"].unique(maintain_order=True).to_list()
               for i, part in enumerate(shards(prompts.filter(pl.col("category") == category), ctx.cfg.shard_size))]
    responses, failures, _ = collect(futures, RESPONSES)
    reporter().done(role)
    return responses.sort("prompt_id", "member"), failures


# -- the flow -------------------------------------------------------------------------------------------------------
@dataclass
class BuildContext(RunContext):
    """The OR-Bench run: the shared context plus the categories being built."""

    categories: list[CategorySpec] = field(default_factory=list)
    brought_seeds: pl.DataFrame | None = None  # core.records.SEEDS rows from `seed_file`, when the config has one


@flow(name="orforge-build", persist_result=False, log_prints=True)
def build_flow(config_path: str, output: str | None = None) -> str:
    """Build a release from the config at `config_path`; returns the release folder."""
    from orforge.core.config import load_config  # noqa: PLC0415 - the flow re-reads the file so scheduled runs see edits

    cfg = load_config(config_path)
    return str(build(cfg, Path(output) if output else None))


@dataclass
class Pipeline:
    """Everything a build produced, before it is written as a release."""

    splits: dict[str, pl.DataFrame]
    votes: pl.DataFrame
    failures: pl.DataFrame
    responses: pl.DataFrame | None
    dedup: pl.DataFrame
    funnel: pl.DataFrame
    tokens: dict[str, dict]
    notes: dict
    rejected: pl.DataFrame | None = None  # the quality gate's rejected seeds and rewrites (QUALITY_REJECTIONS)
    repaired: pl.DataFrame | None = None  # the seeds and rewrites the gate repaired and kept (QUALITY_REPAIRS)


def seeds_to_votes(ctx: BuildContext, gate_rejected: list[pl.DataFrame],
                   gate_repaired: list[pl.DataFrame] | None = None) -> dict[str, tuple]:
    """Seeds, rewrites and moderation of every category, overlapped (flows.common.Overlap): a category's rewrite
    shards start as soon as its seeds are there, its moderation shards as soon as all its rewrite shards are, while
    other categories are still in an earlier stage. The endpoints are never idle between these stages.

    A category's candidates are made unique across its rewrite shards before they are cut into moderation shards,
    exactly as the stage-by-stage build cut them, so shard keys (and stored shards) are the same; the results are
    put together in category and shard order, so they are identical whatever order the tasks ended in. Returns
    (records, failures, notes) per stage; gate rejections are appended to `gate_rejected`, seeds' first.
    """
    cfg, rep, names = ctx.cfg, reporter(), [c.name for c in ctx.categories]
    n_mods = len(cfg.moderation.moderators)
    seeded: dict[str, StageResult] = {}
    rewritten: dict[str, list[StageResult | None]] = {}
    moderated: dict[str, list[StageResult | None]] = {}
    left = {stage: len(names) for stage in ("seeds", "rewrites", "moderation")}  # categories still in each stage
    overlap = Overlap()

    def category_done(stage: str) -> None:
        left[stage] -= 1
        if not left[stage]:
            rep.done(stage)

    def submit_all(stage: str, task, frame: pl.DataFrame, requests: int, name: str, into: dict, then) -> None:
        parts = shards(frame, cfg.shard_size)
        into[name] = [None] * len(parts)
        if not parts:
            then(name)
            return
        prog = rep.stage(stage, requests)  # a stage already running adds this category's requests to its total

        def arrived(i: int, result: StageResult) -> None:
            into[name][i] = result
            if all(r is not None for r in into[name]):
                then(name)

        for i, part in enumerate(parts):
            overlap.add(task.submit(ctx, part, name, i, prog), then=functools.partial(arrived, i))

    def seeds_done(name: str, result: StageResult) -> None:
        seeded[name] = result
        category_done("seeds")
        submit_all("rewrites", rewrites_task, result.records, result.records.height, name, rewritten, rewrites_done)

    def rewrites_done(name: str) -> None:
        category_done("rewrites")
        candidates = combine(rewritten[name], CANDIDATES)[0].unique("prompt_id", keep="first", maintain_order=True)
        submit_all("moderation", moderation_task, candidates, candidates.height * n_mods, name, moderated,
                   lambda _: category_done("moderation"))

    prog = rep.stage("seeds", len(names) * seeds_stage.call_budget(cfg.seeds) if cfg.seeds is not None else 0)
    for name in names:
        overlap.add(seeds_task.submit(ctx, name, prog), then=functools.partial(seeds_done, name))
    overlap.wait()
    seeds = combine([seeded[n] for n in names], SEEDS, gate_rejected, gate_repaired)
    records, failures, notes = combine([r for n in names for r in rewritten[n]], CANDIDATES, gate_rejected,
                                       gate_repaired)
    rewrites = (records.unique("prompt_id", keep="first", maintain_order=True), failures, notes)
    return {"seeds": seeds, "rewrites": rewrites,
            "moderation": combine([r for n in names for r in moderated[n]], VOTES)}


def run_pipeline(cfg: BuildConfig, categories: list[CategorySpec]) -> Pipeline:
    """Seeds -> rewrites -> moderation -> dedup -> panel -> splits, for `categories`; call it inside a flow run."""
    with LLMHub(cfg.cache_path) as hub:
        brought = (read_seed_file(cfg.seed_file, [c.name for c in categories]) if cfg.seed_file is not None
                   else None)
        ctx = BuildContext(cfg, hub, cfg.work_dir, categories=categories, brought_seeds=brought)

        # 1-3. seeds -> rewrites -> moderation, each category going on as soon as its previous stage is done
        gate_rejected: list[pl.DataFrame] = []  # what the quality gate took out of the seeds and rewrites
        gate_repaired: list[pl.DataFrame] = []  # the seeds and rewrites it repaired and kept
        generated = seeds_to_votes(ctx, gate_rejected, gate_repaired)
        seeds, seed_failures, notes = generated["seeds"]
        require_some("seeds", seeds.height, seed_failures)
        candidates, rewrite_failures, _ = generated["rewrites"]
        require_some("rewrites", candidates.height, rewrite_failures)
        votes, vote_failures, _ = generated["moderation"]
        require_some("moderation", votes.height, vote_failures)
        n_mods = len(cfg.moderation.moderators)
        votes = votes.sort("prompt_id", "moderator")  # the same release whatever the shard size
        decisions = ensemble.decide(candidates, votes, n_mods, cfg.moderation.vote)

        # 4. dedup of each pool, against earlier releases when configured
        pool_frames = pools(candidates, decisions, seeds, cfg.toxic)
        against = read_released_prompts(cfg.dedup.against)
        deduped = result_of(dedup_task.submit(ctx, {name: pool_frames[name] for name in ("benign", "toxic")},
                                              against))
        dedup_results = {name: result.records for name, result in deduped.items()}

        # 5. the refusal panel over the deduplicated benign prompts (or a seeded sample), then the hard rule
        responses, hard, panel_failures = None, None, empty(FAILURES)
        if cfg.panel is not None:
            kept = dedup_results["benign"].filter(pl.col("kept")).select("prompt_id")
            benign_kept = pool_frames["benign"].join(kept, on="prompt_id", how="semi")
            if cfg.panel.sample is not None and cfg.panel.sample < benign_kept.height:
                benign_kept = balanced_sample(benign_kept, size=cfg.panel.sample, seed=cfg.seed)
            responses, panel_failures = answer_all(ctx, benign_kept, cfg.panel.members, "panel")
            require_some("panel", responses["response"].is_not_null().sum(), panel_failures)
            hard = panel.hard_members(responses)
        else:
            notes["hard"] = "not built: no refusal panel configured"

        # 6. the splits
        splits = assemble_splits(candidates, decisions, dedup_results["benign"], dedup_results["toxic"], seeds,
                                 cfg.splits, cfg.toxic, cfg.seed, hard)
        if hard is not None:
            notes["hard"] = (f"{splits['hard'].height} prompts refused by at least {cfg.splits.hard_min_rejections} "
                             f"of {len(cfg.panel.members)} panel members, out of {hard.height} answered")
        rejected = rejections(gate_rejected)
        funnel_frame = funnel(seeds, candidates, decisions, dedup_results["benign"], dedup_results["toxic"], splits,
                              rejected)
        # Every candidate with its decision, for audits and for tracing where each one went.
        splits["candidates"] = candidates.join(decisions, on="prompt_id", how="left")
        usage = hub.usage_rows()
        if replicas := hub.replica_rows():  # what each replica of a base_url list did
            notes["replicas"] = replicas
    tokens = tokens_by_role(usage)
    notes["shards"] = {"reused": ctx.shards_reused, "run": ctx.shards_run}
    notes["usage_by_model"] = usage
    dedup_frame = pl.concat([frame.with_columns(pl.lit(pool).alias("pool")).select("pool", *frame.columns)
                             for pool, frame in dedup_results.items()])
    failures = pl.concat([seed_failures, rewrite_failures, vote_failures, panel_failures])
    return Pipeline(splits, votes, failures, responses, dedup_frame, funnel_frame, tokens, notes, rejected,
                    repairs(gate_repaired))


def build(cfg: BuildConfig, output: Path | None = None) -> Path:
    """Run the pipeline over the config's categories and write the release; call it inside a flow run."""
    started = datetime.now(UTC)
    folder = output or release_folder(cfg, started)
    result = run_pipeline(cfg, resolve_categories(cfg.categories))
    info = ManifestInfo(config=cfg, funnel=result.funnel, tokens=result.tokens, notes=result.notes, name=cfg.name,
                        created=started.isoformat(timespec="seconds"),
                        diversity=release_diversity(cfg, published_diversity(result.splits), cfg.dedup.threshold),
                        quality=result.rejected, quality_repairs=result.repaired)
    pair_tables, pair_files = contrast_release_files(result.splits)
    write_release(folder, result.splits, result.votes, result.failures, info, responses=result.responses,
                  dedup=result.dedup, tables=pair_tables, files=pair_files)
    write_report(folder)
    publish_funnel_artifact(cfg, result.funnel, folder)
    return folder


def check_config(cfg: BuildConfig) -> None:
    """What validation of the config file alone cannot see: the categories resolve and the seed file, if any, reads
    and names only categories the build has. ConfigError (exit 2), before anything is written."""
    from orforge.core.config import ConfigError  # noqa: PLC0415

    categories = [c.name for c in resolve_categories(cfg.categories)]
    if cfg.seed_file is not None:
        try:
            read_seed_file(cfg.seed_file, categories)
        except ValueError as e:
            raise ConfigError(f"seed_file: {e}") from None
