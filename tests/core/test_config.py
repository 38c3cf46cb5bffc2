"""Config loading: every mistake is one line naming the file and the field; anchors and ${VAR} work."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from orforge.core.config import BuildConfig, ConfigError, ModelSpec, load_config, parse_config

MINIMAL = """\
seeds:
  model: {backend: openai, base_url: "http://127.0.0.1:9/v1", model: writer}
rewrites:
  model: {backend: local}
moderation:
  moderators:
    - {backend: local, name: mod-a}
"""


def write(tmp_path, text: str, name: str = "build.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(str(path)), message
    return message


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, BuildConfig)
    assert cfg.seeds.model.model == "writer" and cfg.seeds.model.dialect == "json_schema"
    assert cfg.rewrites.model.dialect == "json_object"  # the local backend's default
    assert [m.label for m in cfg.moderation.moderators] == ["mod-a"]
    assert cfg.moderation.vote == "majority"
    assert [role for role, _ in cfg.all_specs()] == ["seeds", "rewrites", "moderator"]


@pytest.mark.parametrize(
    ("extra_yaml", "field"),
    [
        ("seedz: {}\n", "seedz"),
        ("dedup: {treshold: 0.8}\n", "dedup.treshold"),
        ("splits: {hard_size: 10, hard_min_rejection: 2}\n", "splits.hard_min_rejection"),
    ],
)
def test_unknown_keys_are_errors_naming_the_field(tmp_path, extra_yaml, field):
    message = config_error(write(tmp_path, MINIMAL + extra_yaml))
    assert f"{field}: Extra inputs are not permitted" in message


def test_typo_inside_a_model_spec_names_the_list_position(tmp_path):
    text = MINIMAL.replace("{backend: local, name: mod-a}", "{backend: local, name: mod-a, temprature: 0.2}")
    message = config_error(write(tmp_path, text))
    assert "moderation.moderators.0.temprature" in message


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("model: writer}", "model: writer, max_concurrency: many}", "seeds.model.max_concurrency"),
        ("model: writer}", "model: writer, max_concurrency: 0}", "seeds.model.max_concurrency"),
        ("model: writer}", "model: writer, temperature: [0.1]}", "seeds.model.temperature"),
        ("moderators:\n", "vote: sometimes\n  moderators:\n", "moderation.vote"),
        ("rewrites:\n", "seed: zero\nrewrites:\n", "seed"),
    ],
)
def test_wrong_types_are_errors_naming_the_field(tmp_path, old, new, field):
    assert old in MINIMAL
    message = config_error(write(tmp_path, MINIMAL.replace(old, new, 1)))
    assert f": {field}: " in message


def test_unknown_backend_names_the_field(tmp_path):
    message = config_error(write(tmp_path, MINIMAL.replace("backend: local}", "backend: ollama}")))
    assert "rewrites.model.backend" in message and "'openai', 'local' or 'vllm'" in message


def test_openai_backend_without_base_url_names_the_spec(tmp_path):
    message = config_error(write(tmp_path, MINIMAL.replace(', base_url: "http://127.0.0.1:9/v1"', "")))
    assert "seeds.model" in message and "base_url" in message


def test_env_var_in_base_url_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("ORFORGE_TEST_HOST", "10.1.2.3:8001")
    cfg = load_config(write(tmp_path, MINIMAL.replace("127.0.0.1:9", "${ORFORGE_TEST_HOST}")))
    assert cfg.seeds.model.base_url == "http://10.1.2.3:8001/v1"


def test_unset_env_var_in_base_url_names_the_field_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("ORFORGE_TEST_UNSET_HOST", raising=False)
    message = config_error(write(tmp_path, MINIMAL.replace("127.0.0.1:9", "${ORFORGE_TEST_UNSET_HOST}")))
    assert "seeds.model.base_url" in message and "ORFORGE_TEST_UNSET_HOST" in message


def test_api_key_env_naming_an_unset_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ORFORGE_TEST_MISSING_KEY", raising=False)
    text = MINIMAL.replace("model: writer}", "model: writer, api_key_env: ORFORGE_TEST_MISSING_KEY}")
    path = write(tmp_path, text)
    message = config_error(path)
    assert "seeds" in message and "'writer'" in message and "ORFORGE_TEST_MISSING_KEY" in message

    monkeypatch.setenv("ORFORGE_TEST_MISSING_KEY", "sk-abc")
    cfg = load_config(path)
    assert cfg.seeds.model.api_key() == "sk-abc"
    assert "sk-abc" not in cfg.model_dump_json()  # the key is read at call time, never stored


def test_yaml_anchors_under_x_keys_are_reused_and_not_config(tmp_path):
    path = write(tmp_path, """\
        x-local: &local {backend: local, max_concurrency: 2, temperature: 0.0}
        x-remote: &remote
          backend: openai
          base_url: http://127.0.0.1:9/v1
          model: big-model
        seeds:
          model: *remote
        rewrites:
          model: {<<: *remote, temperature: 0.9}
        moderation:
          moderators:
            - {<<: *local, name: small-a}
            - {<<: *local, name: small-b, max_concurrency: 4}
            - *remote
    """)
    cfg = load_config(path)
    mods = cfg.moderation.moderators
    assert [m.label for m in mods] == ["small-a", "small-b", "big-model"]
    assert [m.max_concurrency for m in mods] == [2, 4, 8]
    assert (cfg.rewrites.model.model, cfg.rewrites.model.temperature) == ("big-model", 0.9)
    # seeds default to temperature 1.0 (sampled) when the spec does not say
    assert cfg.seeds.model == ModelSpec(backend="openai", base_url="http://127.0.0.1:9/v1", model="big-model",
                                        temperature=1.0)


def test_duplicate_moderator_names_are_an_error(tmp_path):
    text = MINIMAL + "    - {backend: local, name: mod-a, temperature: 0.5}\n"
    message = config_error(write(tmp_path, text))
    assert "moderation" in message and "unique" in message


def test_missing_required_section(tmp_path):
    message = config_error(write(tmp_path, MINIMAL.split("moderation:")[0]))
    assert "moderation: Field required" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("seeds: [unclosed\n", "invalid YAML"), ("- just\n- a list\n", "must be a YAML mapping")],
)
def test_unreadable_files(tmp_path, text, expected):
    assert expected in config_error(write(tmp_path, text))


def test_missing_file(tmp_path):
    assert "no such config file" in config_error(tmp_path / "nope.yaml")


def test_parse_config_names_the_given_source():
    with pytest.raises(ConfigError, match=r"^inline-test: rewrites.model: Field required"):
        parse_config({"rewrites": {}, "moderation": {}}, "inline-test")


def test_a_build_needs_generated_seeds_or_a_seed_file(tmp_path):
    cfg = {k: v for k, v in yaml.safe_load(open("configs/demo.yaml")).items() if not k.startswith("x-")}
    cfg.pop("seeds")
    assert parse_config(cfg, "file-only").seeds is None
    cfg.pop("seed_file")
    with pytest.raises(ConfigError, match="give a `seeds` section .*, a `seed_file`, or both"):
        parse_config(cfg, "neither")
