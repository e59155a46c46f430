"""The layout holds: no import cycle (module level or inside functions), the library never
imports the CLI, and no public name is shadowed by a submodule of the same name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipstyle"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """clipstyle module -> the clipstyle modules it imports anywhere in its code (TYPE_CHECKING blocks aside)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        edges = set()
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from clipstyle import losses" imports the submodule; other names come from the package
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path) :] = 1, [node]
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_scan_finds_cycles_and_nested_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "clipstyle.optimize" in graph["clipstyle.runner"]  # module level
    assert "clipstyle.loading" in graph["clipstyle.cli.common"]  # inside a function


def test_no_import_cycle_anywhere():
    assert find_cycle(import_graph()) is None


def test_the_library_never_imports_the_cli():
    upward = {
        name: sorted(e for e in edges if e.startswith("clipstyle.cli"))
        for name, edges in import_graph().items()
        if not name.startswith("clipstyle.cli") and name != "clipstyle.__main__"
    }  # the entry point
    assert {k: v for k, v in upward.items() if v} == {}


def test_no_public_name_is_shadowed_by_a_submodule():
    import clipstyle

    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert set(clipstyle.__all__) & submodules == set()


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["apply", "--help"], ["sheet", "--help"]])
def test_help_never_imports_torch(command):
    code = (
        "import sys; from clipstyle.cli import cli\n"
        f"try:\n    cli({command!r})\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(str('torch' in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stderr.strip().endswith("False"), done.stderr
