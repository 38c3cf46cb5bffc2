"""The keyword refusal detector against human labels: in-sample and leave one file out.

    .venv/bin/python benchmarks/refusal_detector.py [--xstest-dir ../shared/benchmarks/xstest]

Every `completions_*.csv` in the XSTest folder is one model's replies with human labels (full or partial refusal
counts as refusal). In-sample: the detector as shipped (every rule, the first three sentences) on each file.
Leave one file out: `moderators.refusal.leave_one_out` chooses how many opening sentences to read and which rules
to keep on the other files, then scores the file held out. Also printed: each rule's hits on refusals and on
answers per file, so a rule that only fits one model shows. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import footer, header, table  # noqa: E402

from orforge.moderators.refusal import REFUSAL_RULES, detect_refusal_keywords, leave_one_out, refusal_rules_matched

REFUSED = ("2_full_refusal", "3_partial_refusal")
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "xstest"


def load(folder: Path) -> dict[str, tuple[list[str | None], list[bool]]]:
    files = {}
    for path in sorted(folder.glob("completions_*.csv")):
        data = pl.read_csv(path)
        files[path.name] = (data["completion"].to_list(), [label in REFUSED for label in data["final_label"]])
    if not files:
        raise SystemExit(f"no completions_*.csv in {folder}")
    return files


def scores(replies: list[str | None], refused: list[bool]) -> tuple[float, float, float]:
    detected = [detect_refusal_keywords(r) == "refusal" for r in replies]  # unsure counts as answer
    tp = sum(d and y for d, y in zip(detected, refused))
    fp = sum(d and not y for d, y in zip(detected, refused))
    fn = sum(y and not d for d, y in zip(detected, refused))
    return (sum(d == y for d, y in zip(detected, refused)) / len(refused), tp / max(tp + fp, 1), tp / max(tp + fn, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xstest-dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    header("keyword refusal detector: in-sample and leave one file out", packages=("polars",))
    files = load(args.xstest_dir)

    rows = []
    for name, (replies, refused) in files.items():
        acc, prec, rec = scores(replies, refused)
        rows.append((name, len(replies), f"{acc:.3f}", f"{prec:.3f}", f"{rec:.3f}"))
    everything = ([r for rs, _ in files.values() for r in rs], [y for _, ys in files.values() for y in ys])
    acc, prec, rec = scores(*everything)
    rows.append(("all files", len(everything[0]), f"{acc:.3f}", f"{prec:.3f}", f"{rec:.3f}"))
    print("\nIn-sample (the detector as shipped):")
    print(table(("file", "n", "accuracy", "precision", "recall"), rows))

    loo = leave_one_out(files)
    print("\nLeave one file out (head length and rules chosen on the other files):")
    print(table(("held out", "n", "head sentences", "rules dropped", "train accuracy", "held-out accuracy"),
                [(name, r["n"], r["head_sentences"], ", ".join(r["dropped"]) or "-", f"{r['train_accuracy']:.3f}",
                  f"{r['held_out_accuracy']:.3f}") for name, r in loo.items()]))
    mean = sum(r["held_out_accuracy"] for r in loo.values()) / len(loo)
    print(f"mean held-out accuracy: {mean:.3f}")

    print("\nEach rule's hits in the opening (refusals / answers):")
    hits = []
    for rule in REFUSAL_RULES:
        cells = []
        for replies, refused in files.values():
            matched = [rule in refusal_rules_matched(r) for r in replies]
            cells.append(f"{sum(m and y for m, y in zip(matched, refused))} / "
                         f"{sum(m and not y for m, y in zip(matched, refused))}")
        hits.append((rule, *cells))
    print(table(("rule", *files), hits))
    footer()


if __name__ == "__main__":
    main()
