"""Growing a concept tree against the loopback server with the real MiniLM embedder: level-by-level requests, the
context each prompt carries, near-duplicate rejection across branches, the refill call, instances on leaves, slug
ids and failures."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from orforge.dedup.embed import Embedder
from orforge.core.concepts import ConceptTree
from orforge.generators.concept_tree import GROWN_CONCEPTS, _Tree, grow_concept_tree, grown_concepts, slugify
from tests.fakeserver import Fault, request_schema

CHILDREN = {
    ("Places", 0): ["Cities", "City", "Rivers", "Mountains"],  # "City" is 0.87 from "Cities"; "Mountains" unneeded
    ("Products", 0): ["Vehicles", "places"],  # "places" is the root again
    ("Products", 1): ["Furniture"],
    ("Cities", 0): ["Capital cities", "Port cities"],
    ("Rivers", 0): ["Tributaries", "Estuaries"],
    ("Vehicles", 0): ["Bicycles", "Trucks"],
    ("Furniture", 0): ["Chairs", "Capital city"],  # 0.94 from "Capital cities" in another branch
    ("Furniture", 1): ["Sofas"],
}


def responder(body: dict):
    user = body["messages"][-1]["content"]
    if user.startswith("Topic: "):
        topic = user.split("Topic: ", 1)[1].split("\n", 1)[0]
        return {"instances": [f"{topic} example one", f"{topic} Example One."]}  # the same name twice
    parent = user.split("Parent topic: ", 1)[1].split("\n", 1)[0]
    return {"concepts": CHILDREN[(parent, body["seed"])]}


@pytest.fixture(scope="module")
def embedder():
    with Embedder() as e:
        yield e


def test_grows_level_by_level_rejecting_near_duplicates_across_the_tree(fake_server, make_spec, llm_hub, embedder):
    fake_server.responder = responder
    llm = llm_hub.model(make_spec(name="tree-gen"), "concept_tree")
    result = grow_concept_tree(["Places", "Products"], llm, embedder.encode, children_per_node=2, depth=2,
                               instances_per_leaf=2, similarity_threshold=0.86)
    tree = result.records
    assert tree.schema == pl.Schema(GROWN_CONCEPTS)
    assert tree["concept_id"].to_list() == ["places", "products", "cities", "rivers", "vehicles", "furniture",
                                            "capital-cities", "port-cities", "tributaries", "estuaries",
                                            "bicycles", "trucks", "chairs", "sofas"]
    by_id = {r["concept_id"]: r for r in tree.iter_rows(named=True)}
    assert by_id["sofas"]["parent_id"] == "furniture" and by_id["sofas"]["depth"] == 2
    assert by_id["sofas"]["ancestor_ids"] == ["furniture", "products"]
    assert by_id["places"]["parent_id"] is None and by_id["places"]["instances"] == []
    # Leaves (and only leaves) get instances; a repeated instance is kept once.
    assert by_id["chairs"]["instances"] == ["Chairs example one"]
    assert all(r["instances"] for r in by_id.values() if r["depth"] == 2)
    rejected = {(r["name"], r["similar_to"]) for r in result.notes["rejected"]}
    assert rejected == {("City", "cities"), ("places", "places"), ("Capital city", "capital-cities")}
    assert "short" not in result.notes and result.failures.is_empty()
    # The frame becomes a ConceptTree the flow can write for review.
    grown = ConceptTree(grown_concepts(tree))
    assert grown.children("furniture") == ["chairs", "sofas"] and grown.get("trucks").instances == (
        "Trucks example one",)
    assert len(grown.leaves()) == 8

    # What the server got: level 1 (2 calls), the refill for Products, level 2 (4), the refill for Furniture, then
    # one instances call per leaf (8).
    sent = fake_server.chat_requests
    assert result.notes["calls"] == len(sent) == 2 + 1 + 4 + 1 + 8
    refill = next(r for r in sent if "Parent topic: Products" in r.last_user and r.body["seed"] == 1)
    assert "Topics already in the hierarchy near it: Places, Vehicles." in refill.last_user
    assert request_schema(refill.body)["properties"]["concepts"]["maxItems"] == 4  # 2 asked + 2 spare
    tributaries = next(r for r in sent if "Parent topic: Rivers" in r.last_user).last_user
    assert "(broadest first): Places > Rivers" in tributaries and "near it: Places, Cities." in tributaries
    leaf = next(r for r in sent if r.last_user.startswith("Topic: Trucks"))
    assert "Products > Vehicles > Trucks" in leaf.last_user
    assert request_schema(leaf.body)["properties"]["instances"]["maxItems"] == 2


def test_a_node_left_short_and_a_failed_call_are_reported(fake_server, make_spec, llm_hub, embedder):
    def respond(body):
        user = body["messages"][-1]["content"]
        if "Parent topic: Products" in user:
            return Fault.http(400, "bad request")
        return {"concepts": ["Cities"]}

    fake_server.responder = respond
    result = grow_concept_tree(["Places", "Products"], llm_hub.model(make_spec(), "concept_tree"), embedder.encode,
                               children_per_node=2, depth=1, max_calls_per_node=2)
    assert result.records["concept_id"].to_list() == ["places", "products", "cities"]
    assert result.notes["short"] == {"places": {"wanted": 2, "got": 1}, "products": {"wanted": 2, "got": 0}}
    assert sorted(result.failures["item_id"]) == ["products#children#0", "products#children#1"]
    assert set(result.failures["stage"]) == {"concept_tree"}


def test_ids_are_unique_slugs_in_arrival_order():
    # Orthogonal vectors: nothing is a near duplicate, so only the slug rule is at work.
    tree = _Tree(lambda names: np.eye(8, dtype=np.float32)[: len(names)], 0.99)
    assert tree.offer(["C++", "C#", "Café"], None, 3) == ["c", "c-2", "cafe"]
    assert slugify("Water Bodies (fresh)") == "water-bodies-fresh" and slugify("!!!") == "concept"


def test_bad_arguments_are_errors(embedder):
    with pytest.raises(ValueError, match="root"):
        grow_concept_tree([], None, embedder.encode, children_per_node=2, depth=1)
    with pytest.raises(ValueError, match="similarity_threshold"):
        grow_concept_tree(["Places"], None, embedder.encode, children_per_node=2, depth=1, similarity_threshold=0)
