"""Progress totals are estimates; a finished stage's bar reads done == total, with what was actually done."""

from __future__ import annotations

import io

import polars as pl
import pytest
from rich.console import Console

from orforge.core.config import SeedsConfig
from orforge.flows.progress import Reporter, RichReporter, StageState, use_reporter
from orforge.generators.seeds import call_budget, generate_seeds
from tests.flows.pipeline import pipeline_responder, write_config


class RecordingReporter(Reporter):
    """Records what a display would be told, as (event, stage, total, completed)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, int, int]] = []

    def _shown_start(self, name: str, state: StageState, added: int) -> None:
        self.events.append(("start", name, state.total, state.completed))

    def _shown_update(self, name: str, state: StageState) -> None:
        self.events.append(("update", name, state.total, state.completed))

    def _shown_done(self, name: str, state: StageState) -> None:
        self.events.append(("done", name, state.total, state.completed))

    def final(self, name: str) -> tuple[str, int, int]:
        event, _, total, completed = [e for e in self.events if e[1] == name][-1]
        return event, total, completed


def categories(*names: str) -> pl.DataFrame:
    return pl.DataFrame({"category": list(names), "description": [f"requests about {n}" for n in names],
                         "examples": [[] for _ in names]},
                        schema={"category": pl.Utf8, "description": pl.Utf8, "examples": pl.List(pl.Utf8)})


def test_a_seed_stage_that_needs_fewer_calls_than_its_budget_ends_at_done_equals_total(fake_server, make_spec,
                                                                                      llm_hub):
    fake_server.responder = pipeline_responder  # distinct seeds, every call delivers in full
    cfg = SeedsConfig(model=make_spec(), seeds_per_category=8, seeds_per_call=4)
    estimate = 2 * call_budget(cfg)  # two categories, the budget is 3 x the calls a full delivery needs
    rep = RecordingReporter()
    progress = rep.stage("seeds", estimate)
    result = generate_seeds(categories("privacy", "violence"), cfg, llm_hub.model(cfg.model, "seeds"), progress)
    assert result.records.height == 16
    calls = len(fake_server.chat_requests)
    assert calls == 4 and calls != estimate

    assert rep.events[0] == ("start", "seeds", estimate, 0)
    assert rep.final("seeds") == ("update", estimate, calls)  # before the end: 4/12
    rep.done("seeds")
    assert rep.final("seeds") == ("done", calls, calls)  # after it: 4/4
    assert rep.stages["seeds"].total == rep.stages["seeds"].completed == calls


def test_a_stage_started_again_after_it_ended_keeps_counting():
    rep = RecordingReporter()
    rep.start("panel", 10)
    rep.update("panel", 7, 100)
    rep.done("panel")
    rep.start("panel", 5)
    assert rep.final("panel") == ("start", 12, 7)
    rep.update("panel", 5, 10)
    rep.done("panel")
    assert rep.final("panel") == ("done", 12, 12)
    assert rep.stages["panel"].tokens == 110


def test_the_rich_bar_of_a_finished_stage_reads_done_over_done():
    out = io.StringIO()
    rep = RichReporter(Console(file=out, width=120, force_terminal=False))
    with use_reporter(rep):
        rep.start("seeds", 72)
        rep.update("seeds", 62, 1234)
        rep.done("seeds")
    [task] = rep.progress.tasks
    assert (task.completed, task.total, task.fields["tokens"]) == (62, 62, 1234)
    assert "62/62" in out.getvalue() and "/72" not in out.getvalue().splitlines()[-1]


def test_the_progress_line_shows_the_cost_so_far_of_a_priced_model(fake_server, make_spec, llm_hub):
    """The fake server reports usage (a token per word): 3 requests of 3 prompt words each, replies of 4 words."""
    from orforge.llm.types import LLMRequest

    fake_server.responder = lambda body: "four words of reply"
    out = io.StringIO()
    rep = RichReporter(Console(file=out, width=160, force_terminal=False))
    priced = make_spec(name="priced", price={"input_per_million": 100.0, "output_per_million": 1000.0})
    with use_reporter(rep):
        progress = rep.stage("panel", 3)
        results = llm_hub.model(priced, "panel").generate([LLMRequest.chat(f"question number {i}") for i in range(3)],
                                                          progress)
        unpriced_progress = rep.stage("answers", 3)
        llm_hub.model(make_spec(name="free"), "answers").generate([LLMRequest.chat("one more question")],
                                                                  unpriced_progress)
        rep.done("panel")
        rep.done("answers")
    assert all(r.ok for r in results)
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    assert (prompt, completion) == (9, 12)
    expected = (prompt * 100.0 + completion * 1000.0) / 1e6
    assert rep.stages["panel"].cost == pytest.approx(expected)
    assert rep.stages["answers"].cost is None
    lines = out.getvalue().splitlines()
    assert any("panel" in line and f"cost {expected:.4f}" in line for line in lines), out.getvalue()
    assert not any("answers" in line and "cost" in line for line in lines)
    assert llm_hub.usage[("panel", "priced")].cost == pytest.approx(expected)


@pytest.mark.slow
def test_every_stage_of_a_build_ends_with_done_equal_to_total(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow

    fake_server.responder = pipeline_responder
    config = write_config(tmp_path, fake_server.url + "/v1")
    rep = RecordingReporter()
    with use_reporter(rep):
        build_flow(config_path=str(config), output=str(tmp_path / "release"))
    seed_calls = sum(1 for r in fake_server.chat_requests
                     if (r.body.get("response_format") or {}).get("json_schema", {}).get("name") == "SeedPrompts")
    estimated = next(total for event, name, total, _ in rep.events if event == "start" and name == "seeds")
    assert seed_calls < estimated  # the budget is an upper bound: the estimate really was off
    assert rep.final("seeds") == ("done", seed_calls, seed_calls)
    for stage in ("rewrites", "moderation", "panel"):
        event, total, completed = rep.final(stage)
        assert event == "done" and total == completed > 0, stage
