"""Release files of the SELECT recipe: SELECT-compatible `data.json` and `taxonomy_plus.json`, and training data.

`data.json` maps each concept id to `{"concept": id, "name": name, "context": {"names": [...], "ids": [...]},
"queries": [evaluation questions], "extra_queries": [training questions]}`, the context being the concept's
ancestors root first; `taxonomy_plus.json` is the tree in SELECT's nested form (core.concepts). So SELECT's own
evaluation code can read an orforge release, and `read_data_json` reads SELECT's release (or ours) back.

Training data, from the `kind == "train"` splits (core.records.SELECT_SPLITS) of each target:
- SFT rows: the question and the behaviour to learn: the abstention reply for the target's and its descendants'
  questions, the question's answer (from an `answers` frame: question_id, answer) for siblings' and ancestors'.
- DPO pairs: chosen = abstain on target and descendants, answer on siblings and ancestors; rejected = the opposite.
  Every pair needs an answer, whichever side it is on.
Rows that need an answer and have none are dropped and counted in the StageResult notes. Every row keeps
target_id, question_id and relation, and names the target (`target_name`) so a trainer can phrase the instruction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from orforge.core.concepts import Concept, ConceptTree, ConceptTreeError
from orforge.core.config import stable_hash
from orforge.core.records import StageResult
from orforge.outputs.release import CardFacts, ReleaseLayout, card_build_facts

DATA_JSON = "data.json"
TREE_FILE = "tree.yaml"
TAXONOMY_JSON = "taxonomy_plus.json"
ABSTAIN_RELATIONS = ("self", "descendant")
ANSWER_RELATIONS = ("sibling", "ancestor")

# Questions read back from a data.json file (SELECT's or ours).
DATA_QUESTIONS = {
    "question_id": pl.Utf8,
    "concept_id": pl.Utf8,
    "question": pl.Utf8,
    "kind": pl.Utf8,  # eval (queries) | train (extra_queries)
    "sample_index": pl.Int64,  # position in its list
}
_ROW_KEYS = {
    "target_id": pl.Utf8,
    "target_name": pl.Utf8,
    "split": pl.Utf8,
    "relation": pl.Utf8,
    "question_id": pl.Utf8,
    "concept_id": pl.Utf8,
    "prompt": pl.Utf8,
}
SFT_ROWS = {**_ROW_KEYS, "response": pl.Utf8, "behaviour": pl.Utf8}  # behaviour: abstain | answer
DPO_PAIRS = {**_ROW_KEYS, "chosen": pl.Utf8, "rejected": pl.Utf8, "chosen_behaviour": pl.Utf8}


def question_id_for(concept_id: str, kind: str, question: str) -> str:
    """Content id of a question read from a data.json file (which carries no ids)."""
    return stable_hash(["select-question", concept_id, kind, question])


# ---------------------------------------------------------------------------------------------------- data.json


def _ordered_questions(questions: pl.DataFrame, kind: str) -> dict[str, list[str]]:
    part = questions.filter(pl.col("kind") == kind)
    order = [c for c in ("sample_index", "question_id") if c in part.columns]
    part = part.sort(["concept_id", *order], nulls_last=True)
    grouped: dict[str, list[str]] = {}
    for cid, text in part.select("concept_id", "question").iter_rows():
        grouped.setdefault(cid, []).append(text)
    return grouped


def select_data(tree: ConceptTree, questions: pl.DataFrame) -> dict[str, dict]:
    """The data.json mapping, concepts in tree order (every concept, with empty lists when it has no questions).

    Questions of concepts outside the tree are left out: they have no context to give."""
    missing = [c for c in ("concept_id", "question", "kind") if c not in questions.columns]
    if missing:
        raise ValueError(f"questions lack column(s) {missing}")
    queries = _ordered_questions(questions, "eval")
    extra = _ordered_questions(questions, "train")
    data = {}
    for c in tree:
        ancestor_ids = list(reversed(tree.ancestors(c.id)))
        data[c.id] = {
            "concept": c.id,
            "name": c.name,
            "context": {"names": tree.context_names(c.id), "ids": ancestor_ids},
            "queries": queries.get(c.id, []),
            "extra_queries": extra.get(c.id, []),
        }
    return data


def _load_json(source: Path | str | dict, what: str) -> tuple[Any, str]:
    if isinstance(source, dict):
        return source, f"<{what}>"
    path = Path(source)
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except FileNotFoundError:
        raise ConceptTreeError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConceptTreeError(f"{path}: cannot read {what}: {e}") from None


def read_data_json(source: Path | str | dict) -> tuple[ConceptTree, pl.DataFrame]:
    """A data.json (path or loaded mapping) as the concept tree its contexts describe and its questions
    (DATA_QUESTIONS; ids from `question_id_for`). An ancestor that only appears in a context is named from it."""
    raw, where = _load_json(source, DATA_JSON)
    if not isinstance(raw, dict):
        raise ConceptTreeError(f"{where}: data.json must map concept ids to entries")
    names: dict[str, str] = {}
    parents: dict[str, str | None] = {}
    order: list[str] = []
    rows: list[dict] = []

    def note(cid: str, name: str, parent: str | None) -> None:
        if cid not in names:
            order.append(cid)
            names[cid], parents[cid] = name, parent
        elif parents[cid] != parent:
            raise ConceptTreeError(f"{where}: concept {cid!r} has two different parents ({parents[cid]!r}, {parent!r})")

    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise ConceptTreeError(f"{where}: concept {key!r}: expected a mapping")
        cid = str(entry.get("concept", key))
        context = entry.get("context") or {}
        ids = [str(i) for i in context.get("ids", [])]
        context_names = [str(n) for n in context.get("names", [])]
        if len(ids) != len(context_names):
            raise ConceptTreeError(
                f"{where}: concept {cid!r}: context has {len(ids)} ids but {len(context_names)} names"
            )
        for i, (aid, aname) in enumerate(zip(ids, context_names)):
            note(aid, aname, ids[i - 1] if i else None)
        note(cid, str(entry.get("name", cid)), ids[-1] if ids else None)
        names[cid] = str(entry.get("name", cid))  # its own entry names it, even if a context met it first
        for kind, field in (("eval", "queries"), ("train", "extra_queries")):
            for i, text in enumerate(entry.get(field) or []):
                rows.append({"question_id": question_id_for(cid, kind, text), "concept_id": cid, "question": text,
                             "kind": kind, "sample_index": i})
    tree = ConceptTree([Concept(id=c, name=names[c], parent=parents[c]) for c in order], source=where)
    questions = pl.DataFrame(rows, schema=DATA_QUESTIONS) if rows else pl.DataFrame(schema=DATA_QUESTIONS)
    return tree, questions


def read_taxonomy_plus(path: Path | str) -> ConceptTree:
    return ConceptTree.load(path)


# ---------------------------------------------------------------------------------------------------- training


def _train_rows(splits: pl.DataFrame, tree: ConceptTree, answers: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    for column in ("question_id", "answer"):
        if column not in answers.columns:
            raise ValueError(f"answers lack column {column!r}; expected question_id, answer")
    repeated = answers.group_by("question_id").len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"answers repeat question_id {repeated['question_id'][0]!r}; give one answer per question")
    train = splits.filter(pl.col("kind") == "train")
    unknown = set(train["relation"].unique().to_list()) - set(ABSTAIN_RELATIONS) - set(ANSWER_RELATIONS)
    if unknown:
        raise ValueError(f"splits hold unknown relation(s) {sorted(unknown)}")
    target_names = pl.DataFrame(
        {"target_id": tree.ids(), "target_name": [tree.get(c).name for c in tree.ids()]},
        schema={"target_id": pl.Utf8, "target_name": pl.Utf8},
    )
    given = answers.select(pl.col("question_id").cast(pl.Utf8), pl.col("answer").cast(pl.Utf8)).filter(
        pl.col("answer").is_not_null() & (pl.col("answer").str.strip_chars() != "")
    )
    rows = (
        train.join(target_names, on="target_id", how="left")
        .join(given, on="question_id", how="left")
        .with_columns(abstain=pl.col("relation").is_in(list(ABSTAIN_RELATIONS)))
        .sort("target_id", "split", "relation", "question_id")
    )
    notes = {"eval_rows_ignored": splits.height - train.height, "train_rows": train.height}
    return rows, notes


def sft_rows(
    splits: pl.DataFrame, tree: ConceptTree, answers: pl.DataFrame, abstention_reply: str
) -> StageResult:
    """One SFT row per train split row: abstention reply on target/descendant questions, the answer on
    sibling/ancestor ones. notes: `dropped_no_answer` (answer rows with no answer), `eval_rows_ignored`."""
    if not abstention_reply.strip():
        raise ValueError("abstention_reply must not be blank")
    rows, notes = _train_rows(splits, tree, answers)
    unanswered = ~pl.col("abstain") & pl.col("answer").is_null()
    notes["dropped_no_answer"] = rows.filter(unanswered).height
    records = rows.filter(~unanswered).select(
        *(pl.col(c) for c in ("target_id", "target_name", "split", "relation", "question_id", "concept_id")),
        pl.col("question").alias("prompt"),
        pl.when(pl.col("abstain")).then(pl.lit(abstention_reply)).otherwise(pl.col("answer")).alias("response"),
        pl.when(pl.col("abstain")).then(pl.lit("abstain")).otherwise(pl.lit("answer")).alias("behaviour"),
    ).cast(SFT_ROWS)
    notes["rows"] = records.height
    return StageResult(records=records, notes=notes)


def dpo_pairs(
    splits: pl.DataFrame, tree: ConceptTree, answers: pl.DataFrame, abstention_reply: str
) -> StageResult:
    """One preference pair per train split row that has an answer: chosen abstains on target/descendant questions
    and answers sibling/ancestor ones; rejected does the opposite. notes: `dropped_no_answer`."""
    if not abstention_reply.strip():
        raise ValueError("abstention_reply must not be blank")
    rows, notes = _train_rows(splits, tree, answers)
    notes["dropped_no_answer"] = rows.filter(pl.col("answer").is_null()).height
    reply = pl.lit(abstention_reply)
    records = rows.filter(pl.col("answer").is_not_null()).select(
        *(pl.col(c) for c in ("target_id", "target_name", "split", "relation", "question_id", "concept_id")),
        pl.col("question").alias("prompt"),
        pl.when(pl.col("abstain")).then(reply).otherwise(pl.col("answer")).alias("chosen"),
        pl.when(pl.col("abstain")).then(pl.col("answer")).otherwise(reply).alias("rejected"),
        pl.when(pl.col("abstain")).then(pl.lit("abstain")).otherwise(pl.lit("answer")).alias("chosen_behaviour"),
    ).cast(DPO_PAIRS)
    notes["rows"] = records.height
    return StageResult(records=records, notes=notes)


# ---------------------------------------------------------------------------------------------------- release


def _select_card_body(facts: CardFacts) -> list[str]:
    cfg, notes = facts.info.config, facts.info.notes
    questions = notes.get("questions", {})
    splits = ", ".join(f"`{s}` ({facts.split_rows.get(s, 0)} rows)" for s in SELECT_SPLIT_ORDER)
    out = [
        f"# {facts.name}",
        "",
        f"{facts.name} measures whether a language model told to abstain on one concept abstains on that concept's "
        "sub-concepts too (generalization) while still answering questions about its siblings and ancestors "
        f"(specificity). It was built with orforge {facts.version.orforge} following the approach of SELECT "
        "(Vasisht et al., NAACL 2025): a tree of benign concepts, everyday questions per concept written with the "
        "concept's ancestors as context, and three splits per target concept.",
        "",
        "## Splits",
        "",
        f"Per target concept: {splits}.",
        "",
        "- `abstention`: the target concept's own evaluation questions (relation `self`). An instructed model "
        "should abstain.",
        "- `generalization`: questions about the target's descendants (relation `descendant`); leaf targets have "
        "none. An instructed model should abstain.",
        "- `specificity`: questions about the target's siblings and ancestors (relations `sibling`, `ancestor`). "
        "An instructed model should answer.",
        "",
        "Each CSV has the columns `target_id, relation, distance, concept_id, question`; `distance` is the number "
        "of tree edges between the target and the question's concept. The parquet files add the question id and "
        "the target's depth. `questions.parquet` holds every question with its lineage (concept, ancestors, "
        "generator model, template sha256, leak flag), `concepts.parquet` and `tree.yaml` the concept tree, "
        f"`{DATA_JSON}` and `{TAXONOMY_JSON}` the same data in SELECT's own format, and `sft.jsonl` / `dpo.jsonl` "
        "training rows built from the separate training questions.",
        "",
        f"Questions: {questions.get('generated', '?')} generated, {questions.get('near_duplicates_dropped', '?')} "
        f"dropped as near duplicates within their concept, {questions.get('leak_flagged', '?')} flagged as fitting "
        "a sibling or the parent as well as their own concept (`leak_flag`; left out of the splits named in "
        "`splits.exclude_leaked`).",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("path/to/{facts.name}", "{facts.configs[0] if facts.configs else "abstention"}")',
        "```",
        "",
        "## How it was built",
        "",
    ]
    if hasattr(cfg, "questions"):
        tree_from = (f"grown by `{cfg.concepts.grow.model.label}` from roots {', '.join(cfg.concepts.grow.roots)}"
                     if cfg.concepts.grow else f"read from `{cfg.concepts.source}`")
        out += [
            f"- Concept tree: {tree_from}.",
            f"- Questions: `{cfg.questions.model.label}` ({cfg.questions.model.model}), "
            f"{cfg.questions.eval_per_concept} evaluation and {cfg.questions.train_per_concept} training questions "
            f"per concept; near duplicates within a concept removed at cosine {cfg.questions.dedup_threshold}.",
            f"- Targets: {cfg.splits.targets if isinstance(cfg.splits.targets, str) else len(cfg.splits.targets)}; "
            f"splits sampled with seed {cfg.splits.seed}.",
            f"- Config sha256: `{cfg.config_hash()}` (full config in `manifest.json`).",
            "",
        ]
    out += card_build_facts(facts)
    out += [
        "## Intended use",
        "",
        "Scoring abstention techniques: instruct a model to abstain on a target concept, ask it the three splits, "
        "and report the abstention rate, the generalization rate and specificity together; a technique that "
        "abstains on everything scores well on the first two and badly on the third. `orforge evaluate` does "
        "this for the techniques `none`, `instructed` and `instructed_fewshot`.",
        "",
        "## Limits",
        "",
        "- Every question was written by a language model; a question can fit more than one concept (see "
        "`leak_flag`).",
        "- The tree is one view of how concepts nest; another tree would move some questions between splits.",
        "- Do not train on the evaluation questions (`kind == eval`); the SFT and DPO files use the training "
        "questions only.",
        "",
        "## License and citation",
        "",
        f"License: `{facts.license_id}`. The method follows SELECT; if you use this dataset, please cite it:",
        "",
        "```bibtex",
        "@inproceedings{vasisht2025select,",
        "  title     = {Knowledge Graph Guided Evaluation of Abstention Techniques},",
        "  author    = {Vasisht, Kinshuk and Kaur, Navreet and Pruthi, Danish},",
        "  booktitle = {Proceedings of the 2025 Conference of the Nations of the Americas Chapter of the ACL},",
        "  pages     = {6921--6939},",
        "  year      = {2025}",
        "}",
        "```",
        "",
    ]
    return out


SELECT_SPLIT_ORDER = ("abstention", "generalization", "specificity")
SELECT_LAYOUT = ReleaseLayout(
    split_order=SELECT_SPLIT_ORDER, record_only=frozenset(),
    csv_columns=("target_id", "relation", "distance", "concept_id", "question"), group_column="target_id",
    tags=("abstention", "selective-refusal", "concept-hierarchy"), card_body=_select_card_body)


def select_files(tree: ConceptTree, questions: pl.DataFrame, sft: pl.DataFrame, dpo: pl.DataFrame) -> dict[str, str]:
    """The text files of a SELECT release (name -> content, for `write_release(files=...)`): the tree as YAML,
    SELECT's own `data.json` and `taxonomy_plus.json`, and the SFT rows and DPO pairs as JSON lines (their parquet
    twins go in as tables)."""
    return {
        TREE_FILE: tree.dumps("yaml"),
        DATA_JSON: json.dumps(select_data(tree, questions), indent=1, ensure_ascii=False) + "\n",
        TAXONOMY_JSON: json.dumps(tree.to_taxonomy_plus(), indent=1, ensure_ascii=False) + "\n",
        "sft.jsonl": sft.write_ndjson(),
        "dpo.jsonl": dpo.write_ndjson(),
    }
