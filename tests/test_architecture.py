"""The layout holds: each subpackage imports only its own layer and those below it, no import
cycle (module level or inside functions), no module imports another's private names, the
paper's loop loads none of the job machinery, and no public name is shadowed by a submodule.

The tree is parsed once per session (:func:`import_graph` is cached)."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WAIT

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipstyle"

# Lowest first. A module may import modules of its own layer and of the layers before it.
# "root": the modules directly in clipstyle/ (config, errors, device, images, prompts,
# interrupts, provenance and the package itself), which everything may use.
LAYERS = ["root", "models", "method", "regions", "styles", "jobs", "evaluation", "serve", "cli", "__main__"]
# What the paper's loop must never load, directly or through another module.
JOB_MACHINERY = ["jobs", "cli", "serve", "models.loading", "evaluation"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] == "__main__":
        return "__main__"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else "root"


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


@functools.cache
def _parsed() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def _imports() -> dict[str, list[tuple[str, str | None]]]:
    """clipstyle module -> (imported module, imported name or None) for every import of a clipstyle
    module anywhere in its code (TYPE_CHECKING blocks aside)."""
    modules = _parsed()
    found: dict[str, list[tuple[str, str | None]]] = {}
    for name, tree in modules.items():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        edges = []
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                edges += [(a.name, None) for a in node.names if a.name in modules]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                for a in node.names:
                    # "from clipstyle.method import losses" imports the submodule; other names come from the module
                    sub = f"{node.module}.{a.name}"
                    edges.append((sub, None) if sub in modules else (node.module, a.name))
        found[name] = [(target, imported) for target, imported in edges if target != name]
    return found


def import_graph() -> dict[str, set[str]]:
    """clipstyle module -> the clipstyle modules it imports anywhere in its code."""
    return {name: {target for target, _ in edges} for name, edges in _imports().items()}


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


def upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """module -> the modules it imports from a higher layer."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = {name: sorted(t for t in targets if rank[layer(t)] > rank[layer(name)]) for name, targets in graph.items()}
    return {k: v for k, v in found.items() if v}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_scan_finds_cycles_upward_imports_and_nested_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    planted = {"clipstyle.method.loop": {"clipstyle.jobs.batch"}, "clipstyle.jobs.batch": {"clipstyle.errors"}}
    assert upward_imports(planted) == {"clipstyle.method.loop": ["clipstyle.jobs.batch"]}
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}
    graph = import_graph()
    assert "clipstyle.method.loop" in graph["clipstyle.jobs.run"]  # module level
    assert "clipstyle.jobs.plan" in graph["clipstyle.cli.common"]  # inside a function
    assert layer("clipstyle") == layer("clipstyle.config") == "root" and layer("clipstyle.jobs.run") == "jobs"


def test_every_subpackage_has_a_layer_and_says_what_it_is():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS) - {"root", "__main__"}
    for name in packages:
        doc = ast.get_docstring(_parsed()[f"clipstyle.{name}"])
        assert doc and len(doc) > 200, f"clipstyle.{name} needs a docstring saying what it holds and may import"


def test_no_layer_imports_a_higher_one():
    assert upward_imports(import_graph()) == {}


def test_no_import_cycle_anywhere():
    assert find_cycle(import_graph()) is None


def test_no_module_imports_another_modules_private_names():
    private = {
        name: sorted(
            f"{target}.{imported}"
            for target, imported in edges
            if imported and imported.startswith("_") and not imported.endswith("__")
        )
        for name, edges in _imports().items()
    }
    assert {k: v for k, v in private.items() if v} == {}


def test_the_loop_loads_none_of_the_job_machinery():
    graph = import_graph()
    for entry in ("clipstyle.method.loop", "clipstyle.method.losses", "clipstyle.models.encoders"):
        loaded = reachable(graph, entry)
        assert not [
            m for m in loaded if any(m == f"clipstyle.{j}" or m.startswith(f"clipstyle.{j}.") for j in JOB_MACHINERY)
        ]


def test_the_loop_imports_no_job_machinery_when_run():
    code = (
        "import sys, clipstyle.method.loop\n"
        "print(sorted(m for m in sys.modules if m.startswith(('clipstyle.jobs', 'clipstyle.cli', "
        "'clipstyle.serve', 'clipstyle.models.loading', 'clipstyle.evaluation'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


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
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert done.stderr.strip().endswith("False"), done.stderr
