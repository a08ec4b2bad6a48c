"""The layout says what depends on what: no import cycle between modules or packages, and each package
imports only what sits below it.

    kandinsky_core        (core/)              numpy, pillow; nothing of ours
    kandinsky_client      (client/)            core
    kandinsky_export      (export/)            core
    kandinsky_repository  (model_repository/)  core; its python_models (run inside Triton) only core
    kandinsky_bench       (benchmarks/)        everything

Every import counts, also those inside functions: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "kandinsky_core": ROOT / "core" / "kandinsky_core",
    "kandinsky_client": ROOT / "client" / "kandinsky_client",
    "kandinsky_export": ROOT / "export" / "kandinsky_export",
    "kandinsky_repository": ROOT / "model_repository" / "kandinsky_repository",
    "kandinsky_bench": ROOT / "benchmarks" / "kandinsky_bench",
}
ALLOWED = {
    "kandinsky_core": set(),
    "kandinsky_client": {"kandinsky_core"},
    "kandinsky_export": {"kandinsky_core"},
    "kandinsky_repository": {"kandinsky_core"},
    "kandinsky_bench": {"kandinsky_core", "kandinsky_client", "kandinsky_export", "kandinsky_repository"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports (relative imports resolved; `from pkg import module` counted)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph.get(node, ()):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def _package_of(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth])


def _collapsed(graph: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        source = _package_of(module, depth)
        packages[source] |= {_package_of(t, depth) for t in targets} - {source}
    return packages


def test_no_module_imports_itself_through_others() -> None:
    assert _cycles(_graph()) == []


def test_no_package_imports_itself_through_others() -> None:
    graph = _graph()
    assert _cycles(_collapsed(graph, 1)) == []  # the five packages
    assert _cycles(_collapsed(graph, 2)) == []  # their subpackages and top modules


def test_each_package_imports_only_what_sits_below_it() -> None:
    for package, targets in _collapsed(_graph(), 1).items():
        assert targets <= ALLOWED[package], (package, sorted(targets - ALLOWED[package]))


def test_the_python_models_run_on_the_core_alone() -> None:
    """Code that runs inside Triton imports nothing of the generator, the server or the gateway."""
    graph = _graph()
    for module, targets in graph.items():
        if module.startswith("kandinsky_repository.python_models"):
            ours = {t for t in targets if not t.startswith("kandinsky_repository.python_models")}
            assert {_package_of(t, 1) for t in ours} <= {"kandinsky_core"}, (module, sorted(ours))


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The checks above can fail: a two-module cycle and a three-package cycle are reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    modules = {"p.x": {"q.y"}, "q.y": {"r.z"}, "r.z": {"p.w"}, "p.w": set()}
    assert _cycles(_collapsed(modules, 1)) == [["p", "q", "r"]]


def _architecture_map() -> set[str]:
    """Paths named by docs/architecture.md's map: 'folder/module.py' under each package's heading line."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```\n", 2)[1]
    named, package = set(), None
    for line in block.splitlines():
        if not line.startswith(" "):
            package = line.split()[0] if line.split() and line.split()[0].count("/") == 2 else None
        elif package:
            named.add(package + line.split()[0])
    return named


def test_the_architecture_map_names_every_module_and_nothing_else() -> None:
    """docs/architecture.md lists every module of the five packages (package markers aside), and every
    path it lists exists."""
    named = _architecture_map()
    modules = {
        str(path.relative_to(ROOT))
        for folder in PACKAGES.values()
        for path in folder.rglob("*.py")
        if path.name != "__init__.py"
        or path.parent.name == "schedulers"  # (schedulers/ defines classes there)
    }
    folders = {n for n in named if n.endswith("/")}
    listed = {m for m in modules if m in named or any(m.startswith(f) for f in folders)}
    assert sorted(modules - listed) == []
    assert sorted(n for n in named if not (ROOT / n).exists()) == []
