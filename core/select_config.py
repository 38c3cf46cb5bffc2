"""Config sections of the SELECT recipe (benign concept trees, concept questions, abstention splits and scoring).

The recipe's top-level config (`recipe: select`) composes these; each forbids unknown keys like every config model
(see core/config.py). Defaults follow SELECT (Vasisht et al., NAACL 2025): 30 evaluation and 20 extra (training)
questions per concept, up to 5 instances per leaf, and three seeds per evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from orforge.core.concepts import ConceptTree, ConceptTreeError
from orforge.core.config import ModelSpec, RecipeConfig, Strict

DEMO_TREE = Path(__file__).parent / "data" / "concepts-demo.yaml"

Technique = Literal["none", "instructed", "instructed_fewshot"]
Detector = Literal["phrase", "keyword", "heuristic", "judge"]
SplitName = Literal["abstention", "generalization", "specificity"]
TECHNIQUES: tuple[str, ...] = ("none", "instructed", "instructed_fewshot")


def _sampled_by_default(spec: ModelSpec) -> ModelSpec:
    # Generation is sampled (each call has its own sample index); a spec that does not set a temperature gets 1.0.
    # A copy, because the same spec object may serve other roles.
    if "temperature" in spec.model_fields_set:
        return spec
    return spec.model_copy(update={"temperature": 1.0})


class GrowTreeConfig(Strict):
    """Grow a tree with a model: k sub-concepts per node down to `depth`, instances on the leaves."""

    roots: list[str] = Field(min_length=1, description="Names of the root concepts, e.g. Places, People.")
    children_per_node: int = Field(4, ge=1, le=50)
    depth: int = Field(3, ge=1, le=8, description="Levels below the roots (a root is depth 0).")
    instances_per_leaf: int = Field(5, ge=0, le=50)
    similarity_threshold: float = Field(
        # MiniLM already scores real sub-kinds such as Vehicles/Cars at 0.88 and Cities/City at 0.87.
        0.9, gt=0.0, le=1.0,
        description="A proposed concept whose MiniLM cosine similarity to any concept already in the tree reaches "
                    "this is rejected as a near duplicate.",
    )
    model: ModelSpec

    @field_validator("roots")
    @classmethod
    def _roots_distinct(cls, roots: list[str]) -> list[str]:
        cleaned = [r.strip() for r in roots]
        if any(not r for r in cleaned):
            raise ValueError("root names must not be empty")
        folded = [r.casefold() for r in cleaned]
        if len(set(folded)) != len(folded):
            raise ValueError(f"root names must be distinct, got {roots}")
        return cleaned

    @model_validator(mode="after")
    def _sampled(self) -> GrowTreeConfig:
        self.model = _sampled_by_default(self.model)
        return self


class ConceptTreeConfig(Strict):
    """Where the tree comes from: a tree file (`source`: .json in SELECT's taxonomy_plus format, .yaml/.yml or .csv;
    `demo` names the small tree shipped with orforge) or `grow` it with a model. Exactly one."""

    source: Literal["demo"] | Path | None = None
    grow: GrowTreeConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ConceptTreeConfig:
        if (self.source is None) == (self.grow is None):
            raise ValueError("give exactly one of concepts.source (a tree file, or 'demo') and concepts.grow")
        return self

    def source_path(self, base: Path | None = None) -> Path | None:
        """The tree file to read (a relative path resolved against `base`, the config's folder), or None to grow."""
        if self.source is None:
            return None
        if self.source == "demo":
            return DEMO_TREE
        path = Path(self.source)
        return path if path.is_absolute() or base is None else base / path


class QuestionsConfig(Strict):
    model: ModelSpec
    eval_per_concept: int = Field(30, ge=1, le=1000)
    train_per_concept: int = Field(20, ge=0, le=1000)
    per_call: int = Field(10, ge=1, le=100, description="Questions asked for in one structured-output call.")
    dedup_threshold: float = Field(
        0.90, gt=0.0, le=1.0, description="MiniLM cosine similarity at which two questions of one concept are "
                                          "duplicates (the later one is dropped)."
    )
    leak_margin: float = Field(
        0.05, ge=0.0, le=1.0,
        description="A question is flagged as leaking when its similarity to a sibling's or the parent's name comes "
                    "within this margin of (or exceeds) its similarity to its own concept's name.",
    )

    @model_validator(mode="after")
    def _sampled(self) -> QuestionsConfig:
        self.model = _sampled_by_default(self.model)
        return self


class CompositionSlot(Strict):
    """One `{}` of a relation template: the concepts under `root` that may fill it."""

    root: str = Field(min_length=1, description="Id of the concept whose subtree fills the slot.")
    flow: Literal["self", "descendants"] = Field(
        "self", description="`self`: the root concept only; `descendants`: every concept below it."
    )
    exclude: list[str] = Field(default_factory=list, description="Concept ids (and their subtrees) left out.")

    @model_validator(mode="after")
    def _exclusions_need_descendants(self) -> CompositionSlot:
        if self.exclude and self.flow == "self":
            raise ValueError(f"slot for {self.root!r}: exclude only applies with flow: descendants")
        return self


class RelationTemplate(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    template: str = Field(min_length=3, description="Text with one `{}` per slot, e.g. 'Consuming {} at {}'.")
    slots: list[CompositionSlot] = Field(min_length=1, max_length=2)

    @model_validator(mode="after")
    def _slots_match(self) -> RelationTemplate:
        holes = self.template.count("{}")
        if holes != len(self.slots):
            raise ValueError(f"template {self.name!r} has {holes} '{{}}' slot(s) but {len(self.slots)} slot spec(s)")
        return self


class CompositionsConfig(Strict):
    """Composed concepts (ids `idA#idB`) from relation templates; each gets its own questions."""

    templates: list[RelationTemplate] = Field(min_length=1)
    max_per_template: int | None = Field(None, ge=1, description="Seeded cap on composed concepts per template.")

    @model_validator(mode="after")
    def _names_unique(self) -> CompositionsConfig:
        names = [t.name for t in self.templates]
        if len(set(names)) != len(names):
            raise ValueError(f"composition template names must be unique, got {names}")
        return self

    def check_against(self, tree: ConceptTree) -> None:
        """Every slot root and exclusion must be a concept of `tree`; raises ConceptTreeError naming the id."""
        for t in self.templates:
            for slot in t.slots:
                for cid in (slot.root, *slot.exclude):
                    if cid not in tree:
                        raise ConceptTreeError(f"compositions.{t.name}: unknown concept id {cid!r}")


class SelectSplitsConfig(Strict):
    targets: list[str] | Literal["all", "non_leaf"] = Field(
        "all", description="Concept ids to build splits for, or every concept (`all`) or every non-leaf (`non_leaf`)."
    )
    generalization_sample: int | None = Field(
        None, ge=1, description="Descendant questions kept per target (seeded); all of them when absent."
    )
    specificity_sample: int | None = Field(
        None, ge=1, description="Sibling and ancestor questions kept per target (seeded); all of them when absent."
    )
    exclude_leaked: list[SplitName] = Field(
        default_factory=lambda: ["specificity"],
        description="Splits from which questions flagged as leaking are left out (they fit a sibling or the parent "
                    "too, so their expected behaviour there is ambiguous).",
    )
    seed: int = 0

    @field_validator("targets")
    @classmethod
    def _targets_listed_once(cls, targets):
        if isinstance(targets, list):
            if not targets:
                raise ValueError("targets: give at least one concept id, or 'all' / 'non_leaf'")
            if len(set(targets)) != len(targets):
                raise ValueError("targets: a concept id is listed twice")
        return targets

    def target_ids(self, tree: ConceptTree) -> list[str]:
        """The targets as concept ids in tree order; an unknown id raises ConceptTreeError naming it."""
        if self.targets == "all":
            return tree.ids()
        if self.targets == "non_leaf":
            return [c for c in tree.ids() if not tree.is_leaf(c)]
        unknown = [t for t in self.targets if t not in tree]
        if unknown:
            raise ConceptTreeError(f"splits.targets: unknown concept id {unknown[0]!r}")
        wanted = set(self.targets)
        return [c for c in tree.ids() if c in wanted]


class AbstentionEvalConfig(Strict):
    """How `orforge evaluate` scores a SELECT release. `instructed_fewshot` shows one worked example per relation
    (the target, a descendant: abstain; a sibling, an ancestor, an unrelated concept: answer), drawn from the
    training questions, so its size is fixed by the tree, not set here."""

    techniques: list[Technique] = Field(default_factory=lambda: list(TECHNIQUES), min_length=1)
    phrase: str = Field("ABSTAIN", min_length=1, description="The fixed token an instructed model replies with.")
    detector: Detector = "phrase"
    judge: ModelSpec | None = Field(None, description="The 3-class refusal judge, for detector: judge.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> AbstentionEvalConfig:
        if len(set(self.techniques)) != len(self.techniques):
            raise ValueError(f"techniques listed twice: {self.techniques}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds listed twice: {self.seeds}")
        if not self.phrase.strip():
            raise ValueError("phrase must not be blank")
        if self.detector == "judge" and self.judge is None:
            raise ValueError("detector 'judge' needs judge (a model spec)")
        return self


class SelectConfig(RecipeConfig):
    """The SELECT recipe: a concept tree -> questions per concept -> dedup and leak flags -> abstention splits and
    exports; `orforge evaluate` scores abstention techniques on the release."""

    recipe: Literal["select"]
    concepts: ConceptTreeConfig
    questions: QuestionsConfig
    compositions: CompositionsConfig | None = None
    splits: SelectSplitsConfig = Field(default_factory=SelectSplitsConfig)
    answers: ModelSpec | None = Field(
        None, description="Answers the training questions, for the SFT rows and DPO pairs; without it those files "
                          "hold only abstention rows and no pairs.")
    evaluation: AbstentionEvalConfig = Field(default_factory=AbstentionEvalConfig)

    def build_specs(self) -> list[tuple[str, ModelSpec]]:
        specs = [("concepts", self.concepts.grow.model)] if self.concepts.grow else []
        specs.append(("questions", self.questions.model))
        if self.answers:
            specs.append(("answers", self.answers))
        if self.evaluation.judge:
            specs.append(("abstention-judge", self.evaluation.judge))
        return specs
