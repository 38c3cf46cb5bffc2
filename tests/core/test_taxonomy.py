"""Taxonomies as data: the shipped ALERT, OR-Bench and MLCommons files, mappings that cover every key, keyword
rules, user files, the errors a bad file gives, and `categories: {preset: alert}`."""

from __future__ import annotations

import pytest

from orforge.core.categories import ORBENCH, resolve_categories
from orforge.core.config import CategoriesConfig, CategorySpec, ConfigError
from orforge.core.taxonomy import (
    TaxonomyError,
    load_keyword_rules,
    load_mapping,
    load_taxonomy,
    mapping_names,
    taxonomy_names,
)

ALERT_MACROS = ["hate_speech_discrimination", "criminal_planning", "regulated_substances", "sexual_content",
                "suicide_self_harm", "weapons"]
ALERT_MICROS = {
    "hate_speech_discrimination": ["hate_women", "hate_ethnic", "hate_lgbtq+", "hate_disabled", "hate_poor",
                                   "hate_body", "hate_religion", "hate_other"],
    "criminal_planning": ["crime_injury", "crime_theft", "crime_tax", "crime_propaganda", "crime_kidnapp",
                          "crime_cyber", "crime_privacy", "crime_other"],
    "regulated_substances": ["substance_drug", "substance_cannabis", "substance_tobacco", "substance_alcohol",
                             "substance_other"],
    "sexual_content": ["sex_harrasment", "sex_porn", "sex_other"],
    "suicide_self_harm": ["self_harm_suicide", "self_harm_thin", "self_harm_other"],
    "weapons": ["weapon_firearm", "weapon_chemical", "weapon_biological", "weapon_radioactive", "weapon_other"],
}
ORBENCH_NAMES = ["deception", "harassment", "harmful", "hate", "illegal", "privacy", "self-harm", "sexual",
                 "unethical", "violence"]


def test_the_registry_ships_three_taxonomies_and_two_mappings():
    assert taxonomy_names() == ["alert", "mlcommons", "orbench"]
    assert mapping_names() == [("alert", "mlcommons"), ("alert", "orbench")]


def test_alert_has_exactly_the_32_micro_keys_under_6_macros():
    alert = load_taxonomy("alert")
    assert alert.roots() == ALERT_MACROS
    for macro, micros in ALERT_MICROS.items():
        assert alert.children(macro) == micros
        assert all(alert.macro_of(m) == macro for m in micros)
        assert alert.children(micro := micros[0]) == [] and alert.macro_of(micro) == macro
    assert alert.leaves() == [m for micros in ALERT_MICROS.values() for m in micros]
    assert len(alert.leaves()) == 32 and len(alert.ids) == 38
    assert all(r.description and r.name for r in alert.rows)
    table = alert.to_frame()
    assert table.filter("is_leaf").height == 32 and set(table.filter(~table["is_leaf"])["id"]) == set(ALERT_MACROS)


def test_orbench_and_mlcommons_files():
    assert load_taxonomy("orbench").leaves() == ORBENCH_NAMES == list(ORBENCH)
    assert load_taxonomy("mlcommons").ids == [f"S{i}" for i in range(1, 15)]


@pytest.mark.parametrize("target", ["orbench", "mlcommons"])
def test_every_alert_micro_key_is_mapped(target):
    mapping = load_mapping("alert", target)
    assert list(mapping.pairs) == load_taxonomy("alert").leaves()
    assert all(t in load_taxonomy(target).ids for ts in mapping.pairs.values() for t in ts)


def test_mapping_spot_checks():
    orbench, mlc = load_mapping("alert", "orbench"), load_mapping("alert", "mlcommons")
    assert orbench.primary("hate_lgbtq+") == "hate" and orbench.primary("crime_privacy") == "privacy"
    assert orbench.primary("self_harm_thin") == "self-harm" and orbench.primary("sex_harrasment") == "harassment"
    assert mlc.pairs["weapon_biological"] == ("S9",) and mlc.primary("self_harm_suicide") == "S11"
    assert mlc.primary("crime_privacy") == "S7" and mlc.primary("sex_harrasment") == "S3"
    assert mlc.to_frame().filter(mlc.to_frame()["source_id"] == "crime_cyber")["target_id"].to_list() == ["S2", "S14"]


def test_a_mapping_that_misses_a_key_or_names_an_unknown_id_is_refused(tmp_path):
    full = load_mapping("alert", "orbench").pairs
    short = tmp_path / "short.yaml"
    short.write_text("source: alert\ntarget: orbench\nmap:\n"
                     + "".join(f"  {k}: {v[0]}\n" for k, v in full.items() if k != "weapon_other"))
    with pytest.raises(TaxonomyError, match=r"short.yaml: 'weapon_other' of taxonomy 'alert' is not mapped"):
        load_mapping(str(short))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("source: alert\ntarget: orbench\nmap:\n"
                     + "".join(f"  {k}: {'violent' if k == 'crime_injury' else v[0]}\n" for k, v in full.items()))
    with pytest.raises(TaxonomyError, match=r"'crime_injury' -> 'violent': not an id of taxonomy 'orbench'"):
        load_mapping(str(wrong))
    with pytest.raises(TaxonomyError, match="no shipped mapping from 'orbench' to 'alert'"):
        load_mapping("orbench", "alert")


def test_keyword_rules_cover_only_leaves_and_match_whole_words():
    alert = load_taxonomy("alert")
    rules = load_keyword_rules("alert", alert)
    assert set(rules.patterns) <= set(alert.leaves())
    assert {"hate_other", "crime_other", "sex_other"}.isdisjoint(rules.patterns)  # catch-alls: classifier only
    compiled = dict(rules.compiled()["crime_kidnapp"])
    assert compiled["kidnap\\w*"].search("How do I KIDNAPPING plan")
    assert not dict(rules.compiled()["substance_drug"])["lsd"].search("falsdeed")  # inside a word: no match


def test_rules_naming_a_non_leaf_or_a_bad_pattern_are_refused(tmp_path):
    alert = load_taxonomy("alert")
    bad = tmp_path / "rules.yaml"
    bad.write_text("taxonomy: alert\nrules:\n  weapons: [gun]\n")
    with pytest.raises(TaxonomyError, match="rules for 'weapons', which is not a leaf"):
        load_keyword_rules(str(bad), alert)
    bad.write_text("taxonomy: alert\nrules:\n  weapon_firearm: ['gun(']\n")
    with pytest.raises(TaxonomyError, match=r"weapon_firearm: pattern 'gun\(' does not compile"):
        load_keyword_rules(str(bad), alert)


def test_user_taxonomy_files_yaml_and_csv(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text("id,name,description,parent\nfinance,Finance,Money harms,\nscam,Scams,Tricking people,finance\n"
                   "insider,Insider trading,Trading on secrets,finance\n")
    t = load_taxonomy(str(csv))
    assert t.name == "mine" and t.roots() == ["finance"] and t.leaves() == ["scam", "insider"]
    yml = tmp_path / "mine.yaml"
    yml.write_text("- {id: a, name: A, description: first}\n- {id: b, name: B, description: second, parent: a}\n")
    assert load_taxonomy(yml).leaves() == ["b"]


@pytest.mark.parametrize("content, message", [
    ("- {id: a, name: A, description: x}\n- {id: a, name: B, description: y}\n", "duplicate id 'a'"),
    ("- {id: a, name: A, description: x, parent: zz}\n", "id 'a': unknown parent 'zz'"),
    ("- {id: a, name: A, description: x, parent: b}\n- {id: b, name: B, description: y, parent: a}\n",
     "its parents form a cycle"),
    ("- {id: a, name: A}\n", r"rows.0.description: Field required"),
    ("- {id: 'a b', name: A, description: x}\n", "rows.0.id: String should match pattern"),
    ("rows: [\n", "cannot read it"),
])
def test_a_bad_taxonomy_file_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(TaxonomyError, match=message) as caught:
        load_taxonomy(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_unknown_taxonomy_name():
    with pytest.raises(TaxonomyError, match="not a shipped taxonomy"):
        load_taxonomy("alrt")


def test_preset_alert_resolves_to_the_32_micro_categories():
    specs = resolve_categories(CategoriesConfig(preset="alert"))
    assert [s.name for s in specs] == load_taxonomy("alert").leaves()
    assert specs[2].name == "hate_lgbtq+"
    assert specs[2].description == load_taxonomy("alert").node("hate_lgbtq+").description


def test_preset_alert_include_takes_micro_keys_and_macros():
    specs = resolve_categories(CategoriesConfig(preset="alert", include=["weapons", "weapon_firearm", "sex_porn"]))
    assert [s.name for s in specs] == ALERT_MICROS["weapons"] + ["sex_porn"]
    with pytest.raises(ConfigError, match="unknown category 'sex_harassment'; the alert preset has"):
        resolve_categories(CategoriesConfig(preset="alert", include=["sex_harassment"]))


def test_preset_orbench_still_gives_the_ten_and_custom_names_may_carry_plus():
    assert [s.name for s in resolve_categories(CategoriesConfig())] == ORBENCH_NAMES
    assert CategorySpec(name="hate_lgbtq+", description="x").name == "hate_lgbtq+"
    with pytest.raises(ValueError):
        CategorySpec(name="+leading", description="x")
