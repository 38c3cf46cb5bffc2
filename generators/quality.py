"""The quality gate on generated text: rules a seed, rewrite, question or paraphrase must pass to go on.

`gate(records, text_column, rules, stage, ...)` is a pure function over a frame of generated rows: it returns the
rows that passed (unchanged) and one `core.records.QUALITY_REJECTIONS` row per rejected row, naming the first rule
it failed (in `RULES` order) and why. The rules, each switched and tuned by `core.config.QualityRules`:

- `punctuation_only`: the row has no letters ("...", "1. 2.", "?!").
- `placeholder`: leftover template text: `{...}`, `$name`, `[...]`, `<...>`, an editorial note such as "(revised)" or
  "(unfinished)", a label such as "Rewrite:" or one of the prompt template's own headings ("Original request:"),
  a markdown heading, list numbering at the start, or a leading or trailing ellipsis (a fragment, not a request).
- `length`: words (tokens with a letter or digit) outside [min_words, max_words].
- `same_as_source`: a rewrite or paraphrase whose normalized token set (Jaccard) or characters (difflib ratio) are
  at least `source_similarity` like the text it was made from.
- `instruction_echo`: most of the row's word trigrams (bigrams for a two-word row) appear in the prompt the model
  was given: it copied its instruction or an example instead of writing something new.
- `language`: py3langid gives a language outside `languages` a normalized probability of at least
  `language_confidence` (an uncertain call passes: short English questions are sometimes guessed as Dutch).
- `request_form`: neither a question (a question mark, or opening with a question word) nor a request (opening with
  an imperative verb, "please", or a phrase such as "I need" or "help me").

Before the rules, `repair` (switched by `QualityRules.repair`) takes off what a small model wraps around a real
request: list numbering or a bullet ("1. How ...", "- How ..."), a label naming the text ("Rewrite:", "Prompt:", or a
heading of the template it was given such as "Original request:"), wrapping quotes, a leading ellipsis before a new
sentence and a trailing one after a question mark. A repair is taken only when what is left reads as a complete
sentence; the repaired text becomes the row's text and the gate's `rekey` gives it its new id. What is really a
placeholder ("{name}", "[insert]", "(revised)", bare numbering) is not repaired and still fails its rule.

Everything is deterministic: no sampling, and py3langid's model is a fixed file. The flows apply the gate to a
task's result after `run_shard`, so changing gate settings reuses stored generation shards.
"""

from __future__ import annotations

import difflib
import io
import lzma
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import polars as pl
from orforge.core.config import QUALITY_RULES, QualityRules
from orforge.core.records import QUALITY_REJECTIONS, QUALITY_REPAIRS, empty, frame
from orforge.core.templates import PromptTemplate, normalize

RULES = QUALITY_RULES

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_LETTER = re.compile(r"[^\W\d_]")

# (pattern, what it is) for the placeholder rule; the first that matches is the detail.
_PLACEHOLDERS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p, re.IGNORECASE | re.MULTILINE), what) for p, what in (
    (r"\{[^{}]*\}|\{\{|\}\}", "a {...} placeholder"),
    (r"\$[a-z_]+\b", "a $name placeholder"),
    (r"\[[^\[\]]*\]?", "a [...] placeholder"),
    (r"<\s*/?\s*[a-z][\w .-]{0,30}>", "a <...> placeholder"),
    ((r"\((?:\s*(?:revised|unfinished|optional|continued|cont\.?|edited|draft|rewritten|rewrite|original|example|"
      r"placeholder|truncated|incomplete|more|etc\.?|sic|translated|paraphrased?|end|todo|tbd|fill in[^)]*|"
      r"insert[^)]*|add [^)]*|your [^)]*))\s*\)"), "an editorial note in parentheses"),
    ((r"^\W*(?:rewrite|rewritten(?: request| prompt)?|original(?: request| prompt)?|request|prompt|question|answer|"
      r"output|response|example|note|category|topic|paraphrase|reply|new request|sure|here is|here are)"
      r"\s*\d*\s*:"), "a label such as 'Rewrite:'"),
    (r"^\s*#{1,6}\s", "a markdown heading"),
    (r"^\W*(?:\(?\d{1,2}[.):]|#\d+)(?:\s|$)|^\s*[-*\u2022]\s", "list numbering"),
    (r"^\W*(?:\.\.+|\u2026)", "a leading ellipsis (a fragment)"),
    (r"(?:\.\.\.+|\u2026)\W*$", "a trailing ellipsis (unfinished)"),
    (r"^[*.\u2022#>=~|_,;:!]", "stray punctuation at the start"),
))

# The repair step: wrappers around a real request, tried in turn until none is left.
_LIST_MARKER = re.compile(r"^(?:\(?\d{1,2}[.):]|#\d{1,2}[.:]?|[-*\u2022])\s+")
_LIST_ITEM = re.compile(r"(?:^|\s)\(?\d{1,2}[.)]\s+[A-Z]")  # another numbered item further on
_LEADING_ELLIPSIS = re.compile(r"^(?:\.{2,}|\u2026)\s*")
# Only after a question or exclamation mark (perhaps in quotes): an ellipsis anywhere else marks an unfinished text.
_TRAILING_ELLIPSIS = re.compile(r"(?:(?<=[?!])|(?<=[?!][\"'\u201d\u2019]))\s*(?:\.{2,}|\u2026)$")
_APOSTROPHE = re.compile(r"(?<=[^\W\d_])['\u2019](?=[^\W\d_])")
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
# Labels naming the text a model was asked for; headings of the template that name a request are added per task.
_REQUEST_LABELS = ("rewrite", "rewritten request", "rewritten prompt", "new request", "request", "prompt",
                   "question", "paraphrase", "paraphrased prompt", "original", "original request")
_REQUEST_WORDS = frozenset(["request", "prompt", "question", "rewrite", "paraphrase"])

# How a question or a request opens (the request_form rule), lower case.
_QUESTION_WORDS = frozenset(
    ["what", "what's", "whats", "which", "who", "whom", "whose", "where", "where's", "when", "why", "how", "how's", "is", "are", "am", "was", "were", "do", "does", "did", "can", "could", "would", "will", "should", "shall", "may", "might", "must", "has", "have", "had", "isn't", "aren't", "wasn't", "doesn't", "didn't", "can't", "couldn't", "wouldn't", "won't", "shouldn't", "hasn't", "haven't"])
_IMPERATIVES = frozenset(
    ["tell", "explain", "describe", "list", "give", "write", "show", "help", "suggest", "outline", "summarize", "summarise", "compare", "draft", "create", "provide", "recommend", "share", "teach", "find", "identify", "name", "generate", "make", "plan", "translate", "compose", "calculate", "design", "develop", "walk", "advise", "offer", "prepare", "review", "analyze", "analyse", "define", "discuss", "detail", "evaluate", "assess", "propose", "guide", "rank", "break", "clarify", "convert", "fix", "check", "correct", "rewrite", "rephrase", "brainstorm", "imagine", "consider", "estimate", "predict", "sketch", "build", "code", "implement", "prove", "solve", "derive", "illustrate", "demonstrate", "recount", "produce", "craft", "construct", "point", "direct", "recommend", "remind", "pick", "choose", "select", "sort", "order", "arrange", "organize", "organise", "map", "track", "keep", "get", "let", "send", "please", "kindly", "elaborate", "contrast", "argue", "debate", "justify", "critique", "interpret", "paraphrase", "simplify", "expand"])
_REQUEST_OPENINGS = ("i want", "i need", "i'd like", "i would like", "i'm looking for", "i am looking for", "i wonder",
                     "i'm wondering", "i am wondering", "i'm trying to", "i am trying to", "i'm curious",
                     "i am curious", "i'd love", "i would love", "i'd appreciate", "i would appreciate",
                     "looking for", "in what", "from what", "to what", "at what", "for what", "on what", "by what",
                     "with what", "under what", "in which", "for which", "on which", "to whom", "for whom",
                     "any tips", "any advice", "any ideas", "any suggestions", "is there", "are there")


@dataclass(frozen=True)
class Instruction:
    """What the model was told, for the echo rule and the heading check: its text and the labels its template uses
    for headings ("Original request", "Category", ...)."""

    text: str
    headings: tuple[str, ...] = ()

    @classmethod
    def from_template(cls, template: PromptTemplate, **values: object) -> Instruction:
        """The template's system and user text with `values` filled in and every other placeholder left empty (a
        rewrite's prompt without its seed, so a rewrite that keeps the seed's words is not called an echo)."""
        vals = {k: str(v) for k, v in values.items()}
        parts = []
        for section in (template.system, template.user):
            filled = string.Template(section).safe_substitute(vals)
            parts.append(re.sub(r"\$\{?[A-Za-z_]\w*\}?", "", filled))
        text = "\n".join(parts)
        labels = re.findall(r"^\s*(?:[-*]\s*|\d+\.\s*)?([A-Z][A-Za-z' ]{2,60}?)\s*:", text, re.MULTILINE)
        return cls(text, tuple(dict.fromkeys(label.strip().lower() for label in labels)))


@dataclass(frozen=True)
class GateResult:
    kept: pl.DataFrame
    rejected: pl.DataFrame  # core.records.QUALITY_REJECTIONS
    repaired: pl.DataFrame  # core.records.QUALITY_REPAIRS: the kept rows whose text `repair` changed


def words(text: str) -> list[str]:
    """Lower-case word tokens (runs of letters or digits, with inner apostrophes)."""
    return _WORD.findall(text.casefold())


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def echo_share(text: str, instruction: str) -> float:
    """Share of the text's word trigrams (bigrams or words for shorter texts) that also occur in `instruction`."""
    tokens = words(text)
    if not tokens:
        return 0.0
    n = min(3, len(tokens))
    own = _ngrams(tokens, n)
    return len(own & _instruction_ngrams(instruction, n)) / len(own)


@cache
def _instruction_ngrams(instruction: str, n: int) -> frozenset[tuple[str, ...]]:
    # One instruction serves every row of a task: its n-grams are computed once.
    return frozenset(_ngrams(words(instruction), n))


def similarity(a: str, b: str) -> float:
    """The larger of the token-set Jaccard and the difflib character ratio of the two normalized texts."""
    na, nb = normalize(a), normalize(b)
    if na == nb:
        return 1.0
    ta, tb = set(words(na)), set(words(nb))
    jaccard = len(ta & tb) / len(ta | tb) if ta | tb else 0.0
    return max(jaccard, difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio())


@cache
def _identifier():
    """py3langid's identifier, its model read in memory: py3langid's own loader unpacks the 4.5 MB file through a
    temporary file, which fails where no file may be written (a full disk, a size limit)."""
    import numpy as np
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier
    from py3langid.modelio import _to_array

    packed = io.BytesIO(lzma.decompress((MODEL_DIR / MODEL_FILE).read_bytes()))
    with np.load(packed, allow_pickle=False) as data:
        return LanguageIdentifier(np.asarray(data["ptc"]), np.asarray(data["pc"]), data["classes"].tolist(),
                                  _to_array(data["nextmove"]), data["out_feat"].tolist(), norm_probs=True,
                                  tk_row=_to_array(data["nextmove_row"]))


def language_of(text: str) -> tuple[str, float]:
    """py3langid's language code for the text and its normalized probability."""
    code, probability = _identifier().classify(text)
    return code, float(probability)


def is_request(text: str) -> bool:
    """A question or a request: a question mark, or an opening question word, imperative verb or request phrase."""
    if "?" in text or "\uff1f" in text:
        return True
    tokens = words(text)
    if not tokens:
        return False
    if tokens[0] in _QUESTION_WORDS or tokens[0] in _IMPERATIVES:
        return True
    opening = " ".join(tokens[:4])
    return any(opening == p or opening.startswith(p + " ") for p in _REQUEST_OPENINGS)


def _labels(instruction: Instruction | None) -> tuple[str, ...]:
    """The request labels, and the template's short headings that name a request ("original request")."""
    own = [h for h in instruction.headings if len(h.split()) <= 3 and _REQUEST_WORDS & set(h.split())] \
        if instruction is not None else []
    return tuple(dict.fromkeys([*_REQUEST_LABELS, *own]))


@cache
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern:
    names = "|".join(re.escape(label).replace(r"\ ", r"\s+") for label in sorted(labels, key=len, reverse=True))
    return re.compile(rf"^(?:\*\*)?(?:{names})(?:\s*#?\d{{1,2}})?\s*(?:\*\*)?\s*:\s*(?:\*\*\s*)?", re.IGNORECASE)


def _unquoted(text: str) -> str | None:
    """`text` without quotes around all of it, or None when it is not wrapped (or quotes only a part of it)."""
    close = _QUOTES.get(text[:1])
    if close is None or len(text) < 3 or text[-1] != close:
        return None
    inner = _APOSTROPHE.sub("", text[1:-1])  # "phone's" or "phone’s" inside single quotes is no quote
    return None if text[0] in inner or close in inner else text[1:-1].strip()


def _complete(text: str) -> bool:
    """Reads as a whole sentence: it opens like one (a capital letter or a digit) and is a request or ends like a
    sentence. A fragment ("otherwise", "and then what?") or an empty rest is not."""
    if not _LETTER.search(text) or not (text[:1].isupper() or text[:1].isdigit()):
        return False
    return is_request(text) or text[-1] in ".!?\u3002"


def repair(text: str, instruction: Instruction | None = None) -> tuple[str, tuple[str, ...]]:
    """`text` without the wrappers a model put around a complete request, and what was taken off ("list marker",
    "label", "quotes", "ellipsis"); `text` itself and () when there was nothing to take off or what is left is not a
    complete sentence (then the rules judge the text as written)."""
    original = (text or "").strip()
    current, done = original, []
    label = _label_pattern(_labels(instruction))
    for _ in range(8):  # each pass takes off one wrapper; real rows have one or two
        for name, strip in (("list marker", lambda t: _LIST_MARKER.sub("", t, count=1)),
                            ("label", lambda t: label.sub("", t, count=1)),
                            ("ellipsis", lambda t: _TRAILING_ELLIPSIS.sub("", _LEADING_ELLIPSIS.sub("", t, count=1))),
                            ("quotes", lambda t: _unquoted(t) or t)):
            stripped = strip(current).strip()
            if stripped != current:
                current = stripped
                done.append(name)
                break
        else:
            break
    if not done or not _complete(current) or ("list marker" in done and _LIST_ITEM.search(current)):
        return original, ()  # a bare marker or fragment, or a numbered list of several requests, is not one request
    return current, tuple(dict.fromkeys(done))


def check(text: str, rules: QualityRules, instruction: Instruction | None = None,
          source: str | None = None) -> tuple[str, str] | None:
    """(rule, detail) of the first rule `text` fails, or None when it passes every switched-on rule."""
    stripped = (text or "").strip()
    if rules.punctuation_only and not _LETTER.search(stripped):
        return "punctuation_only", "no letters" if stripped else "empty"
    if rules.placeholder:
        for pattern, what in _PLACEHOLDERS:
            if match := pattern.search(stripped):
                return "placeholder", f"{what}: {match.group(0).strip()!r}"
        if instruction is not None:
            lowered = stripped.casefold()
            for heading in instruction.headings:
                if re.search(rf"(?:^|\W){re.escape(heading)}\s*:", lowered):
                    return "placeholder", f"the template's heading {heading!r}"
    n_words = len(words(stripped))
    if rules.length and not rules.min_words <= n_words <= rules.max_words:
        return "length", f"{n_words} word{'s' * (n_words != 1)} (allowed {rules.min_words}-{rules.max_words})"
    if rules.same_as_source and source:
        sim = similarity(stripped, source)
        if sim >= rules.source_similarity:
            return "same_as_source", f"similarity {sim:.2f} to the text it was made from"
    if rules.instruction_echo and instruction is not None:
        share = echo_share(stripped, instruction.text)
        if share >= rules.echo_threshold:
            return "instruction_echo", f"{share:.0%} of its word n-grams are in the prompt"
    if rules.language:
        code, probability = language_of(stripped)
        if code not in rules.languages and probability >= rules.language_confidence:
            return "language", f"detected {code} (p={probability:.2f})"
    if rules.request_form and not is_request(stripped):
        return "request_form", "neither a question nor a request"
    return None


def gate(records: pl.DataFrame, text_column: str, rules: QualityRules | None, stage: str, *,
         id_column: str, category_column: str = "category", source_column: str | None = None,
         instruction: Instruction | None = None, rekey: Callable[[dict[str, Any]], str] | None = None) -> GateResult:
    """Split `records` into the rows that pass `rules` (same columns, same order) and the rejected ones
    (QUALITY_REJECTIONS). `rules=None` (the gate switched off) keeps every row.

    With `rules.repair`, each row's text is first repaired (`repair`); a repaired row is judged, and kept, with its
    repaired text and the id `rekey(row)` gives the row with that text (the stage's own content hash). A repaired row
    whose new id is already another kept row's is the same text twice and kept once. A rejected row is reported with
    the text and id the model's output had. Without `rekey` nothing is repaired, since the id would go stale."""
    if rules is None or records.height == 0:
        return GateResult(records, empty(QUALITY_REJECTIONS), empty(QUALITY_REPAIRS))
    texts = records[text_column].to_list()
    sources = records[source_column].to_list() if source_column else [None] * len(texts)
    rows = list(records.iter_rows(named=True))
    mended = [repair(t, instruction) if rules.repair and rekey is not None else (t, ()) for t in texts]
    verdicts = [check(m, rules, instruction, s) for (m, _), s in zip(mended, sources, strict=True)]
    rejected = [
        {"stage": stage, "category": row[category_column], "id": row[id_column], "text": text,
         "source": source, "rule": verdict[0], "detail": verdict[1]}
        for row, text, source, verdict in zip(rows, texts, sources, verdicts, strict=True)
        if verdict is not None
    ]
    passed = [v is None for v in verdicts]
    kept_ids = {row[id_column] for row, ok, (_, how) in zip(rows, passed, mended, strict=True) if ok and not how}
    repaired, kept_rows = [], []
    for row, ok, (text, how) in zip(rows, passed, mended, strict=True):
        if not ok:
            continue
        if how:
            new = {**row, text_column: text}
            new[id_column] = rekey(new)
            duplicate = new[id_column] in kept_ids
            repaired.append({"stage": stage, "category": row[category_column], "id": new[id_column],
                             "original_id": row[id_column], "text": text, "original": row[text_column],
                             "repairs": ", ".join(how), "duplicate": duplicate})
            if duplicate:
                continue
            kept_ids.add(new[id_column])
            row = new
        kept_rows.append(row)
    if not repaired:  # the common case: the rows as they came, untouched
        kept = records.filter(pl.Series(passed, dtype=pl.Boolean))
    else:
        kept = pl.DataFrame(kept_rows, schema=records.schema) if kept_rows else records.head(0)
    return GateResult(kept, frame(rejected, QUALITY_REJECTIONS), frame(repaired, QUALITY_REPAIRS))
