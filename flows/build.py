"""The `build` flow: toxic seeds -> rewrites -> moderator ensemble -> dedup -> refusal panel -> release.

Orchestration only. Each task runs one stage over one category x shard; its result is our own parquet file under
`work_dir/<stage>/<key>.parquet`, keyed by the hash of the stage's inputs, config and template, so a rerun or a
resumed run skips finished shards. A shard that had failures is not stored, so the next run retries just those
requests (the successful ones come from the request cache). See docs/design/build-flow.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from core.categories import resolve_categories
from core.config import BuildConfig, CategorySpec, stable_hash
from core.records import CANDIDATES, FAILURES, RESPONSES, SEEDS, VOTES, StageResult, empty
from dedup.embed import Embedder
from dedup.near import dedup as near_dedup
from flows.progress import StageProgress, reporter
from generators import rewrites as rewrites_stage
from generators import seeds as seeds_stage
from llm.hub import LLMHub
from llm.types import Usage
from moderators import ensemble, panel, refusal
from outputs.atomic import write_json, write_parquet
from outputs.release import ManifestInfo, write_release
from outputs.report import write_report
from outputs.splits import assemble_splits, balanced_sample, funnel, pools

log = logging.getLogger("orforge.build")


@dataclass
class BuildContext:
    cfg: BuildConfig
    hub: LLMHub
    categories: list[CategorySpec]
    work_dir: Path
    shards_reused: dict[str, int] = field(default_factory=dict)
    shards_run: dict[str, int] = field(default_factory=dict)


def _spec_dump(spec) -> dict:
    """The parts of a model spec that change answers (not concurrency, timeouts, retries, URLs or key names)."""
    return spec.model_dump(include={"backend", "model", "temperature", "max_tokens", "structured_output",
                                    "system_prompt", "extra", "name"})


def run_shard(ctx: BuildContext, stage: str, key_material: object, compute: Callable[[], StageResult],
              progress: StageProgress | None = None, requests: int = 0) -> StageResult:
    """Reuse the stage's stored shard when its key matches; otherwise compute it and store it if it is complete.

    A reused shard moves the stage's progress bar by the `requests` it would have made.
    """
    key = stable_hash(key_material, 24)
    folder = ctx.work_dir / stage
    records_path, notes_path = folder / f"{key}.parquet", folder / f"{key}.notes.json"
    if records_path.exists():
        ctx.shards_reused[stage] = ctx.shards_reused.get(stage, 0) + 1
        if progress is not None:
            progress(requests, Usage())
        notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
        return StageResult(pl.read_parquet(records_path), empty(FAILURES), notes)
    result = compute()
    ctx.shards_run[stage] = ctx.shards_run.get(stage, 0) + 1
    if result.failures.is_empty():
        folder.mkdir(parents=True, exist_ok=True)
        write_json(notes_path, result.notes)
        write_parquet(records_path, result.records)  # written last: its presence marks the shard done
    return result


def shards(frame: pl.DataFrame, size: int) -> list[pl.DataFrame]:
    return [frame.slice(i, size) for i in range(0, frame.height, size)] or []


# -- tasks: one stage over one category x shard -------------------------------------------------------------------
TASK_OPTS = dict(cache_policy=NO_CACHE, persist_result=False, retries=0)


@task(name="seeds", task_run_name="seeds-{category}", **TASK_OPTS)
def seeds_task(ctx: BuildContext, category: str, progress) -> StageResult:
    spec = next(c for c in ctx.categories if c.name == category)
    cats = pl.DataFrame({"category": [spec.name], "description": [spec.description], "examples": [spec.examples]},
                        schema={"category": pl.Utf8, "description": pl.Utf8, "examples": pl.List(pl.Utf8)})
    llm = ctx.hub.model(ctx.cfg.seeds.model, "seeds")
    key = ["seeds", spec.model_dump(), ctx.cfg.seeds.model_dump(exclude={"model"}),
           _spec_dump(ctx.cfg.seeds.model), seeds_stage.load_template(seeds_stage.TEMPLATE).sha256]
    return run_shard(ctx, "seeds", key, lambda: seeds_stage.generate_seeds(cats, ctx.cfg.seeds, llm, progress),
                     progress, seeds_stage.call_budget(ctx.cfg.seeds))


@task(name="rewrites", task_run_name="rewrites-{category}-{shard}", **TASK_OPTS)
def rewrites_task(ctx: BuildContext, seeds: pl.DataFrame, category: str, shard: int, progress) -> StageResult:
    llm = ctx.hub.model(ctx.cfg.rewrites.model, "rewrites")
    key = ["rewrites", seeds["seed_id"].to_list(), ctx.cfg.rewrites.rewrites_per_seed,
           _spec_dump(ctx.cfg.rewrites.model), rewrites_stage.load_template(rewrites_stage.TEMPLATE).sha256]
    return run_shard(ctx, "rewrites", key, lambda: rewrites_stage.rewrite(seeds, ctx.cfg.rewrites, llm, progress),
                     progress, seeds.height)


@task(name="moderation", task_run_name="moderation-{category}-{shard}", **TASK_OPTS)
def moderation_task(ctx: BuildContext, candidates: pl.DataFrame, category: str, shard: int, progress) -> StageResult:
    mods = [ctx.hub.model(m, "moderator") for m in ctx.cfg.moderation.moderators]
    key = ["moderation", candidates.select("prompt_id", "prompt").rows(), [c.model_dump() for c in ctx.categories],
           ctx.cfg.moderation.explain, [_spec_dump(m) for m in ctx.cfg.moderation.moderators],
           ensemble.load_template(ensemble.TEMPLATE).sha256]
    return run_shard(ctx, "moderation", key, lambda: ensemble.moderate(
        candidates, ctx.categories, mods, ctx.cfg.moderation.explain, progress), progress, candidates.height * len(mods))


@task(name="dedup", **TASK_OPTS)
def dedup_task(ctx: BuildContext, pool_frames: dict[str, pl.DataFrame], against: pl.DataFrame) -> dict[str, StageResult]:
    """Both pools in one task: MiniLM loads once (only if some text is not in the embedding cache).

    A prompt that is itself in an earlier release (`dedup.against`, same prompt id) is not a duplicate of itself: it
    stays, and only the pool's new prompts are compared, with each other and with every earlier prompt.
    """
    with Embedder(ctx.work_dir / "embeddings.sqlite", batch_size=ctx.cfg.dedup.batch_size) as embedder:
        results = {}
        for pool, records in pool_frames.items():
            released = pl.col("prompt_id").is_in(against["prompt_id"].implode())
            new = records.filter(~released)
            key = ["dedup", pool, new.select("prompt_id", "prompt").rows(), ctx.cfg.dedup.threshold,
                   against["prompt_id"].to_list()]

            def compute(new=new) -> StageResult:
                return near_dedup(new, embedder.encode(new["prompt"].to_list()), ctx.cfg.dedup.threshold,
                                  embedder.encode(against["prompt"].to_list()) if against.height else None,
                                  against["prompt_id"].to_list() if against.height else None)

            result = run_shard(ctx, "dedup", key, compute)
            kept_released = records.filter(released).select(
                "prompt_id", pl.lit(True).alias("kept"), pl.lit(None, pl.Utf8).alias("duplicate_of"),
                pl.lit(None, pl.Float64).alias("similarity"))
            order = records.select("prompt_id").with_row_index("_order")
            result.records = (pl.concat([result.records, kept_released.cast(result.records.schema)])
                              .join(order, on="prompt_id").sort("_order").drop("_order"))
            results[pool] = result
    return results


@task(name="answer", task_run_name="{role}-{category}-{shard}", **TASK_OPTS)
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

    key = ["answer", prompts.select("prompt_id", "prompt").rows(), [_spec_dump(m) for m in specs],
           ctx.cfg.refusal.model_dump(), refusal.JUDGE_TEMPLATE_SHA256]
    return run_shard(ctx, "answers", key, compute, progress, prompts.height * len(members))


def answer_all(ctx: BuildContext, prompts: pl.DataFrame, specs: list, role: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every spec answers every prompt, in tasks per category x shard; returns (responses, failures)."""
    prog = reporter().stage(role, prompts.height * len(specs))
    futures = [answer_task.submit(ctx, part, specs, role, category, i, prog)
               for category in prompts["category"].unique(maintain_order=True).to_list()
               for i, part in enumerate(shards(prompts.filter(pl.col("category") == category), ctx.cfg.shard_size))]
    responses, failures, _ = _collect(futures, RESPONSES)
    reporter().done(role)
    return responses.sort("prompt_id", "member"), failures


# -- the flow -------------------------------------------------------------------------------------------------------
class StageFailedError(RuntimeError):
    """Every request of a stage failed (a dead endpoint, a wrong model name or key): the build stops rather than
    write a release built from nothing."""


def _require_some(stage: str, succeeded: int, failures: pl.DataFrame) -> None:
    if succeeded == 0 and failures.height:
        first = failures.row(0, named=True)
        raise StageFailedError(f"every {stage} request failed ({failures.height} failures); first failure, "
                               f"{first['model']}: {first['reason']}")


def _collect(futures, schema: dict) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    results: list[StageResult] = [f.result() for f in futures]
    records = pl.concat([r.records for r in results], how="vertical") if results else empty(schema)
    failures = pl.concat([r.failures for r in results]) if results else empty(FAILURES)
    notes: dict = {}
    for r in results:
        for k, v in r.notes.items():
            notes.setdefault(k, {}).update(v) if isinstance(v, dict) else notes.__setitem__(k, v)
    return records, failures, notes


def _previous_prompts(folders: list[Path]) -> pl.DataFrame:
    """Prompts of earlier releases, for `dedup.against`."""
    frames = []
    for folder in folders:
        for split in ("benign", "toxic", "hard"):
            path = Path(folder) / f"{split}.parquet"
            if path.exists():
                frames.append(pl.read_parquet(path, columns=["prompt_id", "prompt"]))
    if not frames:
        return pl.DataFrame(schema={"prompt_id": pl.Utf8, "prompt": pl.Utf8})
    return pl.concat(frames).unique("prompt_id", keep="first", maintain_order=True)


def _funnel_markdown(funnel_frame: pl.DataFrame) -> str:
    cols = funnel_frame.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in funnel_frame.iter_rows()]
    return "\n".join(lines)


def release_folder(cfg: BuildConfig, when: datetime) -> Path:
    return cfg.output_dir / cfg.name / when.strftime("%Y%m%d-%H%M%S")


@flow(name="orforge-build", persist_result=False, log_prints=True)
def build_flow(config_path: str, output: str | None = None) -> str:
    """Build a release from the config at `config_path`; returns the release folder."""
    from core.config import load_config  # noqa: PLC0415 - the flow re-reads the file so scheduled runs see edits

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


def run_pipeline(cfg: BuildConfig, categories: list[CategorySpec]) -> Pipeline:
    """Seeds -> rewrites -> moderation -> dedup -> panel -> splits, for `categories`; call it inside a flow run."""
    rep = reporter()
    with LLMHub(cfg.cache_path) as hub:
        ctx = BuildContext(cfg, hub, categories, cfg.work_dir)

        # 1. seeds, one task per category
        prog = rep.stage("seeds", len(categories) * seeds_stage.call_budget(cfg.seeds))
        seeds, seed_failures, notes = _collect([seeds_task.submit(ctx, c.name, prog) for c in categories], SEEDS)
        _require_some("seeds", seeds.height, seed_failures)
        rep.done("seeds")

        # 2. rewrites, per category x shard of seeds
        prog = rep.stage("rewrites", seeds.height)
        futures = [rewrites_task.submit(ctx, part, c.name, i, prog)
                   for c in categories
                   for i, part in enumerate(shards(seeds.filter(pl.col("category") == c.name), cfg.shard_size))]
        candidates, rewrite_failures, _ = _collect(futures, CANDIDATES)
        _require_some("rewrites", candidates.height, rewrite_failures)
        candidates = candidates.unique("prompt_id", keep="first", maintain_order=True)
        rep.done("rewrites")

        # 3. moderation, per category x shard of candidates; every moderator votes on every candidate
        n_mods = len(cfg.moderation.moderators)
        prog = rep.stage("moderation", candidates.height * n_mods)
        futures = [moderation_task.submit(ctx, part, c.name, i, prog)
                   for c in categories
                   for i, part in enumerate(shards(candidates.filter(pl.col("category") == c.name),
                                                   cfg.shard_size))]
        votes, vote_failures, _ = _collect(futures, VOTES)
        _require_some("moderation", votes.height, vote_failures)
        votes = votes.sort("prompt_id", "moderator")  # the same release whatever the shard size
        decisions = ensemble.decide(candidates, votes, n_mods, cfg.moderation.vote)
        rep.done("moderation")

        # 4. dedup of each pool, against earlier releases when configured
        pool_frames = pools(candidates, decisions, seeds, cfg.toxic)
        against = _previous_prompts(cfg.dedup.against)
        deduped = dedup_task(ctx, {name: pool_frames[name] for name in ("benign", "toxic")}, against)
        dedup_results = {name: result.records for name, result in deduped.items()}

        # 5. the refusal panel over the deduplicated benign prompts (or a seeded sample), then the hard rule
        responses, hard, panel_failures = None, None, empty(FAILURES)
        if cfg.panel is not None:
            kept = dedup_results["benign"].filter(pl.col("kept")).select("prompt_id")
            benign_kept = pool_frames["benign"].join(kept, on="prompt_id", how="semi")
            if cfg.panel.sample is not None and cfg.panel.sample < benign_kept.height:
                benign_kept = balanced_sample(benign_kept, size=cfg.panel.sample, seed=cfg.seed)
            responses, panel_failures = answer_all(ctx, benign_kept, cfg.panel.members, "panel")
            _require_some("panel", responses["response"].is_not_null().sum(), panel_failures)
            hard = panel.hard_members(responses)
        else:
            notes["hard"] = "not built: no refusal panel configured"

        # 6. the splits
        splits = assemble_splits(candidates, decisions, dedup_results["benign"], dedup_results["toxic"], seeds,
                                 cfg.splits, cfg.toxic, cfg.seed, hard)
        if hard is not None:
            notes["hard"] = (f"{splits['hard'].height} prompts refused by at least {cfg.splits.hard_min_rejections} "
                             f"of {len(cfg.panel.members)} panel members, out of {hard.height} answered")
        funnel_frame = funnel(seeds, candidates, decisions, dedup_results["benign"], dedup_results["toxic"], splits)
        # Every candidate with its decision, for audits and for tracing where each one went.
        splits["candidates"] = candidates.join(decisions, on="prompt_id", how="left")
        usage = hub.usage_rows()
    tokens: dict[str, dict] = {}
    for row in usage:
        role = tokens.setdefault(row["role"], {"requests": 0, "cached": 0, "failures": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0})
        for k in role:
            role[k] += row[k]
    notes["shards"] = {"reused": ctx.shards_reused, "run": ctx.shards_run}
    notes["usage_by_model"] = usage
    dedup_frame = pl.concat([frame.with_columns(pl.lit(pool).alias("pool")).select("pool", *frame.columns)
                             for pool, frame in dedup_results.items()])
    failures = pl.concat([seed_failures, rewrite_failures, vote_failures, panel_failures])
    return Pipeline(splits, votes, failures, responses, dedup_frame, funnel_frame, tokens, notes)


def build(cfg: BuildConfig, output: Path | None = None) -> Path:
    """Run the pipeline over the config's categories and write the release; call it inside a flow run."""
    started = datetime.now(UTC)
    folder = output or release_folder(cfg, started)
    result = run_pipeline(cfg, resolve_categories(cfg.categories))
    info = ManifestInfo(config=cfg, funnel=result.funnel, tokens=result.tokens, notes=result.notes, name=cfg.name,
                        created=started.isoformat(timespec="seconds"))
    write_release(folder, result.splits, result.votes, result.failures, info, responses=result.responses,
                  dedup=result.dedup)
    write_report(folder)
    _publish_artifact(cfg, result.funnel, folder)
    return folder


def _publish_artifact(cfg: BuildConfig, funnel_frame: pl.DataFrame, folder: Path) -> None:
    try:
        create_markdown_artifact(
            key=f"orforge-funnel-{stable_hash(cfg.name, 8)}",
            markdown=f"## orforge build `{cfg.name}`\n\nRelease: `{folder}`\n\n{_funnel_markdown(funnel_frame)}\n",
            description="Per-category funnel of the build",
        )
    except Exception as e:  # noqa: BLE001 - an artifact is a summary; failing to publish it must not fail the build
        log.warning("could not publish the funnel artifact: %s", e)
