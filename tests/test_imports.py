"""Imports flow one way and never in a circle (STYLE.md, "Data flows one way").

The package's modules are read with ``ast`` (nothing is imported): every ``import`` / ``from``
statement counts, also inside functions, except those under ``if TYPE_CHECKING:``; relative imports
are resolved; ``from pkg import name`` imports the submodule ``pkg.name`` when there is one, else
``pkg``; importing ``a.b.c`` also runs the ``__init__`` of the packages ``a.b`` above it that do not
contain the importer; ``importlib.import_module("adamerge....")`` with a literal name is an import too.

On that graph: no cycle, and these layers never reach (directly or through other modules):

* merging/ → models, data, components, systems, cli (pure functions; no pools);
* models/ → data, components, systems, cli (class names and templates are passed in);
* the task registry → the mini benchmark;
* components/ → systems, cli;
* the core (merging, components, systems, models, data without data/mini) → the demo, the mini
  benchmark and its builder, reporting (results tables, the CLI's run report, the W&B story), the CLI;
  nor does the core import ``wandb`` or ``matplotlib`` itself (it gives plain data; reporting draws);
* the shared helpers (``files``, ``records``, ``errors``) → any of the above.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import adamerge

Graph = Mapping[str, set[str]]

ROOT = "adamerge"
CORE = ("merging", "components", "systems", "models", "data")
NOT_CORE = ("data.mini",)
HELPERS = ("files", "records", "errors")  # what every layer may use
REPORTING = ("results", "report", "wandb_story")  # tables, the run report, what W&B shows
DRAWING = ("wandb", "matplotlib")  # third-party packages only reporting imports


# ---- reading the package ---------------------------------------------------------------------------
def find_modules(package_dir: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package) for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _literal_import(node: ast.AST) -> bool:
    """``importlib.import_module("name")`` / ``__import__("name")`` with a literal name."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    return name in ("import_module", "__import__") and isinstance(node.args[0].value, str)


def _import_statements(tree: ast.AST) -> Iterable[ast.AST]:
    """Every import node (and ``importlib.import_module`` call), skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _literal_import(node):
            yield ast.Import(names=[ast.alias(name=node.args[0].value)])
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str, is_package: bool, source: str, known: Iterable[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (whose text is ``source``) imports."""
    known = set(known)
    targets: set[str] = set()
    for node in _import_statements(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = _resolve(module, is_package, node)
        subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
        targets.update(subs)
        if len(subs) < len(node.names):
            targets.add(base)  # a name defined in the package's __init__
    found = set()
    for target in targets:
        while target and target not in known:  # ``import a.b.attr``-style spellings
            target = target.rpartition(".")[0]
        if not target:
            continue
        found.add(target)
        parent = target.rpartition(".")[0]
        while parent:  # importing a.b.c runs a.b's __init__ unless the importer lives inside a.b
            if parent in known and not (module == parent or module.startswith(parent + ".")):
                found.add(parent)
            parent = parent.rpartition(".")[0]
    found.discard(module)
    return found


def build_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module → the package modules it imports (see the module docstring for what counts)."""
    modules = find_modules(package_dir, package)
    return {
        name: imported_names(name, is_package, path.read_text(encoding="utf-8"), modules)
        for name, (path, is_package) in modules.items()
    }


# ---- questions about a graph -----------------------------------------------------------------------
def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        state[start] = 1
        todo = [iter(sorted(graph.get(start, ())))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(graph.get(nxt, ()))))
    return None


def in_layer(module: str, layers: Iterable[str], package: str = ROOT) -> bool:
    return any(module == f"{package}.{layer}" or module.startswith(f"{package}.{layer}.") for layer in layers)


def forbidden_paths(graph: Graph, sources: Iterable[str], forbidden) -> list[list[str]]:
    """For each source that reaches a module where ``forbidden(module)`` holds, the shortest such path."""
    found = []
    for source in sorted(sources):
        seen = {source: [source]}
        queue = deque([source])
        while queue:
            node = queue.popleft()
            if node != source and forbidden(node):
                found.append(seen[node])
                break
            for nxt in sorted(graph.get(node, ()), key=lambda m: (-m.count("."), m)):  # most specific first
                if nxt not in seen:
                    seen[nxt] = seen[node] + [nxt]
                    queue.append(nxt)
    return found


# ---- the synthetic checks: the test can fail -------------------------------------------------------
def test_find_cycle_finds_a_hand_made_cycle_and_its_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z", "y"}, "z": set()}) == ["y", "y"]
    cycle = find_cycle({"m": {"n"}, "n": {"p"}, "p": {"q", "n"}, "q": set()})
    assert cycle == ["n", "p", "n"]


def test_forbidden_paths_are_transitive_and_named():
    graph = {"core.a": {"core.b"}, "core.b": {"report"}, "report": set(), "core.c": set()}
    paths = forbidden_paths(graph, ["core.a", "core.c"], lambda m: m == "report")
    assert paths == [["core.a", "core.b", "report"]]


def test_the_walker_reads_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                "from . import b\nif TYPE_CHECKING:\n    from pkg.c import C\nelse:\n    import pkg.d\n"
                "def f():\n    from .sub.e import thing\n",
        "b.py": "import importlib\ndef g():\n    return importlib.import_module('pkg.a')\n",
        "c.py": "", "d.py": "",
        "sub/__init__.py": "from .e import thing\n",
        "sub/e.py": "from .. import c\nfrom pkg.sub import f, thing\n",
        "sub/f.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = build_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b", "pkg.d", "pkg.sub", "pkg.sub.e"}  # not pkg.c: TYPE_CHECKING
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.sub.e"}
    assert graph["pkg.sub.e"] == {"pkg.c", "pkg.sub", "pkg.sub.f"}  # `thing` comes from sub/__init__
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


# ---- the package -----------------------------------------------------------------------------------
GRAPH = build_graph(Path(adamerge.__file__).parent, ROOT)


def _fmt(paths: list[list[str]]) -> str:
    return "\n  " + "\n  ".join(" → ".join(p) for p in paths)


def test_the_graph_is_read():
    assert "adamerge.models.pool" in GRAPH["adamerge.systems.base"]
    assert "adamerge.merging.task_vectors" in GRAPH["adamerge.merging.dispatch"]
    assert len(GRAPH) > 40


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def _core(module: str) -> bool:
    return in_layer(module, CORE) and not in_layer(module, NOT_CORE)


RULES = {
    "merging knows no pools, loaders, data, components, systems or CLI": (
        lambda m: in_layer(m, ["merging"]),
        lambda m: in_layer(m, ["models", "data", "components", "systems", "cli"])),
    "models need no task registry, data, components, systems or CLI": (
        lambda m: in_layer(m, ["models"]), lambda m: in_layer(m, ["data", "components", "systems", "cli"])),
    "the task registry does not import the mini benchmark": (
        lambda m: m == "adamerge.data.registry", lambda m: in_layer(m, ["data.mini"])),
    "components do not import systems or the CLI": (
        lambda m: in_layer(m, ["components"]), lambda m: in_layer(m, ["systems", "cli"])),
    "the core imports no demo, benchmark builder, reporting or CLI": (
        _core, lambda m: in_layer(m, ["demo", *REPORTING, "data.mini", "cli"])),
    "the shared helpers (files, records, errors) import no layer above them": (
        lambda m: in_layer(m, HELPERS), lambda m: in_layer(m, [*CORE, "cli", "demo", *REPORTING])),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_layer_rule(rule):
    sources, forbidden = RULES[rule]
    paths = forbidden_paths(GRAPH, [m for m in GRAPH if sources(m)], forbidden)
    assert not paths, f"{rule}; broken by:{_fmt(paths)}"


def third_party_imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in ``source`` (``import wandb.sdk`` → ``wandb``)."""
    names = set()
    for node in _import_statements(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_draws_nothing():
    root = Path(adamerge.__file__).parent
    found = {name: sorted(third_party_imports(path.read_text(encoding="utf-8")) & set(DRAWING))
             for name, (path, _) in find_modules(root, ROOT).items() if _core(name)}
    assert not {k: v for k, v in found.items() if v}, "the core imports a drawing or W&B package"
    assert third_party_imports("import wandb.sdk\nfrom matplotlib.figure import Figure\nfrom . import x\n") == {
        "wandb", "matplotlib"}


def test_layer_rules_can_fail():
    graph = {**GRAPH, "adamerge.merging.ties": GRAPH["adamerge.merging.ties"] | {"adamerge.models.pool"}}
    sources, forbidden = RULES["merging knows no pools, loaders, data, components, systems or CLI"]
    paths = forbidden_paths(graph, [m for m in graph if sources(m)], forbidden)
    assert ["adamerge.merging.ties", "adamerge.models.pool"] in paths
