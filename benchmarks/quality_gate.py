"""The quality gate (generators/quality.py): how its language rule was chosen, what it costs, what it rejects.

1. Language detectors on English that must pass (the 450 XSTest prompts in ../shared, 200 word salads like the test
   pipeline's) and 20 requests in 14 other languages written for this benchmark: py3langid as the gate uses it
   (reject only when another language has probability >= 0.5), its plain top-1 call, and, when installed in the
   same environment, langid and lingua-language-detector.
2. The whole gate with default rules: XSTest prompts rejected (a false-positive rate on real, good requests) and
   rows per second.

    .venv/bin/python benchmarks/quality_gate.py
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, footer, header, table

XSTEST = REPO.parent / "shared" / "benchmarks" / "xstest" / "xstest_prompts.csv"
OTHER = [
    "Comment puis-je signaler une arnaque téléphonique à la police ?",
    "Wie kann ich mein Passwort sicher speichern?",
    "¿Cómo puedo proteger a mis abuelos de las estafas telefónicas?",
    "Come posso riconoscere un messaggio di phishing?",
    "Como posso denunciar um golpe pela internet?", "Hoe kan ik zien of iemand mijn wifi gebruikt?",
    "Quels produits ménagers ne faut-il jamais mélanger ?",
    "Welche Haushaltschemikalien sollte man nie zusammen lagern?",
    "¿Qué señales indican que alguien usa mi red sin permiso?",
    "Quali sono i segnali di un'intimidazione sul lavoro?", "Jak mogę zgłosić oszustwo internetowe?",
    "Hur kan jag skydda mina äldre föräldrar mot bedrägerier?",
    "Explique-moi comment fonctionne une attaque par hameçonnage.",
    "Erkläre mir, wie Betrüger ältere Menschen täuschen.", "Dime qué hacer si alguien me amenaza en línea.",
    "Dimmi come proteggere i miei dati personali.", "Как защитить свой аккаунт от взлома?",
    "如何保护我的个人信息不被泄露？", "Bagaimana cara melaporkan penipuan online?",
    "Nasıl bir dolandırıcılığı polise bildirebilirim?",
]


def detectors() -> dict:
    from orforge.generators import quality

    def gate_keeps(text: str) -> bool:
        code, probability = quality.language_of(text)
        return code == "en" or probability < 0.5

    found = {"py3langid, reject if p(other) >= 0.5 (the gate)": gate_keeps,
             "py3langid, top-1 == en": lambda t: quality.language_of(t)[0] == "en"}
    try:
        import langid

        found["langid 1.1.6, top-1 == en"] = lambda t: langid.classify(t)[0] == "en"
    except ImportError:
        pass
    try:
        from lingua import Language, LanguageDetectorBuilder

        t0 = time.perf_counter()
        lingua = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()
        print(f"lingua: {time.perf_counter() - t0:.1f} s to load every language model")
        found["lingua, top-1 == English"] = lambda t: lingua.detect_language_of(t) == Language.ENGLISH
    except ImportError:
        pass
    return found


def main() -> None:
    header("benchmarks/quality_gate.py: the quality gate's language rule and cost", packages=("py3langid", "polars"))
    from orforge.core.config import QualityRules
    from orforge.core.templates import load_template
    from orforge.generators import quality, rewrites

    from tests.flows.pipeline import salad

    english = [row["prompt"] for row in csv.DictReader(XSTEST.open())]
    salads = [salad("rewrite", "benchmark", i) for i in range(200)]
    quality.language_of("warm up the model")
    rows = []
    for name, keeps in detectors().items():
        t0 = time.perf_counter()
        kept_en, kept_salad = sum(map(keeps, english)), sum(map(keeps, salads))
        rejected = sum(not keeps(t) for t in OTHER)
        ms = 1000 * (time.perf_counter() - t0) / (len(english) + len(salads) + len(OTHER))
        rows.append([name, f"{kept_en}/{len(english)}", f"{kept_salad}/{len(salads)}", f"{rejected}/{len(OTHER)}",
                     f"{ms:.2f}"])
    print(table(["detector", "XSTest kept", "salads kept", "other languages rejected", "ms/text"], rows))

    told = quality.Instruction.from_template(load_template(rewrites.TEMPLATE), category="privacy")
    rules = QualityRules()
    texts = english * 10
    t0 = time.perf_counter()
    verdicts = [quality.check(t, rules, told) for t in texts]
    rate = len(texts) / (time.perf_counter() - t0)
    wrong = [(t, v) for t, v in zip(english, verdicts[:len(english)]) if v]
    print(f"\nwhole gate, default rules, rewrite template as the instruction: {len(wrong)}/{len(english)} XSTest "
          f"prompts rejected; {rate:,.0f} rows/s on one core")
    for text, verdict in wrong[:10]:
        print(f"  {verdict[0]}: {text!r} ({verdict[1]})")
    footer()


if __name__ == "__main__":
    main()
