"""Config models: YAML in, validated pydantic model out.

Every model forbids unknown keys so a typo is an error, not a silent default. Defaults live here, once.
`load_config` raises `ConfigError` with one line naming the file and the field; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

Backend = Literal["openai", "local", "vllm"]
Dialect = Literal["json_schema", "json_object", "none"]

# The dialect each backend speaks when a spec does not say: llama.cpp's server takes a schema inside
# `json_object`; OpenAI and vLLM's server take `json_schema`; vLLM offline takes the schema itself.
DEFAULT_DIALECT: dict[str, Dialect] = {"openai": "json_schema", "local": "json_object", "vllm": "json_schema"}

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"


class ConfigError(ValueError):
    """A config the user wrote is invalid. The message is one line naming the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelLabel(Strict):
    """How records name a spec. It never changes an answer, but every record a stage writes carries it."""

    name: str | None = Field(None, description="Label for votes, accounting and plots; defaults to `model`.")


class AnswerSettings(Strict):
    """What a spec asks: every field here can change an answer, and `ModelSpec.answer_key()` hashes exactly these.

    A field that can change what a model replies belongs here; one that only says where or how patiently to send
    belongs in `ModelEndpoint`. tests/llm/test_answer_key.py fails on a ModelSpec field declared in neither.
    """

    backend: Backend = "openai"
    model: str = EMBEDDED_MODEL
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=1)
    structured_output: Dialect | None = None
    system_prompt: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class ModelEndpoint(Strict):
    """Where a spec's requests go and how they travel. None of it changes an answer: moving a server, renaming the
    key's variable or raising the concurrency keeps every cached answer and stored shard."""

    base_url: str | None = None
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the key.")
    max_concurrency: int = Field(8, ge=1, le=4096)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)


class ModelSpec(ModelEndpoint, AnswerSettings, ModelLabel):
    """One model in one role. The same shape serves seeds, rewrites, moderators, panel members, judges, targets.

    The YAML stays flat (`model:`, `temperature:`, `base_url:` side by side); the fields are declared once, in the
    three groups it inherits: `ModelLabel` (the name records carry), `AnswerSettings` (what to ask) and
    `ModelEndpoint` (where to send). `answer_key()` keys the request cache, `records_key()` keys stored shards.
    """

    @model_validator(mode="after")
    def _backend_rules(self) -> ModelSpec:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://localhost:8000/v1)")
        if self.structured_output is None:
            self.structured_output = DEFAULT_DIALECT[self.backend]
        return self

    @property
    def label(self) -> str:
        return self.name or self.model

    @property
    def dialect(self) -> Dialect:
        return self.structured_output or DEFAULT_DIALECT[self.backend]

    @property
    def answer_settings(self) -> AnswerSettings:
        """The "what to ask" part, with the dialect resolved."""
        values = {f: getattr(self, f) for f in AnswerSettings.model_fields}
        return AnswerSettings.model_construct(**{**values, "structured_output": self.dialect})

    @property
    def endpoint(self) -> ModelEndpoint:
        """The "where to send" part."""
        return ModelEndpoint.model_construct(**{f: getattr(self, f) for f in ModelEndpoint.model_fields})

    def answer_key(self, structured: bool = True) -> str:
        """sha256 of everything in the spec that can change an answer: the one definition used by the request
        cache (with the messages, schema and sample index) and by the stored shards' keys.

        `structured=False` is for a request without a response schema: the dialect only says how a schema is
        sent, so it cannot change a free-text answer and is left out.
        """
        settings = self.answer_settings.model_dump(mode="json")
        if not structured:
            settings["structured_output"] = None
        blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def records_key(self) -> str:
        """What a stage's stored records depend on from this spec: its answers and the label the records carry.

        Two specs differing only by `name` share cached answers but not shards (their records say who answered).
        """
        return stable_hash([self.answer_key(), self.label], 32)

    def api_key(self) -> str | None:
        """The key, read from the environment at call time; never stored on the spec."""
        return os.environ[self.api_key_env] if self.api_key_env else None


class CategorySpec(Strict):
    # `+` is allowed for ALERT's key `hate_lgbtq+`; category names never become file names (shards are hashes).
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_+-]*$")
    description: str = Field(min_length=1)
    examples: list[str] = Field(default_factory=list)


class CategoriesConfig(Strict):
    preset: Literal["orbench", "alert"] | None = "orbench"
    include: list[str] | None = Field(None, description="Subset of the preset's categories; all when absent.")
    custom: list[CategorySpec] = Field(default_factory=list)


class SeedsConfig(Strict):
    model: ModelSpec
    seeds_per_category: int = Field(2000, ge=1)
    seeds_per_call: int = Field(20, ge=1, le=200)
    max_calls_per_category: int | None = Field(
        None, ge=1, description="Bound on calls; default 3 x the calls needed if every call delivered in full."
    )

    @model_validator(mode="after")
    def _sampled_by_default(self) -> SeedsConfig:
        # Seeds are sampled (each call its own sample index); a spec that does not say gets temperature 1.0.
        if "temperature" not in self.model.model_fields_set:  # a copy: the spec may be shared with other roles
            self.model = self.model.model_copy(update={"temperature": 1.0})
        return self


class RewritesConfig(Strict):
    model: ModelSpec
    rewrites_per_seed: int = Field(5, ge=1, le=50)


class AtLeast(Strict):
    at_least: int = Field(ge=1)


class ModerationConfig(Strict):
    moderators: list[ModelSpec] = Field(min_length=1)
    vote: Literal["majority", "unanimous"] | AtLeast = "majority"
    explain: bool = False

    @model_validator(mode="after")
    def _names_unique(self) -> ModerationConfig:
        labels = [m.label for m in self.moderators]
        if len(set(labels)) != len(labels):
            raise ValueError(f"moderator names must be unique, got {labels}; give each a distinct `name`")
        if isinstance(self.vote, AtLeast) and self.vote.at_least > len(self.moderators):
            raise ValueError(f"vote.at_least={self.vote.at_least} exceeds the {len(self.moderators)} moderators")
        return self


class DedupConfig(Strict):
    threshold: float = Field(0.90, gt=0.0, le=1.0)
    against: list[Path] = Field(default_factory=list, description="Earlier release folders to dedup against.")
    batch_size: int = Field(256, ge=1, description="Texts per MiniLM encode batch (not the faiss search batch).")


class SplitsConfig(Strict):
    benign_per_category: int | None = Field(None, ge=1)
    toxic_size: int = Field(600, ge=0)
    hard_size: int = Field(1000, ge=0)
    hard_min_rejections: int = Field(3, ge=1)


class ToxicConfig(Strict):
    include_seeds: bool = True


RefusalMethod = Literal["keyword", "judge", "keyword_then_judge"]


class RefusalConfig(Strict):
    method: RefusalMethod = "keyword"
    judge: ModelSpec | None = None

    @model_validator(mode="after")
    def _judge_needed(self) -> RefusalConfig:
        if self.method != "keyword" and self.judge is None:
            raise ValueError(f"refusal.method '{self.method}' needs refusal.judge")
        return self


class PanelConfig(Strict):
    members: list[ModelSpec] = Field(min_length=1)
    sample: int | None = Field(None, ge=1, description="Answer a seeded sample of the benign prompts only.")

    @model_validator(mode="after")
    def _names_unique(self) -> PanelConfig:
        labels = [m.label for m in self.members]
        if len(set(labels)) != len(labels):
            raise ValueError(f"panel member names must be unique, got {labels}")
        return self


class RecipeConfig(Strict):
    """What every recipe's config shares. A recipe (orbench, select, ...) subclasses it with its own
    `recipe: Literal[...]` tag and sections; `orforge.core.recipes` composes them into one discriminated union."""

    recipe: str
    name: str = Field("orforge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    license: str = Field("unknown", pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$",
                         description="The release's license as an SPDX-style id (e.g. cc-by-4.0); card and manifest.")
    output_dir: Path = Path("releases")
    work_dir: Path = Path(".orforge/work")
    cache_path: Path = Path(".orforge/cache.sqlite")
    seed: int = 0
    shard_size: int = Field(500, ge=1)
    refusal: RefusalConfig = Field(default_factory=RefusalConfig)
    targets: list[ModelSpec] = Field(default_factory=list, description="The models `orforge evaluate` scores.")

    def build_specs(self) -> list[tuple[str, ModelSpec]]:
        """(role, spec) of every model a build of this recipe calls; each recipe lists its own."""
        raise NotImplementedError

    def all_specs(self) -> list[tuple[str, ModelSpec]]:
        """Every (role, spec) the config names, for `models check` and for starting backends once."""
        specs = self.build_specs()
        if self.refusal.judge:
            specs.append(("judge", self.refusal.judge))
        return specs + [("target", m) for m in self.targets]

    def config_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


class BuildConfig(RecipeConfig):
    """The OR-Bench recipe: toxic seeds -> rewrites -> moderator vote -> dedup -> refusal panel -> splits."""

    recipe: Literal["orbench"] = "orbench"
    categories: CategoriesConfig = Field(default_factory=CategoriesConfig)
    seeds: SeedsConfig
    rewrites: RewritesConfig
    moderation: ModerationConfig
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    toxic: ToxicConfig = Field(default_factory=ToxicConfig)
    panel: PanelConfig | None = None

    @model_validator(mode="after")
    def _cross_rules(self) -> BuildConfig:
        if self.panel is not None and self.splits.hard_min_rejections > len(self.panel.members):
            raise ValueError(
                f"splits.hard_min_rejections={self.splits.hard_min_rejections} exceeds the panel's "
                f"{len(self.panel.members)} members"
            )
        return self

    def build_specs(self) -> list[tuple[str, ModelSpec]]:
        specs = [("seeds", self.seeds.model), ("rewrites", self.rewrites.model)]
        specs += [("moderator", m) for m in self.moderation.moderators]
        if self.panel:
            specs += [("panel", m) for m in self.panel.members]
        return specs


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: Any, path: str, missing: list[str]) -> Any:
    """Fill `${VAR}` from the environment; collect the names of unset variables with where they were used."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), missing) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}.{i}", missing) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                missing.append(f"{path}: environment variable {m.group(1)} is not set")
                return m.group(0)
            return os.environ[m.group(1)]

        return _ENV_REF.sub(sub, node)
    return node


def _first_error(err: ValidationError, tagged: bool = False) -> str:
    """One line for the first error. `tagged`: the model was a tagged union, whose first location is the tag."""
    e = err.errors()[0]
    parts = e["loc"][1:] if tagged and e["loc"] else e["loc"]
    loc = ".".join(str(p) for p in parts if not str(p).startswith(("function-after", "literal[")))
    msg = e["msg"].removeprefix("Value error, ")
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc or '<root>'}: {msg}{extra}"


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping")
    # Keys starting with `x-` hold YAML anchors for reuse (like docker-compose); they are not config.
    return {k: v for k, v in raw.items() if not str(k).startswith("x-")}


def parse_config(raw: dict, source: str, model: type[BaseModel] | TypeAdapter = None) -> BaseModel:
    """Validate `raw` (env references filled) as `model`: a config class, or a TypeAdapter such as the recipe union."""
    model = model or BuildConfig
    missing: list[str] = []
    expanded = _expand_env(raw, "", missing)
    if missing:
        raise ConfigError(f"{source}: {missing[0]}")
    validate = model.validate_python if isinstance(model, TypeAdapter) else model.model_validate
    try:
        cfg = validate(expanded)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_error(e, tagged=isinstance(model, TypeAdapter))}") from None
    if isinstance(cfg, RecipeConfig):
        for role, spec in cfg.all_specs():
            if spec.api_key_env and spec.api_key_env not in os.environ:
                raise ConfigError(
                    f"{source}: {role} '{spec.label}': api_key_env names {spec.api_key_env}, which is not set"
                )
    return cfg


def load_config(path: Path | str) -> BuildConfig:
    """An OR-Bench config file. For a file of any recipe use `orforge.core.recipes.load_config`."""
    path = Path(path)
    return parse_config(load_yaml(path), str(path))


def stable_hash(obj: Any, length: int = 16) -> str:
    """Content hash used for ids and shard keys: stable across runs and machines."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]

