"""The concept tree of the SELECT recipe: benign concepts with parents, optional named instances, and the relations
(ancestors, descendants, siblings, path distance) that abstention splits are built from.

A tree is a forest of one or more roots. Roots are treated as children of one implicit top node: they are each
other's siblings and the path between two roots (or between nodes under different roots) runs through that top, so
`distance` is always defined and a root target still has siblings to test specificity on.

Sources (`ConceptTree.load`, by suffix):
- `.json`: SELECT's `taxonomy_plus.json`, a nested mapping `id -> {"name": ..., "children": {id -> {...}}}`;
  `children` may be absent, empty, a mapping or a list of such one-or-more-key mappings; an optional `instances`
  list names entities. A node without `name` is named by its id (read as is, nothing else is inferred).
- `.yaml` / `.yml`: flat rows `{id, name, parent, instances: [...]}` as `{concepts: [...]}` or a bare list.
- `.csv`: a header `id,name,parent[,instances]`, instances separated by `;`, an empty parent for a root.

Every problem (duplicate id, unknown parent, cycle, empty id or name, unreadable file) is a `ConceptTreeError`
whose one-line message names the offending id and, when loading, the file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from orforge.core.records import CONCEPTS

INSTANCE_SEPARATOR = ";"
YAML_SUFFIXES = (".yaml", ".yml")


class ConceptTreeError(ValueError):
    """A concept tree is invalid or could not be read. One line, naming the offending id (and file when loading)."""


class Concept(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    parent: str | None = None
    instances: tuple[str, ...] = ()


class ConceptTree:
    """An immutable, validated forest of concepts. Children keep the order in which they were given."""

    def __init__(self, concepts: Iterable[Concept], source: str | None = None):
        self._source = source
        items = list(concepts)
        if not items:
            raise self._error("the tree has no concepts")
        self._by_id: dict[str, Concept] = {}
        for c in items:
            if not c.id.strip():
                raise self._error(f"a concept has an empty id (name {c.name!r})")
            if not c.name.strip():
                raise self._error(f"concept {c.id!r} has an empty name")
            if c.id in self._by_id:
                raise self._error(f"duplicate concept id {c.id!r}")
            if c.parent is not None and not c.parent.strip():
                raise self._error(f"concept {c.id!r} has an empty parent; leave it out (null) for a root")
            if any(not i.strip() for i in c.instances):
                raise self._error(f"concept {c.id!r} has an empty instance name")
            self._by_id[c.id] = c
        self._children: dict[str, list[str]] = {c.id: [] for c in items}
        self._roots: list[str] = []
        for c in items:
            if c.parent is None:
                self._roots.append(c.id)
            elif c.parent == c.id:
                raise self._error(f"concept {c.id!r} is its own parent (cycle)")
            elif c.parent not in self._by_id:
                raise self._error(f"concept {c.id!r} has unknown parent {c.parent!r} (orphan)")
            else:
                self._children[c.parent].append(c.id)
        self._order = self._walk()
        if len(self._order) != len(self._by_id):
            # Every parent exists, so a node not reachable from a root sits on a cycle.
            reached = set(self._order)
            stuck = next(c.id for c in items if c.id not in reached)
            raise self._error(f"concept {stuck!r} is on a parent cycle ({self._cycle_from(stuck)})")
        self._depth = {}
        for cid in self._order:
            parent = self._by_id[cid].parent
            self._depth[cid] = 0 if parent is None else self._depth[parent] + 1

    # ------------------------------------------------------------------------------------------------ building

    def _error(self, message: str) -> ConceptTreeError:
        return ConceptTreeError(f"{self._source}: {message}" if self._source else message)

    def _walk(self) -> list[str]:
        order: list[str] = []
        stack = list(reversed(self._roots))
        while stack:
            cid = stack.pop()
            order.append(cid)
            stack.extend(reversed(self._children[cid]))
        return order

    def _cycle_from(self, start: str) -> str:
        seen: list[str] = []
        cid: str | None = start
        while cid not in seen:
            seen.append(cid)
            cid = self._by_id[cid].parent
        loop = seen[seen.index(cid):] + [cid]
        return " -> ".join(loop)

    # ------------------------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, cid: object) -> bool:
        return cid in self._by_id

    def __iter__(self) -> Iterator[Concept]:
        return (self._by_id[c] for c in self._order)

    def _require(self, cid: str) -> Concept:
        try:
            return self._by_id[cid]
        except (KeyError, TypeError):
            raise self._error(f"unknown concept id {cid!r}") from None

    def ids(self) -> list[str]:
        """Every id, depth first (a node before its children; roots and children in the order given)."""
        return list(self._order)

    def get(self, cid: str) -> Concept:
        return self._require(cid)

    def roots(self) -> list[str]:
        return list(self._roots)

    def children(self, cid: str) -> list[str]:
        self._require(cid)
        return list(self._children[cid])

    def parent(self, cid: str) -> str | None:
        return self._require(cid).parent

    def ancestors(self, cid: str) -> list[str]:
        """Nearest first: parent, grandparent, ..., root."""
        out = []
        parent = self._require(cid).parent
        while parent is not None:
            out.append(parent)
            parent = self._by_id[parent].parent
        return out

    def descendants(self, cid: str) -> list[str]:
        """Every node below `cid`, depth first."""
        self._require(cid)
        out: list[str] = []
        stack = list(reversed(self._children[cid]))
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(self._children[node]))
        return out

    def siblings(self, cid: str) -> list[str]:
        """Other children of the same parent; for a root, the other roots (children of the implicit top)."""
        parent = self._require(cid).parent
        pool = self._roots if parent is None else self._children[parent]
        return [c for c in pool if c != cid]

    def depth(self, cid: str) -> int:
        self._require(cid)
        return self._depth[cid]

    def distance(self, a: str, b: str) -> int:
        """Edges on the path from `a` to `b`; nodes under different roots meet at the implicit top node."""
        self._require(a)
        self._require(b)
        up_a = [a, *self.ancestors(a)]
        on_path = set(up_a)
        for steps_b, node in enumerate([b, *self.ancestors(b)]):
            if node in on_path:
                return up_a.index(node) + steps_b
        return self._depth[a] + self._depth[b] + 2

    def leaves(self) -> list[str]:
        return [c for c in self._order if not self._children[c]]

    def is_leaf(self, cid: str) -> bool:
        self._require(cid)
        return not self._children[cid]

    def context_names(self, cid: str) -> list[str]:
        """Ancestor names, root first (the context a question prompt gives: "Rivers in the context of ...")."""
        return [self._by_id[a].name for a in reversed(self.ancestors(cid))]

    # ------------------------------------------------------------------------------------------------ export

    def to_frame(self) -> pl.DataFrame:
        """One row per concept (core.records.CONCEPTS), depth first; `ancestor_ids` nearest first."""
        rows = [
            {
                "concept_id": c.id,
                "name": c.name,
                "parent_id": c.parent,
                "depth": self._depth[c.id],
                "instances": list(c.instances),
                "ancestor_ids": self.ancestors(c.id),
            }
            for c in self
        ]
        return pl.DataFrame(rows, schema=CONCEPTS)

    def _rows(self) -> list[dict[str, Any]]:
        rows = []
        for c in self:
            row: dict[str, Any] = {"id": c.id, "name": c.name, "parent": c.parent}
            if c.instances:
                row["instances"] = list(c.instances)
            rows.append(row)
        return rows

    def to_taxonomy_plus(self) -> dict:
        """SELECT's nested form: id -> {"name", "children": {...}}, plus "instances" where a node has them."""

        def node(cid: str) -> dict:
            c = self._by_id[cid]
            out: dict[str, Any] = {"name": c.name, "children": {k: node(k) for k in self._children[cid]}}
            if c.instances:
                out["instances"] = list(c.instances)
            return out

        return {r: node(r) for r in self._roots}

    def tree_hash(self) -> str:
        """sha256 of the content (ids, names, parents, instances), independent of the order nodes were listed in."""
        canonical = sorted([c.id, c.name, c.parent, list(c.instances)] for c in self._by_id.values())
        blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def dumps(self, fmt: str = "yaml") -> str:
        """The tree as text in `fmt` (yaml | json | csv); `load` reads each back to an equal tree."""
        if fmt == "yaml":
            header = (
                "# Concept tree for orforge's SELECT recipe: one row per concept (id, name, parent, instances).\n"
                "# Review, edit and pin it; a root has parent: null.\n"
                f"# tree_hash: {self.tree_hash()}\n"
            )
            body = yaml.safe_dump({"concepts": self._rows()}, sort_keys=False, allow_unicode=True, width=120)
            return header + body
        if fmt == "json":
            return json.dumps(self.to_taxonomy_plus(), indent=2, ensure_ascii=False) + "\n"
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["id", "name", "parent", "instances"])
            for c in self:
                writer.writerow([c.id, c.name, c.parent or "", INSTANCE_SEPARATOR.join(c.instances)])
            return buffer.getvalue()
        raise ValueError(f"unknown tree format {fmt!r}; expected yaml, json or csv")

    def write(self, path: Path | str) -> Path:
        """Write the tree in the format its suffix names (.yaml/.yml by default for review, .json, .csv).

        Written to a temporary sibling and renamed into place, so a reader never sees half a tree."""
        path = Path(path)
        text = self.dumps(_format_of(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Path | str) -> ConceptTree:
        path = Path(path)
        fmt = _format_of(path)
        if not path.is_file():
            raise ConceptTreeError(f"{path}: no such concept tree file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConceptTreeError(f"{path}: cannot read the concept tree: {e}") from None
        return cls.loads(text, fmt, source=str(path))

    @classmethod
    def loads(cls, text: str, fmt: str, source: str = "<tree>") -> ConceptTree:
        if fmt == "json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConceptTreeError(f"{source}: invalid JSON at line {e.lineno}: {e.msg}") from None
            rows = _taxonomy_rows(raw, source)
        elif fmt == "yaml":
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark else ""
                raise ConceptTreeError(f"{source}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
            rows = _yaml_rows(raw, source)
        elif fmt == "csv":
            rows = _csv_rows(text, source)
        else:
            raise ConceptTreeError(f"{source}: unknown tree format {fmt!r}")
        return cls([_concept(row, source) for row in rows], source=source)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in YAML_SUFFIXES:
        return "yaml"
    if suffix == ".csv":
        return "csv"
    raise ConceptTreeError(f"{path}: a concept tree file must end in .json, .yaml, .yml or .csv")


def _concept(row: dict, source: str) -> Concept:
    label = row.get("id", "<no id>") if isinstance(row, dict) else row
    try:
        return Concept.model_validate(row)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "<row>"
        raise ConceptTreeError(f"{source}: concept {label!r}: {field}: {err['msg']}") from None


def _as_text(value: Any) -> Any:
    # YAML reads `id: 2020` as an int; an id or name is text whatever it looks like.
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _yaml_rows(raw: Any, source: str) -> list[dict]:
    if isinstance(raw, dict):
        if set(raw) != {"concepts"}:
            raise ConceptTreeError(f"{source}: a YAML tree is a list of concepts or a mapping with one key, concepts")
        raw = raw["concepts"]
    if not isinstance(raw, list):
        raise ConceptTreeError(f"{source}: a YAML tree must list its concepts (id, name, parent, instances)")
    rows = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConceptTreeError(f"{source}: concept #{i + 1} is not a mapping of id, name, parent, instances")
        row = {k: _as_text(v) for k, v in item.items()}
        if isinstance(row.get("instances"), list):
            row["instances"] = [_as_text(v) for v in row["instances"]]
        elif row.get("instances") is None:
            row.pop("instances", None)
        rows.append(row)
    return rows


def _csv_rows(text: str, source: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if header[:3] != ["id", "name", "parent"] or not set(header) <= {"id", "name", "parent", "instances"}:
        raise ConceptTreeError(f"{source}: a CSV tree needs the header id,name,parent[,instances]; got {header}")
    reader.fieldnames = header
    rows = []
    for record in reader:
        if None in record:  # more cells than header columns
            raise ConceptTreeError(f"{source}: concept {record.get('id')!r}: more cells than the header has")
        parent = (record.get("parent") or "").strip()
        instances = record.get("instances") or ""
        rows.append({
            "id": (record.get("id") or "").strip(),
            "name": (record.get("name") or "").strip(),
            "parent": parent or None,
            "instances": [i.strip() for i in instances.split(INSTANCE_SEPARATOR) if i.strip()],
        })
    return rows


def _taxonomy_rows(raw: Any, source: str) -> list[dict]:
    rows: list[dict] = []

    def visit(mapping: Any, parent: str | None, where: str) -> None:
        if mapping is None:
            return
        if isinstance(mapping, list):
            for i, item in enumerate(mapping):
                visit(item, parent, f"{where}[{i}]")
            return
        if not isinstance(mapping, dict):
            raise ConceptTreeError(f"{source}: {where}: expected a mapping of id -> {{name, children}}")
        for cid, node in mapping.items():
            if node is None:
                node = {}
            if not isinstance(node, dict):
                raise ConceptTreeError(f"{source}: concept {cid!r}: expected {{name, children}}, got {node!r}")
            unknown = set(node) - {"name", "children", "instances"}
            if unknown:
                raise ConceptTreeError(f"{source}: concept {cid!r}: unknown key(s) {sorted(unknown)}")
            row: dict[str, Any] = {"id": cid, "name": _as_text(node.get("name", cid)), "parent": parent}
            if node.get("instances"):
                row["instances"] = [_as_text(v) for v in node["instances"]]
            rows.append(row)
            visit(node.get("children"), cid, f"concept {cid!r} children")

    visit(raw, None, "top level")
    return rows
