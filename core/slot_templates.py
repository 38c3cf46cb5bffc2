"""Slot templates for topping up thin categories of a harmful set: a text with `{slot}` holes and a list of values
per slot, written in a config (`templates: [...]`) or a YAML file (`{templates: [...]}` or a bare list).
`generators.topup` expands them; this module only defines and checks them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from orforge.core.config import ConfigError, Strict
from orforge.core.taxonomy import Taxonomy

HOLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class SlotTemplate(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Stable name; every row it makes carries it.")
    category: str = Field(description="The taxonomy leaf the template's prompts belong to.")
    text: str = Field(min_length=1, description="The prompt with `{slot}` holes.")
    slots: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _holes_match_slots(self) -> SlotTemplate:
        holes = self.holes()
        missing = [h for h in holes if h not in self.slots]
        if missing:
            raise ValueError(f"template {self.id!r}: hole {{{missing[0]}}} has no slot list")
        unused = [s for s in self.slots if s not in holes]
        if unused:
            raise ValueError(f"template {self.id!r}: slot {unused[0]!r} is not a hole of the text")
        for name, values in self.slots.items():
            if not values or any(not v.strip() for v in values):
                raise ValueError(f"template {self.id!r}: slot {name!r} needs one or more non-empty values")
        return self

    def holes(self) -> list[str]:
        """The slot names in the order they first appear in the text."""
        return list(dict.fromkeys(HOLE.findall(self.text)))

    def size(self) -> int:
        """How many prompts the template can make (the product of its slot list lengths)."""
        n = 1
        for h in self.holes():
            n *= len(self.slots[h])
        return n

    def fill(self, index: int) -> str:
        """The `index`-th expansion (0 <= index < size), the last hole varying fastest."""
        values = {}
        for hole in reversed(self.holes()):
            index, digit = divmod(index, len(self.slots[hole]))
            values[hole] = self.slots[hole][digit]
        return HOLE.sub(lambda m: values[m.group(1)], self.text)


class SlotTemplatesFile(Strict):
    templates: list[SlotTemplate]


def load_slot_templates(path: Path | str) -> list[SlotTemplate]:
    """Templates from a YAML file; ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it: {' '.join(str(e).split())}") from None
    try:
        parsed = SlotTemplatesFile.model_validate({"templates": raw} if isinstance(raw, list) else raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where + ': ' if where else ''}{first['msg']}") from None
    check_slot_templates(parsed.templates, None, str(path))
    return parsed.templates


def check_slot_templates(templates: list[SlotTemplate], taxonomy: Taxonomy | None, source: str = "config") -> None:
    """Ids unique; with a taxonomy, every template's category one of its leaves. Raises ConfigError."""
    seen: set[str] = set()
    for t in templates:
        if t.id in seen:
            raise ConfigError(f"{source}: templates: duplicate id {t.id!r}")
        seen.add(t.id)
        if taxonomy is not None and t.category not in taxonomy.leaves():
            raise ConfigError(f"{source}: template {t.id!r}: category {t.category!r} is not a leaf of "
                              f"taxonomy {taxonomy.name!r}")
