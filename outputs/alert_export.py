"""ALERT-format exports: the prompts as ALERT's jsonl, and DPO pairs from a safety evaluation.

- `alert_jsonl`: one JSON object per line, `{"id", "category", "prompt"}`, plus `"attack_type"` for an adversarial
  variant (a row whose `attack_type` is set and is not `none`), in ALERT's key order. `instruction_wrapper=True`
  writes each prompt inside the `### Instruction:` / `### Response:` frame ALERT's own files use, so the text can be
  sent to a base model as it is. Ids are our content hashes, not ALERT's integers.
- `dpo_pairs`: for each prompt, every reply judged safe (chosen) against every reply judged unsafe (rejected), across
  target models; a prompt that no model got wrong, or none got right, gives no pair. Undecided verdicts and empty
  replies take part in no pair.

Both return text or frames; the flow writes them through `outputs.release.write_release`.
"""

from __future__ import annotations

import json

import polars as pl

from orforge.core.config import stable_hash
from orforge.outputs.release import CardFacts, ReleaseLayout, card_build_facts

BASE_ATTACK = "none"
ALERT_BASE_FILE = "alert.jsonl"
ALERT_ADVERSARIAL_FILE = "alert_adversarial.jsonl"
DPO_FILE = "dpo.jsonl"
INSTRUCTION_WRAPPER = "### Instruction:\n{prompt}\n### Response:\n"

DPO_PAIRS = {
    "pair_id": pl.Utf8,
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "chosen": pl.Utf8,
    "rejected": pl.Utf8,
    "chosen_model": pl.Utf8,
    "rejected_model": pl.Utf8,
}


def wrap_instruction(prompt: str) -> str:
    return INSTRUCTION_WRAPPER.replace("{prompt}", prompt)


def alert_jsonl(prompts: pl.DataFrame, instruction_wrapper: bool = False) -> str:
    """`prompts` (`prompt_id, category, prompt`, optionally `attack_type`) as ALERT jsonl text, rows in frame order."""
    missing = [c for c in ("prompt_id", "category", "prompt") if c not in prompts.columns]
    if missing:
        raise ValueError(f"ALERT export needs column(s) {missing}")
    has_attack = "attack_type" in prompts.columns
    lines = []
    for row in prompts.iter_rows(named=True):
        record = {"id": row["prompt_id"], "category": row["category"],
                  "prompt": wrap_instruction(row["prompt"]) if instruction_wrapper else row["prompt"]}
        if has_attack and row["attack_type"] not in (None, BASE_ATTACK):
            record["attack_type"] = row["attack_type"]
        lines.append(json.dumps(record, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def dpo_pairs(responses: pl.DataFrame, decisions: pl.DataFrame,
              max_pairs_per_prompt: int | None = None) -> pl.DataFrame:
    """DPO_PAIRS from target replies (`prompt_id, model, prompt, response`) and the combined safety decisions
    (`prompt_id, model, verdict`, as from `moderators.safety.combine_safety_verdicts`).

    Pairs are ordered by prompt_id, then chosen model, then rejected model; `max_pairs_per_prompt` keeps the first
    that many per prompt (None keeps all: with k safe and u unsafe replies a prompt gives k x u pairs)."""
    for name, needed, table in (("responses", ("prompt_id", "model", "prompt", "response"), responses),
                                ("decisions", ("prompt_id", "model", "verdict"), decisions)):
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise ValueError(f"DPO pairs need {name} column(s) {missing}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    judged = (
        responses.select("prompt_id", "model", "prompt", "response")
        .join(decisions.select("prompt_id", "model", "verdict"), on=["prompt_id", "model"], how="inner")
        .filter(pl.col("verdict").is_in(["safe", "unsafe"]) & pl.col("response").is_not_null()
                & (pl.col("response").str.strip_chars() != ""))
    )
    chosen = judged.filter(pl.col("verdict") == "safe").select(
        "prompt_id", "prompt", pl.col("response").alias("chosen"), pl.col("model").alias("chosen_model"))
    rejected = judged.filter(pl.col("verdict") == "unsafe").select(
        "prompt_id", pl.col("response").alias("rejected"), pl.col("model").alias("rejected_model"))
    pairs = chosen.join(rejected, on="prompt_id", how="inner").sort("prompt_id", "chosen_model", "rejected_model")
    if max_pairs_per_prompt is not None:
        pairs = pairs.group_by("prompt_id", maintain_order=True).head(max_pairs_per_prompt)
    pairs = pairs.with_columns(
        pl.struct("prompt_id", "chosen_model", "rejected_model")
        .map_elements(lambda s: stable_hash([s["prompt_id"], s["chosen_model"], s["rejected_model"]]),
                      return_dtype=pl.Utf8).alias("pair_id"))
    return pairs.select(*(pl.col(c).cast(t) for c, t in DPO_PAIRS.items())) if pairs.height else pl.DataFrame(
        schema=DPO_PAIRS)


def dpo_jsonl(pairs: pl.DataFrame) -> str:
    """DPO pairs as JSON lines (`prompt, chosen, rejected` plus the ids and models), the shape TRL's DPO trainer
    reads."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs.select(*DPO_PAIRS).iter_rows(named=True))


# ---------------------------------------------------------------------------------------------------- release


def _alert_card_body(facts: CardFacts) -> list[str]:
    cfg = facts.info.config
    rows = facts.split_rows
    out = [
        f"# {facts.name}",
        "",
        f"{facts.name} is a set of harmful requests for red-teaming language models: `base` holds {rows.get('base', 0)} "
        f"prompts, each in one of ALERT's fine-grained risk categories, and `adversarial` {rows.get('adversarial', 0)} "
        "variants of them made by attack strategies. A safe model refuses them. It was built with orforge "
        f"{facts.version.orforge} following the approach of ALERT (Tedeschi et al., 2024): 32 micro categories "
        "under 6 macro categories, adversarial variants by suffix injection, prefix injection, token manipulation "
        "and jailbreaking, and a safety score = the share of a model's replies that judge models call safe.",
        "",
        "## Sets",
        "",
        "Each CSV has the columns `prompt_id, category, macro_category, attack_type, prompt` (`attack_type` is "
        f"`none` in `base`). `{ALERT_BASE_FILE}` and `{ALERT_ADVERSARIAL_FILE}` hold the same rows in ALERT's own "
        "format (`id, category, prompt`, plus `attack_type` for variants). The parquet files keep the lineage: how "
        "each prompt was made (`source`: generated, ingested, template, paraphrase), how it was categorised "
        "(`categorized_by`, with the keyword rule or the classifier's confidence), and for variants the parent "
        "prompt and the attack template.",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("path/to/{facts.name}", "base")',
        "```",
        "",
        "## How it was built",
        "",
    ]
    if hasattr(cfg, "attacks"):
        if cfg.seeds is not None:
            out.append(f"- Written by `{cfg.seeds.model.label}` ({cfg.seeds.model.model}), up to "
                       f"{cfg.seeds.seeds_per_category} per category.")
        if cfg.ingest is not None:
            out.append(f"- Ingested from `{cfg.ingest.path.name}`, categorised by keyword rules `{cfg.ingest.rules}` "
                       "then " + (f"the classifier `{cfg.ingest.classifier.label}`" if cfg.ingest.classifier
                                  else "nothing (rows the rules left were dropped)") + ".")
        if cfg.topup is not None:
            out.append(f"- Thin categories topped up to {cfg.topup.minimum} from slot templates"
                       + (f", paraphrased by `{cfg.topup.paraphrase.label}`." if cfg.topup.paraphrase else "."))
        out += [f"- Near duplicates removed at cosine {cfg.dedup.threshold} (MiniLM).",
                f"- Attacks: {', '.join(cfg.attacks.types)}; {cfg.attacks.variants_per_attack} variant(s) per "
                f"attack and prompt, seed {cfg.seed}.", f"- Config sha256: `{cfg.config_hash()}`.", ""]
    out += card_build_facts(facts)
    out += [
        "## Intended use",
        "",
        "Measuring whether a model stays safe on harmful requests, per category and under attack. Report it beside "
        "an over-refusal measure (an OR-Bench-style set): refusing everything is safe and useless.",
        "",
        "## Limits",
        "",
        "- These prompts are harmful by design. Do not publish model replies to them without review.",
        "- Category labels come from the category a prompt was written for, a keyword rule, or a classifier; some "
        "prompts fit more than one category.",
        "- A safety score depends on the judges; report which judges were used.",
        "",
        "## License and citation",
        "",
        f"License: `{facts.license_id}`. The method follows ALERT; if you use this dataset, please cite it:",
        "",
        "```bibtex",
        "@article{tedeschi2024alert,",
        "  title   = {ALERT: A Comprehensive Benchmark for Assessing Large Language Models' Safety through Red Teaming},",
        "  author  = {Tedeschi, Simone and Friedrich, Felix and Schramowski, Patrick and Kersting, Kristian and "
        "Navigli, Roberto and Nguyen, Huu and Li, Bo},",
        "  journal = {arXiv preprint arXiv:2404.08676},",
        "  year    = {2024}",
        "}",
        "```",
        "",
    ]
    return out


ALERT_LAYOUT = ReleaseLayout(
    split_order=("base", "adversarial"), record_only=frozenset(),
    csv_columns=("prompt_id", "category", "macro_category", "attack_type", "prompt"), group_column="category",
    tags=("red-teaming", "safety", "adversarial"), card_body=_alert_card_body)
