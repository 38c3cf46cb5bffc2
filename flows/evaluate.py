"""The `evaluate` flow: score target models on a release, OR-Bench style.

Each target answers the hard and toxic splits (and a seeded sample of benign when asked); refusals are detected with
the config's refusal method; per model and split the rejection rate with a 95% Wilson interval, overall and per
category. Over-refusal is the rejection rate on hard (lower is better); safety is the rate on toxic (higher is
better). Everything goes through the request cache and the shard store, so a rerun sends nothing.

Contrast pairs: every benign prompt a target answers (hard, and the benign sample) came from a toxic seed
(`contrast_pairs.parquet`); the target answers each of those seeds once too, and `contrast.csv` counts per target how
each pair went: answers the benign one and refuses the seed (wanted), refuses both (over-refusal), answers both
(unsafe), or the reverse, with 95% Wilson intervals.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import flow

from orforge.core.categories import resolve_categories
from orforge.core.config import BuildConfig, load_config
from orforge.flows.build import BuildContext, answer_all
from orforge.flows.common import EvaluateInputError
from orforge.flows.common import new_folder
from orforge.llm.hub import LLMHub
from orforge.outputs.atomic import atomic_folder, write_csv, write_parquet
from orforge.outputs.contrast import load_contrast_pairs
from orforge.outputs.report import write_report
from orforge.outputs.scoring import category_plot, contrast_scores, scatter_plot, score, scoring_frame
from orforge.outputs.splits import balanced_sample


def load_splits(release: Path, benign_sample: int | None, seed: int) -> dict[str, pl.DataFrame]:
    if not (release / "manifest.json").is_file():
        raise EvaluateInputError(f"{release}: not a release folder (no manifest.json)")
    splits = {}
    for name in ("hard", "toxic"):
        path = release / f"{name}.parquet"
        if path.exists():
            splits[name] = pl.read_parquet(path)
    if benign_sample:
        benign = pl.read_parquet(release / "benign.parquet")
        splits["benign"] = balanced_sample(benign, size=min(benign_sample, benign.height), seed=seed)
    if not any(frame.height for frame in splits.values()):
        raise EvaluateInputError(f"{release}: the hard and toxic splits are empty or missing; nothing to score")
    return splits


def contrast_seeds(release: Path, prompts: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The contrast pairs whose benign prompt is among `prompts`, and their distinct seeds as prompts to answer
    (prompt_id = seed_id, prompt = the seed text, category)."""
    pairs = load_contrast_pairs(release).join(prompts.select("prompt_id"), on="prompt_id", how="semi")
    seeds = pairs.select(pl.col("seed_id").alias("prompt_id"), pl.col("seed").alias("prompt"), "category")
    return pairs, seeds.unique("prompt_id", keep="first", maintain_order=True)


def evaluate(release: Path, cfg: BuildConfig, benign_sample: int | None = None) -> Path:
    if not cfg.targets:
        raise EvaluateInputError("the config lists no `targets:` to evaluate")
    splits = load_splits(release, benign_sample, cfg.seed)
    prompts = (pl.concat([f.select("prompt_id", "prompt", "category") for f in splits.values()])
               .unique("prompt_id", keep="first", maintain_order=True))
    pairs, seeds = contrast_seeds(release, prompts)
    asked = pl.concat([prompts, seeds]).unique("prompt_id", keep="first", maintain_order=True)
    with LLMHub(cfg.cache_path) as hub:
        ctx = BuildContext(cfg, hub, cfg.work_dir, categories=resolve_categories(cfg.categories))
        responses, failures = answer_all(ctx, asked, cfg.targets, "target")
        usage = hub.usage_rows()
    scores = score(scoring_frame(responses, splits))
    contrast = contrast_scores(pairs, responses)
    folder = new_folder(release / "evaluations")
    with atomic_folder(folder) as tmp:
        write_parquet(tmp / "responses.parquet", responses)
        write_parquet(tmp / "failures.parquet", failures)
        write_csv(tmp / "scores.csv", scores)
        write_csv(tmp / "contrast.csv", contrast)
        write_csv(tmp / "usage.csv", pl.DataFrame(usage) if usage else pl.DataFrame())
        scatter_plot(scores, tmp / "scatter.png")
        category_plot(scores, tmp / "categories.png")
    write_report(release)
    return folder


@flow(name="orforge-evaluate", persist_result=False)
def evaluate_flow(release: str, config_path: str, benign_sample: int | None = None) -> str:
    return str(evaluate(Path(release), load_config(config_path), benign_sample))
