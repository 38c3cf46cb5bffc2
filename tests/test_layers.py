"""The house has no back doors: imports go down the layers, stages never import each other, no module cycles, no
`_private` names imported across the project's modules, and the project's packages are only ever imported through
`orforge.` (in tests/ and benchmarks/ too; tests may still import a private helper of the module they test).

Layers, lowest first: core < llm < generators | moderators | dedup < outputs < flows (and the `orforge` root package,
which only holds the version and `python -m orforge`, sits on top). Every module is parsed with `ast`, so an import
inside a function (a lazy import) counts exactly like one at the top of the file.

`pytest -s tests/test_layers.py` prints the package-level import graph.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "llm", "generators", "moderators", "dedup", "outputs", "flows")
STAGES = frozenset({"generators", "moderators", "dedup"})
LAYER = {"core": 0, "llm": 1, "generators": 2, "moderators": 2, "dedup": 2, "outputs": 3, "flows": 4, "orforge": 5}
# Top-level folders that are the project's own but must never be imported bare (`import core`): the packages, and
# the root `orforge/` folder itself would be fine, so it is not listed.
BARE_FORBIDDEN = frozenset(PACKAGES)
ELSEWHERE = ("tests", "benchmarks")


@dataclass(frozen=True)
class Import:
    source: str  # dotted module that imports, e.g. orforge.flows.build
    path: Path
    line: int
    target: str  # dotted module imported, e.g. orforge.outputs.release
    names: tuple[str, ...]  # names taken from it (`from x import a, b`); empty for `import x`


def module_name(path: Path, root: Path) -> str:
    """`flows/build.py` -> orforge.flows.build; `orforge/__main__.py` -> orforge.__main__; `tests/x.py` -> tests.x."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in PACKAGES:
        parts.insert(0, "orforge")
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    source = module_name(path, root)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(source, path, node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = source.split(".") if is_package else source.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, target] if target else base)
            found.append(Import(source, path, node.lineno, target, tuple(a.name for a in node.names)))
    return found


def python_files(root: Path, folders: tuple[str, ...]) -> list[Path]:
    return sorted(p for folder in folders if (root / folder).is_dir() for p in (root / folder).rglob("*.py"))


def package_of(module: str) -> str | None:
    """The layer package of an orforge module (`orforge.flows.build` -> flows), `orforge` for the root, else None."""
    parts = module.split(".")
    if parts[0] != "orforge":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "orforge"


def violations(root: Path, project_folders: tuple[str, ...] = (*PACKAGES, "orforge"),
               other_folders: tuple[str, ...] = ELSEWHERE) -> tuple[list[str], nx.DiGraph]:
    """Every broken rule under `root`, one line each, and the package-level import graph."""
    problems: list[str] = []
    modules = nx.DiGraph()
    packages = nx.DiGraph()
    project = python_files(root, project_folders)
    known = {module_name(p, root) for p in project}
    for path in project + python_files(root, other_folders):
        in_project = path in project
        for imp in imports_of(path, root):
            where = f"{imp.path.relative_to(root)}:{imp.line}"
            head = imp.target.split(".")[0]
            if head in BARE_FORBIDDEN:
                problems.append(f"{where}: bare import of {imp.target!r}; import it as 'orforge.{imp.target}'")
                continue
            if head != "orforge":
                continue
            # `from orforge.x import y` may name a module y: the edge goes to the deepest module that exists.
            targets = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known] or [imp.target]
            if not in_project:
                continue  # tests may reach into the module they test; benchmarks and tests only obey the bare rule
            private = [n for n in imp.names if n.startswith("_") and f"{imp.target}.{n}" not in known]
            if private and imp.target != imp.source:
                problems.append(f"{where}: imports private name(s) {', '.join(private)} from {imp.target}")
            src_pkg = package_of(imp.source)
            for target in targets:
                dst_pkg = package_of(target)
                if target != imp.source:
                    modules.add_edge(imp.source, target, where=where)
                if dst_pkg is None or dst_pkg == src_pkg:
                    continue
                packages.add_edge(src_pkg, dst_pkg)
                if src_pkg in STAGES and dst_pkg in STAGES:
                    problems.append(f"{where}: stage {src_pkg} imports stage {dst_pkg} ({target}); stages never "
                                    "import each other, a flow composes them")
                elif LAYER[dst_pkg] > LAYER[src_pkg]:
                    problems.append(f"{where}: {src_pkg} imports {target} from the higher layer {dst_pkg}")
    for cycle in nx.simple_cycles(modules):
        ring = [*cycle, cycle[0]]
        steps = ", ".join(f"{a} -> {b} ({modules.edges[a, b]['where']})" for a, b in zip(ring, ring[1:]))
        problems.append(f"import cycle: {steps}")
    return problems, packages


def graph_text(packages: nx.DiGraph) -> str:
    order = sorted(packages.nodes, key=lambda p: (LAYER.get(p, 9), p))
    return "\n".join(f"{p:<11} -> {', '.join(sorted(packages.successors(p), key=lambda q: (LAYER[q], q))) or '-'}"
                     for p in order)


def test_the_project_follows_the_layers():
    problems, packages = violations(REPO)
    print("\npackage-level imports (orforge.<package> -> what it imports):\n" + graph_text(packages))
    assert not problems, "\n".join(problems)
    assert {"core", "llm", "flows"} <= set(packages.nodes)  # the scan did see the project


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name in ("core", "llm", "generators", "moderators", "dedup", "outputs", "flows", "orforge"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"core/config.py": "from orforge.llm.hub import LLMHub\n", "llm/hub.py": "LLMHub = 1\n"},
     "core imports orforge.llm.hub from the higher layer llm"),
    ({"moderators/agreement.py": "def f():\n    from orforge.outputs.atomic import write_csv\n",
      "outputs/atomic.py": "write_csv = 1\n"},
     "moderators imports orforge.outputs.atomic from the higher layer outputs"),
    ({"dedup/near.py": "from orforge.generators import seeds\n", "generators/seeds.py": ""},
     "stage dedup imports stage generators"),
    ({"flows/a.py": "from orforge.flows.b import _helper\n", "flows/b.py": "def _helper(): ...\n"},
     "imports private name(s) _helper from orforge.flows.b"),
    ({"outputs/a.py": "from orforge.outputs import b\n", "outputs/b.py": "from orforge.outputs.a import x\n"},
     "import cycle: orforge.outputs."),
    ({"flows/a.py": "from . import b\n", "flows/b.py": "def f():\n    import orforge.flows.a\n"},
     "import cycle: orforge.flows."),
    ({"tests/test_x.py": "from llm.hub import LLMHub\n"}, "bare import of 'llm.hub'"),
    ({"benchmarks/bench.py": "import core.config\n"}, "bare import of 'core.config'"),
    ({"flows/add_category.py": "from orforge.flows.build import _publish_artifact, run_pipeline\n",
      "flows/build.py": ""}, "imports private name(s) _publish_artifact from orforge.flows.build"),
])
def test_a_bad_module_is_caught(tmp_path, files, expected):
    problems, _ = violations(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_allowed_imports_pass(tmp_path):
    root = _tree(tmp_path, {
        "flows/build.py": "from orforge.outputs.release import write_release\nfrom orforge.dedup import near\n",
        "outputs/release.py": "from orforge.moderators.agreement import agreement\nwrite_release = 1\n",
        "moderators/agreement.py": "from orforge.core.config import X\nagreement = 1\n",
        "dedup/near.py": "from orforge.llm.hub import LLMHub\nfrom orforge.core import records\n",
        "llm/hub.py": "from orforge.core.config import X\nLLMHub = 1\n",
        "core/config.py": "X = 1\n", "core/records.py": "",
        "orforge/__main__.py": "from orforge.flows.cli import main\n",
        "tests/test_z.py": "import orforge.flows.build\nimport corelib\n",
    })
    problems, packages = violations(root)
    assert problems == []
    assert set(packages.successors("flows")) == {"outputs", "dedup"}


if __name__ == "__main__":  # pragma: no cover - `python tests/test_layers.py` prints the graph
    found, graph = violations(REPO)
    print(graph_text(graph))
    print("\n".join(found) or "no violations")
    sys.exit(1 if found else 0)
