"""How the project's modules import each other: the product imports without the test rig, and no module
imports itself back through others.

The product packages (feedrate, shardgen, loaders, training, report and train.py) must work on a machine
that has only requirements.txt: the rig (rig/, moto) is for tests, `make bench`, `make compare` and
`make s3-up`. Import cycles are found on the module graph read from the source with `ast`, imports inside
functions included: a cycle that only closes at call time still ties two modules into one.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("feedrate", "shardgen", "loaders", "training", "report", "train")
RIG = ("rig", "moto")
SKIP_DIRS = {".venv", "data", "results", ".git", "__pycache__", ".s3-local"}


def project_modules() -> dict[str, Path]:
    """Every module of the project by dotted name (tests/helpers.py -> tests.helpers)."""
    found: dict[str, Path] = {}
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if SKIP_DIRS & set(rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            found[".".join(parts)] = path
    return found


def _target(name: str, modules: dict[str, Path], importer: str) -> str | None:
    """The project module `import name` loads: the longest project prefix of `name`. A bare name that
    is a module of the importer's directory (tests import `encoded` with tests/ on sys.path) counts."""
    candidates = [name]
    if "." in importer:
        candidates.append(f"{importer.rsplit('.', 1)[0]}.{name}")
    for candidate in candidates:
        parts = candidate.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in modules and (end > 1 or candidate == name):
                return prefix
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules `module` imports, anywhere in its body, with the line of the first import."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` loads pkg.sub when that is a module; else a name of pkg itself
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        for name in names:
            target = _target(name, modules, module)
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}, modules


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path that returns to its first module) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        start = min(group)
        # shortest way back to `start` inside the group (breadth first)
        paths = {start: [start]}
        frontier = [start]
        cycle: list[str] | None = None
        while frontier and cycle is None:
            nxt = []
            for node in frontier:
                for succ in sorted(graph[node]):
                    if succ == start:
                        cycle = [*paths[node], start]
                        break
                    if succ in group and succ not in paths:
                        paths[succ] = [*paths[node], succ]
                        nxt.append(succ)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle or sorted(group))
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    steps = [
        f"{a} ({modules[a].relative_to(REPO)}:{graph[a][b]}) -> {b}" for a, b in itertools.pairwise(cycle)
    ]
    return "import cycle: " + " | ".join(steps)


def test_no_import_cycle_among_the_projects_modules() -> None:
    graph, modules = import_graph()
    assert "bench.measure" in graph and "bench.__main__" in graph, "the walk sees the bench modules"
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(describe(c, graph, modules) for c in cycles)


def test_the_cycle_finder_finds_and_shows_a_cycle() -> None:
    graph = {"a": {"b": 3}, "b": {"c": 7}, "c": {"a": 1}, "d": {"a": 2}}
    (cycle,) = find_cycles(graph)
    assert cycle == ["a", "b", "c", "a"]
    modules = {name: REPO / f"{name}.py" for name in graph}
    assert (
        describe(cycle, graph, modules) == "import cycle: a (a.py:3) -> b | b (b.py:7) -> c | c (c.py:1) -> a"
    )
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_function_level_and_relative_imports_are_edges(tmp_path: Path) -> None:
    modules = {
        "pkg": tmp_path / "pkg" / "__init__.py",
        "pkg.a": tmp_path / "pkg" / "a.py",
        "pkg.b": tmp_path / "b.py",
    }
    modules["pkg.a"].parent.mkdir()
    modules["pkg"].write_text("from pkg.a import f\n")
    modules["pkg.a"].write_text("def f():\n    from . import b\n    import pkg.b as bb\n")
    modules["pkg.b"].write_text("")
    assert imports_of("pkg.a", modules["pkg.a"], modules) == {"pkg.b": 2}
    assert imports_of("pkg", modules["pkg"], modules) == {"pkg.a": 1}


def test_no_product_module_imports_the_rig() -> None:
    """Statically, so that an import inside a function (which the subprocess check below cannot reach)
    is caught too. bench/ and tests/ are tools beside the product: they may."""
    graph, modules = import_graph()
    offenders = [
        f"{modules[m].relative_to(REPO)}:{line} imports {target}"
        for m, targets in graph.items()
        if m.split(".")[0] in PRODUCT
        for target, line in targets.items()
        if target.split(".")[0] == "rig"
    ]
    assert not offenders, "; ".join(offenders)


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in sys.argv[2].split(","):
    __import__(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("imported", len(sys.argv[2].split(",")))
"""


def test_the_product_imports_without_the_rig_and_moto() -> None:
    names = sorted(m for m in project_modules() if m.split(".")[0] in PRODUCT and not m.endswith("__main__"))
    assert {"train", "report.runs", "loaders.streaming", "shardgen.pack", "feedrate.storage"} <= set(names)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BLOCKER), ",".join(RIG), ",".join(names)],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"imported {len(names)}"


def test_the_blocker_blocks() -> None:
    """The check above can fail: a module that imports the rig is refused."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BLOCKER), ",".join(RIG), "rig.locals3"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "ModuleNotFoundError: blocked for this test: rig" in done.stderr
