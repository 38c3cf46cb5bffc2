"""A small hand-checkable concept tree for the SELECT stage tests, built with `orforge.core.concepts.ConceptTree`.

    places                          products
    ├── water-bodies                └── vehicles
    │   ├── rivers  (Nile, Danube)      ├── bicycles
    │   └── lakes                       └── cars
    └── cities
"""

from __future__ import annotations

import polars as pl

from orforge.core.concepts import Concept, ConceptTree

ROWS = [
    ("places", "Places", None, []),
    ("water-bodies", "Water bodies", "places", []),
    ("rivers", "Rivers", "water-bodies", ["Nile", "Danube"]),
    ("lakes", "Lakes", "water-bodies", []),
    ("cities", "Cities", "places", []),
    ("products", "Products", None, []),
    ("vehicles", "Vehicles", "products", []),
    ("bicycles", "Bicycles", "vehicles", []),
    ("cars", "Cars", "vehicles", []),
]


def make_tree(rows=ROWS) -> ConceptTree:
    return ConceptTree([Concept(id=i, name=n, parent=p, instances=tuple(inst)) for i, n, p, inst in rows])


def concepts_frame(tree: ConceptTree) -> pl.DataFrame:
    """The CONCEPTS frame the question stage and the leak check read (ancestor_ids nearest first)."""
    return tree.to_frame()


def context_of(tree: ConceptTree) -> dict[str, list[str]]:
    return {c: tree.context_names(c) for c in tree.ids()}
