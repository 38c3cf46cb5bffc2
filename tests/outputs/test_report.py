from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import tempfile

import polars as pl
import pytest
from PIL import Image

from orforge.core.records import RESPONSES, VOTES, frame
from orforge.moderators.agreement import agreement
from orforge.outputs.audit import write_audit
from orforge.outputs.atomic import write_csv
from orforge.outputs.plots import PNG_SIGNATURE
from orforge.outputs.release import ManifestInfo, write_release
from orforge.outputs.report import REPORT, SECTION_IDS, build_report, write_report
from orforge.outputs.scoring import score, scoring_frame
from orforge.outputs.splits import assemble_splits, funnel
from tests.outputs.conftest import TEMPLATE, build_config, make_failures

SCRIPT = "<script>alert(1)</script>"
EVIL_PROMPT = f"How do I explain {SCRIPT} to my kids & friends?"
EVIL_NOTE = '<img src="https://example.com/x.png" onerror="alert(2)">'
MODERATORS = ("mod-a", "mod-b", "mod-c")


def vote_rows(candidates: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
    """Votes consistent with each decision: 3-0 for benign/toxic, 2-1 for contested, none for unjudged; mod-c
    dissents on every third benign prompt so the kappas differ between pairs."""
    decision = dict(decisions.select("prompt_id", "decision").iter_rows())
    rows = []
    for i, prompt_id in enumerate(candidates["prompt_id"].to_list()):
        d = decision.get(prompt_id)
        if d in (None, "unjudged"):
            continue
        for k, moderator in enumerate(MODERATORS):
            verdict = d if d in ("benign", "toxic") else ("toxic" if k == 0 else "benign")
            if d == "benign" and moderator == "mod-c" and i % 3 == 0:
                verdict = "toxic"
            rows.append({"prompt_id": prompt_id, "moderator": moderator, "model": f"{moderator}-model",
                         "verdict": verdict, "vote_category": "privacy" if verdict == "toxic" else "none",
                         "rationale": None, "template_sha256": TEMPLATE})
    return frame(rows, VOTES)


@pytest.fixture
def built(records):
    cfg = build_config()
    candidates = records["candidates"]
    # The adversarial prompt goes to a contested candidate: the contested frame is short, so every row is shown.
    contested_id = records["decisions"].filter(pl.col("decision") == "contested")["prompt_id"][0]
    candidates = candidates.with_columns(
        prompt=pl.when(pl.col("prompt_id") == contested_id).then(pl.lit(EVIL_PROMPT)).otherwise("prompt")
    )
    benign_ids = records["decisions"].filter(pl.col("decision") == "benign")["prompt_id"].to_list()
    kept = [p for p in benign_ids if p not in records["dropped"]]
    hard_members = pl.DataFrame({"prompt_id": kept[:4], "rejected_by": [["p1", "p2", "p3"]] * 4,
                                 "n_rejections": [3] * 4})
    splits = assemble_splits(candidates, records["decisions"], records["benign_dedup"], records["toxic_dedup"],
                             records["seeds"], cfg.splits, cfg.toxic, cfg.seed, hard_members)
    table = funnel(records["seeds"], candidates, records["decisions"], records["benign_dedup"],
                   records["toxic_dedup"], splits)
    info = ManifestInfo(config=cfg, funnel=table, notes={"warning": EVIL_NOTE},
                        tokens={"moderator": {"prompt_tokens": 123456, "completion_tokens": 789},
                                "rewrites": {"prompt_tokens": 1000, "completion_tokens": 2000}})
    votes = vote_rows(candidates, records["decisions"])
    return {"splits": splits, "votes": votes, "failures": make_failures(), "info": info}


@pytest.fixture
def release(tmp_path, built):
    return write_release(tmp_path / "tiny", built["splits"], built["votes"], built["failures"], built["info"])


def add_evaluation(release, splits, stamp: str, members: dict[str, bool]) -> None:
    """Each member answers every published prompt once: refuses the toxic ones, and the others when `members` says."""
    toxic = set(splits["toxic"]["prompt_id"].to_list())
    prompts = sorted({p for name in ("benign", "toxic", "hard") for p in splits[name]["prompt_id"].to_list()})
    rows = [
        {"prompt_id": p, "member": member, "model": f"{member}-model", "response": "...",
         "refusal": True if p in toxic else refuses, "label": None, "method": "keyword"}
        for p in prompts for member, refuses in members.items()
    ]
    scores = score(scoring_frame(frame(rows, RESPONSES), {k: v for k, v in splits.items() if k != "contested"}))
    folder = release / "evaluations" / stamp
    folder.mkdir(parents=True)
    write_csv(folder / "scores.csv", scores)


def section(html: str, section_id: str) -> str:
    start = html.index(f'<h2 id="{section_id}">')
    end = html.find("</section>", start)
    return html[start:end]


# ---------------------------------------------------------------------------------------------------- content


def test_every_section_is_there_with_a_stable_id(release):
    path = write_report(release)
    assert path == release / REPORT
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    for section_id in SECTION_IDS:
        assert html.count(f'<h2 id="{section_id}">') == 1, section_id
        assert f'href="#{section_id}"' in html


def test_the_report_is_self_contained(release, built):
    add_evaluation(release, built["splits"], "2026-03-01T10-00-00", {"target-x": False, "target-y": True})
    html = write_report(release).read_text()
    # Funnel chart, agreement heatmap, evaluation scatter and category chart.
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 4
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(PNG_SIGNATURE)
        assert len(Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_data_text_is_escaped(release):
    html = write_report(release).read_text()
    assert SCRIPT not in html and "<script" not in html.lower()
    assert "How do I explain &lt;script&gt;alert(1)&lt;/script&gt; to my kids &amp; friends?" in html
    # The manifest's text is data too.
    assert EVIL_NOTE not in html and "<img src=\"https" not in html
    assert "&lt;img src=&#34;https://example.com/x.png&#34; onerror=&#34;alert(2)&#34;&gt;" in html
    assert 'http-equiv="Content-Security-Policy"' in html and "default-src 'none'" in html


def test_funnel_tokens_and_failures_come_from_the_release(release, built):
    html = write_report(release).read_text()
    funnel_html = section(html, "funnel")
    total_candidates = int(built["info"].funnel["candidates"].sum())
    assert "harassment" in funnel_html and "benign after dedup" in funnel_html
    assert re.search(rf'<tr class="total"><td>total</td><td class="num">\d+</td><td class="num">{total_candidates}<',
                     funnel_html)
    tokens = section(html, "tokens")
    assert "123,456" in tokens and "124,456" in tokens  # the moderator's count and the total
    failures = section(html, "failures")
    assert "invalid_json" in failures and "timeout" in failures and "3 requests failed" in failures


def test_agreement_is_computed_from_the_votes_without_an_audit(release, built):
    html = write_report(release).read_text()
    part = section(html, "agreement")
    assert "Computed from votes.parquet" in part and "data:image/png;base64," in part
    expected = agreement(built["votes"], pl.DataFrame({"prompt_id": [], "prompt": [], "category": []},
                                                      schema={"prompt_id": pl.Utf8, "prompt": pl.Utf8,
                                                              "category": pl.Utf8}))["pairwise"]
    a_c = expected.filter((pl.col("moderator_a") == "mod-a") & (pl.col("moderator_b") == "mod-c")
                          & (pl.col("category") == "all")).row(0, named=True)
    assert a_c["n"] == 21  # 24 candidates, 3 without a decision and so without votes
    assert (f'<td>mod-a</td><td>mod-c</td><td class="num">21</td><td class="num">{a_c["raw_agreement"]:.3f}</td>'
            f'<td class="num">{a_c["cohen_kappa"]:.3f}</td>') in part


def test_agreement_uses_the_audit_when_present(release, built):
    result = agreement(built["votes"], built["splits"]["contested"].select("prompt_id", "prompt", "category"))
    write_audit(release, result)
    part = section(write_report(release).read_text(), "agreement")
    assert "From the audit in audit/" in part
    assert "mod-a" in part and "Fleiss" in part


def test_samples_are_seeded_and_cover_every_split(release, built):
    a = section(build_report(release), "samples")
    assert a == section(build_report(release), "samples")
    for name in ("benign", "toxic", "hard", "contested"):
        assert f"<h3>{name}" in a
    shown = re.findall(r'<td class="text">(.*?)</td>', a)
    assert len(shown) == 5 + 5 + 4 + 3  # 12 benign, 12 toxic, 4 hard and 3 contested rows in the release
    assert section(build_report(release, seed=1), "samples") != a


def test_evaluation_section_says_none_yet_and_then_uses_the_newest(release, built):
    assert "No evaluation yet" in section(build_report(release), "evaluation")
    add_evaluation(release, built["splits"], "2026-01-01T00-00-00", {"old-target": True})
    add_evaluation(release, built["splits"], "2026-02-01T00-00-00", {"new-target": False})
    part = section(build_report(release), "evaluation")
    assert "evaluations/2026-02-01T00-00-00/scores.csv" in part
    assert "new-target" in part and "old-target" not in part
    assert part.count("data:image/png;base64,") == 2


def test_the_report_is_reproducible(release):
    assert build_report(release) == build_report(release)


# ---------------------------------------------------------------------------------------------------- rendering


def test_chromium_renders_the_report(release, built, tmp_path):
    """The report as a person sees it. Skips without chromium on a developer's machine; under CI (CI=true), where
    .ci/run installs chromium, a missing browser is a failure, so this test cannot silently never run."""
    if shutil.which("chromium") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed (.ci/run installs the Debian package); the report went unseen")
        pytest.skip("chromium is not installed")
    add_evaluation(release, built["splits"], "2026-03-01T10-00-00", {"target-x": False, "target-y": True})
    path = write_report(release)
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri()],
            capture_output=True, timeout=120, check=True,
        )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    # Text, tables and charts: many colours, and the page is not blank below the fold.
    assert len(image.getcolors(maxcolors=1 << 24)) > 100
    lower = image.crop((0, 1600, 1280, 2400))
    assert len(lower.getcolors(maxcolors=1 << 24)) > 20


# ---------------------------------------------------------------------------------------------------- templates

TABLE_BREAKER = "Close the table early </table><tr><td>injected</td></tr> and carry on"


@pytest.fixture
def marked_up(tmp_path, built):
    """A release whose benign prompts carry markup, and whose notes hold what flows.build records: per-model usage
    (a list of mappings), shard counts (a mapping) and nested dedup counts."""
    benign = built["splits"]["benign"]
    evil = [SCRIPT, TABLE_BREAKER]
    splits = {**built["splits"], "benign": benign.with_columns(
        prompt=pl.when(pl.int_range(pl.len()) < 2).then(pl.Series(evil + [None] * (benign.height - 2)))
        .otherwise("prompt"))}
    info = ManifestInfo(config=build_config(), funnel=built["info"].funnel, tokens=built["info"].tokens, notes={
        "usage_by_model": [
            {"role": "moderator", "model": "mod-a", "requests": 10, "cached": 2, "failures": 1,
             "prompt_tokens": 500, "completion_tokens": 40},
            {"role": "rewrites", "model": "rewriter", "requests": 4, "cached": 0, "failures": 0,
             "prompt_tokens": 300, "completion_tokens": 900},
        ],
        "shards": {"reused": 3, "run": 5},
        "dedup": {"pools": {"benign": {"input": 12, "kept": 9}}, "dropped": 3},
        "added_categories": ["stalking", "doxxing"],
    })
    # Every benign row is sampled (the split is small), so both marked-up prompts reach the samples section.
    return write_release(tmp_path / "marked", splits, built["votes"], built["failures"], info), splits


def test_markup_in_prompts_is_shown_as_text(marked_up):
    release, splits = marked_up
    html = write_report(release, seed=0).read_text()
    samples = section(html, "samples")
    shown = re.findall(r'<td class="text">(.*?)</td>', samples)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert "Close the table early &lt;/table&gt;&lt;tr&gt;&lt;td&gt;injected&lt;/td&gt;&lt;/tr&gt; and carry on" in shown
    assert "<script" not in html.lower() and "injected</td>" not in html
    # The prompts did not close any table: every table the report opens, it closes itself.
    assert html.count("<table>") == html.count("</table>") > 0


def test_notes_and_usage_are_tables_not_python_reprs(marked_up):
    release, _ = marked_up
    html = write_report(release).read_text()
    assert "{'" not in html and "[{" not in html and "'}" not in html
    tokens = section(html, "tokens")
    assert "<h3>By role and model</h3>" in tokens
    assert ('<td>moderator</td><td>mod-a</td><td class="num">10</td><td class="num">2</td><td class="num">1</td>'
            '<td class="num">500</td><td class="num">40</td>') in tokens
    overview = section(html, "overview")
    assert "usage_by_model" not in overview  # it is the manifest's typed `usage`, shown with the tokens
    assert '<td>reused</td><td>3</td>' in overview and '<td>run</td><td>5</td>' in overview
    assert '<td>pools.benign.kept</td><td>9</td>' in overview
    assert "<li>added_categories: stalking, doxxing</li>" in overview


def test_overview_shows_license_libraries_and_embedding_model(tmp_path, built):
    info = ManifestInfo(config=build_config(license="cc-by-4.0"), funnel=built["info"].funnel)
    release = write_release(tmp_path / "lic", built["splits"], built["votes"], built["failures"], info)
    overview = section(build_report(release), "overview")
    assert "<dt>License</dt><dd>cc-by-4.0</dd>" in overview and "<dt>Recipe</dt><dd>orbench</dd>" in overview
    assert f"<td>polars</td><td>{pl.__version__}</td>" in overview
    assert "<dt>Embedding model</dt><dd>all-MiniLM-L6-v2" in overview


def test_a_recipe_adds_sections_by_registering_them(release, monkeypatch):
    from orforge.outputs import report

    # A registry without the shipped select sections, so the test can register a recipe's sections itself.
    monkeypatch.setattr(report, "_RECIPES", {k: v for k, v in report._RECIPES.items() if k != "select"})
    manifest_path = release / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"recipe": "orbench"', '"recipe": "select"'))
    with pytest.raises(ValueError, match="no report sections for recipe 'select'"):
        build_report(release)

    @report.recipe_sections("select")
    def select_sections(inputs):
        failures = report.failures_section(inputs)
        return [report.overview(inputs),
                report.Section("select-failures", "Failures again", failures.template, failures.context)]

    html = build_report(release)
    assert re.findall(r'<h2 id="([^"]+)">', html) == ["overview", "select-failures"]
    assert 'href="#select-failures"' in html and "invalid_json" in section(html, "select-failures")
    with pytest.raises(ValueError, match="already registered"):
        report.recipe_sections("select")(select_sections)


def test_the_template_escapes_whatever_a_section_passes(release):
    from orforge.outputs.report import Section, render_report

    html = render_report("</title><script>x</script>", "now", [
        Section("s1", "<b>bold</b>", "sections/funnel_chart.html.j2", {"image": None}),
    ])
    assert "<script" not in html and "&lt;/title&gt;&lt;script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    with pytest.raises(ValueError, match="unique"):
        render_report("x", "now", [Section("a", "A", "sections/funnel_chart.html.j2", {"image": None})] * 2)


def test_quality_gate_section_counts_rules_per_category_and_escapes_examples(tmp_path, built):
    from orforge.core.records import QUALITY_REJECTIONS
    from orforge.outputs.release import read_manifest, verify_release

    rejected = frame([
        {"stage": "rewrites", "category": "privacy", "id": "r1", "text": f"... {SCRIPT}", "source": "seed one",
         "rule": "placeholder", "detail": "a leading ellipsis (a fragment): '...'"},
        {"stage": "rewrites", "category": "privacy", "id": "r2", "text": "otherwise", "source": "seed one",
         "rule": "length", "detail": "1 word (allowed 3-100)"},
        {"stage": "rewrites", "category": "violence", "id": "r3", "text": "... (revised)", "source": "seed two",
         "rule": "placeholder", "detail": "an editorial note in parentheses: '(revised)'"},
        {"stage": "seeds", "category": "violence", "id": "s1", "text": "No answer yet.", "source": None,
         "rule": "request_form", "detail": "neither a question nor a request"},
    ], QUALITY_REJECTIONS)
    info = ManifestInfo(**{**vars(built["info"]), "quality": rejected})
    folder = write_release(tmp_path / "gated", built["splits"], built["votes"], built["failures"], info)
    manifest = read_manifest(folder)
    assert [(c.stage, c.category, c.rule, c.n) for c in manifest.counts.quality_rejections] == [
        ("rewrites", "privacy", "length", 1), ("rewrites", "privacy", "placeholder", 1),
        ("rewrites", "violence", "placeholder", 1), ("seeds", "violence", "request_form", 1)]
    assert verify_release(folder).ok and pl.read_parquet(folder / "quality_rejections.parquet").equals(rejected)
    assert "### Quality gate" in (folder / "README.md").read_text()

    shown = section(write_report(folder).read_text(), "quality")
    assert "4 generated texts failed the quality gate (3 rewrites, 1 seeds)" in shown
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", shown)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r) for r in rows]
    assert cells[0] == ["stage", "category", "placeholder", "length", "request form", "total"]  # in rule order
    assert ["rewrites", "privacy", "1", "1", "0", "2"] in cells and ["total", "", "2", "1", "1", "4"] in cells
    assert SCRIPT not in shown and "&lt;script&gt;" in shown  # the example rows are text, never markup
    assert "otherwise" in shown and "No answer yet." in shown


def test_a_release_without_a_gate_says_so(release):
    assert "No quality gate ran" in section(write_report(release).read_text(), "quality")
