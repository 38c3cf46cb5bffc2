from __future__ import annotations

import json
import random

import polars as pl
import pytest

from orforge.core.concepts import Concept, ConceptTree, ConceptTreeError
from orforge.core.records import CONCEPTS
from orforge.core.select_config import DEMO_TREE

# The hand-checkable tree used across the SELECT tests:
#   animals ── mammals ── cats
#          │          └── dogs
#          └── birds ──── owls
#   vehicles ── boats
ROWS = [
    ("animals", "Animals", None), ("mammals", "Mammals", "animals"), ("cats", "Cats", "mammals"),
    ("dogs", "Dogs", "mammals"), ("birds", "Birds", "animals"), ("owls", "Owls", "birds"),
    ("vehicles", "Vehicles", None), ("boats", "Boats", "vehicles"),
]


def hand_tree() -> ConceptTree:
    return ConceptTree([Concept(id=i, name=n, parent=p) for i, n, p in ROWS])


# ---------------------------------------------------------------------------------------------------- relations


def test_relations_on_the_hand_tree():
    t = hand_tree()
    assert t.ids() == ["animals", "mammals", "cats", "dogs", "birds", "owls", "vehicles", "boats"]
    assert t.roots() == ["animals", "vehicles"]
    assert t.children("mammals") == ["cats", "dogs"]
    assert t.parent("cats") == "mammals" and t.parent("animals") is None
    assert t.ancestors("cats") == ["mammals", "animals"]
    assert t.descendants("animals") == ["mammals", "cats", "dogs", "birds", "owls"]
    assert t.descendants("cats") == []
    assert t.siblings("cats") == ["dogs"]
    assert t.siblings("mammals") == ["birds"]
    assert t.siblings("animals") == ["vehicles"]  # roots are siblings under the implicit top
    assert t.siblings("owls") == []
    assert [t.depth(c) for c in ("animals", "mammals", "cats")] == [0, 1, 2]
    assert t.leaves() == ["cats", "dogs", "owls", "boats"]
    assert t.context_names("cats") == ["Animals", "Mammals"]
    assert t.context_names("animals") == []


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("cats", "cats", 0), ("cats", "mammals", 1), ("cats", "animals", 2), ("cats", "dogs", 2),
     ("cats", "owls", 4), ("cats", "birds", 3), ("animals", "vehicles", 2), ("cats", "boats", 5)],
)
def test_distance_counts_edges(a, b, expected):
    t = hand_tree()
    assert t.distance(a, b) == expected
    assert t.distance(b, a) == expected


def test_unknown_id_is_named():
    with pytest.raises(ConceptTreeError, match="'nope'"):
        hand_tree().ancestors("nope")


def test_to_frame_has_the_concepts_schema():
    f = hand_tree().to_frame()
    assert dict(f.schema) == CONCEPTS
    cats = f.filter(pl.col("concept_id") == "cats").row(0, named=True)
    assert cats == {"concept_id": "cats", "name": "Cats", "parent_id": "mammals", "depth": 2, "instances": [],
                    "ancestor_ids": ["mammals", "animals"]}


# ---------------------------------------------------------------------------------------------------- invalid trees


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ([("a", "A", None), ("b", "B", "a"), ("b", "B again", "a")], "duplicate concept id 'b'"),
        ([("a", "A", None), ("b", "B", "ghost")], "'b' has unknown parent 'ghost'"),
        ([("a", "A", None), ("b", "B", "c"), ("c", "C", "b")], "'b' is on a parent cycle"),
        ([("a", "A", "a")], "'a' is its own parent"),
        ([("a", "A", None), ("", "Nameless id", "a")], "empty id"),
        ([("a", "A", None), ("b", "  ", "a")], "'b' has an empty name"),
    ],
)
def test_invalid_trees_name_the_offending_id(rows, named):
    with pytest.raises(ConceptTreeError, match=named):
        ConceptTree([Concept(id=i, name=n, parent=p) for i, n, p in rows])


def test_cycle_error_from_a_file_names_the_file_and_the_loop(tmp_path):
    path = tmp_path / "loop.csv"
    path.write_text("id,name,parent\nroot,Root,\nx,X,y\ny,Y,z\nz,Z,x\n")
    with pytest.raises(ConceptTreeError) as info:
        ConceptTree.load(path)
    message = str(info.value)
    assert str(path) in message and "'x'" in message and "x -> y -> z -> x" in message
    assert "\n" not in message


def test_an_empty_tree_is_an_error():
    with pytest.raises(ConceptTreeError, match="no concepts"):
        ConceptTree([])


# ---------------------------------------------------------------------------------------------------- loading


def test_yaml_mapping_and_bare_list_load(tmp_path):
    rows = [{"id": i, "name": n, "parent": p} for i, n, p in ROWS]
    rows[2]["instances"] = ["Tabby", "Siamese"]
    wrapped = tmp_path / "tree.yaml"
    wrapped.write_text(json.dumps({"concepts": rows}))  # JSON is YAML
    bare = tmp_path / "tree.yml"
    bare.write_text("\n".join(
        f"- id: {r['id']}\n  name: {r['name']}\n  parent: {r['parent'] or 'null'}" for r in rows
    ) + "\n")
    a, b = ConceptTree.load(wrapped), ConceptTree.load(bare)
    assert a.ids() == hand_tree().ids()
    assert a.get("cats").instances == ("Tabby", "Siamese")
    assert b.get("cats").instances == ()
    assert b.ancestors("owls") == ["birds", "animals"]


def test_csv_loads_with_instances(tmp_path):
    path = tmp_path / "tree.csv"
    path.write_text(
        "id,name,parent,instances\nplaces,Places,,\nrivers,Rivers,places,Danube; Amazon\nlakes,Lakes,places,\n"
    )
    t = ConceptTree.load(path)
    assert t.roots() == ["places"]
    assert t.get("rivers").instances == ("Danube", "Amazon")
    assert t.siblings("rivers") == ["lakes"]


def test_csv_without_the_header_is_refused(tmp_path):
    path = tmp_path / "tree.csv"
    path.write_text("concept,label\na,A\n")
    with pytest.raises(ConceptTreeError, match="id,name,parent"):
        ConceptTree.load(path)


def test_taxonomy_plus_json_loads_dict_list_and_absent_children(tmp_path):
    taxonomy = {
        "animals": {
            "name": "Animals",
            "children": [
                {"mammals": {"name": "Mammals", "children": {"cats": {"name": "Cats", "instances": ["Tabby"]},
                                                             "dogs": {"name": "Dogs", "children": {}}}}},
                {"birds": {"name": "Birds", "children": {"owls": {"name": "Owls"}}}},
            ],
        },
        "vehicles": {"name": "Vehicles", "children": {"boats": {"name": "Boats", "children": []}}},
    }
    path = tmp_path / "taxonomy_plus.json"
    path.write_text(json.dumps(taxonomy))
    t = ConceptTree.load(path)
    assert t.ids() == hand_tree().ids()
    assert t.get("cats").instances == ("Tabby",)
    assert t.tree_hash() != hand_tree().tree_hash()  # the instance is content
    assert t.distance("cats", "owls") == 4


def test_taxonomy_json_duplicate_across_branches(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"a": {"name": "A", "children": {"x": {"name": "X"}}},
                                "b": {"name": "B", "children": {"x": {"name": "X"}}}}))
    with pytest.raises(ConceptTreeError, match=rf"{path}.*duplicate concept id 'x'"):
        ConceptTree.load(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ConceptTreeError, match=r"\.json, \.yaml"):
        ConceptTree.load(tmp_path / "tree.txt")
    with pytest.raises(ConceptTreeError, match="no such concept tree file"):
        ConceptTree.load(tmp_path / "absent.yaml")


def test_yaml_row_with_an_unknown_key_names_the_concept(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("- {id: a, name: A, parent: null, colour: red}\n")
    with pytest.raises(ConceptTreeError, match="concept 'a': colour"):
        ConceptTree.load(path)


# ---------------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".csv"])
def test_write_round_trips(tmp_path, suffix):
    concepts = [Concept(id=i, name=n, parent=p, instances=("One", "Two") if i == "owls" else ()) for i, n, p in ROWS]
    tree = ConceptTree(concepts)
    path = tree.write(tmp_path / f"tree{suffix}")
    again = ConceptTree.load(path)
    assert again.ids() == tree.ids()
    assert again.tree_hash() == tree.tree_hash()
    assert again.get("owls").instances == ("One", "Two")


def test_yaml_file_is_reviewable(tmp_path):
    text = hand_tree().write(tmp_path / "t.yaml").read_text()
    assert text.startswith("# Concept tree")
    assert f"tree_hash: {hand_tree().tree_hash()}" in text
    assert "- id: cats\n  name: Cats\n  parent: mammals\n" in text


def test_tree_hash_ignores_listing_order_but_not_content():
    concepts = [Concept(id=i, name=n, parent=p) for i, n, p in ROWS]
    shuffled = concepts[:]
    random.Random(3).shuffle(shuffled)
    assert ConceptTree(shuffled).tree_hash() == hand_tree().tree_hash()
    renamed = [c if c.id != "dogs" else Concept(id="dogs", name="Hounds", parent="mammals") for c in concepts]
    assert ConceptTree(renamed).tree_hash() != hand_tree().tree_hash()
    assert len(hand_tree().tree_hash()) == 64


# ---------------------------------------------------------------------------------------------------- demo tree


def test_demo_tree_shape():
    tree = ConceptTree.load(DEMO_TREE)
    assert 40 <= len(tree) <= 80
    assert [tree.get(r).name for r in tree.roots()] == ["Places", "Organizations", "Creative works", "People",
                                                       "Products"]
    assert max(tree.depth(c) for c in tree.ids()) in (3, 4)
    assert any(tree.get(c).instances for c in tree.leaves())
    assert all(not tree.get(c).instances for c in tree.ids() if not tree.is_leaf(c))
    names = [tree.get(c).name.casefold() for c in tree.ids()]
    assert len(set(names)) == len(names)
