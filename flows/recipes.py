"""Which flows serve which recipe: the CLI and the scheduler look a config's `recipe:` up here.

A recipe is a config model (`orforge.core.recipes.RECIPES`) plus the Prefect flows below, each composed from the
shared stages. Adding a recipe is one entry here and one in core/recipes.py; nothing else dispatches on the name.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import Flow

from orforge.flows.build import build_flow
from orforge.flows.evaluate import evaluate_flow
from orforge.flows.select import select_build_flow, select_evaluate_flow


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Flow  # (config_path, output=None) -> release folder
    evaluate: Flow  # (release, config_path, ...) -> evaluation folder
    audits_moderators: bool  # whether the release holds moderator votes for `orforge audit`
    adds_categories: bool  # whether `orforge add-category` applies


RECIPES: dict[str, Recipe] = {
    "orbench": Recipe("orbench", build_flow, evaluate_flow, audits_moderators=True, adds_categories=True),
    "select": Recipe("select", select_build_flow, select_evaluate_flow, audits_moderators=False,
                     adds_categories=False),
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]
