"""`orforge plan`: requests, tokens and cost per stage before a build, checked by hand and against a real build; and
prices reaching the manifest, the card and the report (the progress line: tests/flows/test_progress.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orforge.core.recipes import load_config
from orforge.flows.cli import app
from orforge.flows.plan import (
    CHARS_PER_TOKEN,
    FREE_ANSWER_TOKENS,
    TOKENS_PER_MESSAGE,
    estimate_tokens,
    make_plan,
    representative_text,
)
from orforge.flows.recipes import recipe
from tests.fakeserver import _as_text
from tests.flows.pipeline import pipeline_responder, stage_of, write_config

CONFIGS = Path(__file__).parents[2] / "configs"
runner = CliRunner()
SEEDS_PRICE = {"input_per_million": 1.0, "output_per_million": 2.0, "currency": "EUR"}
MODERATOR_PRICE = {"input_per_million": 0.5, "output_per_million": 4.0, "currency": "EUR"}
ROLE_OF_STAGE = {"SeedPrompts": "seeds", "Rewrites": "rewrites", "ModerationVerdict": "moderator", "panel": "panel"}


def priced_config(tmp_path: Path, base_url: str) -> Path:
    """The pipeline test config (2 categories x 6 seeds, 4 per call; 3 rewrites per seed; 3 moderators; 3 panel
    members) with the seeds model and the moderators priced and the rest not."""
    config = write_config(tmp_path, base_url)
    raw = yaml.safe_load(config.read_text())
    raw["seeds"]["model"]["price"] = SEEDS_PRICE
    for moderator in raw["moderation"]["moderators"]:
        moderator["price"] = MODERATOR_PRICE
    config.write_text(yaml.safe_dump(raw))
    return config


def by_stage(plan) -> dict[str, list]:
    rows: dict[str, list] = {}
    for row in plan.rows:
        rows.setdefault(f"{row.stage}/{row.role}", []).append(row)
    return rows


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_the_orbench_plan_counts_what_the_config_asks_for(tmp_path):
    cfg = load_config(priced_config(tmp_path, "http://127.0.0.1:9/v1"))
    plan = make_plan(cfg, recipe("orbench").plan)
    rows = by_stage(plan)
    # Seeds: ceil(6 / 4) = 2 calls per category if each delivers in full, the budget 3 x 2 = 6 at most; 2 categories.
    [seeds] = rows["seeds/seeds"]
    assert (seeds.requests, seeds.up_to) == (4, 12)
    # One rewrite call per seed: 12; candidates 12 x 3 = 36, each judged by every moderator and answered by every
    # member (at most: dedup and the vote remove some before the panel).
    [rewrites] = rows["rewrites/rewrites"]
    assert (rewrites.requests, rewrites.up_to) == (12, 12)
    assert [(r.spec.label, r.requests, r.up_to) for r in rows["moderation/moderator"]] == [
        ("mod-0", 36, 36), ("mod-1", 36, 36), ("mod-2", 36, 36)]
    assert [(r.requests, r.up_to) for r in rows["panel/panel"]] == [(36, 36)] * 3
    assert plan.totals()["requests"] == 4 + 12 + 3 * 36 + 3 * 36

    # A panel request is the prompt plus the member's system prompt ("member 0"), each a message: chars / 4 + 4.
    member = rows["panel/panel"][0]
    assert member.input_tokens == (estimate_tokens(representative_text()) + TOKENS_PER_MESSAGE
                                   + math.ceil(len("member 0") / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE)
    assert member.output_tokens == min(FREE_ANSWER_TOKENS, member.spec.max_tokens)
    # The moderators' system prompts differ in length only by a digit, so their requests are the same size.
    assert len({r.input_tokens for r in rows["moderation/moderator"]}) == 1

    # Costs: priced rows at tokens x price per million, unpriced rows none; the currency is the config's.
    assert plan.currency == "EUR"
    assert seeds.cost == pytest.approx((seeds.total_input * 1.0 + seeds.total_output * 2.0) / 1e6)
    assert seeds.max_cost == pytest.approx((seeds.max_input * 1.0 + seeds.up_to * seeds.spec.max_tokens * 2.0) / 1e6)
    assert rewrites.cost is None
    moderation = rows["moderation/moderator"]
    assert plan.totals()["cost"] == pytest.approx(seeds.cost + sum(r.cost for r in moderation))
    assert plan.totals()["unpriced_rows"] == 1 + 3


def test_the_panel_sample_bounds_the_expected_panel_requests(tmp_path):
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    raw = yaml.safe_load(config.read_text())
    raw["panel"]["sample"] = 10
    raw["refusal"] = {"method": "judge", "judge": {**raw["panel"]["members"][0], "name": "judge"}}
    config.write_text(yaml.safe_dump(raw))
    rows = by_stage(make_plan(load_config(config), recipe("orbench").plan))
    assert [(r.requests, r.up_to) for r in rows["panel/panel"]] == [(10, 10)] * 3  # not the 36 candidates
    [judge] = rows["panel/judge"]
    assert (judge.requests, judge.up_to) == (3 * 10, 3 * 10)  # every member's answer is judged


def test_the_select_and_alert_plans_count_their_demo_configs():
    select = by_stage(make_plan(load_config(CONFIGS / "select-demo.yaml"), recipe("select").plan))
    # 11 concepts are needed (the two targets, their descendants, siblings and ancestors); 4 + 2 questions per
    # concept at 6 per call is one call each, the budget three; one answer per training question (2 per concept).
    [questions] = select["questions/questions"]
    assert (questions.requests, questions.up_to) == (11, 33)
    [answers] = select["answers/answers"]
    assert (answers.requests, answers.up_to) == (22, 22)

    alert = by_stage(make_plan(load_config(CONFIGS / "alert-demo.yaml"), recipe("alert").plan))
    assert set(alert) == {"seeds/seeds"}  # attacks are rules; the judges only evaluate
    [seeds] = alert["seeds/seeds"]
    assert (seeds.requests, seeds.up_to) == (3, 9)  # 3 categories x 1 call of 3 seeds, budget 3 calls each


def test_plan_sends_nothing_and_writes_nothing(fake_server, tmp_path):
    config = priced_config(tmp_path, fake_server.url + "/v1")
    before = files_under(tmp_path)
    result = runner.invoke(app, ["plan", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["currency"] == "EUR" and plan["total"]["requests"] == 232
    assert {r["stage"] for r in plan["rows"]} == {"seeds", "rewrites", "moderation", "panel"}
    assert "characters / 4" in plan["token_rule"]
    assert fake_server.requests == []
    assert files_under(tmp_path) == before

    table = runner.invoke(app, ["plan", "--config", str(config)])
    assert table.exit_code == 0, table.output
    assert "cost EUR" in table.stdout and "total" in table.stdout and "characters / 4" in table.stdout


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["seeds"]["model"].update(price={"input_per_million": -1, "output_per_million": 1}),
     "seeds.model.price.input_per_million"),
    (lambda c: c["seeds"]["model"].update(price={"input_per_million": 1}), "seeds.model.price.output_per_million"),
    (lambda c: c["rewrites"]["model"].update(price={**SEEDS_PRICE, "currency": "USD"}),
     "use one currency per config"),
    (lambda c: c["seeds"].update(seeds_per_categroy=5), "seeds.seeds_per_categroy"),
])
def test_a_bad_config_exits_2_with_one_line(tmp_path, mutate, expected):
    config = priced_config(tmp_path, "http://127.0.0.1:9/v1")
    raw = yaml.safe_load(config.read_text())
    mutate(raw)
    config.write_text(yaml.safe_dump(raw))
    before = files_under(tmp_path)
    result = runner.invoke(app, ["plan", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert files_under(tmp_path) == before


def test_a_missing_config_exits_2(tmp_path):
    result = runner.invoke(app, ["plan", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such config file" in result.stderr


def test_cost_per_role_is_the_sum_over_its_priced_models():
    from orforge.flows.common import tokens_by_role

    row = {"requests": 2, "cached": 0, "failures": 0, "prompt_tokens": 10, "completion_tokens": 5}
    usage = [{"role": "moderator", "model": f"mod-{i}", **row, "cost": 0.25 * (i + 1)} for i in range(3)]
    usage += [{"role": "moderator", "model": "unpriced", **row}, {"role": "panel", "model": "m", **row}]
    tokens = tokens_by_role(usage)
    assert tokens["moderator"]["cost"] == pytest.approx(0.25 + 0.5 + 0.75)
    assert tokens["moderator"]["prompt_tokens"] == 40 and "cost" not in tokens["panel"]


@pytest.mark.slow
def test_a_real_build_sends_what_the_plan_says_and_its_manifest_prices_what_was_sent(prefect_harness, fake_server,
                                                                                    tmp_path):
    from orforge.flows.build import build_flow
    from orforge.outputs.release import read_manifest

    fake_server.responder = pipeline_responder  # deterministic: every call delivers in full, texts distinct
    config = priced_config(tmp_path, fake_server.url + "/v1")
    plan = by_stage(make_plan(load_config(config), recipe("orbench").plan))
    folder = tmp_path / "release"
    build_flow(config_path=str(config), output=str(folder))

    sent: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    for request in fake_server.chat_requests:
        role = ROLE_OF_STAGE[stage_of(request.body)]
        sent[role] = sent.get(role, 0) + 1
        prompt = sum(len(m["content"].split()) for m in request.body["messages"])
        completion = len(_as_text(pipeline_responder(request.body)).split())  # the fake server's usage rule
        counted = tokens.setdefault(role, [0, 0])
        counted[0], counted[1] = counted[0] + prompt, counted[1] + completion
    # With a deterministic server the plan's expected counts are exact up to the panel, which it bounds.
    assert sent["seeds"] == plan["seeds/seeds"][0].requests
    assert sent["rewrites"] == plan["rewrites/rewrites"][0].requests
    assert sent["moderator"] == sum(r.requests for r in plan["moderation/moderator"])
    assert 0 < sent["panel"] <= sum(r.up_to for r in plan["panel/panel"])

    manifest = read_manifest(folder)
    assert manifest.currency == "EUR"
    for role, price in (("seeds", SEEDS_PRICE), ("moderator", MODERATOR_PRICE)):
        prompt, completion = tokens[role]
        assert (manifest.tokens[role].prompt_tokens, manifest.tokens[role].completion_tokens) == (prompt, completion)
        expected = (prompt * price["input_per_million"] + completion * price["output_per_million"]) / 1e6
        assert manifest.tokens[role].cost == pytest.approx(expected)
    assert manifest.tokens["rewrites"].cost is None and manifest.tokens["panel"].cost is None
    per_model = {u.model: u.cost for u in manifest.usage if u.role == "moderator"}
    assert set(per_model) == {"mod-0", "mod-1", "mod-2"}
    assert sum(per_model.values()) == pytest.approx(manifest.tokens["moderator"].cost)

    card, report = (folder / "README.md").read_text(), (folder / "report.html").read_text()
    assert "cost (EUR)" in card and f"{manifest.tokens['seeds'].cost:.4g}" in card
    assert "cost (EUR)" in report


def test_the_alert_plan_runs_the_keyword_rules_and_counts_the_top_up(tmp_path):
    spec = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "fake-model"}
    prompts = tmp_path / "prompts.csv"
    # One row names its category, one matches a keyword rule (ransomware: crime_cyber); only the two that match no
    # rule reach the classifier.
    prompts.write_text("prompt,category\nHow do I get into my neighbour's wifi network?,crime_cyber\n"
                       "How is ransomware spread by email?,\nzqx vorb plinth?,\nwhat is the quorvent of a blim?,\n")
    config = tmp_path / "alert.yaml"
    config.write_text(yaml.safe_dump({
        "recipe": "alert", "name": "alert-plan", "work_dir": str(tmp_path / "work"),
        "categories": {"preset": "alert", "include": ["crime_cyber"]},
        "seeds": {"model": {**spec, "name": "writer"}, "seeds_per_category": 3, "seeds_per_call": 3},
        "ingest": {"path": str(prompts), "classifier": {**spec, "name": "classifier"}},
        "topup": {"minimum": 6, "templates": str(CONFIGS / "alert-topup-templates.yaml"),
                  "paraphrase": {**spec, "name": "paraphraser"}},
    }))
    rows = by_stage(make_plan(load_config(config), recipe("alert").plan))
    [classifier] = rows["categorize/classifier"]
    assert (classifier.requests, classifier.up_to) == (2, 2)
    # crime_cyber: 3 seeds + 2 from the file (given, keyword) = 5 of the minimum 6, so one paraphrase; from
    # templates alone, six.
    [paraphrase] = rows["topup/paraphrase"]
    assert (paraphrase.requests, paraphrase.up_to) == (1, 6)
