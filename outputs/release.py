"""Release files: the split CSVs and parquets, the dataset card, and a manifest that hashes every file.

A release folder holds, per split, `<split>.csv` with exactly the columns `prompt,category` (the shape OR-Bench
publishes) and `<split>.parquet` with the lineage; `votes.parquet`, `failures.parquet`, `responses.parquet` (when
given); `README.md`, a dataset card whose YAML header lists one `configs:` entry per non-empty published split so
`datasets.load_dataset(folder, "<split>")` finds it; and `manifest.json`, written last, with the sha256 and size of
every other file. The folder is built aside and renamed into place (`outputs.atomic.atomic_folder`).
"""

from __future__ import annotations

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

from core.config import AtLeast, BuildConfig
from outputs.atomic import atomic_folder, write_csv, write_json, write_parquet, write_text
from outputs.splits import PUBLISHED_SPLITS

MANIFEST = "manifest.json"
CARD = "README.md"
CSV_COLUMNS = ("prompt", "category")
# Frames kept in the release for the record but not offered as a dataset config.
RECORD_ONLY_SPLITS = frozenset({"contested", "candidates"})
# Written into a release after it is sealed (audit, evaluate, the report) and rewritten by later commands: they are
# derived from the hashed files, so the manifest does not list them and `verify_release` does not flag them.
DERIVED = ("report.html", "audit/", "evaluations/", "diff.json", "diff.md")

_REPO_ROOT = Path(__file__).resolve().parent.parent
# Config keys whose values must not reach a public manifest (a `${VAR}` may have expanded a key into `extra`).
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|secret|password|passwd|authorization|token|bearer)$", re.I)


@dataclass
class ManifestInfo:
    """What the release needs to know beyond its frames.

    `config` is the run's BuildConfig (or its dict); `funnel` is `outputs.splits.funnel(...)`; `tokens` maps a role
    to its token counts (e.g. {"moderator": {"prompt_tokens": ..., "completion_tokens": ...}}); `notes` are run
    facts worth a line in the card (e.g. {"hard": "not built: no panel configured"}).
    """

    config: BuildConfig | dict
    funnel: pl.DataFrame | None = None
    tokens: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    license: str = "unknown"
    created: str | None = None


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


def code_version() -> dict[str, Any]:
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
    return info


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


def _config_facts(config: BuildConfig | dict) -> tuple[dict, str]:
    cfg = _as_build_config(config)
    if cfg is not None:
        return _redact(cfg.model_dump(mode="json")), cfg.config_hash()
    raw = json.dumps(config, sort_keys=True, default=str)
    return _redact(json.loads(raw)), hashlib.sha256(raw.encode()).hexdigest()


def models_by_role(config: BuildConfig | dict) -> dict[str, list[dict[str, str]]]:
    cfg = _as_build_config(config)
    if cfg is None:
        return {}
    roles: dict[str, list[dict[str, str]]] = {}
    for role, spec in cfg.all_specs():
        roles.setdefault(role, []).append({"name": spec.label, "backend": spec.backend, "model": spec.model})
    return roles


def _vote_rule(cfg: BuildConfig) -> str:
    n = len(cfg.moderation.moderators)
    vote = cfg.moderation.vote
    if isinstance(vote, AtLeast):
        return f"at least {vote.at_least} of {n} moderators"
    return f"{vote} of {n} moderator{'s' if n != 1 else ''}"


def _by_category(frame: pl.DataFrame) -> dict[str, int]:
    if frame.height == 0 or "category" not in frame.columns:
        return {}
    return dict(frame.group_by("category").len().sort("category").iter_rows())


def _failure_counts(failures: pl.DataFrame) -> dict[str, Any]:
    by_stage: dict[str, dict[str, int]] = {}
    if failures.height:
        rows = failures.group_by("stage", "reason").len().sort("stage", "reason").iter_rows()
        for stage, reason, n in rows:
            by_stage.setdefault(str(stage), {})[str(reason)] = n
    return {"total": failures.height, "by_stage": by_stage}


def _file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or rel.startswith(DERIVED):
            continue
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        files[rel] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return files


# ---------------------------------------------------------------------------------------------------- card


def _md_table(frame: pl.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def _with_total(frame: pl.DataFrame) -> pl.DataFrame:
    if frame.height == 0:
        return frame
    numeric = [c for c, t in frame.schema.items() if t.is_integer()]
    total = frame.select(pl.lit("**total**").alias("category"), *[pl.col(c).sum() for c in numeric])
    return pl.concat([frame.cast({c: pl.Int64 for c in numeric}), total.cast({c: pl.Int64 for c in numeric})])


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


def _card(
    name: str,
    info: ManifestInfo,
    split_rows: dict[str, int],
    configs: list[str],
    split_categories: pl.DataFrame,
    version: dict[str, Any],
) -> str:
    cfg = _as_build_config(info.config)
    header = {
        "pretty_name": name,
        "license": info.license,
        "language": ["en"],
        "task_categories": ["text-generation"],
        "tags": ["over-refusal", "safety", "llm-evaluation", "orforge"],
        "size_categories": [_size_category(sum(split_rows[c] for c in configs))],
        "configs": [
            {"config_name": c, "data_files": f"{c}.csv", **({"default": True} if i == 0 else {})}
            for i, c in enumerate(configs)
        ],
    }
    out = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out += [
        f"# {name}",
        "",
        f"{name} is a set of prompts for measuring over-refusal: requests that touch sensitive subjects and can look "
        "harmful at first glance, yet can be answered safely. A model that refuses them is being overcautious. "
        f"It was built with orforge {version['orforge']} following the approach of OR-Bench (Cui et al., 2024): a "
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
            return ", ".join(f"`{m['name']}` ({m['backend']}: {m['model']})" for m in roles.get(role, [])) or "none"

        out += [
            f"- Seeds: {names('seeds')}, up to {cfg.seeds.seeds_per_category} per category.",
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
    commit = f", commit `{version['git_commit']}`" if version["git_commit"] else ""
    out += [f"Code: orforge {version['orforge']}{commit}.", ""]

    if info.funnel is not None and info.funnel.height:
        out += ["### Funnel", "", "Prompts per category at each stage.", "", _md_table(_with_total(info.funnel)), ""]
    if split_categories.height:
        out += ["### Rows per split and category", "", _md_table(_with_total(split_categories)), ""]
    if info.tokens:
        token_rows = [
            {"role": role, **(v if isinstance(v, dict) else {"tokens": v})} for role, v in info.tokens.items()
        ]
        out += ["### Tokens per role", "", _md_table(pl.DataFrame(token_rows)), ""]
    if info.notes:
        out += ["### Notes", ""] + [f"- {k}: {v}" for k, v in info.notes.items()] + [""]

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
        f"License: `{info.license}`. The prompts were produced by the models listed above; check their terms of use "
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
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- write / read


def write_release(
    folder: Path | str,
    splits: dict[str, pl.DataFrame],
    votes: pl.DataFrame,
    failures: pl.DataFrame,
    manifest_info: ManifestInfo | dict,
    responses: pl.DataFrame | None = None,
    overwrite: bool = False,
    dedup: pl.DataFrame | None = None,
) -> Path:
    """Write a complete release to `folder` (built aside, renamed into place) and return its path.

    `splits` maps a split name to its lineage frame (as `outputs.splits.assemble_splits` returns); every split
    gets a parquet, and every one except the record-only `contested` a `prompt,category` CSV. Raises
    `outputs.atomic.ReleaseWriteError` if anything fails, leaving nothing at `folder`.
    """
    info = manifest_info if isinstance(manifest_info, ManifestInfo) else ManifestInfo(**manifest_info)
    folder = Path(folder)
    cfg = _as_build_config(info.config)
    name = info.name or (cfg.name if cfg else folder.name)
    for split, frame in splits.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", split):
            raise ValueError(f"split name {split!r} must be lowercase letters, digits, '-' or '_'")
        absent = [c for c in CSV_COLUMNS if c not in frame.columns]
        if absent:
            raise ValueError(f"split {split!r} lacks column(s) {absent}")

    order = [s for s in PUBLISHED_SPLITS if s in splits] + sorted(s for s in splits if s not in PUBLISHED_SPLITS)
    split_rows = {s: splits[s].height for s in order}
    configs = [s for s in order if s not in RECORD_ONLY_SPLITS and splits[s].height > 0]
    published = [s for s in order if s not in RECORD_ONLY_SPLITS]
    split_categories = _split_category_table({s: splits[s] for s in published})
    version = code_version()
    config_dict, config_hash = _config_facts(info.config)

    with atomic_folder(folder, overwrite=overwrite) as tmp:
        for split in order:
            frame = splits[split]
            write_parquet(tmp / f"{split}.parquet", frame)
            if split not in RECORD_ONLY_SPLITS:
                write_csv(tmp / f"{split}.csv", frame.select(CSV_COLUMNS))
        write_parquet(tmp / "votes.parquet", votes)
        write_parquet(tmp / "failures.parquet", failures)
        if responses is not None:
            write_parquet(tmp / "responses.parquet", responses)
        if dedup is not None:  # one row per pooled prompt: kept, or the prompt it duplicates and the similarity
            write_parquet(tmp / "dedup.parquet", dedup)
        write_text(tmp / CARD, _card(name, info, split_rows, configs, split_categories, version))
        manifest = {
            "name": name,
            "created": info.created or datetime.now(UTC).isoformat(timespec="seconds"),
            "code": version,
            "config": config_dict,
            "config_hash": config_hash,
            "models": models_by_role(info.config),
            "splits": [
                {
                    "name": s,
                    "rows": split_rows[s],
                    "parquet": f"{s}.parquet",
                    "csv": f"{s}.csv" if s not in RECORD_ONLY_SPLITS else None,
                    "config": s in configs,
                    "by_category": _by_category(splits[s]),
                }
                for s in order
            ],
            "counts": {
                "funnel": info.funnel.to_dicts() if info.funnel is not None else None,
                "votes": votes.height,
                "responses": responses.height if responses is not None else None,
                "dedup_dropped": int((~dedup["kept"]).sum()) if dedup is not None else None,
            },
            "tokens": info.tokens,
            "failures": _failure_counts(failures),
            "notes": info.notes,
            "files": _file_hashes(tmp),
        }
        write_json(tmp / MANIFEST, manifest)
    return folder


def _split_category_table(splits: dict[str, pl.DataFrame]) -> pl.DataFrame:
    seen = set().union(*(set(f["category"].to_list()) for f in splits.values())) if splits else set()
    categories = sorted(seen - {None})
    table = pl.DataFrame({"category": categories}, schema={"category": pl.Utf8})
    for split, frame in splits.items():
        counts = frame.group_by("category").len(name=split).cast({"category": pl.Utf8, split: pl.Int64})
        table = table.join(counts, on="category", how="left").with_columns(pl.col(split).fill_null(0))
    return table


def read_manifest(folder: Path | str) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a release folder (no {MANIFEST})")
    return json.loads(path.read_text())


def read_release(folder: Path | str) -> dict[str, Any]:
    """Load a release: {"manifest", "splits": {name: lineage frame}, "votes", "failures", "responses" (or None)}."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    splits = {s["name"]: pl.read_parquet(folder / s["parquet"]) for s in manifest["splits"]}
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
    expected = read_manifest(folder)["files"]
    actual = _file_hashes(folder)
    check = ReleaseCheck()
    for rel, meta in expected.items():
        if rel not in actual:
            check.missing.append(rel)
        elif actual[rel] != {"sha256": meta["sha256"], "bytes": meta["bytes"]}:
            check.changed.append(rel)
    check.unexpected = sorted(set(actual) - set(expected))
    return check
