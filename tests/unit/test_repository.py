"""The house rules, checked on the source tree: layers import only downwards, no import circles, no file
loaded by path, no link out of the repository, no oversized hand-written file, and every package installed.

Layers (lower never imports higher):
    edgefleet (shared)  <-  edgefleet.agent, edgefleet.server, edgefleet.cli  <-  edgefleet.devtools
The CLI reaches the server through one entry module only (`edgefleet.server.main`, for `edgefleet server`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
MAX_LINES = 500
ROLES = ("edgefleet.server", "edgefleet.agent", "edgefleet.cli", "edgefleet.devtools")
# role -> roles it may import
ALLOWED = {
    "shared": set(),
    "edgefleet.agent": set(),
    "edgefleet.server": set(),
    "edgefleet.cli": set(),
    "edgefleet.devtools": {"edgefleet.server", "edgefleet.agent", "edgefleet.cli"},
}
CLI_ENTRY_TO_SERVER = "edgefleet.server.main"


def source_modules() -> Iterator[tuple[str, Path]]:
    """(module name, file) for every installed module, through pyproject's package-dir mapping."""
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            relative = path.relative_to(base).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            # A folder mapped on its own (edgefleet.server -> server/) is not part of its parent's tree.
            if package == "edgefleet" and parts and f"edgefleet.{parts[0]}" in PACKAGE_DIRS:
                continue
            yield ".".join([package, *parts]), path


MODULES = dict(source_modules())


def role_of(module: str) -> str:
    for role in ROLES:
        if module == role or module.startswith(role + "."):
            return role
    return "shared"


def imports_of(path: Path, *, top_level_only: bool) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def edgefleet_imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    found = set()
    for name in imports_of(path, top_level_only=top_level_only):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def test_the_wheel_has_one_top_level_package_and_lists_every_subpackage() -> None:
    assert {name.split(".")[0] for name in PACKAGE_DIRS} == {"edgefleet"}
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert on_disk - packages == set(), "add these to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_layer_imports_only_what_is_below_it(role: str) -> None:
    wrong = []
    for module, path in MODULES.items():
        if role_of(module) != role:
            continue
        for imported in edgefleet_imports(path):
            target = role_of(imported)
            if target in ("shared", role) or target in ALLOWED[role]:
                continue
            if role == "edgefleet.cli" and imported == CLI_ENTRY_TO_SERVER:
                continue
            wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_no_import_circle_between_modules() -> None:
    graph = {m: edgefleet_imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    # A package's own __init__ importing its submodules is not a circle worth reporting.
    for module in graph:
        graph[module] = {i for i in graph[module] if not module.startswith(i + ".")}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                circles.append([*trail[trail.index(nxt) :], nxt] if nxt in trail else [module, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def _hand_written() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if (
            relative.parts[0] in (".venv", "tests", ".git", "demo-run", ".typecheck", "build")
            or "_pb2" in path.name
        ):
            continue
        yield path


def test_no_hand_written_file_is_over_the_size_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _hand_written()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_nothing_is_loaded_by_file_path() -> None:
    pattern = re.compile(
        r"spec_from_file_location|runpy\.run_path|SourceFileLoader|sys\.path\.(insert|append)"
    )
    users = [
        str(p.relative_to(ROOT))
        for folder in ("tests", "bench", "scripts", *PACKAGE_DIRS.values())
        for p in (ROOT / folder).rglob("*.py")
        if p.resolve() != Path(__file__).resolve() and pattern.search(p.read_text())
    ]
    assert users == []


def test_no_link_leaves_the_repository() -> None:
    texts = [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "bench").rglob("*.md")]
    texts += [p for p in ROOT.rglob("*.py") if not {".venv", ".typecheck", "build"} & set(p.parts)]
    outside_link = "../" + "shared"  # spelled apart, so that this file does not name it itself
    outside = [str(p.relative_to(ROOT)) for p in texts if outside_link in p.read_text()]
    assert outside == []


def test_every_test_the_docs_name_exists() -> None:
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    named = set()
    for doc in (ROOT / "docs").rglob("*.md"):
        named |= set(re.findall(r"`(test_\w+)`", doc.read_text()))
    assert named, "docs/ names the tests that show each promise"
    assert named - defined == set()
