"""Rejection categories: presets are shipped taxonomies (`orbench`: OR-Bench's ten; `alert`: ALERT's 32 micro
categories; see core/taxonomy.py) and the resolution of a config's categories into one list used by every stage."""

from __future__ import annotations

from orforge.core.config import CategoriesConfig, CategorySpec, ConfigError
from orforge.core.taxonomy import load_taxonomy

# OR-Bench's ten categories by name, read from the shipped taxonomy file (the one list of them).
ORBENCH: dict[str, str] = {r.id: r.description for r in load_taxonomy("orbench").rows}


def resolve_categories(cfg: CategoriesConfig, source: str = "config") -> list[CategorySpec]:
    """The categories a build uses, preset first (optionally filtered), then custom ones. Raises ConfigError."""
    categories: list[CategorySpec] = []
    if cfg.preset is not None:
        taxonomy = load_taxonomy(cfg.preset)
        leaves = taxonomy.leaves()
        names: list[str] = []
        # `include` names leaves, or a higher category standing for every leaf under it (ALERT's `weapons`).
        for name in cfg.include if cfg.include is not None else leaves:
            if name not in taxonomy.ids:
                raise ConfigError(f"{source}: categories.include: unknown category {name!r}; "
                                  f"the {cfg.preset} preset has {', '.join(taxonomy.ids)}")
            names += [leaf for leaf in taxonomy.leaves_under(name) if leaf not in names]
        categories = [CategorySpec(name=n, description=taxonomy.node(n).description) for n in names]
    elif cfg.include:
        raise ConfigError(f"{source}: categories.include needs a preset")
    seen = {c.name for c in categories}
    for custom in cfg.custom:
        if custom.name in seen:
            raise ConfigError(f"{source}: categories.custom: category {custom.name!r} already exists")
        seen.add(custom.name)
        categories.append(custom)
    if not categories:
        raise ConfigError(f"{source}: categories: no categories to build")
    return categories
