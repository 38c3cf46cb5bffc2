from __future__ import annotations

import pytest
from pydantic import ValidationError

from orforge.core.concepts import ConceptTreeError
from orforge.core.select_config import (
    DEMO_TREE,
    AbstentionEvalConfig,
    CompositionsConfig,
    ConceptTreeConfig,
    QuestionsConfig,
    SelectSplitsConfig,
)
from tests.core.test_concepts import hand_tree

LOCAL = {"backend": "local", "model": "tiny"}


def test_tree_source_or_grow_exactly_one():
    with pytest.raises(ValidationError, match="exactly one"):
        ConceptTreeConfig()
    with pytest.raises(ValidationError, match="exactly one"):
        ConceptTreeConfig(source="t.yaml", grow={"roots": ["Places"], "model": LOCAL})
    grown = ConceptTreeConfig(grow={"roots": ["Places", "People"], "model": LOCAL})
    assert grown.source_path() is None
    assert (grown.grow.children_per_node, grown.grow.depth, grown.grow.instances_per_leaf) == (4, 3, 5)
    assert grown.grow.model.temperature == 1.0  # sampled unless the spec says otherwise


def test_source_paths(tmp_path):
    assert ConceptTreeConfig(source="demo").source_path() == DEMO_TREE
    assert ConceptTreeConfig(source="trees/t.csv").source_path(tmp_path) == tmp_path / "trees/t.csv"
    with pytest.raises(ValidationError, match="extra"):
        ConceptTreeConfig(source="demo", typo=1)


def test_grow_roots_must_be_distinct():
    with pytest.raises(ValidationError, match="distinct"):
        ConceptTreeConfig(grow={"roots": ["Places", "places "], "model": LOCAL})


def test_question_defaults_follow_select():
    q = QuestionsConfig(model={**LOCAL, "temperature": 0.3})
    assert (q.eval_per_concept, q.train_per_concept) == (30, 20)
    assert q.model.temperature == 0.3


def test_targets_resolve_against_the_tree():
    tree = hand_tree()
    assert SelectSplitsConfig().target_ids(tree) == tree.ids()
    assert SelectSplitsConfig(targets="non_leaf").target_ids(tree) == ["animals", "mammals", "birds", "vehicles"]
    assert SelectSplitsConfig(targets=["dogs", "animals"]).target_ids(tree) == ["animals", "dogs"]
    with pytest.raises(ConceptTreeError, match="'wolves'"):
        SelectSplitsConfig(targets=["wolves"]).target_ids(tree)
    with pytest.raises(ValidationError, match="twice"):
        SelectSplitsConfig(targets=["dogs", "dogs"])
    assert SelectSplitsConfig().exclude_leaked == ["specificity"]


def test_composition_slots_must_match_the_template():
    with pytest.raises(ValidationError, match="2 '\\{\\}' slot"):
        CompositionsConfig(templates=[{"name": "at", "template": "Eating {} at {}", "slots": [{"root": "animals"}]}])
    with pytest.raises(ValidationError, match="descendants"):
        CompositionsConfig(templates=[{"name": "x", "template": "About {}",
                                       "slots": [{"root": "animals", "exclude": ["cats"]}]}])
    ok = CompositionsConfig(templates=[{"name": "ride", "template": "Riding {} past {}", "slots": [
        {"root": "vehicles", "flow": "descendants"}, {"root": "animals", "flow": "descendants", "exclude": ["owls"]}]}])
    ok.check_against(hand_tree())
    bad = CompositionsConfig(templates=[{"name": "ride", "template": "Riding {}", "slots": [{"root": "trains"}]}])
    with pytest.raises(ConceptTreeError, match="'trains'"):
        bad.check_against(hand_tree())


def test_abstention_eval_defaults_and_rules():
    cfg = AbstentionEvalConfig()
    assert cfg.techniques == ["none", "instructed", "instructed_fewshot"]
    assert (cfg.phrase, cfg.detector, cfg.seeds) == ("ABSTAIN", "phrase", [0, 1, 2])
    with pytest.raises(ValidationError, match="needs judge"):
        AbstentionEvalConfig(detector="judge")
    with pytest.raises(ValidationError):
        AbstentionEvalConfig(techniques=["refuse_everything"])
    with pytest.raises(ValidationError, match="seeds listed twice"):
        AbstentionEvalConfig(seeds=[1, 1])
    with pytest.raises(ValidationError, match="blank"):
        AbstentionEvalConfig(phrase="  ")
