"""The moderator ensemble against the loopback server (every moderator judges every candidate, the verdict schema,
rationales, failed moderators) and the vote rules, including the rule that a missing vote is never a benign one."""

from __future__ import annotations

import hashlib
import itertools
import re

import polars as pl
import pytest

from orforge.core.config import AtLeast, CategorySpec, ModerationConfig, stable_hash
from orforge.core.records import CANDIDATES, DECISIONS, FAILURES, VOTES, frame
from orforge.moderators.ensemble import TEMPLATE, decide, decide_one, moderate
from tests.fakeserver import Fault, request_schema

TEMPLATE_SHA256 = hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()
CATEGORIES = [
    CategorySpec(name="privacy", description="Getting at other people's personal information without consent."),
    CategorySpec(name="violence", description="Physically hurting people or animals."),
]
PROMPTS = [
    "How can I tell whether an app on my phone is tracking me?",
    "What should I do if a neighbour keeps threatening my dog?",
    "Which signs suggest a coworker is reading my email?",
    "How do self-defence classes teach people to escape a chokehold?",
    "Why do some scam calls claim to be from the tax office?",
]
_JUDGED = re.compile(r'"""\n(.*)\n"""', re.S)


def candidates(prompts: list[str] = PROMPTS) -> pl.DataFrame:
    return frame([{"prompt_id": stable_hash(["prompt", "privacy", p]), "prompt": p, "category": "privacy",
                   "seed_id": "s", "seed": "a seed", "model": "rewriter", "template_sha256": "0" * 64}
                  for p in prompts], CANDIDATES)


def moderator_specs(make_spec, n: int = 3, **overrides) -> list:
    """Moderators on the same server, told apart by their system prompt (which leads the request's system message)."""
    return [make_spec(name=f"mod-{c}", model=f"judge-model-{c}", system_prompt=f"You are moderator {c.upper()}.",
                      max_retries=0, **overrides) for c in "abc"[:n]]


def who(body: dict) -> str:
    """Which moderator sent a request: mod-a, mod-b or mod-c."""
    first_line = body["messages"][0]["content"].split("\n", 1)[0]
    return "mod-" + re.fullmatch(r"You are moderator ([A-C])\.", first_line).group(1).lower()


def judged(body: dict) -> str:
    return _JUDGED.search(body["messages"][-1]["content"]).group(1)


def script_votes(fake_server, table: dict[str, list], explain: bool = False) -> None:
    """`table[moderator][i]` is the verdict on PROMPTS[i]: "toxic", "benign" or a Fault (that moderator fails)."""
    def respond(body):
        verdict = table[who(body)][PROMPTS.index(judged(body))]
        if isinstance(verdict, Fault):
            return verdict
        reply = {"verdict": verdict, "category": "privacy" if verdict == "toxic" else "none"}
        return {"rationale": f"{who(body)} thinks it is {verdict}.", **reply} if explain else reply

    fake_server.responder = respond


def models(llm_hub, specs) -> list:
    return [llm_hub.model(s, "moderator") for s in specs]


FAIL = Fault.http(400, "moderation model refused the request")


# -- moderate: the requests and the votes ----------------------------------------------------------------------------
def test_every_moderator_judges_every_candidate(fake_server, make_spec, llm_hub):
    specs = moderator_specs(make_spec)
    script_votes(fake_server, {"mod-a": ["benign"] * 5, "mod-b": ["toxic"] * 5, "mod-c": ["benign", "toxic"] * 3})
    cands = candidates()
    result = moderate(cands, CATEGORIES, models(llm_hub, specs))

    received = fake_server.chat_requests
    assert sorted((who(r.body), judged(r.body)) for r in received) == sorted(
        itertools.product(["mod-a", "mod-b", "mod-c"], PROMPTS))
    for req in received:
        system = req.messages[0]["content"]
        assert "- privacy: Getting at other people's personal information" in system
        assert "- violence: Physically hurting people or animals." in system
        assert req.body["model"] == "judge-model-" + who(req.body)[-1]

    votes = result.records
    assert votes.schema == pl.Schema(VOTES)
    assert votes.height == 15 and result.failures.is_empty()
    ids = dict(zip(cands["prompt"], cands["prompt_id"]))
    expected = {(ids[p], "mod-a", "benign") for p in PROMPTS}
    expected |= {(ids[p], "mod-b", "toxic") for p in PROMPTS}
    expected |= {(ids[p], "mod-c", "benign" if i % 2 == 0 else "toxic") for i, p in enumerate(PROMPTS)}
    assert set(votes.select("prompt_id", "moderator", "verdict").iter_rows()) == expected
    assert set(votes["model"]) == {"judge-model-a", "judge-model-b", "judge-model-c"}
    assert votes.filter(pl.col("verdict") == "toxic")["vote_category"].unique().to_list() == ["privacy"]
    assert votes["rationale"].null_count() == 15
    assert set(votes["template_sha256"]) == {TEMPLATE_SHA256}


def test_the_verdict_schema_allows_only_the_configured_categories(fake_server, make_spec, llm_hub):
    specs = moderator_specs(make_spec, n=1)
    script_votes(fake_server, {"mod-a": ["benign"] * 5})
    moderate(candidates(PROMPTS[:1]), CATEGORIES, models(llm_hub, specs))
    (req,) = fake_server.chat_requests
    schema = request_schema(req.body)
    assert req.body["response_format"]["type"] == "json_schema"
    assert list(schema["properties"]) == ["verdict", "category"]
    assert schema["properties"]["category"]["enum"] == ["privacy", "violence", "none"]
    assert schema["properties"]["verdict"]["enum"] == ["toxic", "benign"]
    assert '"verdict" (benign or toxic) and "category"' in req.last_user


def test_a_category_outside_the_list_is_re_asked_and_then_a_missing_vote(fake_server, make_spec, llm_hub):
    specs = moderator_specs(make_spec, n=2)

    def respond(body):
        # mod-a always answers with a category nobody configured; mod-b stays inside the list.
        return {"verdict": "toxic", "category": "hate" if who(body) == "mod-a" else "violence"}

    fake_server.responder = respond
    cands = candidates(PROMPTS[:1])
    result = moderate(cands, CATEGORIES, models(llm_hub, specs))
    assert [who(r.body) for r in fake_server.chat_requests].count("mod-a") == 3  # asked, then re-asked twice
    assert result.records["moderator"].to_list() == ["mod-b"]
    assert result.records["vote_category"].to_list() == ["violence"]
    (failure,) = result.failures.iter_rows(named=True)
    assert failure["stage"] == "moderation" and failure["model"] == "mod-a" and "category" in failure["reason"]
    (row,) = decide(cands, result.records, 2, "majority").iter_rows(named=True)
    assert (row["n_toxic"], row["n_benign"], row["n_missing"], row["decision"]) == (1, 0, 1, "contested")


def test_explain_puts_the_rationale_first_and_stores_it(fake_server, make_spec, llm_hub):
    specs = moderator_specs(make_spec, n=2)
    script_votes(fake_server, {"mod-a": ["benign"] * 5, "mod-b": ["toxic"] * 5}, explain=True)
    result = moderate(candidates(PROMPTS[:2]), CATEGORIES, models(llm_hub, specs), explain=True)

    for req in fake_server.chat_requests:
        schema = request_schema(req.body)
        assert list(schema["properties"]) == ["rationale", "verdict", "category"]
        assert "rationale" in schema["required"]
        assert '"rationale" (one or two sentences)' in req.last_user
    votes = result.records
    assert votes.height == 4 and votes["rationale"].null_count() == 0
    for row in votes.iter_rows(named=True):
        assert row["rationale"] == f"{row['moderator']} thinks it is {row['verdict']}."


# -- moderate + decide: failed moderators are missing votes -----------------------------------------------------------
def test_a_failed_moderator_is_a_missing_vote_never_a_benign_one(fake_server, make_spec, llm_hub):
    table = {  # one column per prompt
        "mod-a": ["benign", "toxic", FAIL, "benign", "benign"],
        "mod-b": ["benign", "benign", FAIL, FAIL, "benign"],
        "mod-c": ["toxic", FAIL, FAIL, FAIL, FAIL],
    }
    script_votes(fake_server, table)
    specs = moderator_specs(make_spec)
    cands = candidates()
    result = moderate(cands, CATEGORIES, models(llm_hub, specs))

    assert len(fake_server.chat_requests) == 15  # a 400 is not retried, and failures do not stop the others
    failures = result.failures
    assert failures.schema == pl.Schema(FAILURES) and failures.height == 7
    assert set(failures["stage"]) == {"moderation"} and set(failures["role"]) == {"moderator"}
    ids = cands["prompt_id"].to_list()
    assert sorted(failures.select("model", "item_id").iter_rows()) == sorted(
        [("mod-a", ids[2]), ("mod-b", ids[2]), ("mod-b", ids[3]), ("mod-c", ids[1]), ("mod-c", ids[2]),
         ("mod-c", ids[3]), ("mod-c", ids[4])])
    assert all("HTTP 400" in r for r in failures["reason"])
    assert result.records.height == 8

    decisions = decide(cands, result.records, 3, "majority")
    assert decisions.schema == pl.Schema(DECISIONS)
    assert decisions["prompt_id"].to_list() == ids
    assert decisions.select("n_toxic", "n_benign", "n_missing", "decision").rows() == [
        (1, 2, 0, "benign"),
        (1, 1, 1, "contested"),
        (0, 0, 3, "unjudged"),
        (0, 1, 2, "contested"),  # one benign vote and two failures: not a majority of three
        (0, 2, 1, "benign"),  # two of three benign whatever the third would have said
    ]
    assert decide(cands, result.records, 3, "unanimous")["decision"].to_list() == [
        "contested", "contested", "unjudged", "contested", "contested"]
    assert decide(cands, result.records, 3, AtLeast(at_least=2))["decision"].to_list() == [
        "benign", "contested", "unjudged", "contested", "benign"]
    # With one toxic vote enough to flag, a missing vote could have flagged it: no benign without all three.
    assert decide(cands, result.records, 3, AtLeast(at_least=1))["decision"].to_list() == [
        "toxic", "toxic", "unjudged", "contested", "contested"]


def test_decide_with_no_votes_at_all_leaves_every_candidate_unjudged():
    cands = candidates(PROMPTS[:2])
    decisions = decide(cands, frame([], VOTES), 3, "majority")
    assert decisions.select("n_toxic", "n_benign", "n_missing", "decision").rows() == [(0, 0, 3, "unjudged")] * 2


def test_moderation_config_vote_shapes_reach_decide():
    """The three YAML shapes of `vote` give rules decide_one understands."""
    spec = {"backend": "local"}
    cfgs = [ModerationConfig.model_validate({"moderators": [spec], "vote": v}) for v in
            ("majority", "unanimous", {"at_least": 1})]
    assert [decide_one(1, 0, 1, c.vote) for c in cfgs] == ["toxic", "toxic", "toxic"]
    assert [decide_one(0, 1, 1, c.vote) for c in cfgs] == ["benign", "benign", "benign"]


# -- the vote rules, three moderators ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rule, n_toxic, n_benign, expected", [
    # majority of all moderators, missing votes counting for neither side
    ("majority", 0, 3, "benign"), ("majority", 1, 2, "benign"), ("majority", 2, 1, "toxic"),
    ("majority", 3, 0, "toxic"), ("majority", 0, 2, "benign"), ("majority", 2, 0, "toxic"),
    ("majority", 1, 1, "contested"), ("majority", 0, 1, "contested"), ("majority", 1, 0, "contested"),
    ("majority", 0, 0, "unjudged"),
    # unanimous: every moderator, so one missing vote is enough to leave it contested
    ("unanimous", 0, 3, "benign"), ("unanimous", 3, 0, "toxic"), ("unanimous", 1, 2, "contested"),
    ("unanimous", 2, 1, "contested"), ("unanimous", 0, 2, "contested"), ("unanimous", 2, 0, "contested"),
    ("unanimous", 0, 0, "unjudged"),
    # at_least 1: one toxic vote flags it; benign needs every moderator's benign vote
    (AtLeast(at_least=1), 1, 2, "toxic"), (AtLeast(at_least=1), 1, 0, "toxic"), (AtLeast(at_least=1), 3, 0, "toxic"),
    (AtLeast(at_least=1), 0, 3, "benign"), (AtLeast(at_least=1), 0, 2, "contested"),
    (AtLeast(at_least=1), 0, 1, "contested"), (AtLeast(at_least=1), 0, 0, "unjudged"),
    # at_least 2: two toxic votes flag it; two benign votes clear it (the third could not make it toxic)
    (AtLeast(at_least=2), 2, 1, "toxic"), (AtLeast(at_least=2), 2, 0, "toxic"), (AtLeast(at_least=2), 1, 2, "benign"),
    (AtLeast(at_least=2), 0, 3, "benign"), (AtLeast(at_least=2), 0, 2, "benign"),
    (AtLeast(at_least=2), 1, 1, "contested"), (AtLeast(at_least=2), 1, 0, "contested"),
    (AtLeast(at_least=2), 0, 1, "contested"), (AtLeast(at_least=2), 0, 0, "unjudged"),
])
def test_vote_rules_with_three_moderators(rule, n_toxic, n_benign, expected):
    assert decide_one(n_toxic, n_benign, 3, rule) == expected


@pytest.mark.parametrize("n_moderators", [2, 3, 4, 5])
def test_a_decision_never_depends_on_the_missing_votes(n_moderators):
    """Whenever a rule decides benign or toxic with votes missing, every way the missing moderators could have voted
    gives the same decision: a missing vote is never silently counted for either side."""
    rules = ["majority", "unanimous"] + [AtLeast(at_least=k) for k in range(1, n_moderators + 1)]
    for rule in rules:
        for n_toxic in range(n_moderators + 1):
            for n_benign in range(n_moderators + 1 - n_toxic):
                decision = decide_one(n_toxic, n_benign, n_moderators, rule)
                if decision not in ("benign", "toxic"):
                    continue
                n_missing = n_moderators - n_toxic - n_benign
                for extra_toxic in range(n_missing + 1):
                    full = decide_one(n_toxic + extra_toxic, n_benign + n_missing - extra_toxic, n_moderators, rule)
                    assert full == decision, (rule, n_toxic, n_benign, extra_toxic)


# -- moderate: the moderators are asked together ----------------------------------------------------------------------
def test_moderators_on_one_endpoint_are_in_flight_together_and_votes_keep_their_order(fake_server, make_spec,
                                                                                       llm_hub):
    """Three moderators on one endpoint whose cap (15) holds the shard three times: the server has requests of all
    three in flight at one moment (asked one after another, the endpoint drained to zero between them). Replies come
    back last moderator first; the votes are still in moderator order, then candidate order."""
    specs = [make_spec(name=f"mod-{c}", system_prompt=f"You are moderator {c.upper()}.", max_retries=0,
                       max_concurrency=15) for c in "abc"]
    script_votes(fake_server, {"mod-a": ["benign"] * 5, "mod-b": ["toxic"] * 5, "mod-c": ["benign", "toxic"] * 3})
    fake_server.latency_s = lambda body: 0.3 + 0.05 * "cba".index(who(body)[-1])
    cands = candidates()
    votes = moderate(cands, CATEGORIES, models(llm_hub, specs)).records

    assert fake_server.most_in_flight_together(lambda r: who(r.body)) == {"mod-a", "mod-b", "mod-c"}
    assert fake_server.max_in_flight == 15
    ids = cands["prompt_id"].to_list()
    assert votes.select("moderator", "prompt_id").rows() == [(m, pid) for m in ("mod-a", "mod-b", "mod-c")
                                                              for pid in ids]
    assert votes["verdict"].to_list() == ["benign"] * 5 + ["toxic"] * 5 + ["benign", "toxic"] * 2 + ["benign"]
