"""Risk taxonomies as data: a registry of shipped files (`core/taxonomies/*.yaml`), user files, mappings between
taxonomies and keyword rules for categorising prompts.

A taxonomy is rows of `id, name, description, parent` (parent null for a top-level category). Shipped: `alert`
(6 macro, 32 micro categories), `orbench` (OR-Bench's ten, flat) and `mlcommons` (the hazard codes S1-S14 a Llama
Guard 3 judge names). A user file is YAML (`{name?, description?, rows: [...]}` or a bare list of rows) or CSV with
the header `id,name,description,parent` (empty parent for a top level).

A mapping (`core/taxonomies/mappings/<source>-<target>.yaml`) sends every leaf of the source taxonomy to one or more
ids of the target, most fitting first. Keyword rules (`core/taxonomies/rules/<taxonomy>.yaml`) list regular
expressions per leaf; `moderators.categorize` applies them.

Every problem (unknown name, unreadable file, duplicate id, unknown parent, cycle, a mapping that misses a key, a
rule that does not compile) is a `TaxonomyError` (a `ConfigError`) whose one-line message names the file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import polars as pl
import yaml
from pydantic import Field, ValidationError

from orforge.core.config import ConfigError, Strict

TAXONOMY_DIR = Path(__file__).parent / "taxonomies"
MAPPING_DIR = TAXONOMY_DIR / "mappings"
RULES_DIR = TAXONOMY_DIR / "rules"
YAML_SUFFIXES = (".yaml", ".yml")

# Ids may carry `+` (ALERT's `hate_lgbtq+`) and upper case (MLCommons' `S1`); no spaces, slashes or dots.
TAXONOMY_TABLE = {"id": pl.Utf8, "name": pl.Utf8, "description": pl.Utf8, "parent": pl.Utf8,
                  "macro": pl.Utf8, "is_leaf": pl.Boolean}


class TaxonomyError(ConfigError):
    """A taxonomy, mapping or rule file is invalid or unreadable. One line, naming the file."""


class TaxonomyRow(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_+-]*$")
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    parent: str | None = None


class TaxonomyFile(Strict):
    name: str | None = None
    description: str | None = None
    rows: list[TaxonomyRow] = Field(min_length=1)


@dataclass(frozen=True)
class Taxonomy:
    """A validated forest of categories, rows in file order. `sha256` is the hash of the file's bytes."""

    name: str
    rows: tuple[TaxonomyRow, ...]
    sha256: str
    source: str

    def __post_init__(self) -> None:
        ids = [r.id for r in self.rows]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup is not None:
            raise TaxonomyError(f"{self.source}: duplicate id {dup!r}")
        known = set(ids)
        for r in self.rows:
            if r.parent is not None and r.parent not in known:
                raise TaxonomyError(f"{self.source}: id {r.id!r}: unknown parent {r.parent!r}")
        for r in self.rows:  # a parent chain longer than the number of rows is a cycle
            seen, node = {r.id}, r
            while node.parent is not None:
                if node.parent in seen:
                    raise TaxonomyError(f"{self.source}: id {r.id!r}: its parents form a cycle")
                seen.add(node.parent)
                node = self.node(node.parent)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    def node(self, node_id: str) -> TaxonomyRow:
        for r in self.rows:
            if r.id == node_id:
                return r
        raise KeyError(node_id)

    def children(self, node_id: str | None) -> list[str]:
        """Direct children of `node_id` in file order; `None` gives the top-level ids."""
        return [r.id for r in self.rows if r.parent == node_id]

    def roots(self) -> list[str]:
        return self.children(None)

    def leaves(self) -> list[str]:
        """Ids with no children, in file order: the categories a prompt is labelled with."""
        parents = {r.parent for r in self.rows}
        return [r.id for r in self.rows if r.id not in parents]

    def macro_of(self, node_id: str) -> str:
        """The top-level ancestor of `node_id` (itself for a top-level id)."""
        node = self.node(node_id)
        while node.parent is not None:
            node = self.node(node.parent)
        return node.id

    def leaves_under(self, node_id: str) -> list[str]:
        """The leaves at or below `node_id`, in file order."""
        return [leaf for leaf in self.leaves() if leaf == node_id or self._is_below(leaf, node_id)]

    def _is_below(self, node_id: str, ancestor: str) -> bool:
        node = self.node(node_id)
        while node.parent is not None:
            if node.parent == ancestor:
                return True
            node = self.node(node.parent)
        return False

    def to_frame(self) -> pl.DataFrame:
        leaves = set(self.leaves())
        return pl.DataFrame([{"id": r.id, "name": r.name, "description": r.description, "parent": r.parent,
                              "macro": self.macro_of(r.id), "is_leaf": r.id in leaves} for r in self.rows],
                            schema=TAXONOMY_TABLE)


def taxonomy_names() -> list[str]:
    """The shipped taxonomies, by name."""
    return sorted(p.stem for p in TAXONOMY_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise TaxonomyError(f"{path}: cannot read it: {' '.join(str(e).split())}") from None


def _first_error(source: object, error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{source}: {where}: {first['msg']}" if where else f"{source}: {first['msg']}"


@cache
def _load_file(path: Path) -> Taxonomy:
    if not path.is_file():
        raise TaxonomyError(f"{path}: no such taxonomy file")
    try:
        data = path.read_bytes()
        text = data.decode()
    except (OSError, UnicodeDecodeError) as e:
        raise TaxonomyError(f"{path}: cannot read it: {' '.join(str(e).split())}") from None
    if path.suffix == ".csv":
        raw: object = {"rows": [{k: (v or None) if k == "parent" else v for k, v in row.items()}
                                for row in csv.DictReader(io.StringIO(text))]}
    elif path.suffix in YAML_SUFFIXES:
        raw = _read_yaml(path)
        if isinstance(raw, list):
            raw = {"rows": raw}
    else:
        raise TaxonomyError(f"{path}: a taxonomy file is .yaml, .yml or .csv")
    if not isinstance(raw, dict):
        raise TaxonomyError(f"{path}: expected rows of id, name, description, parent")
    try:
        parsed = TaxonomyFile.model_validate(raw)
    except ValidationError as e:
        raise TaxonomyError(_first_error(path, e)) from None
    return Taxonomy(parsed.name or path.stem, tuple(parsed.rows), hashlib.sha256(data).hexdigest(), str(path))


def load_taxonomy(name_or_path: str | Path) -> Taxonomy:
    """A shipped taxonomy by name (`alert`, `orbench`, `mlcommons`) or a user file by path."""
    if isinstance(name_or_path, str) and name_or_path in taxonomy_names():
        return _load_file(TAXONOMY_DIR / f"{name_or_path}.yaml")
    path = Path(name_or_path)
    if path.suffix not in (*YAML_SUFFIXES, ".csv"):
        raise TaxonomyError(f"{name_or_path}: not a shipped taxonomy ({', '.join(taxonomy_names())}) "
                            "nor a .yaml/.csv file")
    return _load_file(path.resolve())


@dataclass(frozen=True)
class TaxonomyMapping:
    """Every leaf of `source` -> one or more ids of `target`, most fitting first."""

    source: str
    target: str
    pairs: dict[str, tuple[str, ...]]

    def primary(self, key: str) -> str:
        return self.pairs[key][0]

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame([{"source_id": k, "target_id": t, "rank": i}
                             for k, targets in self.pairs.items() for i, t in enumerate(targets)],
                            schema={"source_id": pl.Utf8, "target_id": pl.Utf8, "rank": pl.Int64})


class MappingFile(Strict):
    source: str
    target: str
    map: dict[str, str | list[str]]


def mapping_names() -> list[tuple[str, str]]:
    """The shipped mappings as (source, target) taxonomy names."""
    out = []
    for p in sorted(MAPPING_DIR.glob("*.yaml")):
        source, _, target = p.stem.partition("-")
        out.append((source, target))
    return out


def load_mapping(source: str, target: str | None = None) -> TaxonomyMapping:
    """A shipped mapping (`load_mapping("alert", "orbench")`) or a user mapping file (`load_mapping(path)`).
    Both taxonomies are loaded and checked: every leaf of the source mapped, every target id known."""
    path = MAPPING_DIR / f"{source}-{target}.yaml" if target is not None else Path(source)
    if target is not None and (source, target) not in mapping_names():
        raise TaxonomyError(f"no shipped mapping from {source!r} to {target!r}; shipped: "
                            + ", ".join(f"{s}-{t}" for s, t in mapping_names()))
    if not path.is_file():
        raise TaxonomyError(f"{path}: no such mapping file")
    raw = _read_yaml(path)
    try:
        parsed = MappingFile.model_validate(raw)
    except ValidationError as e:
        raise TaxonomyError(_first_error(path, e)) from None
    src, dst = load_taxonomy(parsed.source), load_taxonomy(parsed.target)
    pairs = {k: tuple([v] if isinstance(v, str) else v) for k, v in parsed.map.items()}
    known_targets = set(dst.ids)
    for key, targets in pairs.items():
        if key not in src.leaves():
            raise TaxonomyError(f"{path}: {key!r} is not a leaf of taxonomy {src.name!r}")
        if not targets:
            raise TaxonomyError(f"{path}: {key!r} maps to nothing")
        unknown = [t for t in targets if t not in known_targets]
        if unknown:
            raise TaxonomyError(f"{path}: {key!r} -> {unknown[0]!r}: not an id of taxonomy {dst.name!r}")
    missing = [leaf for leaf in src.leaves() if leaf not in pairs]
    if missing:
        raise TaxonomyError(f"{path}: {missing[0]!r} of taxonomy {src.name!r} is not mapped")
    return TaxonomyMapping(src.name, dst.name, pairs)


class RulesFile(Strict):
    taxonomy: str
    rules: dict[str, list[str]]


@dataclass(frozen=True)
class KeywordRules:
    """Per leaf, regular expressions matched case-insensitively as whole words. `sha256` is the file's hash."""

    taxonomy: str
    patterns: dict[str, tuple[str, ...]]
    sha256: str

    def compiled(self) -> dict[str, list[tuple[str, re.Pattern]]]:
        # Word boundaries that also work next to `+` or `-`: no word character on either side of the match.
        return {cat: [(p, re.compile(rf"(?<!\w)(?:{p})(?!\w)", re.IGNORECASE)) for p in pats]
                for cat, pats in self.patterns.items()}


def load_keyword_rules(name_or_path: str | Path, taxonomy: Taxonomy) -> KeywordRules:
    """Shipped rules by taxonomy name (`alert`) or a user rules file; every category must be a leaf of `taxonomy`
    and every pattern must compile."""
    if isinstance(name_or_path, str) and (RULES_DIR / f"{name_or_path}.yaml").is_file():
        path = RULES_DIR / f"{name_or_path}.yaml"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise TaxonomyError(f"{name_or_path}: no shipped keyword rules of that name and no such file")
    raw = _read_yaml(path)
    try:
        parsed = RulesFile.model_validate(raw)
    except ValidationError as e:
        raise TaxonomyError(_first_error(path, e)) from None
    if parsed.taxonomy != taxonomy.name:
        raise TaxonomyError(f"{path}: rules for taxonomy {parsed.taxonomy!r}, not {taxonomy.name!r}")
    leaves = set(taxonomy.leaves())
    for cat, pats in parsed.rules.items():
        if cat not in leaves:
            raise TaxonomyError(f"{path}: rules for {cat!r}, which is not a leaf of taxonomy {taxonomy.name!r}")
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise TaxonomyError(f"{path}: {cat}: pattern {p!r} does not compile: {e}") from None
    return KeywordRules(taxonomy.name, {c: tuple(p) for c, p in parsed.rules.items()},
                        hashlib.sha256(path.read_bytes()).hexdigest())
