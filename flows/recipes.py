"""Which flows serve which recipe: the CLI and the scheduler look a config's `recipe:` up here.

A recipe is a config model (`orforge.core.recipes.RECIPES`) plus the Prefect flows below, each composed from the
shared stages. Adding a recipe is one entry here and one in core/recipes.py; nothing else dispatches on the name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prefect import Flow

from orforge.flows.alert import alert_build_flow, alert_evaluate_flow
from orforge.flows.alert import check_config as check_alert
from orforge.flows.build import build_flow
from orforge.flows.build import check_config as check_orbench
from orforge.flows.evaluate import evaluate_flow
from orforge.flows.plan import alert_stages, orbench_stages, select_stages
from orforge.flows.select import load_tree, select_build_flow, select_evaluate_flow


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Flow  # (config_path, output=None) -> release folder
    evaluate: Flow  # (release, config_path, ...) -> evaluation folder
    audits_moderators: bool  # whether the release holds moderator (or judge) votes for `orforge audit`
    adds_categories: bool  # whether `orforge add-category` applies
    check: Callable  # (config) -> None; raises ConfigError for what the config model alone cannot see
    plan: Callable  # (config) -> list[flows.plan.Planned]: the build's model stages, for `orforge plan`


RECIPES: dict[str, Recipe] = {
    "orbench": Recipe("orbench", build_flow, evaluate_flow, audits_moderators=True, adds_categories=True,
                      check=check_orbench, plan=orbench_stages),
    "select": Recipe("select", select_build_flow, select_evaluate_flow, audits_moderators=False,
                     adds_categories=False, check=load_tree, plan=select_stages),
    # ALERT's "moderators" are its safety judges: `orforge audit` reads their verdicts from the newest evaluation.
    "alert": Recipe("alert", alert_build_flow, alert_evaluate_flow, audits_moderators=True, adds_categories=False,
                    check=check_alert, plan=alert_stages),
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]
