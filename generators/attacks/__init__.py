"""Adversarial variants of harmful prompts: a registry of attacks, one small module each, and the `augment` stage.

An attack turns a base prompt into variants. It is a function registered under its name:

    # generators/attacks/base64_wrap.py -- the whole file; nothing else needs editing
    import base64
    import random

    from orforge.generators.attacks import Variant, register_attack, rule_sha256

    RULE = "base64/v1: the request encoded in base64 with a plain-language instruction to decode and answer it"

    @register_attack("base64_wrap")
    def base64_wrap(prompt: str, n: int, rng: random.Random) -> list[Variant]:
        encoded = base64.b64encode(prompt.encode()).decode()
        return [Variant(f"Decode this base64 and reply to it: {encoded}", "base64", rule_sha256(RULE))]

Every module in this package is imported the first time the registry is read (`pkgutil` over the package folder),
so a new file registers itself; `leetspeak.py` is one such file. Attacks built from wrapper templates keep them in
`data/<attack>.yaml` (a list of `{id, text}` with a `{prompt}` placeholder) and register with
`register_template_attack`; `suffix_injection`, `prefix_injection` and `jailbreaking` are three lines each.

Determinism: each (prompt, attack) pair draws from its own `random.Random`, seeded by a hash of the run seed, the
attack name and the prompt's text, so a variant depends on nothing but those: not on row order, on which other
prompts or attacks run, or on the process (Python's `hash()` is salted per process and is never used).
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import polars as pl
import yaml

from orforge.core.config import stable_hash
from orforge.core.records import VARIANTS, StageResult

DATA_DIR = Path(__file__).parent / "data"
BASE_ATTACK = "none"  # the attack_type of a base prompt in scores and exports

# One row per variant. `prompt_id` is the variant's own id: a content hash of its parent, attack and text.
INPUT_COLUMNS = ("prompt_id", "prompt", "category", "macro_category")


@dataclass(frozen=True)
class Variant:
    """One rewritten prompt, the template (or rule set) that made it, and that template's sha256."""

    text: str
    template_id: str
    template_sha256: str


AttackFn = Callable[[str, int, random.Random], list[Variant]]
_REGISTRY: dict[str, AttackFn] = {}


def register_attack(name: str) -> Callable[[AttackFn], AttackFn]:
    """Register `fn(prompt, n, rng) -> list[Variant]`: up to `n` variants of `prompt`, drawing only from `rng`."""

    def deco(fn: AttackFn) -> AttackFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"attack {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def rule_sha256(rule: str) -> str:
    """The sha256 that identifies a rule-based attack's behaviour (bump the rule text when the behaviour changes)."""
    return hashlib.sha256(rule.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class WrapperTemplate:
    template_id: str
    text: str
    sha256: str

    def fill(self, prompt: str) -> str:
        # str.replace scans the template only, so a prompt that itself contains "{prompt}" is not expanded again.
        return self.text.replace("{prompt}", prompt)


@cache
def load_wrapper_templates(attack: str) -> tuple[WrapperTemplate, ...]:
    """`data/<attack>.yaml`: a list of {id, text}; each text holds `{prompt}` exactly once."""
    path = DATA_DIR / f"{attack}.yaml"
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of {{id, text}} templates")
    templates: list[WrapperTemplate] = []
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"id", "text"}:
            raise ValueError(f"{path}: every template needs exactly the keys id and text, got {entry!r}")
        text = str(entry["text"]).strip()
        if text.count("{prompt}") != 1:
            raise ValueError(f"{path}: template {entry['id']!r} must hold {{prompt}} exactly once")
        templates.append(WrapperTemplate(str(entry["id"]), text, rule_sha256(text)))
    ids = [t.template_id for t in templates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: template ids repeat")
    return tuple(templates)


def register_template_attack(name: str) -> AttackFn:
    """An attack that wraps the prompt in `n` distinct templates of `data/<name>.yaml`, chosen by the rng.

    The templates are shuffled and the first `n` taken, so asking for more variants later keeps the earlier ones
    (their ids, and any cached answers to them, stay valid)."""

    def wrap(prompt: str, n: int, rng: random.Random) -> list[Variant]:
        order = list(load_wrapper_templates(name))
        rng.shuffle(order)
        return [Variant(t.fill(prompt), t.template_id, t.sha256) for t in order[:n]]

    wrap.__name__ = name
    return register_attack(name)(wrap)


_loaded = False


def _load_modules() -> None:
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True


def attack_names() -> list[str]:
    _load_modules()
    return sorted(_REGISTRY)


def get_attack(name: str) -> AttackFn:
    _load_modules()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def prompt_rng(seed: int, attack: str, prompt: str) -> random.Random:
    """The random stream for one (prompt, attack) pair: a function of the seed, the attack and the text only."""
    digest = hashlib.sha256(f"{seed}\x00{attack}\x00{prompt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def augment(prompts: pl.DataFrame, attacks: list[str], variants_per_attack: int, seed: int) -> StageResult:
    """Variants (VARIANTS) of every prompt (`prompt_id, prompt, category, macro_category`) under every attack.

    Up to `variants_per_attack` distinct variants per prompt and attack: a template attack with fewer templates
    gives fewer, and a variant identical to its base prompt or to an earlier variant is dropped (notes count both).
    Rows come out in input order, then attack order, then variant order. No model is called, so no failures.
    Every built-in attack draws its variants in sequence, so the variants for n are the first n of those for n + 1.
    """
    if variants_per_attack < 1:
        raise ValueError(f"variants_per_attack must be >= 1, got {variants_per_attack}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks repeat: {attacks}")
    functions = {name: get_attack(name) for name in attacks}
    missing = [c for c in INPUT_COLUMNS if c not in prompts.columns]
    if missing:
        raise ValueError(f"augment needs column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    if prompts["prompt"].null_count() or prompts["prompt_id"].null_count():
        raise ValueError("augment: prompts have null prompt or prompt_id values")

    rows: list[dict] = []
    made = {name: 0 for name in attacks}
    short = {name: 0 for name in attacks}
    for base in prompts.select(INPUT_COLUMNS).iter_rows(named=True):
        for name, fn in functions.items():
            seen = {base["prompt"]}
            kept = 0
            for variant in fn(base["prompt"], variants_per_attack, prompt_rng(seed, name, base["prompt"])):
                if variant.text in seen or kept == variants_per_attack:
                    continue
                seen.add(variant.text)
                rows.append({
                    "prompt_id": stable_hash([base["prompt_id"], name, variant.text]),
                    "prompt": variant.text,
                    "parent_id": base["prompt_id"],
                    "category": base["category"],
                    "macro_category": base["macro_category"],
                    "attack_type": name,
                    "template_id": variant.template_id,
                    "template_sha256": variant.template_sha256,
                    "variant_index": kept,
                })
                kept += 1
            made[name] += kept
            short[name] += kept < variants_per_attack
    records = pl.DataFrame(rows, schema=VARIANTS) if rows else pl.DataFrame(schema=VARIANTS)
    notes = {"attacks": list(attacks), "variants_per_attack": variants_per_attack, "seed": seed,
             "variants_by_attack": made, "prompts_short_of_variants": {k: v for k, v in short.items() if v}}
    return StageResult(records=records, notes=notes)
