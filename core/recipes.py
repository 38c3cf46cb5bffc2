"""The recipes a config can name, as one pydantic discriminated union on `recipe:`.

`recipe: orbench` (the default, so configs written before recipes existed keep working), `recipe: select` or
`recipe: alert`. Each
recipe's config model subclasses `core.config.RecipeConfig`; adding a recipe is adding its model to `RECIPES`.
The flows dispatch on the same name (`orforge.flows.recipes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from orforge.core.alert_config import AlertConfig
from orforge.core.config import BuildConfig, ConfigError, RecipeConfig, load_yaml, parse_config
from orforge.core.select_config import SelectConfig

RECIPES: dict[str, type[RecipeConfig]] = {"orbench": BuildConfig, "select": SelectConfig, "alert": AlertConfig}
DEFAULT_RECIPE = "orbench"

AnyRecipeConfig = Annotated[Union[BuildConfig, SelectConfig, AlertConfig],  # noqa: UP007
                            Field(discriminator="recipe")]
_ADAPTER = TypeAdapter(AnyRecipeConfig)


def parse_any(raw: dict, source: str) -> RecipeConfig:
    """Validate a config mapping of any recipe; a missing `recipe:` means orbench."""
    raw = {"recipe": DEFAULT_RECIPE, **raw}
    if raw["recipe"] not in RECIPES:
        raise ConfigError(f"{source}: recipe: unknown recipe {raw['recipe']!r} (known: {', '.join(RECIPES)})")
    return parse_config(raw, source, _ADAPTER)


def load_config(path: Path | str) -> RecipeConfig:
    """A config file of any recipe, validated; ConfigError (one line naming the file and the field) otherwise."""
    path = Path(path)
    return parse_any(load_yaml(path), str(path))
