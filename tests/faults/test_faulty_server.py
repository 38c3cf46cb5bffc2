"""A build against a server that fails one request in ten, in every way we know of; then a rerun with the faults
off completes exactly what failed and asks nothing that was already answered."""

from __future__ import annotations

import re

import polars as pl
import pytest

from orforge.core.config import stable_hash
from orforge.core.templates import normalize
from orforge.llm.hub import MAX_REASKS
from tests.fakeserver import Fault
from tests.faults.support import TRANSPORT_FAULTS, check_release_bookkeeping, edit_config, logical_id
from tests.flows.pipeline import pipeline_responder, stage_of, write_config

pytestmark = pytest.mark.slow

# Order matters: FakeServer draws kinds with its seeded RNG, and with FAULT_SEED every kind comes up within the
# first ~60 requests (a build sends over 200), so the build meets each kind at least once.
FAULTS = (Fault.rate_limited(retry_after=0.2), Fault.server_error(), Fault.unavailable(retry_after=0.2),
          Fault.reset(), Fault.delay(3.0), Fault.truncated(), Fault.invalid_json(), Fault.empty_choices())
FAULT_SEED = 9
SPEC_SETTINGS = {"timeout_s": 1.0, "max_retries": 2}  # the delayed replies (3 s) time out; 3 tries per request


class Poisoned:
    """The scripted model, except for two items that fail whatever the retries and re-asks: the first seed whose
    rewrites are asked for always gets invalid JSON (re-asked by the hub), and the first candidate sent to
    moderation always gets a 500 (retried by the client), so it stays unjudged. Random faults cannot rescue them:
    for a structured request every fault kind is a failure."""

    def __init__(self) -> None:
        self.seed: str | None = None
        self.candidate: str | None = None

    def __call__(self, body: dict):
        stage = stage_of(body)
        if stage == "Rewrites":
            self.seed = self.seed or _about(body)
            if _about(body) == self.seed:
                return Fault.invalid_json()
        elif stage == "ModerationVerdict":
            self.candidate = self.candidate or _about(body)
            if _about(body) == self.candidate:
                return Fault.server_error("persistent failure")
        return pipeline_responder(body)


def _about(body: dict) -> str:
    """The seed a rewrite request is about, or the prompt a moderation or panel request is about."""
    user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    if stage_of(body) == "Rewrites":
        return re.search(r'Original request: "(.*)"', user).group(1)
    if stage_of(body) == "ModerationVerdict":
        return re.search(r'"""\n(.*)\n"""', user, re.S).group(1)
    return user


def test_random_faults_then_rerun_completes_only_what_failed(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow

    poison = Poisoned()
    fake_server.responder = poison
    fake_server.random_faults(0.10, FAULTS, seed=FAULT_SEED)
    config = edit_config(write_config(tmp_path, fake_server.url + "/v1"), specs=SPEC_SETTINGS)

    first = tmp_path / "first"
    build_flow(config_path=str(config), output=str(first))
    run1 = fake_server.chat_requests
    served = {r.fault for r in run1} - {None}
    assert served == {f.kind for f in FAULTS}, f"the build should meet every fault kind, met {served}"

    one = check_release_bookkeeping(first)
    failures, candidates = one["failures"], one["candidates"]
    assert candidates.height > 0 and one["rows"]["benign"] > 0 and one["rows"]["hard"] > 0

    # Each poisoned item was tried as often as the settings allow, then recorded as a failure with its reason:
    # the seed once per hub attempt (each ends in a reply), the candidate 1 + max_retries times per moderator.
    about_seed = [r for r in run1 if stage_of(r.body) == "Rewrites" and _about(r.body) == poison.seed]
    assert sum(r.fault not in TRANSPORT_FAULTS for r in about_seed) == 1 + MAX_REASKS
    about_candidate = [r for r in run1
                       if stage_of(r.body) == "ModerationVerdict" and _about(r.body) == poison.candidate]
    assert len(about_candidate) >= 3 * (1 + SPEC_SETTINGS["max_retries"])
    stage_failures = {stage: failures.filter(pl.col("stage") == stage) for stage in ("rewrites", "moderation")}
    category = re.search(r"Category: (\S+)", about_seed[0].last_user).group(1)
    poisoned_seed = stable_hash(["seed", category, normalize(poison.seed)])  # how seed ids are made
    reason = stage_failures["rewrites"].filter(pl.col("item_id") == poisoned_seed)["reason"].to_list()
    # Invalid JSON, unless a random fault had the last word: then it is another malformed reply.
    assert len(reason) == 1 and re.match(r"invalid JSON|truncated|empty choices", reason[0]), reason
    assert poisoned_seed not in set(candidates["seed_id"])  # it has no candidates, and is still a seed:
    assert poisoned_seed in set(pl.read_parquet(first / "dedup.parquet")["prompt_id"])
    unjudged = candidates.filter(pl.col("prompt") == poison.candidate)
    assert unjudged["decision"].to_list() == ["unjudged"]
    reasons = stage_failures["moderation"].filter(pl.col("item_id") == unjudged["prompt_id"][0])["reason"]
    assert reasons.len() == 3 and reasons.str.contains("HTTP 500 from .*: persistent failure").any()

    # The random faults were recovered: retried by the client (transport) or re-asked by the hub (bad replies).
    # What the hub counted as sent is every reply that arrived plus every request that failed for good in
    # transport; the transport faults in between were the openai client's own retries.
    sent = sum(u.requests for u in one["manifest"].tokens.values())
    transport_failed = failures.filter(pl.col("reason").str.contains(r"^(HTTP \d+|timeout|connection error)")).height
    assert transport_failed >= 1
    assert sent == sum(r.fault not in TRANSPORT_FAULTS for r in run1) + transport_failed

    # Nothing of this build was stored for the failed shards, so a rerun with the faults off completes them.
    fake_server.random_faults(0.0)
    fake_server.responder = pipeline_responder
    second = tmp_path / "second"
    build_flow(config_path=str(config), output=str(second))
    run2 = fake_server.chat_requests[len(run1):]
    two = check_release_bookkeeping(second)
    assert two["failures"].is_empty()

    # Everything the first run had is still there and the votes it got are unchanged; the poisoned seed now has
    # candidates and the unjudged candidate its votes.
    old_ids = set(candidates["prompt_id"])
    new = two["candidates"].filter(~pl.col("prompt_id").is_in(list(old_ids)))
    assert old_ids <= set(two["candidates"]["prompt_id"])
    assert new.height > 0 and set(new["seed_id"]) == set(stage_failures["rewrites"]["item_id"])  # the poisoned seed
    assert two["candidates"].filter(pl.col("prompt") == poison.candidate)["decision"][0] != "unjudged"
    old_votes = set(two["votes"].filter(pl.col("prompt_id").is_in(list(old_ids))).iter_rows())
    first_votes = set(one["votes"].iter_rows())
    assert first_votes <= old_votes  # the votes added are the ones that failed, and nothing else
    failed_votes = set(stage_failures["moderation"].select("item_id", "model").iter_rows())
    assert {(v[0], v[1]) for v in old_votes - first_votes} == failed_votes

    # What the rerun sent: the requests that never got a good answer in the first run, and requests about prompts
    # the first run never had (votes on the new candidates, panel answers on new benign prompts). Nothing answered
    # before was asked again.
    answered = {logical_id(r.body) for r in run1 if r.fault is None}
    asked = {logical_id(r.body) for r in run1}
    first_panel = set(one["responses"]["prompt_id"])
    new_benign = set(two["responses"]["prompt_id"]) - first_panel
    new_benign_prompts = two["candidates"].filter(pl.col("prompt_id").is_in(list(new_benign)))["prompt"]
    new_prompts = set(new["prompt"]) | set(new_benign_prompts)
    assert run2 and all(r.fault is None for r in run2)
    assert not {logical_id(r.body) for r in run2} & answered
    stages: dict[str, int] = {}
    for r in run2:
        stage = stage_of(r.body)
        stages[stage] = stages.get(stage, 0) + 1
        if not (stage in ("ModerationVerdict", "panel") and _about(r.body) in new_prompts):
            assert logical_id(r.body) in asked, f"the rerun asked something new that is not about a new prompt: {stage}"
    # Every failure of the first run is asked once more (the two poisoned items, and any random fault that
    # outlasted the retries), plus the new prompts' votes and answers.
    n_failed = dict(failures.group_by("stage").len().iter_rows())
    assert "SeedPrompts" not in stages
    assert stages["Rewrites"] == n_failed["rewrites"]
    assert stages["ModerationVerdict"] == n_failed["moderation"] + 3 * new.height
    assert stages.get("panel", 0) == n_failed.get("panel", 0) + 3 * len(new_benign)
