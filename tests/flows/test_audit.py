"""`orforge audit` on a built release: agreement files, human labels, the report, and bad input."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from orforge.flows.cli import app
from tests.flows.pipeline import pipeline_responder, write_config

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_audit_writes_agreement_and_human_accuracy(prefect_harness, fake_server, tmp_path):
    from orforge.flows.build import build_flow

    fake_server.responder = pipeline_responder
    release = tmp_path / "release"
    build_flow(config_path=str(write_config(tmp_path, fake_server.url + "/v1")), output=str(release))

    candidates = pl.read_parquet(release / "candidates.parquet")
    # A "human" who agrees with the ensemble wherever it decided, and calls every contested prompt toxic.
    human = candidates.select(pl.col("prompt_id").alias("id"),
                              pl.when(pl.col("decision") == "benign").then(pl.lit("benign"))
                              .otherwise(pl.lit("toxic")).alias("label"))
    human.write_csv(tmp_path / "human.csv")

    result = runner.invoke(app, ["audit", "--release", str(release), "--human", str(tmp_path / "human.csv")])
    assert result.exit_code == 0, result.output
    audit = release / "audit"
    pairwise = pl.read_csv(audit / "pairwise.csv")
    assert pairwise.filter(pl.col("category") == "all").height == 3  # 3 moderators -> 3 pairs
    # The scripted moderators disagree on some prompts, so agreement is high but not perfect.
    raw = pairwise.filter(pl.col("category") == "all")["raw_agreement"]
    assert (raw < 1).all() and (raw > 0.5).all()
    assert pl.read_csv(audit / "contested.csv").height > 0
    scores = pl.read_csv(audit / "human.csv")
    ensemble = scores.filter(pl.col("rater") == "ensemble").row(0, named=True)
    assert ensemble["accuracy"] == 1.0 and ensemble["n_matched"] > 0
    report = (release / "report.html").read_text()
    assert "Cohen" in report and "audit" in report

    bad = tmp_path / "bad.csv"
    bad.write_text("id,verdict\nx,toxic\n")
    result = runner.invoke(app, ["audit", "--release", str(release), "--human", str(bad)])
    assert result.exit_code == 2 and "label" in result.output
    assert runner.invoke(app, ["audit", "--release", str(tmp_path)]).exit_code == 2


# ---------------------------------------------------------------------------------------------------- human audit

MODERATORS = ("mod-0", "mod-1", "mod-2")


@pytest.fixture(scope="module")
def built_release(prefect_harness, tmp_path_factory):
    """One loopback build shared by the audit-sample tests; tests that write into a release copy it first."""
    from orforge.flows.build import build_flow
    from tests.fakeserver import FakeServer

    tmp = tmp_path_factory.mktemp("audit-release")
    with FakeServer() as server:
        server.responder = pipeline_responder
        release = tmp / "release"
        build_flow(config_path=str(write_config(tmp, server.url + "/v1")), output=str(release))
    return release


def copy_release(release, tmp_path):
    import shutil

    return shutil.copytree(release, tmp_path / "release")


def files_and_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def draw(release, out, *extra):
    return runner.invoke(app, ["audit", "sample", "--release", str(release), "--out", str(out), *map(str, extra)])


def test_audit_sample_is_blinded_stratified_deterministic_and_its_key_is_complete(built_release, tmp_path):
    from orforge.outputs.audit import KEY_FILE, LABEL_COLUMN, SAMPLE_FILE
    from orforge.outputs.splits import proportional_quotas

    result = draw(built_release, tmp_path / "a", "--n", 25, "--stratify", "category,decision", "--seed", 3)
    assert result.exit_code == 0, result.output
    sample = pl.read_csv(tmp_path / "a" / SAMPLE_FILE, infer_schema=False)
    key = pl.read_csv(tmp_path / "a" / KEY_FILE, infer_schema_length=None)

    # Blinded: what people see is the item, the prompt and empty answer columns; nothing a model said.
    assert sample.columns == ["item_id", "prompt", LABEL_COLUMN, "comment"]
    assert sample[LABEL_COLUMN].null_count() == sample["comment"].null_count() == 25
    text = (tmp_path / "a" / SAMPLE_FILE).read_text()
    for leaked in (*MODERATORS, "member-", "decision", "vote", "contested", "fake-model"):
        assert leaked not in text
    assert sample["item_id"].to_list() == [f"item-{i:03d}" for i in range(1, 26)]

    # Stratified: proportional to the strata of every judged candidate, at least one from each.
    candidates = pl.read_parquet(built_release / "candidates.parquet")
    strata = candidates.group_by("category", "decision").len()
    counts = {f"{c} / {d}": n for c, d, n in strata.iter_rows()}
    drawn = {f"{c} / {d}": n for c, d, n in key.group_by("category", "decision").len().iter_rows()}
    assert len(counts) >= 4 and drawn == {s: q for s, q in proportional_quotas(counts, 25).items() if q}
    assert set(drawn) == set(counts) and min(drawn.values()) >= 1
    assert key.height == 25 and key["prompt_id"].n_unique() == 25

    # The key maps every item back to the release: its decision, splits, each moderator's vote, the panel.
    assert key["item_id"].to_list() == sample["item_id"].to_list()
    assert key.columns[:6] == ["item_id", "prompt_id", "prompt", "category", "decision", "split"]
    assert {f"vote_{m}" for m in MODERATORS} | {"panel_n_refusals", "panel_refused_by"} <= set(key.columns)
    joined = key.join(candidates.select("prompt_id", "prompt", "category", "decision"), on="prompt_id", suffix="_r")
    assert joined.height == 25
    for column in ("prompt", "category", "decision"):
        assert joined[column].to_list() == joined[f"{column}_r"].to_list()
    votes = pl.read_parquet(built_release / "votes.parquet")
    for moderator in MODERATORS:
        mine = dict(votes.filter(pl.col("moderator") == moderator).select("prompt_id", "verdict").iter_rows())
        assert key[f"vote_{moderator}"].to_list() == [mine.get(p) for p in key["prompt_id"]]
    splits = {s: set(pl.read_parquet(built_release / f"{s}.parquet")["prompt_id"]) for s in ("benign", "toxic", "hard")}
    for row in key.iter_rows(named=True):
        held = [s for s in ("benign", "toxic", "hard") if row["prompt_id"] in splits[s]]
        assert row["split"] == (", ".join(held) or "none")
    responses = pl.read_parquet(built_release / "responses.parquet")
    refusals = dict(responses.group_by("prompt_id").agg(pl.col("refusal").sum()).iter_rows())
    assert [refusals.get(p) for p in key["prompt_id"]] == key["panel_n_refusals"].to_list()
    assert key["panel_n_refusals"].null_count() < 25  # some sampled benign prompts went to the panel

    # Deterministic per seed; another seed draws another sample.
    assert draw(built_release, tmp_path / "b", "--n", 25, "--stratify", "category,decision", "--seed", 3).exit_code == 0
    assert files_and_bytes(tmp_path / "a") == files_and_bytes(tmp_path / "b")
    assert draw(built_release, tmp_path / "c", "--n", 25, "--stratify", "category,decision", "--seed", 4).exit_code == 0
    other = pl.read_csv(tmp_path / "c" / KEY_FILE)
    assert set(other["prompt_id"]) != set(key["prompt_id"])

    # Without strata: a simple random sample; the default folder sits in the release's audit/.
    release = copy_release(built_release, tmp_path)
    result = runner.invoke(app, ["audit", "sample", "--release", str(release), "--n", "10"])
    assert result.exit_code == 0, result.output
    assert pl.read_csv(release / "audit" / "human-sample-n10-seed0" / KEY_FILE).height == 10


@pytest.mark.parametrize("args, message", [
    (["--n", "100000"], "judged prompts to sample from"),
    (["--n", "2", "--stratify", "category,decision"], "one per stratum"),
    (["--stratify", "category,model"], "unknown column(s) ['model']"),
])
def test_audit_sample_bad_input_exits_2_and_writes_nothing(built_release, tmp_path, args, message):
    before = files_and_bytes(built_release)
    result = draw(built_release, tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists() and files_and_bytes(built_release) == before
    assert "Traceback" not in result.output


def test_audit_sample_refuses_an_existing_folder(built_release, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "audit_sample.csv").write_text("being labelled\n")
    result = draw(built_release, tmp_path / "out", "--n", 5)
    assert result.exit_code == 2 and "exists" in result.output
    assert (tmp_path / "out" / "audit_sample.csv").read_text() == "being labelled\n"


def label_sample(folder, label_of) -> None:
    """Fill the blinded sample like a person would: `label_of(key row)` per item, in the sample's own file."""
    from orforge.outputs.audit import KEY_FILE, LABEL_COLUMN, SAMPLE_FILE

    key = {r["item_id"]: r for r in pl.read_csv(folder / KEY_FILE, infer_schema_length=None).iter_rows(named=True)}
    sample = pl.read_csv(folder / SAMPLE_FILE, infer_schema=False)
    sample.with_columns(pl.Series(LABEL_COLUMN, [label_of(key[i]) for i in sample["item_id"]])).write_csv(
        folder / SAMPLE_FILE)


def test_human_labels_on_a_sample_score_moderators_ensemble_and_panel_per_category(built_release, tmp_path):
    from orforge.outputs.audit import SAMPLE_FILE
    from orforge.outputs.release import read_manifest, verify_release

    release = copy_release(built_release, tmp_path)
    folder = tmp_path / "sample"
    assert draw(release, folder, "--n", 30, "--stratify", "category", "--seed", 1).exit_code == 0
    # The "person" agrees with mod-0 everywhere (in any case and spacing).
    label_sample(folder, lambda row: f" {row['vote_mod-0'].upper()} ")
    result = runner.invoke(app, ["audit", "--release", str(release), "--human", str(folder / SAMPLE_FILE)])
    assert result.exit_code == 0, result.output

    key = pl.read_csv(folder / "audit_key.csv", infer_schema_length=None)
    human = pl.read_csv(release / "audit" / "human.csv", infer_schema_length=None)
    categories = sorted(set(key["category"]))
    assert len(categories) == 2
    for category in ["all", *categories]:
        part = key if category == "all" else key.filter(pl.col("category") == category)
        rows = {r["rater"]: r for r in human.filter(pl.col("category") == category).iter_rows(named=True)}
        assert set(rows) == {*MODERATORS, "ensemble", "panel (refused by at least 2)"}
        assert rows["mod-0"]["n_matched"] == part.height and rows["mod-0"]["accuracy"] == 1.0
        assert rows["mod-0"]["cohen_kappa"] == pytest.approx(1.0)
        for moderator in MODERATORS[1:]:
            same = (part[f"vote_{moderator}"] == part["vote_mod-0"]).mean()
            assert rows[moderator]["accuracy"] == pytest.approx(same)
        decided = part.filter(pl.col("decision").is_in(["toxic", "benign"]))
        assert rows["ensemble"]["n_matched"] == decided.height
        assert rows["ensemble"]["n_contested"] == part.filter(pl.col("decision") == "contested").height
        assert rows["ensemble"]["accuracy"] == pytest.approx((decided["decision"] == decided["vote_mod-0"]).mean())
        answered = part.filter(pl.col("panel_n_refusals").is_not_null())
        panel_says = pl.when(pl.col("panel_n_refusals") >= 2).then(pl.lit("toxic")).otherwise(pl.lit("benign"))
        panel = rows["panel (refused by at least 2)"]
        assert panel["n_matched"] == answered.height and panel["n_no_vote"] == part.height - answered.height
        if answered.height:
            expected = answered.select((panel_says == pl.col("vote_mod-0")).mean()).item()
            assert panel["accuracy"] == pytest.approx(expected)
    assert any(r["accuracy"] < 1 for r in human.iter_rows(named=True))  # the other raters are not all perfect

    # The card of the audited release quotes the overall figures and still matches its manifest.
    card = (release / "README.md").read_text()
    assert card.count("## Human audit") == 1 and "| mod-0 | 30 | 1.000 | 1.000 |" in card
    assert card.index("## Human audit") < card.index("## Intended use")
    assert verify_release(release).ok and read_manifest(release).files["README.md"].bytes == len(card.encode())
    assert "Agreement with human labels" in (release / "report.html").read_text()

    # Labels that change: the quote is replaced, not repeated.
    label_sample(folder, lambda row: "toxic")
    assert runner.invoke(app, ["audit", "--release", str(release), "--human", str(folder / SAMPLE_FILE)]).exit_code == 0
    card = (release / "README.md").read_text()
    assert card.count("## Human audit") == 1 and "| mod-0 | 30 | 1.000 |" not in card and verify_release(release).ok


@pytest.mark.parametrize("edit, message", [
    (lambda s, k: s.with_columns(pl.col("label (toxic or benign)").replace("toxic", "maybe")), "other than toxic"),
    (lambda s, k: s.with_columns(pl.when(pl.col("item_id") == "item-002").then(None)
                                 .otherwise(pl.col("label (toxic or benign)")).alias("label (toxic or benign)")),
     "have no label"),
    (lambda s, k: s.with_columns(pl.col("item_id").replace("item-003", "item-999")), "'item-999' (row 4) is not in"),
    (lambda s, k: s.with_columns(pl.when(pl.col("item_id") == "item-001").then(pl.lit("another prompt"))
                                 .otherwise(pl.col("prompt")).alias("prompt")), "differs from the key"),
    (lambda s, k: s.drop("item_id"), "need the columns item_id"),
    (lambda s, k: (k.unlink(), s)[1], "no such file"),
    (lambda s, k: (k.write_text(k.read_text().replace(pl.read_csv(k)["prompt_id"][0], "not-a-prompt")), s)[1],
     "not prompts of"),
])
def test_bad_human_labels_exit_2_and_write_nothing(built_release, tmp_path, edit, message):
    from orforge.outputs.audit import KEY_FILE, SAMPLE_FILE

    release = copy_release(built_release, tmp_path)
    folder = tmp_path / "sample"
    assert draw(release, folder, "--n", 8, "--seed", 2).exit_code == 0
    label_sample(folder, lambda row: row["vote_mod-1"])
    sample = pl.read_csv(folder / SAMPLE_FILE, infer_schema=False)
    edit(sample, folder / KEY_FILE).write_csv(folder / SAMPLE_FILE)
    before = files_and_bytes(release)
    result = runner.invoke(app, ["audit", "--release", str(release), "--human", str(folder / SAMPLE_FILE)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert files_and_bytes(release) == before


def test_audit_exit_2_without_a_release_or_with_a_missing_human_file(built_release, tmp_path):
    assert runner.invoke(app, ["audit"]).exit_code == 2
    result = runner.invoke(app, ["audit", "--release", str(built_release), "--human", str(tmp_path / "none.csv")])
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(app, ["audit", "--release", str(built_release), "--key", str(tmp_path / "k.csv")])
    assert result.exit_code == 2 and "--key goes with --human" in result.output
