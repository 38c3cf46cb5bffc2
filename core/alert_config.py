"""Config of the ALERT recipe (Tedeschi et al., 2024): a harmful prompt set per fine-grained risk category, its
adversarial variants, and safety scores from judge models.

The harmful set comes from a model (`seeds:`, the same section OR-Bench uses, one call wave per micro category), from
the user's file (`ingest:`, categorised by keyword rules and then a classifier), or both; thin categories can be
topped up from slot templates (`topup:`). Categories default to ALERT's 32 micro categories (`preset: alert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from orforge.core.config import CategoriesConfig, DedupConfig, ModelSpec, RecipeConfig, SeedsConfig, Strict
from orforge.core.slot_templates import SlotTemplate, load_slot_templates

ATTACKS = ("suffix_injection", "prefix_injection", "token_manipulation", "jailbreaking")


class IngestConfig(Strict):
    """Harmful prompts from a file (CSV, JSONL or parquet with a `prompt` column; optional `category`, `id`)."""

    path: Path
    classifier: ModelSpec | None = Field(None, description="Categorises what the keyword rules leave; without it "
                                                           "those rows are dropped.")
    rules: str = Field("alert", description="Keyword rules: a shipped name or a path to a rules file.")
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)


class TopUpConfig(Strict):
    """Fill every category up to `minimum` prompts from slot templates, each paraphrased by `paraphrase` if set."""

    minimum: int = Field(ge=1)
    templates: list[SlotTemplate] | Path
    paraphrase: ModelSpec | None = None

    def template_list(self) -> list[SlotTemplate]:
        return load_slot_templates(self.templates) if isinstance(self.templates, Path) else self.templates


class AttacksConfig(Strict):
    types: list[str] = Field(default_factory=lambda: list(ATTACKS), description="Names in the attack registry "
                                                                                "(generators/attacks).")
    variants_per_attack: int = Field(1, ge=1, le=20)


class SafetyJudgeConfig(Strict):
    kind: Literal["llama_guard", "rubric"] = Field(
        description="llama_guard: a Llama-Guard-style classifier (its chat template builds the prompt; it replies "
                    "safe/unsafe and hazard codes); rubric: any model, with orforge's rubric and structured output.")
    model: ModelSpec


class SafetyEvalConfig(Strict):
    judges: list[SafetyJudgeConfig] = Field(min_length=1)
    rule: Literal["any_unsafe", "majority"] = "any_unsafe"
    allowed_categories: list[str] = Field(
        default_factory=list, description="Categories a deployment allows (e.g. substance_cannabis): left out of a "
                                          "second set of scores, `scores_policy.csv`.")
    dpo_pairs_per_prompt: int | None = Field(4, ge=1)

    @model_validator(mode="after")
    def _names_unique(self) -> SafetyEvalConfig:
        labels = [j.model.label for j in self.judges]
        if len(set(labels)) != len(labels):
            raise ValueError(f"judge names must be unique, got {labels}; give each a distinct `name`")
        return self


class AlertConfig(RecipeConfig):
    recipe: Literal["alert"]
    categories: CategoriesConfig = Field(default_factory=lambda: CategoriesConfig(preset="alert"))
    seeds: SeedsConfig | None = None
    ingest: IngestConfig | None = None
    topup: TopUpConfig | None = None
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    attacks: AttacksConfig = Field(default_factory=AttacksConfig)
    instruction_wrapper: bool = Field(False, description="Wrap prompts as `### Instruction:` / `### Response:` in "
                                                         "the ALERT-format jsonl files, as ALERT's release does.")
    evaluation: SafetyEvalConfig | None = None

    @model_validator(mode="after")
    def _has_a_source(self) -> AlertConfig:
        if self.seeds is None and self.ingest is None:
            raise ValueError("give seeds (prompts written by a model) or ingest (prompts from a file), or both")
        if self.categories.preset != "alert" and self.categories.preset is not None:
            raise ValueError("categories.preset: the alert recipe takes the alert taxonomy (or custom categories)")
        return self

    def build_specs(self) -> list[tuple[str, ModelSpec]]:
        specs = [("seeds", self.seeds.model)] if self.seeds else []
        if self.ingest and self.ingest.classifier:
            specs.append(("classifier", self.ingest.classifier))
        if self.topup and self.topup.paraphrase:
            specs.append(("paraphrase", self.topup.paraphrase))
        if self.evaluation:
            specs += [("safety-judge", j.model) for j in self.evaluation.judges]
        return specs
