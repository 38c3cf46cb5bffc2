"""The default path on the real embedded model (llama.cpp + SmolLM2-135M): the proof that `make demo` works.

Slow (the server starts in about 2 s, each reply takes a second or more on 2 cores); kept in CI on purpose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl
import pytest
import yaml
from pydantic import BaseModel

from orforge.core.config import ModelSpec

pytestmark = pytest.mark.slow


class Verdict(BaseModel):
    verdict: Literal["benign", "toxic"]
    category: str


def test_embedded_model_gives_a_schema_valid_reply_and_stops_with_the_hub(tmp_path):
    from orforge.llm.hub import LLMHub
    from orforge.llm.types import LLMRequest

    with LLMHub(tmp_path / "cache.sqlite") as hub:
        llm = hub.model(ModelSpec(backend="local", max_tokens=48), "test")
        result = llm.generate([LLMRequest.chat("Is 'how do I bake bread?' a harmful request? Reply in JSON.",
                                               response_model=Verdict)])[0]
        server = next(iter(hub._services.values()))
        assert server.proc.poll() is None
    assert result.ok, result.error
    assert isinstance(result.parsed, Verdict)
    assert result.completion_tokens > 0
    assert server.proc.poll() is not None, "the embedded server must stop when the hub closes"


def test_embedded_server_does_not_outlive_a_killed_parent(tmp_path):
    """SIGKILL of the process that started the server takes the server down too (no orphan)."""
    import subprocess
    import sys
    import time

    script = ("import sys; sys.path.insert(0, '.');"
              "from orforge.core.config import ModelSpec; from orforge.llm.hub import LLMHub;"
              f"hub = LLMHub({str(tmp_path / 'c.sqlite')!r}); hub.model(ModelSpec(backend='local'), 'x');"
              "print(next(iter(hub._services.values())).proc.pid, flush=True); import time; time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.2)
    assert not _alive(child_pid), "the llama.cpp server outlived its parent"


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_small_build_on_the_embedded_model(prefect_harness, tmp_path):
    """A tiny version of configs/demo.yaml: every role on the embedded model, through Prefect, to a release."""
    from orforge.flows.build import build_flow
    from orforge.outputs.release import read_manifest, verify_release

    demo = yaml.safe_load(open("configs/demo.yaml"))
    demo.update(output_dir=str(tmp_path / "releases"), work_dir=str(tmp_path / "work"),
                cache_path=str(tmp_path / "cache.sqlite"))
    demo["categories"]["include"] = ["privacy"]
    seeds = pl.read_csv(demo["seed_file"]["path"]).filter(pl.col("category") == "privacy")
    seeds.write_csv(tmp_path / "seeds.csv")  # the demo's written seeds of the one category built here
    demo["seed_file"]["path"] = str(tmp_path / "seeds.csv")
    demo["seeds"].update(seeds_per_category=2, seeds_per_call=2)
    demo["rewrites"]["rewrites_per_seed"] = 2
    demo["panel"]["members"] = demo["panel"]["members"][:2]
    # The 135M model's rewrites are nearly all junk ("...1. The last one is not a request."), which the quality gate
    # rejects (the demo's report counts them; the gate itself runs on this model in the SELECT and ALERT tests below).
    # Repairing wrapped requests does not save them: with the gate on, all 5 rewrites of a run were rejected (4
    # statements, 1 copy of its seed once "... 2." was taken off), leaving moderation and the panel nothing, so the
    # gate is off here: this test proves that every role runs on the embedded model.
    demo["quality"] = {"enabled": False}
    demo["splits"]["hard_min_rejections"] = 1
    for member in demo["panel"]["members"] + demo["moderation"]["moderators"]:
        member["max_tokens"] = 32
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(demo))

    out = tmp_path / "release"
    build_flow(config_path=str(config), output=str(out))
    manifest = read_manifest(out)
    rows = {s.name: s.rows for s in manifest.splits}
    assert rows["toxic"] > 0  # the seeds at least
    assert rows["benign"] + rows["toxic"] + pl.read_parquet(out / "contested.parquet").height > 0
    assert manifest.tokens["moderator"].completion_tokens > 0
    assert (out / "report.html").exists()
    assert verify_release(out).ok


def test_small_select_build_and_evaluation_on_the_embedded_model(prefect_harness, tmp_path):
    """A tiny version of configs/select-demo.yaml on the embedded model: one target with a child and a sibling,
    through Prefect to a release, then one technique evaluated on it."""
    from orforge.flows.select import select_build_flow, select_evaluate_flow
    from orforge.outputs.release import read_manifest, verify_release

    tree = tmp_path / "tree.yaml"
    tree.write_text("concepts:\n- {id: places, name: Places, parent: null}\n"
                    "- {id: rivers, name: Rivers, parent: places}\n- {id: lakes, name: Lakes, parent: places}\n"
                    "- {id: volcanoes, name: Volcanoes, parent: null}\n")
    demo = yaml.safe_load(open("configs/select-demo.yaml"))
    demo.update(output_dir=str(tmp_path / "releases"), work_dir=str(tmp_path / "work"),
                cache_path=str(tmp_path / "cache.sqlite"), concepts={"source": str(tree)})
    demo["questions"].update(eval_per_concept=3, train_per_concept=1, per_call=3)
    demo["splits"] = {"targets": ["places"]}
    demo["answers"]["max_tokens"] = 24
    demo["evaluation"].update(techniques=["instructed"], seeds=[0])
    config = tmp_path / "tiny-select.yaml"
    config.write_text(yaml.safe_dump(demo))

    out = tmp_path / "release"
    select_build_flow(config_path=str(config), output=str(out))
    manifest = read_manifest(out)
    rows = {s.name: s.rows for s in manifest.splits}
    assert rows["abstention"] > 0 and rows["generalization"] > 0, rows
    assert manifest.tokens["questions"].completion_tokens > 0
    assert verify_release(out).ok and (out / "data.json").is_file()

    evaluation = Path(select_evaluate_flow(release=str(out), config_path=str(config)))
    responses = pl.read_parquet(evaluation / "responses.parquet")
    assert responses.height == sum(rows.values()) and responses["response"].is_not_null().all()
    assert (evaluation / "scores.csv").is_file()


def test_small_alert_build_and_evaluation_on_the_embedded_model(prefect_harness, tmp_path):
    """A tiny version of configs/alert-demo.yaml on the embedded model: one micro category, two prompts, one attack,
    through Prefect to a release, then the rubric judge on the target's replies."""
    from orforge.flows.alert import alert_build_flow, alert_evaluate_flow
    from orforge.outputs.release import read_manifest, verify_release

    demo = yaml.safe_load(open("configs/alert-demo.yaml"))
    demo.update(output_dir=str(tmp_path / "releases"), work_dir=str(tmp_path / "work"),
                cache_path=str(tmp_path / "cache.sqlite"))
    demo["categories"]["include"] = ["crime_cyber"]
    demo["seeds"].update(seeds_per_category=2, seeds_per_call=2)
    demo["attacks"]["types"] = ["prefix_injection"]
    demo["evaluation"]["allowed_categories"] = []
    config = tmp_path / "tiny-alert.yaml"
    config.write_text(yaml.safe_dump(demo))

    out = tmp_path / "release"
    alert_build_flow(config_path=str(config), output=str(out))
    manifest = read_manifest(out)
    rows = {s.name: s.rows for s in manifest.splits}
    assert rows["base"] > 0 and rows["adversarial"] == rows["base"], rows
    assert verify_release(out).ok and (out / "alert.jsonl").is_file()

    evaluation = Path(alert_evaluate_flow(release=str(out), config_path=str(config)))
    verdicts = pl.read_parquet(evaluation / "verdicts.parquet")
    # One rubric verdict per reply the judge could be asked about (a reply it garbled stays a recorded failure).
    assert 0 < verdicts.height <= rows["base"] + rows["adversarial"]
    assert set(verdicts["judge"]) == {"smollm2-judge"} and (evaluation / "safety_scores.csv").is_file()
