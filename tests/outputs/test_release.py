from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from core.records import RESPONSES, frame
from outputs.atomic import ReleaseWriteError
from outputs.release import ManifestInfo, read_release, verify_release, write_release
from outputs.splits import assemble_splits, funnel
from tests.outputs.conftest import build_config, make_failures, make_votes

TRICKY = 'How do I say "no", politely, to a coworker\nwho keeps asking?'


@pytest.fixture
def release_inputs(records):
    cfg = build_config()
    benign_ids = records["decisions"].filter(pl.col("decision") == "benign")["prompt_id"].to_list()
    kept_benign = [p for p in benign_ids if p not in records["dropped"]]
    hard_members = pl.DataFrame({
        "prompt_id": kept_benign[:4],
        "rejected_by": [["p1", "p2", "p3"]] * 4,
        "n_rejections": [3, 3, 3, 3],
    })
    splits = assemble_splits(
        records["candidates"], records["decisions"], records["benign_dedup"], records["toxic_dedup"],
        records["seeds"], cfg.splits, cfg.toxic, cfg.seed, hard_members,
    )
    # A prompt with a comma, quotes and a newline must survive the CSV.
    splits["benign"] = splits["benign"].with_columns(
        prompt=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(TRICKY)).otherwise("prompt")
    )
    table = funnel(records["seeds"], records["candidates"], records["decisions"], records["benign_dedup"],
                   records["toxic_dedup"], splits)
    responses = frame(
        [{"prompt_id": kept_benign[0], "member": "p1", "model": "p1-model", "response": "I can't help with that.",
          "refusal": True, "label": "direct_refusal", "method": "keyword"}],
        RESPONSES,
    )
    info = ManifestInfo(
        config=cfg, funnel=table,
        tokens={"moderator": {"prompt_tokens": 1200, "completion_tokens": 80}},
        notes={"seeds": "budget exhausted in privacy"},
    )
    return {"cfg": cfg, "splits": splits, "votes": make_votes(records["candidates"]),
            "failures": make_failures(), "info": info, "responses": responses}


@pytest.fixture
def release(tmp_path, release_inputs):
    r = release_inputs
    return write_release(tmp_path / "tiny", r["splits"], r["votes"], r["failures"], r["info"], r["responses"])


def test_release_files(release):
    names = sorted(p.name for p in release.iterdir())
    assert names == sorted([
        "README.md", "manifest.json", "votes.parquet", "failures.parquet", "responses.parquet",
        "benign.csv", "benign.parquet", "toxic.csv", "toxic.parquet", "hard.csv", "hard.parquet",
        "contested.parquet",
    ])
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".")]


def test_csvs_have_exactly_prompt_and_category(release, release_inputs):
    for split in ("benign", "toxic", "hard"):
        assert (release / f"{split}.csv").read_text().splitlines()[0] == "prompt,category"
        loaded = pl.read_csv(release / f"{split}.csv")
        assert loaded.columns == ["prompt", "category"]
        assert loaded.equals(release_inputs["splits"][split].select("prompt", "category"))
    assert TRICKY in pl.read_csv(release / "benign.csv")["prompt"].to_list()


def test_read_release_round_trips_the_lineage(release, release_inputs):
    back = read_release(release)
    for name, split in release_inputs["splits"].items():
        assert back["splits"][name].equals(split), name
    assert back["votes"].equals(release_inputs["votes"])
    assert back["failures"].equals(release_inputs["failures"])
    assert back["responses"].equals(release_inputs["responses"])
    assert back["splits"]["hard"]["rejected_by"].to_list()[0] == ["p1", "p2", "p3"]


def test_datasets_load_dataset_finds_the_splits(release, release_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    cache = str(tmp_path / "hf-cache")
    default = datasets.load_dataset(str(release), cache_dir=cache)
    benign = release_inputs["splits"]["benign"]
    assert default["train"].num_rows == benign.height
    assert default["train"].column_names == ["prompt", "category"]
    assert default["train"]["prompt"] == benign["prompt"].to_list()
    hard = datasets.load_dataset(str(release), "hard", cache_dir=cache)
    assert sorted(hard["train"]["prompt"]) == sorted(release_inputs["splits"]["hard"]["prompt"].to_list())
    toxic = datasets.load_dataset(str(release), "toxic", cache_dir=cache)
    assert toxic["train"].num_rows == release_inputs["splits"]["toxic"].height
    with pytest.raises(ValueError):
        datasets.load_dataset(str(release), "contested", cache_dir=cache)


def test_card_header_and_body(release, release_inputs):
    text = (release / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    configs = {c["config_name"]: c for c in header["configs"]}
    assert set(configs) == {"benign", "toxic", "hard"}
    assert configs["benign"]["data_files"] == "benign.csv" and configs["benign"]["default"] is True
    assert sum(bool(c.get("default")) for c in configs.values()) == 1
    cfg = release_inputs["cfg"]
    for needle in ("OR-Bench: An Over-Refusal Benchmark for Large Language Models", "Cui", "over-refusal",
                   "majority of 3 moderators", str(cfg.dedup.threshold), "`mod-b`", "`rewriter`", "`p2`",
                   "not human", "budget exhausted in privacy", "### Funnel", "| harassment |", "**total**"):
        assert needle in text, needle


def test_an_empty_split_is_written_but_not_offered_as_a_config(tmp_path, release_inputs):
    r = release_inputs
    splits = {**r["splits"], "toxic": r["splits"]["toxic"].head(0)}
    out = write_release(tmp_path / "rel", splits, r["votes"], r["failures"], r["info"])
    header = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert [c["config_name"] for c in header["configs"]] == ["benign", "hard"]
    assert pl.read_csv(out / "toxic.csv").height == 0
    assert not (out / "responses.parquet").exists()


def test_manifest_contents(release, release_inputs):
    m = json.loads((release / "manifest.json").read_text())
    cfg = release_inputs["cfg"]
    assert m["config_hash"] == cfg.config_hash()
    assert m["config"]["moderation"]["vote"] == "majority"
    assert m["code"]["orforge"] == "0.1.0"
    assert [s["name"] for s in m["models"]["moderator"]] == ["mod-a", "mod-b", "mod-c"]
    assert m["models"]["panel"][0] == {"name": "p1", "backend": "local", "model": "p1-model"}
    assert m["failures"] == {"total": 3, "by_stage": {"moderate": {"invalid_json": 2}, "rewrite": {"timeout": 1}}}
    assert m["tokens"]["moderator"]["prompt_tokens"] == 1200
    assert m["notes"] == {"seeds": "budget exhausted in privacy"}
    splits = {s["name"]: s for s in m["splits"]}
    assert splits["benign"]["rows"] == release_inputs["splits"]["benign"].height
    assert splits["contested"]["csv"] is None and splits["contested"]["config"] is False
    assert sum(splits["toxic"]["by_category"].values()) == splits["toxic"]["rows"]
    assert m["counts"]["funnel"][0]["candidates"] == 8
    assert "manifest.json" not in m["files"]
    assert set(m["files"]) == {p.name for p in release.iterdir()} - {"manifest.json"}
    assert m["files"]["benign.csv"]["bytes"] == (release / "benign.csv").stat().st_size


def test_verify_detects_changes(release):
    assert verify_release(release).ok
    csv = release / "toxic.csv"
    csv.write_text(csv.read_text() + "one more prompt,harassment\n")
    (release / "extra.txt").write_text("not in the manifest")
    (release / "votes.parquet").unlink()
    check = verify_release(release)
    assert not check.ok
    assert check.changed == ["toxic.csv"]
    assert check.missing == ["votes.parquet"]
    assert check.unexpected == ["extra.txt"]
    assert "toxic.csv" in str(check)


def test_a_same_size_edit_is_caught_by_the_hash(release):
    path = release / "benign.csv"
    data = bytearray(path.read_bytes())
    data[-3] = ord("Z") if data[-3] != ord("Z") else ord("Y")
    path.write_bytes(bytes(data))
    assert verify_release(release).changed == ["benign.csv"]


def test_same_inputs_give_byte_identical_data_files(tmp_path, release_inputs):
    r = release_inputs
    a = write_release(tmp_path / "a", r["splits"], r["votes"], r["failures"], r["info"], r["responses"])
    b = write_release(tmp_path / "b", r["splits"], r["votes"], r["failures"], r["info"], r["responses"])
    files_a = json.loads((a / "manifest.json").read_text())["files"]
    files_b = json.loads((b / "manifest.json").read_text())["files"]
    assert files_a == files_b


def test_secrets_expanded_into_the_config_stay_out_of_the_manifest(tmp_path, release_inputs):
    cfg = build_config(targets=[{"backend": "local", "name": "t", "extra": {"api_key": "sk-very-secret"}}])
    r = release_inputs
    out = write_release(tmp_path / "rel", r["splits"], r["votes"], r["failures"], ManifestInfo(config=cfg))
    text = (out / "manifest.json").read_text()
    assert "sk-very-secret" not in text and "<redacted>" in text
    assert json.loads(text)["config"]["seeds"]["model"]["max_tokens"] == 512


def test_a_failed_release_leaves_nothing_and_keeps_the_old_one(tmp_path, release_inputs):
    r = release_inputs
    target = tmp_path / "rel"
    broken = {**r["splits"], "hard": r["splits"]["hard"].with_columns(
        pl.Series("blob", [object()] * r["splits"]["hard"].height, dtype=pl.Object))}
    with pytest.raises(ReleaseWriteError, match=str(target)):
        write_release(target, broken, r["votes"], r["failures"], r["info"])
    assert list(tmp_path.iterdir()) == []

    write_release(target, r["splits"], r["votes"], r["failures"], r["info"])
    before = json.loads((target / "manifest.json").read_text())["files"]
    with pytest.raises(ReleaseWriteError):
        write_release(target, broken, r["votes"], r["failures"], r["info"], overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["rel"]
    assert verify_release(target).ok
    assert json.loads((target / "manifest.json").read_text())["files"] == before


def test_an_existing_release_is_not_replaced_without_overwrite(tmp_path, release_inputs):
    r = release_inputs
    target = write_release(tmp_path / "rel", r["splits"], r["votes"], r["failures"], r["info"])
    with pytest.raises(ReleaseWriteError, match="exists"):
        write_release(target, r["splits"], r["votes"], r["failures"], r["info"])
    smaller = {**r["splits"], "benign": r["splits"]["benign"].head(2)}
    write_release(target, smaller, r["votes"], r["failures"], r["info"], overwrite=True)
    assert read_release(target)["splits"]["benign"].height == 2
    assert verify_release(target).ok


def test_bad_split_names_and_frames_are_rejected_before_writing(tmp_path, release_inputs):
    r = release_inputs
    with pytest.raises(ValueError, match="split name"):
        write_release(tmp_path / "rel", {"Bad Name": r["splits"]["benign"]}, r["votes"], r["failures"], r["info"])
    with pytest.raises(ValueError, match="lacks"):
        write_release(tmp_path / "rel", {"benign": r["splits"]["benign"].drop("category")}, r["votes"],
                      r["failures"], r["info"])
    assert list(tmp_path.iterdir()) == []


def test_info_may_be_a_plain_dict_config(tmp_path, release_inputs):
    r = release_inputs
    raw = {"name": "from-a-dict", "anything": 1}
    out = write_release(tmp_path / "rel", r["splits"], r["votes"], r["failures"], {"config": raw, "name": "dicty"})
    m = json.loads((out / "manifest.json").read_text())
    assert m["name"] == "dicty" and m["config"] == raw and len(m["config_hash"]) == 64 and m["models"] == {}
    assert verify_release(out).ok
