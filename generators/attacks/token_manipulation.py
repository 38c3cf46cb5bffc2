"""Token manipulation: seeded character and word perturbations that a reader still understands.

A variant perturbs about a third of the prompt's words (at least one), each by one operation:
- `swap`: two neighbouring letters inside the word trade places ("instructions" -> "instrcutions");
- `case`: the word's letters flip case ("make" -> "MAKE");
- `drop_vowels`: vowels inside the word go, the first and last letter stay ("explain" -> "expln");
- `double`: one inside letter is written twice ("bomb" -> "boomb").
Only ASCII letters change and only into ASCII letters: no homoglyphs, digits or invisible characters, so what a
filter sees is a typo-ridden prompt, not an encoding. The first and last letter of a word never move, which is
what keeps scrambled words readable. `template_id` names the operations a variant used, sorted ("case+swap").
"""

from __future__ import annotations

import random
import re

from orforge.generators.attacks import Variant, register_attack, rule_sha256

RULE = ("token_manipulation/v1: perturb round(0.3 x words) >= 1 ASCII words, one of swap, case, drop_vowels, "
        "double each; first and last letters kept")
RULE_SHA256 = rule_sha256(RULE)
WORD_SHARE = 0.3
ATTEMPTS_PER_VARIANT = 6  # a short prompt may repeat a perturbation; try a few times for a distinct one

_WORD = re.compile(r"[A-Za-z]+")
_VOWELS = set("aeiouAEIOU")


def _swap(word: str, rng: random.Random) -> str | None:
    if len(word) < 4:
        return None
    options = [i for i in range(1, len(word) - 2) if word[i] != word[i + 1]]
    if not options:
        return None
    i = rng.choice(options)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _case(word: str, rng: random.Random) -> str | None:
    return word.swapcase()


def _drop_vowels(word: str, rng: random.Random) -> str | None:
    inner = "".join(c for c in word[1:-1] if c not in _VOWELS)
    if len(word) < 4 or len(inner) == len(word) - 2:
        return None
    return word[0] + inner + word[-1]


def _double(word: str, rng: random.Random) -> str | None:
    if len(word) < 3:
        return None
    i = rng.randrange(1, len(word) - 1)
    return word[: i + 1] + word[i] + word[i + 1:]


OPERATIONS = {"swap": _swap, "case": _case, "drop_vowels": _drop_vowels, "double": _double}


def perturb(prompt: str, rng: random.Random) -> tuple[str, list[str]]:
    """One perturbed copy of `prompt` and the operations it used (empty when the prompt has no ASCII word)."""
    spans = [m.span() for m in _WORD.finditer(prompt)]
    if not spans:
        return prompt, []
    chosen = sorted(rng.sample(range(len(spans)), max(1, round(WORD_SHARE * len(spans)))))
    pieces, used, last = [], set(), 0
    for index in chosen:
        start, end = spans[index]
        word = prompt[start:end]
        names = list(OPERATIONS)
        rng.shuffle(names)
        for name in names:  # the first operation that applies to this word
            changed = OPERATIONS[name](word, rng)
            if changed is not None and changed != word:
                pieces += [prompt[last:start], changed]
                used.add(name)
                last = end
                break
    pieces.append(prompt[last:])
    return "".join(pieces), sorted(used)


@register_attack("token_manipulation")
def token_manipulation(prompt: str, n: int, rng: random.Random) -> list[Variant]:
    variants: list[Variant] = []
    seen = {prompt}
    for _ in range(n * ATTEMPTS_PER_VARIANT):
        if len(variants) == n:
            break
        text, used = perturb(prompt, rng)
        if text not in seen:
            seen.add(text)
            variants.append(Variant(text, "+".join(used), RULE_SHA256))
    return variants
