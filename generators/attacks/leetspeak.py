"""Leetspeak: letters written as look-alike digits (a->4, e->3, i->1, o->0, s->5, t->7).

The first variant rewrites every word; later ones rewrite a seeded half of the words, so a keyword filter meets a
different mix of plain and encoded words each time. Added as the proof that an attack is one file: nothing else
in the project names it.
"""

from __future__ import annotations

import random
import re

from orforge.generators.attacks import Variant, register_attack, rule_sha256

RULE = "leetspeak/v1: a4 e3 i1 o0 s5 t7; variant 0 every word, later variants a seeded half of the words"
RULE_SHA256 = rule_sha256(RULE)
LEET = str.maketrans("aeiostAEIOST", "431057431057")
ATTEMPTS_PER_VARIANT = 6

_WORD = re.compile(r"[A-Za-z]+")


def encode(prompt: str, rng: random.Random | None = None) -> str:
    """Every word in leetspeak, or (with an rng) each word with probability one half."""
    return _WORD.sub(lambda m: m.group(0).translate(LEET) if rng is None or rng.random() < 0.5 else m.group(0),
                     prompt)


@register_attack("leetspeak")
def leetspeak(prompt: str, n: int, rng: random.Random) -> list[Variant]:
    full = encode(prompt)
    variants = [Variant(full, "full", RULE_SHA256)] if full != prompt else []
    seen = {prompt, full}
    for _ in range((n - 1) * ATTEMPTS_PER_VARIANT):
        if len(variants) >= n:
            break
        text = encode(prompt, rng)
        if text not in seen:
            seen.add(text)
            variants.append(Variant(text, "partial", RULE_SHA256))
    return variants[:n]
