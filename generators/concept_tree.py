"""Growing a concept tree with a model (SELECT recipe): from root names, ask for sub-concepts level by level down
to a depth, then for named instances on the leaves, rejecting near-duplicate concept names across the whole tree.

The result is a frame of concepts (`concept_id`, `name`, `parent_id`, `depth`, `instances`, `ancestor_ids`
nearest first) that the flow writes as a tree file for a person to review and pin; a pinned file, not this stage,
is what a build reads. `encode` is passed in (the flow gives the MiniLM embedder's `encode`) because a stage never
imports another stage.

Rules, in the order candidates arrive (parents in breadth-first order, names in reply order):
- a name whose normalised form is already in the tree, or whose embedding reaches `similarity_threshold` with any
  accepted name (roots included), is rejected and listed in `notes["rejected"]`;
- a node that got fewer than `children_per_node` children after its calls is kept with what it got
  (`notes["short"]`); a node that got none is a leaf and gets instances.
The default threshold is 0.9 because short names of a kind and its parent already come close on MiniLM
("Vehicles" and "Cars": 0.88; "Cities" and "City": 0.87), so a lower one rejects real sub-kinds.
Ids are slugs of the names; a slug already taken gets `-2`, `-3`, ... in arrival order, so the same replies give
the same ids.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import polars as pl
from pydantic import Field, StringConstraints, create_model

from orforge.core.records import CONCEPTS, FAILURES, StageResult, frame
from orforge.core.templates import load_template, normalize
from orforge.llm.hub import LLM
from orforge.llm.types import LLMRequest

CHILDREN_TEMPLATE = Path(__file__).parent / "templates" / "concept_children.md"
INSTANCES_TEMPLATE = Path(__file__).parent / "templates" / "concept_instances.md"
ConceptName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=2, max_length=60)]
InstanceName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80)]
# Asking for a few more names than needed leaves room for rejected near duplicates without another call.
EXTRA_NAMES_PER_CALL = 2
# The prompt lists the names the tree already has near this node (its ancestors and siblings), not the whole tree.
MAX_AVOID_NAMES = 20

# The grown tree has the shape of any tree's frame (ConceptTree.to_frame), parents before children.
GROWN_CONCEPTS = CONCEPTS

Encode = Callable[[list[str]], np.ndarray]


def slugify(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-") or "concept"


class _Tree:
    """The growing tree: accepted nodes, their vectors, and the id and name indexes the rules need."""

    def __init__(self, encode: Encode, threshold: float):
        self.encode, self.threshold = encode, threshold
        self.nodes: dict[str, dict] = {}
        self.names: dict[str, str] = {}  # normalised name -> id
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self.ids: list[str] = []  # row order of `vectors`
        self.rejected: list[dict] = []

    def _unique_id(self, name: str) -> str:
        base = slug = slugify(name)
        n = 2
        while slug in self.nodes:
            slug, n = f"{base}-{n}", n + 1
        return slug

    def offer(self, names: list[str], parent: str | None, limit: int) -> list[str]:
        """Accept up to `limit` of `names` under `parent`, in order; returns the new ids."""
        accepted: list[str] = []
        if not names:
            return accepted
        vectors = np.asarray(self.encode(list(names)), dtype=np.float32)
        for name, vector in zip(names, vectors):
            if len(accepted) >= limit:
                break
            key = normalize(name)
            if not key:
                continue
            if key in self.names:
                self.rejected.append({"name": name, "parent_id": parent, "similar_to": self.names[key],
                                      "similarity": 1.0})
                continue
            if self.ids:
                sims = self.vectors @ vector
                best = int(np.argmax(sims))
                if sims[best] >= self.threshold:
                    self.rejected.append({"name": name, "parent_id": parent, "similar_to": self.ids[best],
                                          "similarity": round(float(sims[best]), 4)})
                    continue
            cid = self._unique_id(name)
            depth = 0 if parent is None else self.nodes[parent]["depth"] + 1
            ancestors = [] if parent is None else [parent, *self.nodes[parent]["ancestor_ids"]]
            self.nodes[cid] = {"concept_id": cid, "name": name, "parent_id": parent, "depth": depth,
                               "instances": [], "ancestor_ids": ancestors}
            self.names[key] = cid
            self.vectors = vector[None, :] if not self.ids else np.vstack([self.vectors, vector])
            self.ids.append(cid)
            accepted.append(cid)
        return accepted

    def path(self, cid: str) -> str:
        node = self.nodes[cid]
        return " > ".join([self.nodes[a]["name"] for a in reversed(node["ancestor_ids"])] + [node["name"]])

    def nearby_names(self, cid: str) -> list[str]:
        node = self.nodes[cid]
        near = [self.nodes[a]["name"] for a in node["ancestor_ids"]]
        near += [n["name"] for n in self.nodes.values() if n["parent_id"] == node["parent_id"] and n is not node]
        return near[:MAX_AVOID_NAMES]


def grow_concept_tree(roots: list[str], llm: LLM, encode: Encode, *, children_per_node: int, depth: int,
                      instances_per_leaf: int = 0, similarity_threshold: float = 0.9, max_calls_per_node: int = 2,
                      on_progress=None) -> StageResult:
    """Records: GROWN_CONCEPTS, parents before children. Failures: one row per failed call (stage
    "concept_tree", item_id `<concept_id>#children#<n>` or `<concept_id>#instances`). Notes: `rejected` (name,
    parent, the accepted concept it was too close to, cosine), `short` (nodes with fewer children than asked),
    `calls`."""
    if not roots:
        raise ValueError("grow_concept_tree needs at least one root name")
    if children_per_node < 1 or depth < 0 or instances_per_leaf < 0 or max_calls_per_node < 1:
        raise ValueError("children_per_node and max_calls_per_node must be >= 1, depth and instances_per_leaf >= 0")
    if not 0.0 < similarity_threshold <= 1.0:
        raise ValueError(f"similarity_threshold must be in (0, 1], got {similarity_threshold}")
    children_template = load_template(CHILDREN_TEMPLATE)
    instances_template = load_template(INSTANCES_TEMPLATE)
    per_call = children_per_node + EXTRA_NAMES_PER_CALL
    children_model = create_model("SubConcepts", concepts=(list[ConceptName], Field(min_length=1,
                                                                                     max_length=per_call)))
    tree = _Tree(encode, similarity_threshold)
    failures: list[dict] = []
    calls = 0

    level = tree.offer(list(roots), None, len(roots))
    if len(level) < len(roots):
        raise ValueError(f"root names repeat or are near duplicates: {[r['name'] for r in tree.rejected]}")
    short: dict[str, dict] = {}
    for _ in range(depth):
        got: dict[str, list[str]] = {cid: [] for cid in level}
        for attempt in range(max_calls_per_node):
            open_nodes = [cid for cid in level if len(got[cid]) < children_per_node]
            if not open_nodes:
                break
            requests = []
            for cid in open_nodes:
                avoid = tree.nearby_names(cid) + [tree.nodes[c]["name"] for c in got[cid]]
                avoid_text = ("Topics already in the hierarchy near it: " + ", ".join(avoid) + ".\n") if avoid else ""
                system, user = children_template.render(name=tree.nodes[cid]["name"], path=tree.path(cid),
                                                        avoid=avoid_text, count=per_call)
                requests.append(LLMRequest.chat(user, system=system, response_model=children_model,
                                                sample_index=attempt, item_id=f"{cid}#children#{attempt}"))
            calls += len(requests)
            for cid, res in zip(open_nodes, llm.generate(requests, on_progress)):
                if not res.ok:
                    failures.append({"stage": "concept_tree", "role": llm.role, "model": llm.label,
                                     "item_id": res.request.item_id, "reason": res.error})
                    continue
                got[cid] += tree.offer(res.parsed.concepts, cid, children_per_node - len(got[cid]))
        for cid in level:
            if len(got[cid]) < children_per_node:
                short[cid] = {"wanted": children_per_node, "got": len(got[cid])}
        level = [c for cid in level for c in got[cid]]
        if not level:
            break

    has_children = {n["parent_id"] for n in tree.nodes.values()}
    leaves = [cid for cid in tree.nodes if cid not in has_children]
    if instances_per_leaf and leaves:
        instances_model = create_model(
            "Instances", instances=(list[InstanceName], Field(min_length=1, max_length=instances_per_leaf)))
        requests = []
        for cid in leaves:
            system, user = instances_template.render(name=tree.nodes[cid]["name"], path=tree.path(cid),
                                                     count=instances_per_leaf)
            requests.append(LLMRequest.chat(user, system=system, response_model=instances_model,
                                            item_id=f"{cid}#instances"))
        calls += len(requests)
        for cid, res in zip(leaves, llm.generate(requests, on_progress)):
            if not res.ok:
                failures.append({"stage": "concept_tree", "role": llm.role, "model": llm.label,
                                 "item_id": res.request.item_id, "reason": res.error})
                continue
            seen: set[str] = set()
            for name in res.parsed.instances:
                if normalize(name) and normalize(name) not in seen:
                    seen.add(normalize(name))
                    tree.nodes[cid]["instances"].append(name)

    notes = {"calls": calls, "concepts": len(tree.nodes), "leaves": len(leaves),
             "children_template_sha256": children_template.sha256,
             "instances_template_sha256": instances_template.sha256, "model": llm.label}
    if tree.rejected:
        notes["rejected"] = tree.rejected
    if short:
        notes["short"] = short
    return StageResult(frame(list(tree.nodes.values()), GROWN_CONCEPTS), frame(failures, FAILURES), notes)


def grown_concepts(records: pl.DataFrame) -> list:
    """The grown frame as `orforge.core.concepts.Concept` rows, for `ConceptTree(...)` and the tree file writer."""
    from orforge.core.concepts import Concept  # the tree model lands with the SELECT data side

    return [Concept(id=r["concept_id"], name=r["name"], parent=r["parent_id"], instances=list(r["instances"] or []))
            for r in records.iter_rows(named=True)]
