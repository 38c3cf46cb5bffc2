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


class ModelPrice(Strict):
    """What a model's tokens cost, per million: accounting only (`orforge plan`, the progress line, the manifest)."""

    input_per_million: float = Field(ge=0.0, description="Price of one million prompt (input) tokens.")
    output_per_million: float = Field(ge=0.0, description="Price of one million completion (output) tokens.")
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code; one currency per config.")

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


class ModelLabel(Strict):
    """How records name a spec and how its usage is accounted. Neither changes an answer: the name enters shard keys
    (records carry it), the price enters no key at all."""

    name: str | None = Field(None, description="Label for votes, accounting and plots; defaults to `model`.")
    price: ModelPrice | None = Field(None, description="Per-million-token prices, for cost estimates and accounting.")


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

    base_url: str | list[str] | None = Field(
        None, description="The server's URL, or a list of URLs: replicas of one model, each with its own cap.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the key.")
    max_concurrency: int = Field(8, ge=1, le=4096)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)


def _check_replicas(backend: str, urls: list[str]) -> None:
    """A `base_url` list names replicas of one model (llm/replicas.py): each URL once, and only for `openai`."""
    if backend != "openai":
        raise ValueError(f"base_url: a list of replica URLs needs backend 'openai', not {backend!r}")
    if not urls:
        raise ValueError("base_url: the list of replica URLs is empty; give one URL or several")
    seen: set[str] = set()
    for url in urls:
        if not url.strip():
            raise ValueError("base_url: a replica URL is empty")
        if url.rstrip("/") in seen:
            raise ValueError(f"base_url: replica {url} is listed twice")
        seen.add(url.rstrip("/"))


class ModelSpec(ModelEndpoint, AnswerSettings, ModelLabel):
    """One model in one role. The same shape serves seeds, rewrites, moderators, panel members, judges, targets.

    The YAML stays flat (`model:`, `temperature:`, `base_url:` side by side); the fields are declared once, in the
    three groups it inherits: `ModelLabel` (the name records carry), `AnswerSettings` (what to ask) and
    `ModelEndpoint` (where to send). `answer_key()` keys the request cache, `records_key()` keys stored shards.
    """

    @model_validator(mode="after")
    def _backend_rules(self) -> ModelSpec:
        if isinstance(self.base_url, list):
            _check_replicas(self.backend, self.base_url)
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

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float | None:
        """What these tokens cost at the spec's price, or None when it has none."""
        return self.price.cost(prompt_tokens, completion_tokens) if self.price is not None else None

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


class SeedFileConfig(Strict):
    """Toxic seeds you bring: a CSV, JSONL or parquet file with a prompt and a category column, used instead of
    generated seeds (no `seeds:` section) or besides them. Categories must be ones the build has."""

    path: Path
    prompt_column: str = "prompt"
    category_column: str = "category"


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
    index: Literal["auto", "exact", "ivf"] = Field(
        "auto", description="Search for earlier kept prompts: exact, faiss IVF (approximate), or auto (exact below "
        "50K prompts, IVF above); see dedup/near.py.")
    encoder: Literal["torch", "onnx"] = Field(
        "torch", description="MiniLM backend: torch (sentence-transformers fp32, the reference) or onnx (int8 "
        "onnxruntime export, cosine >= 0.99 to torch; see docs/benchmarks.md).")


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


class DiversityConfig(Strict):
    """Diversity metrics of the published text (outputs.diversity), in the manifest, card and report."""

    enabled: bool = True
    sample: int = Field(1000, ge=2, description="At most this many prompts per split and group are measured, drawn "
                                                "with the config's seed (Self-BLEU and the cosine are quadratic).")


GateStage = Literal["seeds", "rewrites", "questions", "paraphrases"]
# The quality gate's rules in the order they are tried (a rejected row names the first it failed); each is a switch
# of QualityRules.
QUALITY_RULES = ("punctuation_only", "placeholder", "length", "same_as_source", "instruction_echo", "language",
                 "request_form")


class QualityRules(Strict):
    """The quality gate's rules for one generation stage (generators/quality.py); each can be switched off."""

    punctuation_only: bool = Field(True, description="Reject rows with no letters (ellipses, numbers, punctuation).")
    placeholder: bool = Field(True, description="Reject leftover template or placeholder text: {..}, [..], <..>, "
                                                "(revised), (unfinished), 'Rewrite:', numbering, the template's "
                                                "own headings, a leading or trailing ellipsis.")
    length: bool = True
    min_words: int = Field(3, ge=1)
    max_words: int = Field(100, ge=1)
    instruction_echo: bool = Field(True, description="Reject a row whose word trigrams mostly come from the prompt "
                                                     "the model was given.")
    echo_threshold: float = Field(0.6, gt=0.0, le=1.0, description="Share of the row's trigrams found in the prompt.")
    same_as_source: bool = Field(True, description="Reject a rewrite or paraphrase (near) equal to the text it was "
                                                   "made from.")
    source_similarity: float = Field(0.85, gt=0.0, le=1.0, description="Token-set Jaccard or character ratio (of "
                                                                       "normalized texts) at which a row is its source.")
    language: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1,
                                 description="ISO 639-1 codes accepted by the language rule (py3langid).")
    language_confidence: float = Field(0.5, ge=0.0, le=1.0, description="A row is rejected only when the detector "
                                                                        "gives another language at least this "
                                                                        "probability.")
    request_form: bool = Field(True, description="Reject rows that are neither a question nor a request.")
    repair: bool = Field(True, description="Before the rules, take list numbering, a label such as 'Rewrite:', "
                                           "wrapping quotes or an ellipsis off a complete request and keep the "
                                           "repaired text (with its own id) instead of rejecting the row.")

    @model_validator(mode="after")
    def _bounds(self) -> QualityRules:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words={self.min_words} exceeds max_words={self.max_words}")
        return self


class QualityConfig(QualityRules):
    """The quality gate after every generation stage: these rules for every stage, with `stages` overriding some of
    them for one (e.g. `stages: {seeds: {request_form: false}}`). `enabled: false` turns the gate off."""

    enabled: bool = True
    stages: dict[GateStage, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _overrides_valid(self) -> QualityConfig:
        for stage in self.stages:
            try:
                self.for_stage(stage)
            except ValidationError as e:
                raise ValueError(f"stages.{stage}: {_first_error(e)}") from None
        return self

    def for_stage(self, stage: str) -> QualityRules | None:
        """The rules for `stage`, or None when the gate is off."""
        if not self.enabled:
            return None
        base = self.model_dump(exclude={"enabled", "stages"})
        return QualityRules.model_validate({**base, **self.stages.get(stage, {})})


RunnerKind = Literal["threads", "dask", "ray"]


class RunnerConfig(Strict):
    """Where a recipe's tasks run (flows/runner.py): Prefect's thread pool in this process, or the worker processes
    of a Dask or Ray cluster. Where tasks run never changes what is built, so it is not in `config_hash()`."""

    kind: RunnerKind = "threads"
    address: str | None = Field(None, description="An existing cluster (Dask tcp://host:8786, Ray ray://host:10001 or "
                                                  "auto); none: a local cluster is started for the run.")
    workers: int | None = Field(None, ge=1, le=4096, description=(
        "threads: the thread pool's size (Prefect's default when absent). dask/ray: the cluster's worker processes "
        "(Ray: its CPUs); each gets 1/workers of every endpoint's max_concurrency. Default for a local cluster: the "
        "CPU count; needed with an address."))

    @model_validator(mode="after")
    def _address_rules(self) -> RunnerConfig:
        if self.address and self.kind == "threads":
            raise ValueError("address needs kind dask or ray (threads run in this process)")
        if self.address and self.workers is None:
            raise ValueError(f"workers: give the number of worker processes of the cluster at {self.address}; every "
                             "endpoint's max_concurrency is divided among them")
        return self

    def processes(self) -> int:
        """How many processes make model calls at once, each with its own hub: 1 for threads."""
        if self.kind == "threads":
            return 1
        return self.workers or os.cpu_count() or 1


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
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

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
        return hashlib.sha256(self.model_dump_json(exclude={"runner"}).encode()).hexdigest()

    def price_currency(self) -> str | None:
        """The currency of the config's prices (parse_config allows one per config), or None when nothing is priced."""
        return next((spec.price.currency for _, spec in self.all_specs() if spec.price is not None), None)


class BuildConfig(RecipeConfig):
    """The OR-Bench recipe: toxic seeds -> rewrites -> moderator vote -> dedup -> refusal panel -> splits."""

    recipe: Literal["orbench"] = "orbench"
    categories: CategoriesConfig = Field(default_factory=CategoriesConfig)
    seeds: SeedsConfig | None = Field(None, description="Generated seeds; may be left out when `seed_file` is set.")
    seed_file: SeedFileConfig | None = None
    rewrites: RewritesConfig
    moderation: ModerationConfig
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    toxic: ToxicConfig = Field(default_factory=ToxicConfig)
    panel: PanelConfig | None = None

    @model_validator(mode="after")
    def _cross_rules(self) -> BuildConfig:
        if self.seeds is None and self.seed_file is None:
            raise ValueError("seeds: give a `seeds` section (generated seeds), a `seed_file`, or both")
        if self.panel is not None and self.splits.hard_min_rejections > len(self.panel.members):
            raise ValueError(
                f"splits.hard_min_rejections={self.splits.hard_min_rejections} exceeds the panel's "
                f"{len(self.panel.members)} members"
            )
        return self

    def build_specs(self) -> list[tuple[str, ModelSpec]]:
        specs = [("seeds", self.seeds.model)] if self.seeds is not None else []
        specs += [("rewrites", self.rewrites.model)]
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
        # Costs are summed across roles, so prices in two currencies would add up to nonsense.
        currencies = {spec.price.currency: (role, spec.label) for role, spec in cfg.all_specs() if spec.price}
        if len(currencies) > 1:
            (c1, (r1, l1)), (c2, (r2, l2)) = list(currencies.items())[:2]
            raise ConfigError(f"{source}: price.currency: {r1} '{l1}' is priced in {c1} but {r2} '{l2}' in {c2}; "
                              "use one currency per config")
        for role, spec in cfg.all_specs():
            if spec.api_key_env and spec.api_key_env not in os.environ:
                raise ConfigError(
                    f"{source}: {role} '{spec.label}': api_key_env names {spec.api_key_env}, which is not set"
                )
            if spec.max_concurrency < (processes := cfg.runner.processes()):
                # Each worker process keeps at least one request in flight: fewer than one each would exceed the cap.
                raise ConfigError(f"{source}: runner.workers: {processes} worker processes exceed {role} "
                                  f"'{spec.label}' max_concurrency={spec.max_concurrency}; each worker takes 1/workers "
                                  "of it (lower runner.workers or raise max_concurrency)")
    return cfg


def load_config(path: Path | str) -> BuildConfig:
    """An OR-Bench config file. For a file of any recipe use `orforge.core.recipes.load_config`."""
    path = Path(path)
    return parse_config(load_yaml(path), str(path))


def stable_hash(obj: Any, length: int = 16) -> str:
    """Content hash used for ids and shard keys: stable across runs and machines."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]

