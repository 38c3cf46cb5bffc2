from __future__ import annotations

import polars as pl
import pytest

from orforge.core.records import VOTES, frame
from orforge.moderators.agreement import ALL, UNKNOWN_CATEGORY, agreement, human_agreement, read_human_labels
from orforge.outputs.audit import HEATMAP, write_audit
from orforge.outputs.plots import PNG_SIGNATURE

VERDICT = {"t": "toxic", "b": "benign"}


def make_votes(pattern: dict[str, str], categories: dict[str, str] | None = None) -> pl.DataFrame:
    """pattern: moderator -> one letter per prompt (t toxic, b benign, . no vote); prompt i is `p{i}`.
    categories: moderator -> one letter per prompt giving its vote_category (default: x for toxic, none for benign)."""
    rows = []
    for moderator, letters in pattern.items():
        for i, letter in enumerate(letters):
            if letter == ".":
                continue
            vote_category = "x" if letter == "t" else "none"
            if categories and moderator in categories:
                vote_category = {"x": "x", "y": "y", "n": "none"}[categories[moderator][i]]
            rows.append({"prompt_id": f"p{i}", "moderator": moderator, "model": f"{moderator}-model",
                         "verdict": VERDICT[letter], "vote_category": vote_category, "rationale": None,
                         "template_sha256": "a" * 64})
    return frame(rows, VOTES)


def make_prompts(categories: str) -> pl.DataFrame:
    """One prompt per letter; the letter is its category (category "c<letter>")."""
    return pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(len(categories))],
        "prompt": [f"prompt number {i}" for i in range(len(categories))],
        "category": [f"c{c}" for c in categories],
    })


def pair(table: pl.DataFrame, a: str, b: str, category: str = ALL) -> dict:
    rows = table.filter((pl.col("moderator_a") == a) & (pl.col("moderator_b") == b) & (pl.col("category") == category))
    assert rows.height == 1, (a, b, category, rows)
    return rows.row(0, named=True)


# ---------------------------------------------------------------------------------------------------- pairwise


def test_perfect_agreement_gives_kappa_one():
    votes = make_votes({"m1": "ttbbtb", "m2": "ttbbtb"})
    row = pair(agreement(votes, make_prompts("aaaaaa"))["pairwise"], "m1", "m2")
    assert row["n"] == 6 and row["raw_agreement"] == 1.0 and row["cohen_kappa"] == pytest.approx(1.0)


def test_raw_agreement_and_kappa_match_the_hand_computation():
    # m1 says toxic on 2 of 4, m2 on 1 of 4; they agree on 3 of 4.
    # p_o = 3/4; p_e = (2/4)(1/4) + (2/4)(3/4) = 1/2; kappa = (3/4 - 1/2) / (1 - 1/2) = 1/2.
    votes = make_votes({"m1": "ttbb", "m2": "tbbb"})
    row = pair(agreement(votes, make_prompts("aaaa"))["pairwise"], "m1", "m2")
    assert row["raw_agreement"] == pytest.approx(0.75)
    assert row["cohen_kappa"] == pytest.approx(0.5)


def test_systematic_disagreement_gives_negative_kappa():
    votes = make_votes({"m1": "tbtbtb", "m2": "btbtbt", "m3": "tbtbbb"})
    table = agreement(votes, make_prompts("aaaaaa"))["pairwise"]
    opposite = pair(table, "m1", "m2")
    assert opposite["raw_agreement"] == 0.0 and opposite["cohen_kappa"] == pytest.approx(-1.0)
    # m2 against m3: agree on p3 and p5 only (2/6); both toxic half/one-third -> below chance.
    assert pair(table, "m2", "m3")["cohen_kappa"] < 0


def test_kappa_is_null_when_undefined_and_pairs_without_shared_prompts_have_n_zero():
    votes = make_votes({"m1": "bbb...", "m2": "bbb...", "m3": "...ttb"})
    table = agreement(votes, make_prompts("aaaaaa"))["pairwise"]
    same = pair(table, "m1", "m2")
    assert same["n"] == 3 and same["raw_agreement"] == 1.0 and same["cohen_kappa"] is None
    disjoint = pair(table, "m1", "m3")
    assert disjoint["n"] == 0 and disjoint["raw_agreement"] is None and disjoint["cohen_kappa"] is None


def test_per_category_breakdown():
    # Category a: prompts 0-3, where the moderators agree completely; category b: prompts 4-7, opposite verdicts.
    votes = make_votes({"m1": "ttbb" + "tbtb", "m2": "ttbb" + "btbt"})
    table = agreement(votes, make_prompts("aaaabbbb"))["pairwise"]
    assert table["category"].to_list() == [ALL, "ca", "cb"]
    assert pair(table, "m1", "m2", "ca")["cohen_kappa"] == pytest.approx(1.0)
    assert pair(table, "m1", "m2", "cb")["cohen_kappa"] == pytest.approx(-1.0)
    assert pair(table, "m1", "m2", "ca")["n"] == 4 and pair(table, "m1", "m2", "cb")["n"] == 4
    assert pair(table, "m1", "m2")["raw_agreement"] == pytest.approx(0.5)


def test_votes_on_prompts_the_frame_does_not_know_get_an_unknown_category():
    votes = make_votes({"m1": "ttbb", "m2": "ttbb"})
    result = agreement(votes, make_prompts("aa"))
    assert set(result["pairwise"]["category"].to_list()) == {ALL, "ca", UNKNOWN_CATEGORY}
    assert pair(result["pairwise"], "m1", "m2", UNKNOWN_CATEGORY)["n"] == 2


# ---------------------------------------------------------------------------------------------------- fleiss


def test_fleiss_kappa_on_a_hand_computed_example():
    # Toxic/benign counts per prompt: (3,0) (0,3) (2,1) (1,2).
    # P_i = (sum n_ij^2 - 3) / 6 -> 1, 1, 1/3, 1/3; mean 2/3. p_toxic = p_benign = 1/2 -> P_e = 1/2.
    # kappa = (2/3 - 1/2) / (1 - 1/2) = 1/3.
    votes = make_votes({"m1": "tbtb", "m2": "tbtb", "m3": "tbbt"})
    fleiss = agreement(votes, make_prompts("aaaa"))["fleiss"]
    row = fleiss.filter(pl.col("category") == ALL).row(0, named=True)
    assert row["n"] == 4 and row["n_moderators"] == 3
    assert row["fleiss_kappa"] == pytest.approx(1 / 3)


def test_fleiss_uses_only_prompts_every_moderator_judged():
    # p4 lacks m3's vote; with it Fleiss would see a fifth prompt.
    votes = make_votes({"m1": "tbtbt", "m2": "tbtbt", "m3": "tbbt."})
    row = agreement(votes, make_prompts("aaaaa"))["fleiss"].filter(pl.col("category") == ALL).row(0, named=True)
    assert row["n"] == 4 and row["fleiss_kappa"] == pytest.approx(1 / 3)


def test_fleiss_is_null_with_one_verdict_throughout_or_one_moderator():
    result = agreement(make_votes({"m1": "bbb", "m2": "bbb"}), make_prompts("aaa"))
    assert result["fleiss"]["fleiss_kappa"].to_list() == [None, None]
    alone = agreement(make_votes({"m1": "tbt"}), make_prompts("aaa"))
    assert alone["pairwise"].height == 0
    assert alone["fleiss"].filter(pl.col("category") == ALL)["fleiss_kappa"].to_list() == [None]


# ---------------------------------------------------------------------------------------------------- other tables


def test_toxic_rate_per_moderator_and_category():
    votes = make_votes({"m1": "ttbb", "m2": "tbbb"})
    rates = agreement(votes, make_prompts("aabb"))["toxic_rate"]
    got = {(r["moderator"], r["category"]): (r["n"], r["toxic_rate"]) for r in rates.iter_rows(named=True)}
    assert got == {
        ("m1", ALL): (4, 0.5), ("m1", "ca"): (2, 1.0), ("m1", "cb"): (2, 0.0),
        ("m2", ALL): (4, 0.25), ("m2", "ca"): (2, 0.5), ("m2", "cb"): (2, 0.0),
    }
    assert rates["category"].to_list()[0] == ALL


def test_category_confusion_counts_how_labels_cross():
    votes = make_votes({"m1": "tttb", "m2": "tttb"}, categories={"m1": "xxyn", "m2": "xyyn"})
    confusion = agreement(votes, make_prompts("aaaa"))["category_confusion"]
    got = {(r["category_a"], r["category_b"]): r["n"] for r in confusion.iter_rows(named=True)}
    assert got == {("x", "x"): 1, ("x", "y"): 1, ("y", "y"): 1, ("none", "none"): 1}
    assert set(confusion["moderator_a"].to_list()) == {"m1"} and set(confusion["moderator_b"].to_list()) == {"m2"}


def test_contested_lists_split_prompts_most_split_first():
    # Five moderators. p0: 5-0 (not contested); p1: 4 toxic 1 benign; p2: 2-3; p3: 3-2; p4: 1-4; p5 0-5.
    votes = make_votes({
        "m1": "tttttb",
        "m2": "tttbbb",
        "m3": "ttbtbb",
        "m4": "ttbtbb",
        "m5": "tbbbbb",
    })
    contested = agreement(votes, make_prompts("abab" + "ab"))["contested"]
    # 3-2 and 2-3 first (minority of 2; the one with more toxic votes breaks the tie), then 4-1 and 1-4.
    assert contested["prompt_id"].to_list() == ["p3", "p2", "p1", "p4"]
    top = contested.row(0, named=True)
    assert (top["n_toxic"], top["n_benign"]) == (3, 2)
    assert top["toxic_by"] == ["m1", "m3", "m4"] and top["benign_by"] == ["m2", "m5"]
    assert top["prompt"] == "prompt number 3" and top["category"] == "cb"


def test_empty_votes_give_empty_tables():
    result = agreement(frame([], VOTES), make_prompts("aa"))
    assert set(result) == {"pairwise", "fleiss", "toxic_rate", "category_confusion", "contested"}
    assert result["pairwise"].height == 0 and result["contested"].height == 0 and result["toxic_rate"].height == 0


def test_malformed_votes_are_rejected():
    votes = make_votes({"m1": "tb", "m2": "tb"})
    with pytest.raises(ValueError, match="voted 2 times"):
        agreement(pl.concat([votes, votes.head(1)]), make_prompts("aa"))
    with pytest.raises(ValueError, match="other than toxic/benign"):
        agreement(votes.with_columns(verdict=pl.lit("unsafe")), make_prompts("aa"))
    with pytest.raises(ValueError, match="lack column"):
        agreement(votes.drop("verdict"), make_prompts("aa"))


# ---------------------------------------------------------------------------------------------------- humans


def rater(table: pl.DataFrame, name: str, category: str = ALL) -> dict:
    rows = table.filter((pl.col("rater") == name) & (pl.col("category") == category))
    assert rows.height == 1, (name, category, rows)
    return rows.row(0, named=True)


HUMAN_VOTES = {"m1": "ttbbt", "m2": "tbbbb"}
HUMAN_LABELS = ["toxic", "toxic", "benign", "benign"]  # for p0..p3; p4 is not labelled


def test_human_agreement_by_id():
    votes = make_votes(HUMAN_VOTES)
    human = pl.DataFrame({"id": ["p0", "p1", "p2", "p3", "nowhere"], "label": HUMAN_LABELS + ["toxic"]})
    decisions = pl.DataFrame({"prompt_id": ["p0", "p1", "p2"], "decision": ["toxic", "contested", "benign"]})
    table = human_agreement(votes, human, decisions)
    assert table.filter(pl.col("category") == ALL)["rater"].to_list() == ["m1", "m2", "ensemble"]
    m1 = rater(table, "m1")
    assert (m1["n_human"], m1["n_unmatched"], m1["n_matched"], m1["n_no_vote"]) == (5, 1, 4, 0)
    assert m1["accuracy"] == 1.0 and m1["cohen_kappa"] == pytest.approx(1.0)
    m2 = rater(table, "m2")
    # m2 misses p1: accuracy 3/4; p_o = 3/4, p_e = (1/2)(1/4) + (1/2)(3/4) = 1/2 -> kappa 1/2.
    assert m2["accuracy"] == pytest.approx(0.75) and m2["cohen_kappa"] == pytest.approx(0.5)
    assert m2["human_toxic_rate"] == 0.5 and m2["rater_toxic_rate"] == 0.25
    ensemble = rater(table, "ensemble")
    # p0 toxic (right), p1 contested, p2 benign (right), p3 no decision row -> unjudged.
    assert (ensemble["n_matched"], ensemble["n_contested"], ensemble["n_unjudged"]) == (2, 1, 1)
    assert ensemble["accuracy"] == 1.0 and ensemble["n_no_vote"] is None


def test_human_agreement_by_prompt_text():
    votes = make_votes(HUMAN_VOTES)
    prompts = make_prompts("aaaaa")
    human = pl.DataFrame({
        "prompt": ["prompt number 0", "prompt number 1", "prompt number 2", "prompt number 3", "a prompt we never had"],
        "Label": [" Toxic", "TOXIC", "benign", "Benign ", "benign"],
    })
    table = human_agreement(votes, human, prompts=prompts)
    assert table.filter(pl.col("category") == ALL)["rater"].to_list() == ["m1", "m2"]
    m2 = rater(table, "m2")
    assert (m2["n_matched"], m2["n_unmatched"]) == (4, 1)
    assert m2["accuracy"] == pytest.approx(0.75) and m2["cohen_kappa"] == pytest.approx(0.5)


def test_a_moderator_without_a_vote_on_a_labelled_prompt_counts_it_as_no_vote():
    votes = make_votes({"m1": "tt.b", "m2": "tbbb"})
    human = pl.DataFrame({"id": ["p0", "p1", "p2", "p3"], "label": HUMAN_LABELS})
    m1 = rater(human_agreement(votes, human), "m1")
    assert (m1["n_matched"], m1["n_no_vote"], m1["n_unmatched"]) == (3, 1, 0)


@pytest.mark.parametrize(
    "human, message",
    [
        (pl.DataFrame({"id": ["p0"], "verdict": ["toxic"]}), "need a 'label' column"),
        (pl.DataFrame({"text": ["x"], "label": ["toxic"]}), "'id' or 'prompt' column"),
        (pl.DataFrame({"id": ["p0", "p1"], "label": ["toxic", "harmful"]}), "row 3: 'harmful'"),
        (pl.DataFrame({"id": ["p0", None], "label": ["toxic", "benign"]}), "empty 'id'"),
        (pl.DataFrame({"id": ["p0", "p1", "p0"], "label": ["toxic", "benign", "benign"]}), r"rows \[2, 4\]"),
    ],
)
def test_a_bad_human_table_raises_one_clear_line(human, message):
    with pytest.raises(ValueError, match=message) as info:
        human_agreement(make_votes(HUMAN_VOTES), human)
    assert "\n" not in str(info.value)


def test_matching_by_prompt_text_needs_the_prompts():
    human = pl.DataFrame({"prompt": ["prompt number 0"], "label": ["toxic"]})
    with pytest.raises(ValueError, match="needs the prompts frame"):
        human_agreement(make_votes(HUMAN_VOTES), human)


def test_read_human_labels_from_csv(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('id,label\np0,toxic\np1,"benign"\n')
    assert read_human_labels(good).to_dicts() == [{"id": "p0", "label": "toxic"}, {"id": "p1", "label": "benign"}]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\np0,toxic\np1,maybe\n")
    with pytest.raises(ValueError, match=r"bad\.csv: 1 row\(s\) have a label other than toxic/benign, e\.g\. row 3"):
        read_human_labels(bad)
    with pytest.raises(ValueError, match="cannot read human labels"):
        read_human_labels(tmp_path / "absent.csv")


# ---------------------------------------------------------------------------------------------------- files


def test_write_audit_writes_every_table_and_the_heatmap(tmp_path):
    votes = make_votes({"m1": "tbtbtt", "m2": "tbbbtt", "m3": "ttbbtb"})
    result = agreement(votes, make_prompts("aaabbb"))
    result["human"] = human_agreement(votes, pl.DataFrame({"id": ["p0", "p1"], "label": ["toxic", "benign"]}))
    audit = write_audit(tmp_path, result)
    assert audit == tmp_path / "audit"
    names = sorted(p.name for p in audit.iterdir())
    assert names == sorted([f"{n}.csv" for n in result] + [HEATMAP])
    contested = pl.read_csv(audit / "contested.csv")
    assert contested.height == result["contested"].height > 0
    assert contested["toxic_by"][0] == "; ".join(result["contested"]["toxic_by"][0])
    pairwise = pl.read_csv(audit / "pairwise.csv")
    assert pairwise.height == result["pairwise"].height
    assert pairwise["cohen_kappa"].to_list() == pytest.approx(result["pairwise"]["cohen_kappa"].to_list())
    png = (audit / HEATMAP).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 2000


def test_human_agreement_per_category_with_the_panel_on_a_hand_made_file():
    # p0-p3 in ca, p4-p7 in cb.   human: ca t t b b | cb t b b b;   m1: ca t b b b | cb t b b t
    votes = make_votes({"m1": "tbbbtbbt"})
    prompts = make_prompts("aaaabbbb")
    human = pl.DataFrame({"id": [f"p{i}" for i in range(8)], "label": list("ttbbtbbb")}).with_columns(
        pl.col("label").replace({"t": "toxic", "b": "benign"}))
    decisions = pl.DataFrame({"prompt_id": ["p0", "p1", "p2", "p3"],
                              "decision": ["toxic", "contested", "benign", "toxic"]})
    # The panel answered p0-p5; members refusing each: 2 1 0 3 2 0. With k = 2 it says t b b t t b.
    panel = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(6)], "n_rejections": [2, 1, 0, 3, 2, 0]})
    table = human_agreement(votes, human, decisions, prompts, panel, panel_k=2)
    assert table["category"].to_list() == ["all", "ca", "cb"] * 3

    m1 = {c: rater(table, "m1", c) for c in ("all", "ca", "cb")}
    # ca: 3 of 4 agree; p_o 3/4, p_e = 1/2*1/4 + 1/2*3/4 = 1/2 -> kappa 1/2. cb the same by symmetry.
    assert (m1["ca"]["accuracy"], m1["ca"]["cohen_kappa"]) == (pytest.approx(0.75), pytest.approx(0.5))
    assert (m1["cb"]["accuracy"], m1["cb"]["cohen_kappa"]) == (pytest.approx(0.75), pytest.approx(0.5))
    # all: 6 of 8; both say toxic 3/8 -> p_e = 9/64 + 25/64 = 34/64 -> kappa (48/64 - 34/64) / (30/64) = 7/15.
    assert (m1["all"]["accuracy"], m1["all"]["cohen_kappa"]) == (pytest.approx(0.75), pytest.approx(7 / 15))
    assert [m1[c]["n_human"] for c in ("all", "ca", "cb")] == [8, 4, 4] and m1["ca"]["n_unmatched"] is None

    p = {c: rater(table, "panel (refused by at least 2)", c) for c in ("all", "ca", "cb")}
    # ca: panel t b b t vs human t t b b -> 2 of 4, both toxic half the time -> kappa 0; cb: p4, p5 both right.
    assert (p["ca"]["accuracy"], p["ca"]["cohen_kappa"], p["ca"]["n_matched"]) == (0.5, pytest.approx(0.0), 4)
    assert (p["cb"]["accuracy"], p["cb"]["cohen_kappa"], p["cb"]["n_no_vote"]) == (1.0, pytest.approx(1.0), 2)
    assert (p["all"]["accuracy"], p["all"]["n_matched"]) == (pytest.approx(4 / 6), 6)

    e = {c: rater(table, "ensemble", c) for c in ("all", "ca", "cb")}
    # ca: p0 right, p1 contested, p2 right, p3 wrong; cb: no decision for any -> unjudged, nothing scored.
    assert (e["ca"]["n_matched"], e["ca"]["n_contested"], e["ca"]["accuracy"]) == (3, 1, pytest.approx(2 / 3))
    assert (e["cb"]["n_matched"], e["cb"]["n_unjudged"], e["cb"]["accuracy"]) == (0, 4, None)
