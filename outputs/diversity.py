"""How varied a set of prompts is: Self-BLEU, Distinct-1/2, mean pairwise MiniLM cosine and embedding clusters.

Every metric is computed per group (a category, or any column) and over the whole split ("all"), each on a seeded
sample of at most `sample` prompts of that group (`numpy.random.default_rng(seed)`, drawn without replacement from
the rows in file order), so a set of 80K prompts costs what 1,000 do and two datasets are compared at the same size
(Distinct-n falls as a set grows). The same inputs always give the same numbers.

- Tokens: each prompt lowercased, trailing whitespace dropped, then sacrebleu's `13a` tokenizer (the one BLEU uses by
  default), split on spaces. Self-BLEU and Distinct-n read the same tokens.
- Self-BLEU: for each sampled prompt, sacrebleu's sentence BLEU-4 (`sacrebleu.sentence_bleu(prompt, others,
  lowercase=True)`: 13a tokens, exponential smoothing, effective order, closest reference length) with every other
  sampled prompt of the group as a reference, then averaged, on a 0-1 scale. The n-gram counts are collected once
  per group (the largest and second largest count of each n-gram over the sample, so leaving the hypothesis out of
  its references costs nothing) and the score comes from `sacrebleu.BLEU.compute_bleu`; a test checks the result
  against `sentence_bleu` itself. Higher means the prompts repeat each other's wording: less diverse.
- Distinct-n: distinct n-grams / all n-grams over the sample (n-grams inside a prompt, never across two). Higher is
  more diverse.
- Mean cosine: the mean over all pairs of sampled prompts of the cosine similarity of their all-MiniLM-L6-v2
  embeddings (`dedup.embed.Embedder`, served from its store when the build has embedded the text already).
- Clusters: greedy leaders at the dedup threshold, i.e. the prompts `dedup.near.dedup` keeps when run over the
  sample in sample order: a prompt starts a new cluster unless it is within the threshold of a leader before it.
  Out of `sampled`; a split the build already deduplicated at that threshold has as many clusters as prompts.

Self-BLEU and the mean cosine carry a 95% t-interval of the per-prompt scores (each prompt's BLEU against the rest,
each prompt's mean cosine to the rest; their mean is the metric). The per-prompt scores of one sample are not
independent, so the interval is a guide to the sampling noise, not an exact coverage guarantee.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from orforge.core.manifest import Diversity, DiversityReference, DiversityRow
from orforge.dedup.near import dedup as near_dedup
from orforge.outputs.intervals import t_interval
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.helpers import extract_all_word_ngrams
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

DEFAULT_SAMPLE = 1000
ORDER = 4
SELF_BLEU_METHOD = ("sacrebleu sentence BLEU-4 of each sampled prompt against all other sampled prompts of its group "
                    "(lowercased, 13a tokens, exp smoothing, effective order), averaged, 0-1")
CLUSTER_METHOD = "greedy leaders (dedup.near.dedup keep-first over the sample) at cosine >= threshold"
# Figures as reported in FalseReject's paper (Zhang et al., 2025), which measured OR-Bench-80K and its own prompts.
REFERENCES = (
    DiversityReference(dataset="OR-Bench-80K", self_bleu=0.35, distinct_2=0.53, source="FalseReject paper, table"),
    DiversityReference(dataset="FalseReject", self_bleu=0.26, distinct_2=0.65, source="FalseReject paper, table"),
)
READING = "Lower Self-BLEU and mean cosine, and higher Distinct-n, mean more diverse text."

_TOKENIZER = Tokenizer13a()
# sacrebleu.sentence_bleu's scorer: only its settings are used (compute_bleu), never its reference handling.
_BLEU = BLEU(lowercase=True, effective_order=True, max_ngram_order=ORDER)


@dataclass(frozen=True)
class Measured:
    """One frame to measure: its name in the table, the text column, and the column grouped by (None: overall only)."""

    split: str
    frame: pl.DataFrame
    column: str = "prompt"
    by: str | None = "category"


def tokens(text: str) -> list[str]:
    """The tokens every metric here reads: lowercased, 13a-tokenized, split on spaces."""
    return _TOKENIZER(text.lower().rstrip()).split()


def distinct_n(token_lists: Sequence[Sequence[str]], n: int) -> float | None:
    """Distinct n-grams / all n-grams over the prompts (n-grams inside one prompt); None when there are none."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def self_bleu_scores(texts: Sequence[str]) -> list[float]:
    """Each text's sentence BLEU (0-1) against all the other texts as references, in order; [] for fewer than two.

    Equal to `sacrebleu.sentence_bleu(texts[i], texts[:i] + texts[i+1:], lowercase=True).score / 100` for every i.
    """
    return self_bleu_of_tokens([tokens(t) for t in texts])


def self_bleu_of_tokens(token_lists: Sequence[Sequence[str]]) -> list[float]:
    """`self_bleu_scores` of texts already split by `tokens`."""
    if len(token_lists) < 2:
        return []
    counts, lengths = [], []
    for toks in token_lists:
        grams, length = extract_all_word_ngrams(" ".join(toks), 1, ORDER)
        counts.append(grams)
        lengths.append(length)
    # For each n-gram, its largest count, the prompt holding it and the second largest count over the other prompts:
    # the clip for prompt i is the largest count over prompts other than i.
    best: dict[tuple, list[int]] = {}
    for i, grams in enumerate(counts):
        for gram, c in grams.items():
            entry = best.get(gram)
            if entry is None:
                best[gram] = [c, i, 0]
            elif c > entry[0]:
                entry[2], entry[0], entry[1] = entry[0], c, i
            elif c > entry[2]:
                entry[2] = c
    length_counts = Counter(lengths)
    sorted_lengths = sorted(length_counts)
    scores = []
    for i, grams in enumerate(counts):
        correct, total = [0] * ORDER, [0] * ORDER
        for gram, c in grams.items():
            top, owner, second = best[gram]
            total[len(gram) - 1] += c
            correct[len(gram) - 1] += min(c, second if owner == i else top)
        ref_len = _closest_other_length(lengths[i], sorted_lengths, length_counts)
        bleu = BLEU.compute_bleu(correct, total, lengths[i], ref_len, smooth_method=_BLEU.smooth_method,
                                 smooth_value=_BLEU.smooth_value, effective_order=_BLEU.effective_order,
                                 max_ngram_order=ORDER)
        scores.append(bleu.score / 100.0)
    return scores


def _closest_other_length(own: int, sorted_lengths: list[int], length_counts: Counter) -> int:
    """sacrebleu's closest reference length (ties go to the shorter) over every length but one copy of `own`."""
    if length_counts[own] > 1:
        return own
    at = bisect.bisect_left(sorted_lengths, own)
    below = sorted_lengths[at - 1] if at > 0 else None
    above = sorted_lengths[at + 1] if at + 1 < len(sorted_lengths) else None
    if below is None:
        return above
    if above is None or own - below <= above - own:
        return below
    return above


def mean_cosines(vectors: np.ndarray) -> np.ndarray:
    """Each row's mean cosine similarity to every other row (unit-length rows); their mean is the mean over pairs."""
    n = vectors.shape[0]
    if n < 2:
        return np.zeros(0)
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    return (sims.sum(axis=1) - np.diag(sims)) / (n - 1)


def sample_texts(texts: Sequence[str], size: int, seed: int) -> list[str]:
    """At most `size` of `texts`, drawn without replacement with `seed`, in their original order."""
    if len(texts) <= size:
        return list(texts)
    picked = np.sort(np.random.default_rng(seed).choice(len(texts), size=size, replace=False))
    return [texts[i] for i in picked]


def measure_texts(texts: Sequence[str], embedder, *, split: str, by: str | None = None, group: str = "all",
                  sample: int = DEFAULT_SAMPLE, seed: int = 0, threshold: float = 0.9) -> DiversityRow:
    """Every metric for one group of texts (nulls and empty strings left out)."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    picked = sample_texts(texts, sample, seed)
    row = {"split": split, "by": by, "group": group, "rows": len(texts), "sampled": len(picked)}
    token_lists = [tokens(t) for t in picked]
    row["distinct_1"] = distinct_n(token_lists, 1)
    row["distinct_2"] = distinct_n(token_lists, 2)
    if len(picked) >= 2:
        row["self_bleu"], row["self_bleu_low"], row["self_bleu_high"] = t_interval(self_bleu_of_tokens(token_lists))
        vectors = embedder.encode(picked)
        row["mean_cosine"], row["mean_cosine_low"], row["mean_cosine_high"] = t_interval(
            mean_cosines(vectors).tolist(), bounds=(-1.0, 1.0))
        ids = pl.DataFrame({"prompt_id": [str(i) for i in range(len(picked))]})
        row["clusters"] = near_dedup(ids, vectors, threshold).notes["kept"]
    elif picked:
        row["clusters"] = 1
    return DiversityRow(**row)


def measure(items: Sequence[Measured], embedder, *, sample: int = DEFAULT_SAMPLE, seed: int = 0,
            threshold: float = 0.9) -> Diversity:
    """Rows for each item: its whole split ("all") first, then each value of its `by` column in sorted order."""
    if sample < 2:
        raise ValueError(f"sample must be at least 2, got {sample}")
    rows = []
    for item in items:
        if item.column not in item.frame.columns:
            raise ValueError(f"{item.split}: no column {item.column!r} (columns: {', '.join(item.frame.columns)})")
        if item.by is not None and item.by not in item.frame.columns:
            raise ValueError(f"{item.split}: no column {item.by!r} to group by "
                             f"(columns: {', '.join(item.frame.columns)})")
        settings = {"sample": sample, "seed": seed, "threshold": threshold}
        texts = item.frame.get_column(item.column).cast(pl.Utf8).to_list()
        rows.append(measure_texts(texts, embedder, split=item.split, **settings))
        if item.by is None:
            continue
        groups = item.frame.select(pl.col(item.by).cast(pl.Utf8).fill_null("(none)"),
                                   pl.col(item.column).cast(pl.Utf8))
        for value in sorted(groups.get_column(item.by).unique().to_list()):
            part = groups.filter(pl.col(item.by) == value).get_column(item.column).to_list()
            rows.append(measure_texts(part, embedder, split=item.split, by=item.by, group=value, **settings))
    return Diversity(sample_size=sample, seed=seed, threshold=threshold, self_bleu=SELF_BLEU_METHOD,
                     clusters=CLUSTER_METHOD, embedding_model=getattr(embedder, "model_key", None), rows=rows,
                     references=list(REFERENCES))


def summary_rows(diversity: Diversity, references: bool = True) -> list[dict[str, str]]:
    """One row of formatted text per measured group, then (with `references`) the published reference figures:
    what the card and report show."""
    def interval(value, low, high) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    out = []
    for r in diversity.rows:
        out.append({"split": r.split, "group": r.group if r.by else "all", "sampled": f"{r.sampled:,} of {r.rows:,}",
                    "Self-BLEU [95% CI]": interval(r.self_bleu, r.self_bleu_low, r.self_bleu_high),
                    "Distinct-1": number(r.distinct_1), "Distinct-2": number(r.distinct_2),
                    "mean cosine [95% CI]": interval(r.mean_cosine, r.mean_cosine_low, r.mean_cosine_high),
                    "clusters": "-" if r.clusters is None else f"{r.clusters:,}"})
    for ref in diversity.references if references else ():
        out.append({"split": f"{ref.dataset} (reference: {ref.source})", "group": "all", "sampled": "-",
                    "Self-BLEU [95% CI]": number(ref.self_bleu), "Distinct-1": "-",
                    "Distinct-2": number(ref.distinct_2), "mean cosine [95% CI]": "-", "clusters": "-"})
    return out


def reference_note(diversity: Diversity) -> str:
    """The reference figures as one line (for a terminal, where the table has no room for them)."""
    return "For comparison, as published: " + "; ".join(
        f"{r.dataset} Self-BLEU {r.self_bleu}, Distinct-2 {r.distinct_2} ({r.source})" for r in diversity.references
    ) + ". " + READING


def method_note(diversity: Diversity, references: bool = True) -> str:
    """One paragraph saying how the table was measured and (with `references`, for a table that has the reference
    rows) how to read it."""
    return (f"Measured on a seeded sample (seed {diversity.seed}) of at most {diversity.sample_size:,} prompts per "
            f"split and group. Self-BLEU: {diversity.self_bleu}. Distinct-n: distinct / all n-grams over the sample, "
            f"same tokens. Mean cosine: over all pairs of the sample's {diversity.embedding_model or 'MiniLM'} "
            f"embeddings. Clusters: {diversity.clusters} {diversity.threshold}. Intervals are 95% t-intervals of the "
            "per-prompt scores."
            + (f" {READING} The reference rows are the published figures, not measured here." if references else ""))
