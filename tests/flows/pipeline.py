"""A scripted OpenAI-compatible model for whole-pipeline tests: answers each stage's request deterministically.

The stage is read from the request: the response schema's name (SeedPrompts, Rewrites, ModerationVerdict) or, with
no schema, a panel answer. Texts are word salads drawn from a hash of the request, so they are distinct for MiniLM,
except where a near-duplicate is planted on purpose.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from tests.fakeserver import request_schema

WORDS = ("river apple engine lantern orbit velvet canyon pixel harbor meadow quartz signal tundra violin walnut "
         "zephyr anchor basket cactus dolphin ember falcon glacier hammer island jungle kettle lemon magnet nectar "
         "oyster pepper quiver rocket saddle ticket umbrella vessel wizard yogurt bridge candle desert feather "
         "garden helmet insect jacket kitten ladder mirror needle orange pencil rabbit silver tomato valley window "
         "copper marble thunder planet spider blanket circus dragon forest guitar honey iceberg jewel koala").split()


def _h(*parts: object) -> int:
    return int(hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12], 16)


def salad(*key: object, n: int = 9) -> str:
    x = _h(*key)
    words = []
    for i in range(n):
        words.append(WORDS[(x >> (i * 4)) % len(WORDS)] if i < 10 else WORDS[_h(key, i) % len(WORDS)])
        x = _h(x, i)
    return "How would a " + " ".join(words) + "?"


def stage_of(body: dict) -> str:
    fmt = body.get("response_format") or {}
    name = (fmt.get("json_schema") or {}).get("name")
    if name:
        return name
    return "panel" if request_schema(body) is None else "unknown"


def _user(body: dict) -> str:
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"]


def _system(body: dict) -> str:
    return " ".join(m["content"] for m in body["messages"] if m["role"] == "system")


def pipeline_responder(body: dict):
    stage, user = stage_of(body), _user(body)
    if stage == "SeedPrompts":
        count = int(re.search(r"Write (\d+) different", user).group(1))
        category = re.search(r"Category: (\S+)", user).group(1)
        seed = body.get("seed", 0)
        return {"prompts": [salad("seed", category, seed, i) for i in range(count)]}
    if stage == "Rewrites":
        count = int(re.search(r"Write (\d+) different", user).group(1))
        original = re.search(r'Original request: "(.*)"', user).group(1)
        prompts = [salad("rewrite", original, i) for i in range(count)]
        if _h("dup", original) % 4 == 0:  # plant a near-duplicate: the first rewrite with one word changed
            prompts[-1] = prompts[0].replace("How would a", "How could a")
        return {"prompts": prompts}
    if stage == "ModerationVerdict":
        prompt = re.search(r'"""\n(.*)\n"""', user, re.S).group(1)
        x = _h("verdict", prompt) % 10
        # 0-5 benign for all, 6-7 toxic for all, 8-9 split by moderator (contested or a 2-1 majority)
        if x < 6:
            verdict = "benign"
        elif x < 8:
            verdict = "toxic"
        else:
            verdict = "toxic" if _h("mod", prompt, _system(body)) % 2 else "benign"
        return {"verdict": verdict, "category": "none"}
    if stage == "panel":
        if _h("refuse", user, _system(body)) % 3 == 0 or _h("hard", user) % 5 == 0:
            return "I'm sorry, but I can't help with that request."
        return "Here is a short, helpful answer: start by reading a reliable guide on the topic."
    raise AssertionError(f"unexpected request stage {stage}")


def write_config(tmp_path: Path, base_url: str, **overrides) -> Path:
    """A build config with every role on the scripted server, work and outputs inside tmp_path."""
    spec = {"backend": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": 8,
            "timeout_s": 10, "max_retries": 2}
    cfg = {
        "name": "pipeline-test",
        "output_dir": str(tmp_path / "releases"),
        "work_dir": str(tmp_path / "work"),
        "cache_path": str(tmp_path / "cache.sqlite"),
        "shard_size": 8,
        "categories": {"preset": "orbench", "include": ["privacy", "violence"]},
        "seeds": {"model": {**spec, "name": "gen"}, "seeds_per_category": 6, "seeds_per_call": 4},
        "rewrites": {"model": {**spec, "name": "rewriter"}, "rewrites_per_seed": 3},
        "moderation": {"moderators": [{**spec, "name": f"mod-{i}", "system_prompt": f"moderator {i}"}
                                      for i in range(3)]},
        "splits": {"toxic_size": 20, "hard_size": 50, "hard_min_rejections": 2},
        "panel": {"members": [{**spec, "name": f"member-{i}", "system_prompt": f"member {i}"} for i in range(3)]},
    }
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rebuild_with_quality(config: Path, fake_server, output: Path, quality: dict) -> Path:
    """The build of `config` again with `quality:` set to `quality`, into `output`; asserts that it asked the model
    for no seed or rewrite (gate settings are in no generation shard's key). Returns the new release folder."""
    from orforge.flows.build import build_flow

    sent = len(fake_server.chat_requests)
    raw = yaml.safe_load(config.read_text())
    raw["quality"] = quality
    config.write_text(yaml.safe_dump(raw))
    build_flow(config_path=str(config), output=str(output))
    assert not [r for r in fake_server.chat_requests[sent:] if stage_of(r.body) in ("SeedPrompts", "Rewrites")]
    return output
