"""The release manifest as a typed model: what `manifest.json` holds, written once and read back typed.

`outputs.release.write_release` builds a `Manifest` and writes it with `model_dump_json`; every reader goes through
`Manifest.from_json` (via `outputs.release.read_manifest`), never through raw dicts. Every model forbids unknown
keys, so a writer and a reader that drift apart fail loudly on the next read instead of silently dropping a field.

`schema_version` says which shape a file has; it goes up whenever a field is added, renamed or removed:
- 1: the first typed manifest.
- 2: adds optional fields only: `counts.quality_rejections` and `counts.quality_repairs` (the quality gate),
  `cost` per role and per model with the manifest's `currency`, and `diversity`. A version-1 file validates as it is
  (the new fields are None), and so does one written while they were being added (it says 1 but may hold some).
A manifest read back keeps the version its file says; a release written now says `SCHEMA_VERSION`. A rename or a
removal would also need a step in `from_json` that moves the old shape into the new one, as `_from_unversioned`
does for manifests written before `schema_version` existed (no `schema_version` key): they keep the per-model usage
and the parent release inside `notes`, which it moves into their typed fields. A file claiming a version this code
does not know (newer, or below 1) is refused with a message that says so.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 2


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or not of a known shape; the message is one line naming the file."""


class MissingManifestError(ManifestError, FileNotFoundError):
    """The folder has no manifest.json at all (not a release folder)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeVersion(_Strict):
    """orforge's version and, from a git checkout, the commit and whether the tree had uncommitted changes."""

    orforge: str
    git_commit: str | None = None
    git_dirty: bool | None = None


class EmbeddingModel(_Strict):
    """The sentence-embedding model near-duplicate removal used: its name, the key its vectors are stored under
    (`dedup.embed.Embedder.model_key`) and a sha256 over its files, so a changed model is visible."""

    name: str
    key: str
    sha256: str | None = None


class Libraries(_Strict):
    """Versions of the installed packages that shape the data (only those installed), and the embedding model."""

    packages: dict[str, str] = Field(default_factory=dict)
    embedding_model: EmbeddingModel | None = None


class ModelRef(_Strict):
    name: str
    backend: str
    model: str


class SplitEntry(_Strict):
    """One split in the release: its files, rows per category, and whether it is offered as a dataset config."""

    name: str
    rows: int
    parquet: str
    csv: str | None = None
    config: bool = False
    by_category: dict[str, int] = Field(default_factory=dict)


class QualityRejectionCount(_Strict):
    """Generated rows of one stage and category that the quality gate rejected by one rule (generators.quality)."""

    stage: str
    category: str | None = None
    rule: str
    n: int


class QualityRepairCount(_Strict):
    """Generated rows of one stage and category that the quality gate repaired (took `repairs` off) and kept."""

    stage: str
    category: str | None = None
    repairs: str  # what was taken off, e.g. "list marker" or "label, quotes" (generators.quality.repair)
    n: int


class Counts(_Strict):
    """`funnel` is one row per category (orbench: outputs.splits.funnel) or root concept (select:
    outputs.concept_splits.select_funnel): {"<group>": ..., "<stage>": count, ...}. `votes` is None for a recipe
    without moderator votes."""

    funnel: list[dict[str, int | str | None]] | None = None
    votes: int | None = 0
    responses: int | None = None
    dedup_dropped: int | None = None
    # The quality gate's rejections per stage, category and rule (rows in quality_rejections.parquet); None for a
    # release built before the gate existed.
    quality_rejections: list[QualityRejectionCount] | None = None
    # The rows it repaired and kept instead (per stage, category and repairs); None for a release built before the
    # repair step existed or without a gate.
    quality_repairs: list[QualityRepairCount] | None = None


class RoleUsage(_Strict):
    """Requests and tokens of one role. A count the run did not record is None, not zero. `cost` is what the
    tokens sent cost at the config's prices (in `Manifest.currency`); None when no model of the role is priced."""

    requests: int | None = None
    cached: int | None = None
    failures: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None


class ModelUsage(RoleUsage):
    """Requests and tokens of one model in one role (llm.hub.LLMHub.usage_rows)."""

    role: str
    model: str


class FailureCounts(_Strict):
    total: int = 0
    by_stage: dict[str, dict[str, int]] = Field(default_factory=dict)


class FileHash(_Strict):
    sha256: str
    bytes: int


class ParentRelease(_Strict):
    """The release this one grew from (add-category). Named by its folder's name, never by a path on the builder's
    disk; `manifest_sha256` pins the exact parent and `files` its file hashes at the time."""

    folder: str
    name: str | None = None
    created: str | None = None
    manifest_sha256: str | None = None
    config_hash: str | None = None
    files: dict[str, FileHash] = Field(default_factory=dict)


class DiversityRow(_Strict):
    """The diversity of one split's group (a category or other group value, or "all"), measured on a seeded sample
    of `sampled` of its `rows` prompts (outputs.diversity). Self-BLEU and Distinct-n are in [0, 1]; a metric that
    needs two prompts is None for a group of one. `*_low`/`*_high` are 95% t-intervals of the per-prompt scores."""

    split: str
    by: str | None = None  # the column grouped by; None for the split as a whole
    group: str = "all"
    rows: int
    sampled: int
    self_bleu: float | None = None
    self_bleu_low: float | None = None
    self_bleu_high: float | None = None
    distinct_1: float | None = None
    distinct_2: float | None = None
    mean_cosine: float | None = None
    mean_cosine_low: float | None = None
    mean_cosine_high: float | None = None
    clusters: int | None = None


class DiversityReference(_Strict):
    """A published dataset's figures, shown beside a release's own (measured by their authors, not by orforge)."""

    dataset: str
    self_bleu: float | None = None
    distinct_2: float | None = None
    source: str


class Diversity(_Strict):
    """How varied the release's text is (outputs.diversity): at most `sample_size` prompts per group, drawn with
    `seed`; `self_bleu` names the BLEU variant, `clusters` the clustering rule at `threshold`."""

    sample_size: int
    seed: int
    threshold: float
    self_bleu: str
    clusters: str
    embedding_model: str | None = None
    rows: list[DiversityRow] = Field(default_factory=list)
    references: list[DiversityReference] = Field(default_factory=list)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    recipe: str = "orbench"
    name: str
    created: str
    license: str = "unknown"
    code: CodeVersion
    config: dict[str, Any]
    config_hash: str
    models: dict[str, list[ModelRef]] = Field(default_factory=dict)
    splits: list[SplitEntry] = Field(default_factory=list)
    counts: Counts = Field(default_factory=Counts)
    tokens: dict[str, RoleUsage] = Field(default_factory=dict)
    usage: list[ModelUsage] = Field(default_factory=list)
    currency: str | None = Field(None, description="Currency of every `cost` (the config's prices); None: unpriced.")
    failures: FailureCounts = Field(default_factory=FailureCounts)
    notes: dict[str, Any] = Field(default_factory=dict)
    parent: ParentRelease | None = None
    libraries: Libraries = Field(default_factory=Libraries)
    diversity: Diversity | None = None
    files: dict[str, FileHash] = Field(default_factory=dict)

    def split(self, name: str) -> SplitEntry | None:
        return next((s for s in self.splits if s.name == name), None)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        """Parse and validate a manifest's text; `source` names the file in a ManifestError's one-line message."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"{source}: a manifest is a JSON object, got {type(raw).__name__}")
        version = raw.get("schema_version")
        if version is None:
            raw = _from_unversioned(raw)
        elif not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            raise ManifestError(f"{source}: schema_version {version!r} is not one this orforge reads "
                                f"(1 to {SCHEMA_VERSION}); upgrade orforge")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise ManifestError(f"{source}: {where}: {first['msg']}{more}") from None


def _from_unversioned(raw: dict[str, Any]) -> dict[str, Any]:
    """A manifest from before `schema_version`: the per-model usage and the parent release lived in `notes`."""
    raw = {**raw, "schema_version": 1}
    notes = dict(raw.get("notes") or {})
    usage = notes.pop("usage_by_model", None)
    if isinstance(usage, list) and "usage" not in raw:
        raw["usage"] = usage
    parent = notes.pop("parent", None)
    if isinstance(parent, dict) and "parent" not in raw:
        # Old manifests named the parent by an absolute path; only its last part is kept.
        folder = str(parent.get("folder") or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        raw["parent"] = {"folder": folder, "config_hash": parent.get("config_hash"),
                         "files": parent.get("files") or {}}
    raw["notes"] = notes
    return raw
