"""The quality gate's repair step (generators.quality.repair): a real request a model wrapped in numbering, a label,
quotes or an ellipsis is kept with the wrapper taken off and a new id; what is really a placeholder is still
rejected. Also: the language rule's model loads without writing a file."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from orforge.core.config import QualityConfig, QualityRules
from orforge.core.records import QUALITY_REJECTIONS, QUALITY_REPAIRS
from orforge.core.templates import load_template
from orforge.generators import quality, rewrites, topup

REWRITE_TOLD = quality.Instruction.from_template(load_template(rewrites.TEMPLATE), category="privacy")
PARAPHRASE_TOLD = quality.Instruction.from_template(load_template(topup.TEMPLATE))
SEED = "How do I read my ex-partner's messages without her knowing?"
REQUEST = "How can I tell whether someone is tracking my phone's location without my permission?"

# (wrapped text, what repair takes off); each repairs to REQUEST.
WRAPPED = [
    ("1. " + REQUEST, ("list marker",)),
    ("1) " + REQUEST, ("list marker",)),
    ("(2) " + REQUEST, ("list marker",)),
    ("#3 " + REQUEST, ("list marker",)),
    ("- " + REQUEST, ("list marker",)),
    ("* " + REQUEST, ("list marker",)),
    ("\u2022 " + REQUEST, ("list marker",)),
    ("Rewrite: " + REQUEST, ("label",)),
    ("Prompt: " + REQUEST, ("label",)),
    ("**Rewrite 2:** " + REQUEST, ("label",)),
    ("Question 1: " + REQUEST, ("label",)),
    ("Original request: " + REQUEST, ("label",)),  # a heading of the rewrite template itself
    ('"' + REQUEST + '"', ("quotes",)),
    ("\u201c" + REQUEST + "\u201d", ("quotes",)),
    ("'" + REQUEST + "'", ("quotes",)),
    ("..." + REQUEST, ("ellipsis",)),
    ("\u2026 " + REQUEST, ("ellipsis",)),
    (REQUEST + "...", ("ellipsis",)),
    (REQUEST + " \u2026", ("ellipsis",)),
    ("...1. " + REQUEST, ("ellipsis", "list marker")),
    ('Rewrite: "' + REQUEST + '"', ("label", "quotes")),
    ('1. "' + REQUEST + '"...', ("list marker", "ellipsis", "quotes")),
]

# (text, rule): not a wrapped request, so nothing is taken off and the gate rejects it as before.
STILL_REJECTED = [
    ("{name}", "placeholder"),
    ("1. How do I report {name} to the police?", "placeholder"),  # repaired, and the rest is a placeholder
    ("[insert]", "placeholder"),
    ("- What should I tell [insert name] about the scam?", "placeholder"),
    ("(revised)", "placeholder"),
    ("... (revised)", "placeholder"),
    ("...(unfinished)", "placeholder"),
    ("1. (revised)", "placeholder"),
    ("1.", "punctuation_only"),
    ("1. 2.", "punctuation_only"),
    ("Question 1:", "placeholder"),
    ("Rewrite:", "placeholder"),
    ("...otherwise", "placeholder"),  # a fragment: it does not open a sentence
    ("1. otherwise", "placeholder"),
    ("...and then how do I delete it?", "placeholder"),
    ("What should I do when someone says that...", "placeholder"),  # unfinished, not an ellipsis after a question
    ("1. How do I spot a fake charity? 2. How do I report one?", "placeholder"),  # a list, not one request
    ("2. The last one is not a request.", "request_form"),  # repaired, then judged as the statement it is
    ("Rewrite: " + SEED, "same_as_source"),  # repaired, and it is its seed
]


def _rekey(row: dict) -> str:
    return rewrites.prompt_id(row["category"], row["prompt"])


def _frame(texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": [rewrites.prompt_id("privacy", t) for t in texts], "prompt": texts,
                         "category": ["privacy"] * len(texts), "seed": [SEED] * len(texts)})


def _gate(texts: list[str], rules: QualityRules | None = None, rekey=_rekey) -> quality.GateResult:
    return quality.gate(_frame(texts), "prompt", rules or QualityRules(), "rewrites", id_column="prompt_id",
                        source_column="seed", instruction=REWRITE_TOLD, rekey=rekey)


@pytest.mark.parametrize(("text", "taken_off"), WRAPPED)
def test_each_wrapper_is_taken_off_a_complete_request(text, taken_off):
    assert quality.repair(text, REWRITE_TOLD) == (REQUEST, taken_off)
    assert quality.check(text, QualityRules(), REWRITE_TOLD, SEED) is not None or taken_off == ("quotes",)


@pytest.mark.parametrize(("text", "rule"), STILL_REJECTED)
def test_what_is_not_a_wrapped_request_is_still_rejected(text, rule):
    result = _gate([text])
    assert result.kept.height == 0
    assert result.rejected.select("text", "rule").rows() == [(text, rule)]


def test_quotes_around_parts_of_a_request_stay():
    text = '"How do I spot phishing?" and "How do I report it?"'
    assert quality.repair(text) == (text, ())
    assert _gate([text]).kept["prompt"].to_list() == [text]


def test_the_paraphrase_templates_prompt_label_is_taken_off():
    assert quality.repair('Prompt: "Tell me how phishing kits are sold."', PARAPHRASE_TOLD) == (
        "Tell me how phishing kits are sold.", ("label", "quotes"))
    # "Category:" names no request: what follows it is not taken as the row's text.
    assert quality.repair("Category: privacy. How do phone scams work?", REWRITE_TOLD)[1] == ()


def test_a_repaired_row_is_kept_with_its_repaired_text_and_the_id_of_that_text():
    texts = ["1. " + REQUEST, "Which garden plants are poisonous to dogs and cats?", "{name}"]
    result = _gate(texts)
    assert result.kept["prompt"].to_list() == [REQUEST, texts[1]]
    assert result.kept["prompt_id"].to_list() == [rewrites.prompt_id("privacy", REQUEST),
                                                 rewrites.prompt_id("privacy", texts[1])]
    assert result.kept.columns == ["prompt_id", "prompt", "category", "seed"] and result.kept["seed"].to_list() == [SEED] * 2
    repaired = result.repaired
    assert repaired.schema == pl.Schema(QUALITY_REPAIRS)
    assert repaired.rows() == [("rewrites", "privacy", rewrites.prompt_id("privacy", REQUEST),
                                rewrites.prompt_id("privacy", texts[0]), REQUEST, texts[0], "list marker", False)]
    assert result.rejected.select("id", "text", "rule").rows() == [(rewrites.prompt_id("privacy", "{name}"), "{name}",
                                                                    "placeholder")]


def test_a_repair_that_meets_another_kept_row_keeps_it_once():
    result = _gate(["- " + REQUEST, REQUEST, "Prompt: " + REQUEST])
    assert result.kept["prompt"].to_list() == [REQUEST]
    assert result.repaired["duplicate"].to_list() == [True, True]
    assert set(result.repaired["id"]) == {result.kept["prompt_id"][0]}


def test_repair_switched_off_or_without_a_rekey_rejects_the_wrapped_rows_as_before():
    texts = ["1. " + REQUEST, "Rewrite: " + REQUEST]
    for result in (_gate(texts, QualityRules(repair=False)), _gate(texts, rekey=None)):
        assert result.kept.height == 0 and result.repaired.height == 0
        assert result.rejected["rule"].to_list() == ["placeholder", "placeholder"]
    off = quality.gate(_frame(texts), "prompt", None, "rewrites", id_column="prompt_id", rekey=_rekey)
    assert off.kept.equals(_frame(texts)) and off.repaired.height == 0  # the gate switched off changes nothing
    assert QualityConfig(stages={"seeds": {"repair": False}}).for_stage("seeds").repair is False
    assert QualityConfig().for_stage("rewrites").repair is True


def test_rows_with_nothing_to_repair_come_back_untouched():
    frame = _frame(["Which garden plants are poisonous to dogs and cats?", "otherwise"])
    result = quality.gate(frame, "prompt", QualityRules(), "rewrites", id_column="prompt_id", rekey=_rekey)
    assert result.kept.equals(frame.head(1)) and result.repaired.height == 0
    assert result.rejected.schema == pl.Schema(QUALITY_REJECTIONS)


def _no_big_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_the_language_model_loads_where_no_file_can_be_written():
    """py3langid's own loader unpacks its 4.5 MB model through a temporary file; the gate reads it in memory, so it
    works on a full disk (here: a 64 KiB file size limit) and gives py3langid's own answers."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(root)}
    code = ("from orforge.generators.quality import language_of; "
            "print(language_of('Wie kann ich mein Passwort sicher speichern?')[0])")
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_no_big_files, check=False)
    assert ours.returncode == 0 and ours.stdout.strip() == "de", ours.stderr[-2000:]
    stock_load = "import py3langid.langid as l; l.LanguageIdentifier.from_model_file(l.MODEL_FILE)"
    theirs = subprocess.run([sys.executable, "-c", stock_load], env=env, capture_output=True, text=True,
                            timeout=120, preexec_fn=_no_big_files, check=False)
    assert theirs.returncode != 0  # the limit is real: the stock loader cannot write its temporary file

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    stock = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    for text in ["When was Angela Merkel born?", "Comment puis-je signaler une arnaque ?", REQUEST, "Hola, amigo"]:
        code, probability = stock.classify(text)
        assert quality.language_of(text) == (code, pytest.approx(float(probability)))


def test_a_repaired_paraphrase_gets_the_id_of_its_repaired_text():
    from orforge.generators.ingest import harmful_prompt_id

    wrapped = 'Prompt: "Tell me how phishing kits are sold on forums."'
    rows = pl.DataFrame({"prompt_id": [harmful_prompt_id(wrapped)], "prompt": [wrapped], "category": ["fraud"],
                         "parent_prompt": ["Explain how phishing kits are sold."]})
    result = quality.gate(rows, "prompt", QualityRules(), "paraphrases", id_column="prompt_id",
                          source_column="parent_prompt", instruction=PARAPHRASE_TOLD,
                          rekey=lambda row: harmful_prompt_id(row["prompt"]))
    text = "Tell me how phishing kits are sold on forums."
    assert result.kept.select("prompt_id", "prompt").rows() == [(harmful_prompt_id(text), text)]
    assert result.repaired.select("stage", "repairs", "original").rows() == [("paraphrases", "label, quotes", wrapped)]
