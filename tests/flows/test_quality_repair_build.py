"""A build whose model wraps its requests in numbering, labels and quotes (the way small models do): the gate keeps
them repaired, with ids of the repaired text, counts them in the manifest and the report, and a rewrite is asked
for the repaired seed. Switching the repair off rejects them again without asking the model anything new."""

from __future__ import annotations

import re

import polars as pl
from orforge.generators import rewrites, seeds

from tests.flows.pipeline import _h, _user, pipeline_responder, rebuild_with_quality, stage_of, write_config


def _wrap(text: str, i: int) -> str:
    return (f"{i + 1}. {text}", f'Rewrite: "{text}"', f"- {text}")[i % 3]


def wrapping_responder(body: dict):
    """The pipeline's scripted model, except that the first seed of every call comes numbered and some rewrites
    come numbered, labelled or quoted."""
    reply = pipeline_responder(body)
    if stage_of(body) == "SeedPrompts":
        reply["prompts"][0] = "1. " + reply["prompts"][0]
    elif stage_of(body) == "Rewrites":
        original = re.search(r'Original request: "(.*)"', _user(body)).group(1)
        if _h("wrap", original) % 2 == 0:
            reply["prompts"] = [_wrap(p, i) for i, p in enumerate(reply["prompts"])]
    return reply


def test_wrapped_requests_are_kept_repaired_with_new_ids(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow
    from orforge.outputs.release import read_manifest, verify_release

    fake_server.responder = wrapping_responder
    config = write_config(tmp_path, fake_server.url + "/v1", panel=None)
    out = tmp_path / "release"
    build_flow(config_path=str(config), output=str(out))

    wrapped_seeds, wrapped_rewrites = set(), set()
    for request in fake_server.chat_requests:
        for text in wrapping_responder(request.body)["prompts"] if stage_of(request.body) in (
                "SeedPrompts", "Rewrites") else []:
            if re.match(r'^(?:\d+\. |Rewrite: "|- )', text):
                (wrapped_seeds if stage_of(request.body) == "SeedPrompts" else wrapped_rewrites).add(text)
    assert wrapped_seeds and wrapped_rewrites

    # The rewrite requests name the repaired seeds, never the numbered ones.
    asked = {re.search(r'Original request: "(.*)"', _user(r.body)).group(1) for r in fake_server.chat_requests
             if stage_of(r.body) == "Rewrites"}
    assert not {s for s in asked if re.match(r"^\d+\. ", s)}
    assert {s[len("1. "):] for s in wrapped_seeds} & asked

    candidates = pl.read_parquet(out / "candidates.parquet")
    assert not candidates.filter(pl.col("prompt").str.contains(r'^(?:\d+\. |Rewrite: |- |")')).height
    for row in candidates.iter_rows(named=True):
        assert row["prompt_id"] == rewrites.prompt_id(row["category"], row["prompt"])
        assert row["seed_id"] == seeds.seed_id(row["category"], row["seed"])
    toxic = pl.read_parquet(out / "toxic.parquet")
    assert not toxic.filter(pl.col("prompt").str.contains(r"^\d+\. ")).height

    manifest = read_manifest(out)
    repaired: dict[tuple[str, str], int] = {}
    for c in manifest.counts.quality_repairs:  # per stage and repairs, over both categories
        repaired[(c.stage, c.repairs)] = repaired.get((c.stage, c.repairs), 0) + c.n
    assert set(repaired) == {("seeds", "list marker"), ("rewrites", "list marker"), ("rewrites", "label, quotes")}
    # Every wrapped rewrite is repaired and kept.
    assert sum(n for (stage, _), n in repaired.items() if stage == "rewrites") == candidates.join(
        pl.DataFrame({"prompt": [re.sub(r'^(?:\d+\. |Rewrite: "|- )|"$', "", t) for t in wrapped_rewrites]}),
        on="prompt", how="semi").height
    assert not manifest.counts.quality_rejections  # nothing the model wrote was rejected
    assert verify_release(out).ok
    html = (out / "report.html").read_text()
    start = html.index('<h2 id="quality">')
    assert f"{sum(repaired.values())} texts were kept after a repair" in html[start:html.index("</section>", start)]

    # The repair is a gate setting, in no shard key: switched off, nothing new is asked and the wrapped rows fail.
    again = rebuild_with_quality(config, fake_server, tmp_path / "again", {"repair": False})
    manifest = read_manifest(again)
    assert manifest.counts.quality_repairs == []
    assert {(r.stage, r.rule) for r in manifest.counts.quality_rejections} == {("seeds", "placeholder"),
                                                                              ("rewrites", "placeholder")}
