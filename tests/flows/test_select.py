"""The SELECT recipe through real Prefect against a scripted loopback model: build, rerun, evaluate, CLI dispatch.

The scripted model writes questions that name their concept, answers every plain question, and, told to abstain on
a concept, replies ABSTAIN exactly when the question names that concept. So the scores are known in advance:
`instructed` abstains on every target question and on no sibling or ancestor question, and never on a descendant's
question (whose text names the descendant, not the target); `none` never abstains.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.fakeserver import request_schema
from tests.flows.pipeline import salad

pytestmark = pytest.mark.slow

TREE = """\
concepts:
- {id: places, name: Places, parent: null}
- {id: water, name: Waterways, parent: places}
- {id: rivers, name: Rivers, parent: water, instances: [Danube]}
- {id: canals, name: Canals, parent: water}
- {id: peaks, name: Summits, parent: places}
- {id: people, name: People, parent: null}
- {id: poets, name: Poets, parent: people}
"""


def select_responder(body: dict):
    user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    system = " ".join(m["content"] for m in body["messages"] if m["role"] == "system")
    if request_schema(body) is not None:  # question generation
        topic = re.search(r"Topic: (.+)", user).group(1).strip()
        count = int(re.search(r"Write (\d+) different", user).group(1))
        return {"questions": [f"About {topic}: {salad('q', topic, body.get('seed', 0), i)}" for i in range(count)]}
    banned = re.search(r"Do not answer any question about (.+?) \(", system)
    if banned:
        name = banned.group(1)
        return "ABSTAIN" if f"About {name}:" in user else f"Here is an answer to: {user[:40]}"
    return f"Here is an answer to: {user[:40]}"


def write_select_config(tmp_path: Path, base_url: str, **overrides) -> Path:
    spec = {"backend": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": 8, "timeout_s": 10,
            "max_retries": 2}
    tmp_path.mkdir(parents=True, exist_ok=True)
    tree = tmp_path / "tree.yaml"
    tree.write_text(TREE)
    cfg = {
        "recipe": "select",
        "name": "select-test",
        "license": "cc-by-4.0",
        "output_dir": str(tmp_path / "releases"),
        "work_dir": str(tmp_path / "work"),
        "cache_path": str(tmp_path / "cache.sqlite"),
        "shard_size": 3,
        "concepts": {"source": str(tree)},
        "questions": {"model": {**spec, "name": "writer"}, "eval_per_concept": 3, "train_per_concept": 2,
                      "per_call": 5},
        "splits": {"targets": ["water", "peaks"]},
        "answers": {**spec, "name": "answerer"},
        "evaluation": {"techniques": ["none", "instructed", "instructed_fewshot"], "seeds": [0, 1]},
        "targets": [{**spec, "name": "target-a"}],
    }
    cfg.update(overrides)
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def select_server(fake_server):
    fake_server.responder = select_responder
    return fake_server


def test_select_build_rerun_and_evaluate(prefect_harness, select_server, tmp_path):
    from orforge.core.concepts import ConceptTree
    from orforge.flows.select import select_build_flow, select_evaluate_flow
    from orforge.outputs.release import read_manifest, verify_release

    config = write_select_config(tmp_path, select_server.url + "/v1")
    first = Path(select_build_flow(config_path=str(config), output=str(tmp_path / "first")))
    sent = len(select_server.chat_requests)
    # Questions only for the concepts the two targets need: water, rivers, canals, peaks (targets and their
    # descendants), places (ancestor); poets and people are never asked about.
    asked = {re.search(r"Topic: (.+)", r.body["messages"][-1]["content"]).group(1).strip()
             for r in select_server.chat_requests if request_schema(r.body) is not None}
    assert asked == {"Waterways", "Rivers", "Canals", "Summits", "Places"}

    manifest = read_manifest(first)
    assert manifest.recipe == "select" and manifest.license == "cc-by-4.0"
    assert verify_release(first).ok
    # Diversity of the kept questions (by kind) and of each split (by target concept), in the card too.
    overall = {r.split: r.rows for r in manifest.diversity.rows if r.by is None}
    assert set(overall) == {"questions", "abstention", "generalization", "specificity"}
    assert overall["abstention"] == manifest.split("abstention").rows
    assert {r.by for r in manifest.diversity.rows if r.split == "abstention" and r.by} == {"target_id"}
    assert "### Diversity" in (first / "README.md").read_text()
    for name in ("abstention.csv", "generalization.csv", "specificity.csv", "questions.parquet", "tree.yaml",
                 "data.json", "taxonomy_plus.json", "sft.jsonl", "dpo.jsonl", "sft.parquet", "dpo.parquet",
                 "README.md", "report.html"):
        assert (first / name).is_file(), name

    abstention = pl.read_parquet(first / "abstention.parquet")
    generalization = pl.read_parquet(first / "generalization.parquet")
    specificity = pl.read_parquet(first / "specificity.parquet")
    questions = pl.read_parquet(first / "questions.parquet")
    concept_of = dict(questions.select("question_id", "concept_id").iter_rows())
    # Membership follows the tree exactly.
    assert set(abstention.filter(pl.col("target_id") == "water")["concept_id"]) == {"water"}
    assert set(generalization.filter(pl.col("target_id") == "water")["concept_id"]) == {"rivers", "canals"}
    assert generalization.filter(pl.col("target_id") == "peaks").height == 0  # a leaf has no descendants
    spec_water = specificity.filter(pl.col("target_id") == "water")
    assert set(spec_water.select("concept_id", "relation", "distance").unique().iter_rows()) <= {
        ("peaks", "sibling", 2), ("places", "ancestor", 1)}
    assert all(concept_of[q] == c for q, c in abstention.select("question_id", "concept_id").iter_rows())
    assert pl.read_csv(first / "abstention.csv").columns == ["target_id", "relation", "distance", "concept_id",
                                                             "question"]
    # SELECT's own format reads back to the same tree; the card lets `datasets` find the three splits.
    data = json.loads((first / "data.json").read_text())
    assert data["rivers"]["context"] == {"names": ["Places", "Waterways"], "ids": ["places", "water"]}
    assert len(data["rivers"]["queries"]) == questions.filter((pl.col("concept_id") == "rivers")
                                                              & (pl.col("kind") == "eval")).height
    assert ConceptTree.load(first / "taxonomy_plus.json").tree_hash() == ConceptTree.load(first / "tree.yaml").tree_hash()
    card = (first / "README.md").read_text()
    assert "config_name: abstention" in card and "license: cc-by-4.0" in card
    # DPO: on the target's own training questions the chosen reply abstains, on a sibling's it answers.
    dpo = pl.read_parquet(first / "dpo.parquet")
    own = dpo.filter((pl.col("target_id") == "water") & (pl.col("relation") == "self"))
    assert own.height and set(own["chosen"]) == {"ABSTAIN"}
    sibling = dpo.filter(pl.col("relation") == "sibling")
    assert sibling.height and set(sibling["rejected"]) == {"ABSTAIN"}
    report = (first / "report.html").read_text()
    assert 'id="splits"' in report and 'id="evaluation"' in report

    # A rerun sends nothing and writes the same splits.
    second = Path(select_build_flow(config_path=str(config), output=str(tmp_path / "second")))
    assert len(select_server.chat_requests) == sent
    for name in ("abstention.csv", "generalization.csv", "specificity.csv", "data.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    # Evaluate: 1 target x 3 techniques x 2 seeds over every split row.
    before = len(select_server.chat_requests)
    evaluation = Path(select_evaluate_flow(release=str(first), config_path=str(config)))
    rows = abstention.height + generalization.height + specificity.height
    assert len(select_server.chat_requests) - before == rows * 3 * 2
    scores = pl.read_csv(evaluation / "scores.csv")
    by_technique = {r["technique"]: r for r in scores.iter_rows(named=True)}
    assert by_technique["instructed"]["abstention_rate"] == 1.0
    assert by_technique["instructed"]["specificity"] == 1.0
    assert by_technique["instructed"]["generalization_rate"] == 0.0
    assert by_technique["none"]["abstention_rate"] == 0.0 and by_technique["none"]["specificity"] == 1.0
    assert (evaluation / "distance.png").stat().st_size > 1000
    assert 'id="evaluation"' in (first / "report.html").read_text()
    # Few-shot prompts show worked examples from the training questions, never the question being asked.
    fewshot = [r.body for r in select_server.chat_requests[before:] if len(r.body["messages"]) > 2]
    assert fewshot
    for body in fewshot:
        asked_now = body["messages"][-1]["content"]
        assert asked_now not in [m["content"] for m in body["messages"][:-1]]
    # Evaluating again sends nothing (every answer is cached).
    again = len(select_server.chat_requests)
    select_evaluate_flow(release=str(first), config_path=str(config))
    assert len(select_server.chat_requests) == again
    shutil.rmtree(tmp_path / "work")


def test_select_cli_build_and_bad_tree_exit_codes(select_server, tmp_path):
    """The CLI dispatches on `recipe:`; a tree with a cycle is a config error: exit 2, one line, nothing written."""
    config = write_select_config(tmp_path, select_server.url + "/v1")
    bad = tmp_path / "cycle.yaml"
    bad.write_text("concepts:\n- {id: a, name: A, parent: b}\n- {id: b, name: B, parent: a}\n")
    bad_config = write_select_config(tmp_path / "bad", select_server.url + "/v1", concepts={"source": str(bad)})
    done = subprocess.run([sys.executable, "-m", "orforge", "build", "--config", str(bad_config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    err = (done.stdout + done.stderr).strip()
    assert len(err.splitlines()) == 1 and "cycle" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "releases").exists()

    done = subprocess.run([sys.executable, "-m", "orforge", "validate-config", str(config)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


GROWN = {"Places": ["Harbours", "Deserts"], "Harbours": ["Ferry ports", "Marinas"], "Deserts": ["Salt flats", "Dunes"],
         "Music": ["Operas", "Sonatas"], "Operas": ["Comic operas", "Grand operas"], "Sonatas": ["Piano sonatas",
                                                                                               "Violin sonatas"]}


def grow_responder(body: dict):
    user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if name == "SubConcepts":
        parent = re.search(r"Parent topic: (.+)", user).group(1).strip()
        return {"concepts": GROWN.get(parent, [f"{parent} kind {i}" for i in range(2)])}
    if name and "nstances" in name:
        topic = re.search(r"Topic: (.+)", user).group(1).strip()
        return {"instances": [f"{topic} example {i}" for i in range(2)]}
    return select_responder(body)


def test_select_grows_a_tree_and_writes_it_for_review(prefect_harness, fake_server, tmp_path):
    """`concepts.grow`: the model proposes sub-concepts level by level; the release carries the tree as tree.yaml,
    which pins it: a build from that file asks no concept questions and gives the same splits."""
    from orforge.core.concepts import ConceptTree
    from orforge.flows.select import select_build_flow

    fake_server.responder = grow_responder
    spec = {"backend": "openai", "base_url": fake_server.url + "/v1", "model": "fake-model", "timeout_s": 10,
            "max_retries": 2}
    config = write_select_config(tmp_path, fake_server.url + "/v1", concepts={"grow": {
        "roots": ["Places", "Music"], "children_per_node": 2, "depth": 2, "instances_per_leaf": 2,
        "similarity_threshold": 0.97,
        "model": {**spec, "name": "grower"}}}, splits={"targets": "non_leaf"})
    grown = Path(select_build_flow(config_path=str(config), output=str(tmp_path / "grown")))
    tree = ConceptTree.load(grown / "tree.yaml")
    names = {tree.get(c).name for c in tree.ids()}
    assert {"Places", "Harbours", "Marinas", "Music", "Grand operas"} <= names
    assert len(tree.ids()) == 14 and max(tree.depth(c) for c in tree.ids()) == 2
    leaf = next(c for c in tree.ids() if tree.get(c).name == "Marinas")
    assert tree.get(leaf).instances == ("Marinas example 0", "Marinas example 1")
    assert pl.read_parquet(grown / "abstention.parquet")["target_id"].n_unique() == 6  # the non-leaf concepts

    pinned = write_select_config(tmp_path / "pinned", fake_server.url + "/v1",
                                 concepts={"source": str(grown / "tree.yaml")}, splits={"targets": "non_leaf"})
    grow_requests = sum(1 for r in fake_server.chat_requests
                        if (r.body.get("response_format") or {}).get("json_schema", {}).get("name") == "SubConcepts")
    again = Path(select_build_flow(config_path=str(pinned), output=str(tmp_path / "again")))
    assert sum(1 for r in fake_server.chat_requests
               if (r.body.get("response_format") or {}).get("json_schema", {}).get("name") == "SubConcepts") \
        == grow_requests
    assert (grown / "abstention.csv").read_bytes() == (again / "abstention.csv").read_bytes()


def junk_questions_responder(body: dict):
    """SELECT's scripted model, except that two of the questions about Rivers are junk."""
    reply = select_responder(body)
    if request_schema(body) is not None and "Topic: Rivers" in body["messages"][-1]["content"]:
        reply["questions"][-2:] = ["...(unfinished)", "Rivers are long and wet and flow to the sea."]
    return reply


def test_select_gated_questions_are_counted(prefect_harness, fake_server, tmp_path):
    from orforge.flows.select import select_build_flow
    from orforge.outputs.release import read_manifest

    fake_server.responder = junk_questions_responder
    config = write_select_config(tmp_path, fake_server.url + "/v1", answers=None, targets=[])
    out = Path(select_build_flow(config_path=str(config), output=str(tmp_path / "release")))
    questions = pl.read_parquet(out / "questions.parquet")
    assert not {"...(unfinished)", "Rivers are long and wet and flow to the sea."} & set(questions["question"])
    manifest = read_manifest(out)
    counts = [(r.stage, r.category, r.rule, r.n) for r in manifest.counts.quality_rejections]
    assert counts == [("questions", "rivers", "placeholder", 1), ("questions", "rivers", "request_form", 1)]
    funnel = {row["root"]: row for row in manifest.counts.funnel}
    assert funnel["places"]["questions_failed_gate"] == 2
    rejected = pl.read_parquet(out / "quality_rejections.parquet")
    assert set(rejected["id"]).isdisjoint(questions["question_id"])
    assert '<h2 id="quality">' in (out / "report.html").read_text()
