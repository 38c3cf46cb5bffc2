"""Release files: the split CSVs and parquets, the dataset card, and a manifest that hashes every file.

A release folder holds, per split, `<split>.csv` with exactly the columns `prompt,category` (the shape OR-Bench
publishes) and `<split>.parquet` with the lineage; `votes.parquet`, `failures.parquet`, `responses.parquet` (when
given); `README.md`, a dataset card whose YAML header lists one `configs:` entry per non-empty published split so
`datasets.load_dataset(folder, "<split>")` finds it; and `manifest.json`, written last, with the sha256 and size of
every other file. The folder is built aside and renamed into place (`outputs.atomic.atomic_folder`).

The manifest is a `core.manifest.Manifest`: `write_release` builds it once and writes it with `model_dump_json`,
`read_manifest` reads it back typed (a `ManifestError` with one line for a missing or invalid file). Besides the
counts and hashes it records what shapes the data beyond the config: the code version, the versions of the libraries
that make or judge the text (`library_versions`) and the embedding model used for near-duplicate removal.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from orforge.core.config import AtLeast, BuildConfig, RecipeConfig
from orforge.core.manifest import (
    CodeVersion,
    Counts,
    Diversity,
    EmbeddingModel,
    FailureCounts,
    FileHash,
    Libraries,
    Manifest,
    ManifestError,
    MissingManifestError,
    ModelRef,
    ModelUsage,
    ParentRelease,
    QualityRejectionCount,
    QualityRepairCount,
    RoleUsage,
    SplitEntry,
)
from orforge.core.recipes import parse_any
from orforge.outputs.atomic import atomic_folder, write_csv, write_parquet, write_text
from orforge.outputs.diversity import method_note, summary_rows
from orforge.outputs.splits import PUBLISHED_SPLITS

MANIFEST = "manifest.json"
CARD = "README.md"
QUALITY_REJECTIONS_FILE = "quality_rejections.parquet"
CSV_COLUMNS = ("prompt", "category")
# Frames kept in the release for the record but not offered as a dataset config.
RECORD_ONLY_SPLITS = frozenset({"contested", "candidates"})
# Written into a release after it is sealed (audit, evaluate, the report) and rewritten by later commands: they are
# derived from the hashed files, so the manifest does not list them and `verify_release` does not flag them.
DERIVED = ("report.html", "audit/", "evaluations/", "diff.json", "diff.md")

_REPO_ROOT = Path(__file__).resolve().parent.parent
# Packages whose version can change the text a build produces or how it is judged and deduplicated. Only installed
# ones are recorded (llama-cpp-python and vllm are optional backends). Like lm-evaluation-harness's record of the
# transformers version next to its results, this is what to compare first when two builds of one config differ.
SHAPING_LIBRARIES = ("openai", "llama-cpp-python", "vllm", "sentence-transformers", "transformers", "faiss-cpu",
                     "polars", "prefect", "torch")
# Config keys whose values must not reach a public manifest (a `${VAR}` may have expanded a key into `extra`).
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|secret|password|passwd|authorization|token|bearer)$", re.I)


@dataclass(frozen=True)
class CardFacts:
    """What a recipe's card text is written from (the YAML header above it is the same for every recipe)."""

    name: str
    info: ManifestInfo
    split_rows: dict[str, int]
    configs: list[str]
    split_groups: pl.DataFrame
    version: CodeVersion
    license_id: str
    tokens: dict[str, RoleUsage]
    notes: dict[str, Any]
    layout: ReleaseLayout
    currency: str | None = None  # of the tokens' cost, when the config is priced
    tables: tuple[str, ...] = ()  # the further parquet tables written beside the splits (`write_release(tables=)`)


@dataclass(frozen=True)
class ReleaseLayout:
    """How a recipe's release is laid out: the published splits in order, which frames are kept for the record only
    (parquet, no CSV, no dataset config), the CSV columns, the column split rows are counted by, the card's tags and
    the card text (everything below the YAML header). OR-Bench's is `ORBENCH_LAYOUT`; another recipe passes its own
    to `write_release`, so the folder, manifest, hashes and card header are written by one piece of code."""

    split_order: tuple[str, ...]
    record_only: frozenset[str]
    csv_columns: tuple[str, ...]
    group_column: str
    tags: tuple[str, ...]
    card_body: Any  # Callable[[CardFacts], list[str]]


@dataclass
class ManifestInfo:
    """What the release needs to know beyond its frames.

    `config` is the run's BuildConfig (or its dict); `funnel` is `outputs.splits.funnel(...)`; `tokens` maps a role
    to its counts (`core.manifest.RoleUsage` fields, e.g. {"moderator": {"prompt_tokens": ..., ...}}); `usage` is
    the same per (role, model) as `LLMHub.usage_rows()` returns; `notes` are run facts worth a line in the card (e.g.
    {"hard": "not built: no panel configured"}). `license` defaults to the config's. `embedding_model` defaults to
    the bundled MiniLM that `dedup.embed.Embedder` uses unless told otherwise (`embedding_model_facts`).

    A `usage_by_model` entry in `notes` (where flows.build has put the per-model usage) is taken as `usage` when
    `usage` is not given, so it lands in its typed field and not in the free-form notes.
    """

    config: BuildConfig | dict
    funnel: pl.DataFrame | None = None
    tokens: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    license: str | None = None
    created: str | None = None
    usage: list[dict[str, Any]] | None = None
    parent: ParentRelease | None = None
    embedding_model: EmbeddingModel | None = None
    recipe: str | None = None  # default: the config's `recipe`, else "orbench"
    diversity: Diversity | None = None  # outputs.diversity.measure over the published splits
    # The quality gate's rejected rows (core.records.QUALITY_REJECTIONS): written as quality_rejections.parquet and
    # counted per stage, category and rule in `counts.quality_rejections`. None: the recipe ran no gate.
    quality: pl.DataFrame | None = None
    # The rows the gate repaired and kept (core.records.QUALITY_REPAIRS): counted in `counts.quality_repairs`.
    quality_repairs: pl.DataFrame | None = None


@dataclass
class ReleaseCheck:
    """The result of `verify_release`: files whose bytes changed, files gone, and files the manifest does not list."""

    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.unexpected)

    def __str__(self) -> str:
        if self.ok:
            return "release verified: every file matches the manifest"
        parts = [f"{k}: {', '.join(v)}" for k, v in vars(self).items() if v]
        return "release does not match its manifest; " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- facts


def code_version() -> CodeVersion:
    """orforge's version and, when running from a git checkout, its commit and whether the tree had changes."""
    try:
        version = importlib.metadata.version("orforge")
    except importlib.metadata.PackageNotFoundError:
        try:
            version = tomllib.loads((_REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            version = "unknown"
    info: dict[str, Any] = {"orforge": version, "git_commit": None, "git_dirty": None}
    try:
        top = _git("rev-parse", "--show-toplevel")
        # An installed copy may sit inside somebody else's repository; only our own checkout counts.
        if top is not None and Path(top).resolve() == _REPO_ROOT:
            info["git_commit"] = _git("rev-parse", "HEAD")
            if info["git_commit"] is not None:
                status = _git("status", "--porcelain", "--untracked-files=no")
                info["git_dirty"] = bool(status) if status is not None else None
    except OSError:
        pass
    return CodeVersion(**info)


def library_versions() -> dict[str, str]:
    """{package: version} for each of `SHAPING_LIBRARIES` that is installed."""
    versions = {}
    for package in SHAPING_LIBRARIES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@functools.cache
def embedding_model_facts() -> EmbeddingModel | None:
    """The bundled MiniLM as `dedup.embed.Embedder` uses it by default: its store key and a sha256 over its files
    (relative path and content of each, in order). None when the model package is not installed. Hashed once per
    process: about 90 MB of weights."""
    from orforge.dedup.embed import Embedder, bundled_model_dir, model_files_sha256

    try:
        folder = bundled_model_dir()
    except (ImportError, FileNotFoundError):
        return None
    sha256 = model_files_sha256(folder)
    with Embedder(None) as embedder:  # in-memory store: only its key is wanted
        key = embedder.model_key
    # The default key is "<model name>/<package>==<version>" (the bundled folder itself is just called "model").
    return EmbeddingModel(name=key.split("/", 1)[0], key=key, sha256=sha256)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: "<redacted>" if _SECRET_KEY.search(str(k)) and v not in (None, "") else _redact(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_redact(v) for v in node]
    return node


def _as_build_config(config: BuildConfig | dict) -> BuildConfig | None:
    if isinstance(config, BuildConfig):
        return config
    try:
        return BuildConfig.model_validate(config)
    except Exception:
        return None


def _recipe_of(config: Any) -> str:
    recipe = config.get("recipe") if isinstance(config, dict) else getattr(config, "recipe", None)
    return recipe if isinstance(recipe, str) and recipe else "orbench"


def _as_recipe_config(config: RecipeConfig | dict) -> RecipeConfig | None:
    """The config as a typed recipe config (any recipe), or None for a dict that no longer validates."""
    if isinstance(config, RecipeConfig):
        return config
    try:
        return parse_any(config, "manifest")
    except Exception:
        return None


def _config_facts(config: RecipeConfig | dict) -> tuple[dict, str]:
    cfg = _as_recipe_config(config)
    if cfg is not None:
        return _redact(cfg.model_dump(mode="json")), cfg.config_hash()
    raw = json.dumps(config, sort_keys=True, default=str)
    return _redact(json.loads(raw)), hashlib.sha256(raw.encode()).hexdigest()


def models_by_role(config: RecipeConfig | dict) -> dict[str, list[ModelRef]]:
    cfg = _as_recipe_config(config)
    if cfg is None:
        return {}
    roles: dict[str, list[ModelRef]] = {}
    for role, spec in cfg.all_specs():
        roles.setdefault(role, []).append(ModelRef(name=spec.label, backend=spec.backend, model=spec.model))
    return roles


def _vote_rule(cfg: BuildConfig) -> str:
    n = len(cfg.moderation.moderators)
    vote = cfg.moderation.vote
    if isinstance(vote, AtLeast):
        return f"at least {vote.at_least} of {n} moderators"
    return f"{vote} of {n} moderator{'s' if n != 1 else ''}"


def _by_category(frame: pl.DataFrame, column: str = "category") -> dict[str, int]:
    if frame.height == 0 or column not in frame.columns:
        return {}
    return dict(frame.group_by(column).len().sort(column).iter_rows())


def _failure_counts(failures: pl.DataFrame) -> FailureCounts:
    by_stage: dict[str, dict[str, int]] = {}
    if failures.height:
        rows = failures.group_by("stage", "reason").len().sort("stage", "reason").iter_rows()
        for stage, reason, n in rows:
            by_stage.setdefault(str(stage), {})[str(reason)] = n
    return FailureCounts(total=failures.height, by_stage=by_stage)


def file_hash(path: Path) -> FileHash:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return FileHash(sha256=digest.hexdigest(), bytes=path.stat().st_size)


def _file_hashes(folder: Path) -> dict[str, FileHash]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or rel.startswith(DERIVED):
            continue
        files[rel] = file_hash(path)
    return files


# ---------------------------------------------------------------------------------------------------- card


def flat_items(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, scalar or list of scalars) pairs for a JSON-like note, so nested facts read as lines, not as
    Python reprs: {"shards": {"run": 2}} -> [("shards.run", 2)]. A list of mappings gets one key per item."""
    if isinstance(node, dict):
        if not node:
            return [(prefix, None)] if prefix else []
        out: list[tuple[str, Any]] = []
        for key, value in node.items():
            out += flat_items(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(node, list | tuple) and any(isinstance(v, dict | list | tuple) for v in node):
        out = []
        for i, value in enumerate(node):
            out += flat_items(value, f"{prefix}[{i}]")
        return out
    return [(prefix, list(node) if isinstance(node, tuple) else node)]


def _md_scalar(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(none)"
    return "(none)" if value is None else str(value)


def _md_table(frame: pl.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def with_total(frame: pl.DataFrame, label: str = "total") -> pl.DataFrame:
    """`frame` with a row summing its integer columns, labelled `label` in its first column (category or root)."""
    if frame.height == 0:
        return frame
    numeric = [c for c, t in frame.schema.items() if t.is_integer()]
    key = frame.columns[0] if frame.columns[0] not in numeric else "category"
    total = frame.select(pl.lit(label).alias(key), *[pl.col(c).sum().cast(pl.Int64) for c in numeric])
    return pl.concat([frame.cast({c: pl.Int64 for c in numeric}), total], how="diagonal_relaxed")


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


_SPLIT_MEANING = {
    "benign": "prompts the moderators judged benign, after near-duplicate removal; a model should answer these",
    "toxic": "prompts judged toxic (and, when configured, the toxic seeds), balanced per category; a control set "
    "that a model should refuse",
    "hard": "benign prompts that at least {k} of the {n} panel models refused; the hardest over-refusal cases",
}


def _card(facts: CardFacts) -> str:
    """The dataset card: a YAML header that `datasets.load_dataset` reads (one config per non-empty published split,
    the first the default), then the recipe's own text."""
    header = {
        "pretty_name": facts.name,
        "license": facts.license_id,
        "language": ["en"],
        "task_categories": ["text-generation"],
        "tags": [*facts.layout.tags, "llm-evaluation", "orforge"],
        "size_categories": [_size_category(sum(facts.split_rows[c] for c in facts.configs))],
        "configs": [
            {"config_name": c, "data_files": f"{c}.csv", **({"default": True} if i == 0 else {})}
            for i, c in enumerate(facts.configs)
        ],
    }
    out = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    return "\n".join(out + facts.layout.card_body(facts))


def card_build_facts(facts: CardFacts) -> list[str]:
    """Card lines every recipe shares after its own method text: code version, tables of rows per split and group,
    tokens per role, and the run's notes."""
    version, tokens, notes = facts.version, facts.tokens, facts.notes
    commit = f", commit `{version.git_commit}`" if version.git_commit else ""
    out = [f"Code: orforge {version.orforge}{commit}; library versions in `{MANIFEST}`.", ""]
    if facts.info.funnel is not None and facts.info.funnel.height:
        out += ["### Funnel", "", "Rows at each stage.", "", _md_table(with_total(facts.info.funnel, "**total**")), ""]
    if facts.info.quality is not None and facts.info.quality.height:
        per_rule = facts.info.quality.group_by("stage", "rule").len(name="rejected").sort("stage", "rule")
        out += ["### Quality gate", "", (f"{facts.info.quality.height} generated texts failed the quality gate and "
                                         f"went no further (each under the first rule it failed; every one in "
                                         f"`{QUALITY_REJECTIONS_FILE}`)."), "", _md_table(per_rule), ""]
    if facts.split_groups.height:
        out += ["### Rows per split and " + facts.layout.group_column.replace("_", " "), "",
                _md_table(with_total(facts.split_groups, "**total**")), ""]
    if tokens:
        cost_column = f"cost ({facts.currency})" if facts.currency else "cost"
        token_rows = [{"role": role, **dict((cost_column, f"{v:.4g}") if k == "cost" else (k, v)
                                            for k, v in usage.model_dump(exclude_none=True).items())}
                      for role, usage in tokens.items()]
        out += ["### Tokens per role", "", _md_table(pl.DataFrame(token_rows, infer_schema_length=None)), ""]
    if facts.info.diversity is not None and facts.info.diversity.rows:
        out += ["### Diversity", "", method_note(facts.info.diversity), "",
                _md_table(pl.DataFrame(summary_rows(facts.info.diversity))), ""]
    if notes:
        out += ["### Notes", ""] + [f"- {k}: {_md_scalar(v)}" for k, v in flat_items(notes)] + [""]
    return out


def _orbench_card_body(facts: CardFacts) -> list[str]:
    name, info, split_rows, configs = facts.name, facts.info, facts.split_rows, facts.configs
    version, license_id = facts.version, facts.license_id  # noqa: F841 - version is used in the text below
    cfg = _as_build_config(info.config)
    out = [
        f"# {name}",
        "",
        f"{name} is a set of prompts for measuring over-refusal: requests that touch sensitive subjects and can look "
        "harmful at first glance, yet can be answered safely. A model that refuses them is being overcautious. "
        f"It was built with orforge {version.orforge} following the approach of OR-Bench (Cui et al., 2024): a "
        "model writes harmful seed prompts for each category, a second model rewrites each seed into prompts that "
        "keep the sensitive surface but not the harmful intent, and several moderator models vote on every "
        "rewrite. Prompts are sorted by the vote into benign and toxic sets and near-duplicates are removed.",
        "",
        "## Splits",
        "",
    ]
    k = cfg.splits.hard_min_rejections if cfg else "k"
    n_panel = len(cfg.panel.members) if cfg and cfg.panel else "n"
    rows = []
    for split, n in split_rows.items():
        meaning = _SPLIT_MEANING.get(split, "").format(k=k, n=n_panel)
        if split in RECORD_ONLY_SPLITS:
            meaning = "candidates the vote left undecided; kept for the record, not offered as a config"
        where = f"`{split}.csv`, `{split}.parquet`" if split not in RECORD_ONLY_SPLITS else f"`{split}.parquet`"
        config = f"`{split}`" if split in configs else "-"
        rows.append({"config": config, "files": where, "rows": n, "contents": meaning})
    out += [_md_table(pl.DataFrame(rows)), ""]
    empty = [s for s in split_rows if s not in configs and s not in RECORD_ONLY_SPLITS]
    if empty:
        out += [f"Empty, so not offered as a config: {', '.join(empty)}.", ""]
    out += [
        "Each CSV has exactly the columns `prompt,category`. The parquet file of the same name keeps the lineage of "
        "every row: `prompt_id` (a content hash), `source` (rewrite or seed), the seed it came from (`seed_id`, "
        "`seed`), the model that wrote it (`model`) and the sha256 of the prompt template used (`template_sha256`), "
        "and the moderator vote counts (`n_toxic`, `n_benign`, `n_missing`). The hard split adds the panel members "
        "that refused each prompt (`rejected_by`, `n_rejections`). `votes.parquet` holds every moderator vote, "
        "`failures.parquet` every request that failed, and `responses.parquet` (when present) the panel's answers.",
        "",
    ]
    if "contrast_pairs" in facts.tables:
        out += [
            "`contrast_pairs.csv` and `contrast_pairs.parquet` pair every benign prompt with the toxic seed it was "
            "rewritten from (`pair_id`, `category`, `prompt_id`, `prompt`, `seed_id`, `seed`): a model should answer "
            "the first and refuse the second; `orforge evaluate` counts how often it does.",
            "",
        ]
    out += [
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("path/to/{name}", "{configs[0] if configs else "benign"}")',
        "```",
        "",
        "## How it was built",
        "",
    ]
    if cfg is not None:
        roles = models_by_role(cfg)

        def names(role: str) -> str:
            return ", ".join(f"`{m.name}` ({m.backend}: {m.model})" for m in roles.get(role, [])) or "none"

        out += [
            "- Seeds: " + "; ".join(
                ([f"{names('seeds')}, up to {cfg.seeds.seeds_per_category} per category"] if cfg.seeds else [])
                + ([f"brought from `{cfg.seed_file.path.name}`"] if cfg.seed_file else [])) + ".",
            f"- Rewrites: {names('rewrites')}, {cfg.rewrites.rewrites_per_seed} per seed.",
            f"- Moderators: {names('moderator')}. Vote rule: {_vote_rule(cfg)}. A candidate the rule leaves "
            "undecided is contested and one the moderators could not judge is unjudged; neither enters a split.",
            f"- Near-duplicates: removed with sentence embeddings at a cosine similarity threshold of "
            f"{cfg.dedup.threshold}, separately for the benign and toxic pools"
            + (f", and against {len(cfg.dedup.against)} earlier release(s)." if cfg.dedup.against else "."),
            f"- Toxic split: up to {cfg.splits.toxic_size} prompts, balanced over categories; seeds "
            f"{'included' if cfg.toxic.include_seeds else 'not included'}.",
        ]
        if cfg.panel is not None:
            out.append(
                f"- Hard split: panel {names('panel')}; refusals detected by `{cfg.refusal.method}`"
                + (f" with judge {names('judge')}" if cfg.refusal.judge else "")
                + f"; a prompt refused by at least {cfg.splits.hard_min_rejections} members qualifies; up to "
                f"{cfg.splits.hard_size}, balanced over categories."
            )
        else:
            out.append("- Hard split: no panel configured.")
        if cfg.splits.benign_per_category:
            out.append(f"- Benign split capped at {cfg.splits.benign_per_category} prompts per category.")
        out += [f"- Sampling seed: {cfg.seed}. Config sha256: `{cfg.config_hash()}` (full config in `{MANIFEST}`).", ""]
    else:
        out += [f"The run's settings are recorded in `{MANIFEST}`.", ""]
    out += card_build_facts(facts)

    out += [
        "## Intended use",
        "",
        "Measuring over-refusal: run a model on the benign (or hard) prompts and count how often it declines. Run "
        "it on the toxic prompts too: a model that answers everything would look perfect on the benign set, so "
        "the useful result is a low refusal rate on benign prompts together with a high one on toxic prompts. "
        "Report both.",
        "",
        "## Limits",
        "",
        "- Every prompt was written by a language model, not collected from people, so the phrasing and topics "
        "reflect what those models produce.",
        "- The benign and toxic labels are votes of moderator models, not human judgements. Some benign prompts are "
        "arguably harmful and some toxic prompts arguably fine; treat the labels as a strong filter, not ground "
        "truth.",
        "- Category labels come from the category the seed was written for; a rewrite may drift toward another one.",
        "- The hard split depends on the panel that was used; a different panel would pick different prompts.",
        "- Do not train on these prompts if you also evaluate on them.",
        "",
        "## License and citation",
        "",
        f"License: `{license_id}`. The prompts were produced by the models listed above; check their terms of use "
        "before redistributing. The method follows OR-Bench; if you use this dataset, please cite it:",
        "",
        "```bibtex",
        "@article{cui2024orbench,",
        "  title   = {OR-Bench: An Over-Refusal Benchmark for Large Language Models},",
        "  author  = {Cui, Justin and Chiang, Wei-Lin and Stoica, Ion and Hsieh, Cho-Jui},",
        "  journal = {arXiv preprint arXiv:2405.20947},",
        "  year    = {2024}",
        "}",
        "```",
        "",
    ]
    return out


ORBENCH_LAYOUT = ReleaseLayout(
    split_order=PUBLISHED_SPLITS, record_only=RECORD_ONLY_SPLITS, csv_columns=CSV_COLUMNS, group_column="category",
    tags=("over-refusal", "safety"), card_body=_orbench_card_body)


# ---------------------------------------------------------------------------------------------------- write / read


def write_release(
    folder: Path | str,
    splits: dict[str, pl.DataFrame],
    votes: pl.DataFrame | None,
    failures: pl.DataFrame,
    manifest_info: ManifestInfo | dict,
    responses: pl.DataFrame | None = None,
    overwrite: bool = False,
    dedup: pl.DataFrame | None = None,
    *,
    layout: ReleaseLayout = ORBENCH_LAYOUT,
    tables: dict[str, pl.DataFrame] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write a complete release to `folder` (built aside, renamed into place) and return its path.

    `splits` maps a split name to its lineage frame; every split gets a parquet, and every one except the layout's
    record-only frames a CSV of the layout's columns (OR-Bench: `prompt,category`). `tables` are further parquet
    files and `files` further text files (name -> content), both hashed in the manifest like everything else.
    Raises `outputs.atomic.ReleaseWriteError` if anything fails, leaving nothing at `folder`.
    """
    info = manifest_info if isinstance(manifest_info, ManifestInfo) else ManifestInfo(**manifest_info)
    folder = Path(folder)
    name = info.name or getattr(info.config, "name", None) or folder.name
    tables, files = tables or {}, files or {}
    for split, frame in {**splits, **tables}.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", split):
            raise ValueError(f"split name {split!r} (or table name) must be lowercase letters, digits, '-' or '_'")
    for split, frame in splits.items():
        absent = [c for c in layout.csv_columns if c not in frame.columns]
        if absent and split not in layout.record_only:
            raise ValueError(f"split {split!r} lacks column(s) {absent}")

    order = [s for s in layout.split_order if s in splits] + sorted(s for s in splits if s not in layout.split_order)
    split_rows = {s: splits[s].height for s in order}
    configs = [s for s in order if s not in layout.record_only and splits[s].height > 0]
    published = [s for s in order if s not in layout.record_only]
    split_groups = _split_category_table({s: splits[s] for s in published}, layout.group_column)
    version = code_version()
    config_dict, config_hash = _config_facts(info.config)
    recipe_config = _as_recipe_config(info.config)
    license_id = info.license or getattr(info.config, "license", None) or "unknown"
    notes = dict(info.notes)
    usage = info.usage if info.usage is not None else notes.pop("usage_by_model", None)
    if info.usage is not None:
        notes.pop("usage_by_model", None)
    tokens = {role: RoleUsage.model_validate(v) for role, v in info.tokens.items()}
    # Everything but the file hashes is known before writing: a field that does not fit fails before any file.
    manifest = Manifest(
        recipe=info.recipe or _recipe_of(info.config),
        name=name,
        created=info.created or datetime.now(UTC).isoformat(timespec="seconds"),
        license=license_id,
        code=version,
        config=config_dict,
        config_hash=config_hash,
        models=models_by_role(info.config),
        splits=[
            SplitEntry(name=s, rows=split_rows[s], parquet=f"{s}.parquet",
                       csv=f"{s}.csv" if s not in layout.record_only else None, config=s in configs,
                       by_category=_by_category(splits[s], layout.group_column))
            for s in order
        ],
        counts=Counts(
            funnel=info.funnel.to_dicts() if info.funnel is not None else None,
            votes=votes.height if votes is not None else None,
            responses=responses.height if responses is not None else None,
            dedup_dropped=int((~dedup["kept"]).sum()) if dedup is not None else None,
            quality_rejections=quality_rejection_counts(info.quality) if info.quality is not None else None,
            quality_repairs=(quality_repair_counts(info.quality_repairs) if info.quality_repairs is not None
                             else None),
        ),
        tokens=tokens,
        usage=[ModelUsage.model_validate(row) for row in usage or []],
        currency=recipe_config.price_currency() if recipe_config is not None else None,
        failures=_failure_counts(failures),
        notes=_redact(notes),
        parent=info.parent,
        libraries=Libraries(packages=library_versions(),
                            embedding_model=info.embedding_model or embedding_model_facts()),
        diversity=info.diversity,
    )
    facts = CardFacts(name, info, split_rows, configs, split_groups, version, license_id, tokens, manifest.notes,
                      layout, manifest.currency, tables=tuple(tables))

    with atomic_folder(folder, overwrite=overwrite) as tmp:
        for split in order:
            frame = splits[split]
            write_parquet(tmp / f"{split}.parquet", frame)
            if split not in layout.record_only:
                write_csv(tmp / f"{split}.csv", frame.select(layout.csv_columns))
        if votes is not None:
            write_parquet(tmp / "votes.parquet", votes)
        write_parquet(tmp / "failures.parquet", failures)
        if responses is not None:
            write_parquet(tmp / "responses.parquet", responses)
        if dedup is not None:  # one row per pooled prompt: kept, or the prompt it duplicates and the similarity
            write_parquet(tmp / "dedup.parquet", dedup)
        if info.quality is not None:  # one row per generated text the quality gate rejected, with rule and detail
            write_parquet(tmp / QUALITY_REJECTIONS_FILE, info.quality)
        for table, frame in tables.items():
            write_parquet(tmp / f"{table}.parquet", frame)
        for file_name, text in files.items():
            write_text(tmp / file_name, text)
        write_text(tmp / CARD, _card(facts))
        manifest.files = _file_hashes(tmp)
        write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    return folder


def quality_rejection_counts(rejected: pl.DataFrame) -> list[QualityRejectionCount]:
    """The quality gate's rejections per stage, category and rule, for `counts.quality_rejections`."""
    if rejected.height == 0:
        return []
    counts = rejected.group_by("stage", "category", "rule").len(name="n").sort("stage", "category", "rule")
    return [QualityRejectionCount.model_validate(row) for row in counts.iter_rows(named=True)]


def quality_repair_counts(repaired: pl.DataFrame) -> list[QualityRepairCount]:
    """The rows the quality gate repaired per stage, category and repairs, for `counts.quality_repairs`."""
    if repaired.height == 0:
        return []
    counts = repaired.group_by("stage", "category", "repairs").len(name="n").sort("stage", "category", "repairs")
    return [QualityRepairCount.model_validate(row) for row in counts.iter_rows(named=True)]


def _split_category_table(splits: dict[str, pl.DataFrame], column: str = "category") -> pl.DataFrame:
    """Rows per value of `column` (category, or target concept) and split."""
    seen = set().union(*(set(f[column].to_list()) for f in splits.values())) if splits else set()
    groups = sorted(seen - {None})
    table = pl.DataFrame({column: groups}, schema={column: pl.Utf8})
    for split, frame in splits.items():
        counts = frame.group_by(column).len(name=split).cast({column: pl.Utf8, split: pl.Int64})
        table = table.join(counts, on=column, how="left").with_columns(pl.col(split).fill_null(0))
    return table


def read_manifest(folder: Path | str) -> Manifest:
    """The release's manifest, typed. Raises MissingManifestError (a FileNotFoundError) when the folder has none and
    ManifestError when the file is not a manifest this code reads; both messages are one line naming the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MissingManifestError(f"{folder}: not a release folder (no {MANIFEST})")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror or e})") from None
    return Manifest.from_json(text, str(path))


def amend_card(folder: Path | str, text: str) -> None:
    """Replace a sealed release's card with `text` and record the card's new sha256 in its manifest, so
    `verify_release` still passes (the manifest's own sha256, `manifest_sha256`, changes). `orforge audit --human`
    uses it to quote the people's agreement figures in the card of the release they labelled."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    write_text(folder / CARD, text)
    manifest.files[CARD] = file_hash(folder / CARD)
    write_text(folder / MANIFEST, manifest.model_dump_json(indent=2) + "\n")


def manifest_sha256(folder: Path | str) -> str:
    """sha256 of the manifest file's bytes: one hash that pins every file of a release."""
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()


def read_release(folder: Path | str) -> dict[str, Any]:
    """Load a release: {"manifest" (a Manifest), "splits": {name: lineage frame}, "votes", "failures", "responses"
    (or None)}."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    splits = {s.name: pl.read_parquet(folder / s.parquet) for s in manifest.splits}
    responses = folder / "responses.parquet"
    return {
        "manifest": manifest,
        "splits": splits,
        "votes": pl.read_parquet(folder / "votes.parquet"),
        "failures": pl.read_parquet(folder / "failures.parquet"),
        "responses": pl.read_parquet(responses) if responses.is_file() else None,
    }


def verify_release(folder: Path | str) -> ReleaseCheck:
    """Re-hash every file against the manifest; the result lists changed, missing and unlisted files."""
    folder = Path(folder)
    expected = read_manifest(folder).files
    actual = _file_hashes(folder)
    check = ReleaseCheck()
    for rel, meta in expected.items():
        if rel not in actual:
            check.missing.append(rel)
        elif actual[rel] != meta:
            check.changed.append(rel)
    check.unexpected = sorted(set(actual) - set(expected))
    return check
