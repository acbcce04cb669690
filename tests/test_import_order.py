"""The stage order is the import order: data -> embed -> index -> search -> app / cli, base modules under all.

Every module of retrieval/, training/ and app/ is read with `ast` (imports at module level and inside
functions alike) and mapped to its floor. The test fails on:

  * an import against the order, listed as `file:line -> module` (a lazy import inside a function is still
    a dependency: laziness defers the cost, never the direction);
  * retrieval.cli (and the demo it runs) importing training or app at module level: the commands import them
    inside the function that needs them, so `retrieval --help` stays fast and torch-free;
  * an import cycle between product files. Cycles count imports at every level, lazy ones included: the
    cycles this test was written against were each a dispatcher importing, inside a function, the
    specialised module that imported it back, which ties the two files together as surely as a
    module-level import does.

The exceptions are few, listed below with their reason, and each must still be needed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT_PACKAGES = ("retrieval", "training", "app")

# Floors, lowest first. A module may import its own floor and any floor of lower rank. Floors of equal rank
# are siblings that never import each other: training builds on retrieval, the server does not train.
FLOOR_RANK = {"base": 0, "data": 1, "embed": 2, "index": 3, "search": 4, "training": 5, "serve": 5, "cli": 6}

# Single modules, by exact name. A new top-level module of retrieval/ must be given a floor here.
MODULE_FLOORS = {
    "retrieval": "base",  # the package itself: __version__
    "retrieval.errors": "base",
    "retrieval.atomic": "base",
    "retrieval.images": "base",
    "retrieval.image_files": "base",
    "retrieval.devices": "base",
    "retrieval.versions": "base",
    "retrieval.config": "base",
    "retrieval.preprocess": "base",  # test-time preprocessing: embed backends, checkpoints, training transforms
    "retrieval.model": "base",
    "retrieval.checkpoint": "base",
    "retrieval.knn": "base",
    "retrieval.metrics": "base",
    "retrieval.query_intake": "base",  # one intake for query images: the API, the UI and `retrieval search`
    "retrieval.client": "serve",  # the Python client of the JSON API: hit records over HTTP, beside the server
    "retrieval.export": "serve",  # checkpoint -> model.onnx, beside the server
    "retrieval.demo_job": "cli",  # the body of `retrieval demo`: every stage in one call
    # the RunConfig one `retrieval train` means (preset, --config, flags, --set): reads the dataset registry and
    # the training catalog, beside the command line rather than inside it
    "retrieval.config_resolve": "cli",
    "retrieval.__main__": "cli",
}
# Packages: the package and every module inside it.
PACKAGE_FLOORS = {
    "retrieval.data": "data",
    "retrieval.embed": "embed",
    "retrieval.index": "index",
    "retrieval.search": "search",
    "retrieval.cli": "cli",
    "training": "training",
    "app": "serve",
}

# (importer floor, imported floor) pairs allowed only inside a function.
LAZY_ONLY = {("cli", "training"), ("cli", "serve")}
# Torch-free training modules the command line reads at startup (the choices its help texts list).
LIGHT_TRAINING = {"training", "training.catalog", "training.levels"}

# Imports against the order that are allowed, with why. Each must still exist (stale entries fail).
ALLOWED_AGAINST_ORDER = {
    ("retrieval.config", "training.catalog"):
        "config validates presets against the torch-free catalog of losses",
    ("retrieval.config", "training.levels"):
        "config picks a preset by whether its torch-free mixing level forms mixes",
}
KNOWN_CYCLES: dict[frozenset[str], str] = {}


@dataclass(frozen=True)
class Import:
    """One import of a product module by a product module."""

    importer: str
    path: str  # the importer's file, relative to the root it was read from
    line: int
    imported: str
    lazy: bool  # inside a function body

    def where(self) -> str:
        return f"{self.path}:{self.line} -> {self.imported}"


def product_modules(root: Path, packages: Iterable[str] = PRODUCT_PACKAGES) -> dict[str, Path]:
    """module name -> file, for every .py file under the product packages of `root`."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The product module `name` names (or the nearest enclosing one for an attribute path); None if external."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, path: str, modules: dict[str, Path]) -> None:
        self.module, self.path, self.modules = module, path, modules
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, node: ast.stmt, target: str | None) -> None:
        if target is not None and target != self.module:
            self.found.append(Import(self.module, self.path, node.lineno, target, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, _resolve(alias.name, self.modules))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")[: len(self.package.split(".")) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(node, submodule if submodule in self.modules else _resolve(base, self.modules))


def read_imports(root: Path, packages: Iterable[str] = PRODUCT_PACKAGES) -> tuple[dict[str, Path], list[Import]]:
    """Every product module under `root` and every import of one product module by another."""
    modules = product_modules(root, packages)
    imports: list[Import] = []
    for name, path in modules.items():
        visitor = _ImportVisitor(name, path.name == "__init__.py", path.relative_to(root).as_posix(), modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports += sorted(set(visitor.found), key=lambda i: (i.line, i.imported))
    return modules, imports


def floor_of(module: str) -> str | None:
    if module in MODULE_FLOORS:
        return MODULE_FLOORS[module]
    packages = [p for p in PACKAGE_FLOORS if module == p or module.startswith(p + ".")]
    return PACKAGE_FLOORS[max(packages, key=len)] if packages else None


def order_problems(imports: Iterable[Import], allowed: dict[tuple[str, str], str] = ALLOWED_AGAINST_ORDER
                   ) -> list[str]:
    """`file:line -> module (why)` for each import against the floors or the lazy-only rule."""
    problems = []
    for imp in imports:
        src, dst = floor_of(imp.importer), floor_of(imp.imported)
        if src is None or dst is None:
            continue  # reported by the floor-map test
        if (imp.importer, imp.imported) in allowed:
            continue
        if src != dst and FLOOR_RANK[src] <= FLOOR_RANK[dst]:
            problems.append(f"{imp.where()}  ({src} must not import {dst})")
        elif (src, dst) in LAZY_ONLY and not imp.lazy and imp.imported not in LIGHT_TRAINING:
            problems.append(f"{imp.where()}  ({src} imports {dst} only inside the function that needs it)")
    return problems


def import_cycles(imports: Iterable[Import]) -> list[list[str]]:
    """Groups of product modules that import each other (directly or round a loop), each sorted; lazy imports
    count."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.imported)
        graph.setdefault(imp.imported, set())
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return sorted(groups)


def _cycle_lines(group: list[str], imports: Iterable[Import]) -> list[str]:
    members = set(group)
    return [imp.where() for imp in imports if imp.importer in members and imp.imported in members]


# -- the product -------------------------------------------------------------------------------------


MODULES, IMPORTS = read_imports(REPO)


def test_every_product_module_has_a_floor() -> None:
    missing = sorted(m for m in MODULES if floor_of(m) is None)
    assert not missing, ("modules without a floor: " + ", ".join(missing)
                         + "; add them to MODULE_FLOORS or PACKAGE_FLOORS in tests/test_import_order.py")
    assert len(MODULES) > 80 and len(IMPORTS) > 300  # the walk found the product, not an empty tree


def test_imports_follow_the_stage_order() -> None:
    problems = order_problems(IMPORTS)
    assert not problems, "imports against the stage order (data -> embed -> index -> search -> app / cli):\n" + (
        "\n".join(problems))


def test_no_import_cycles_between_product_files() -> None:
    cycles = [group for group in import_cycles(IMPORTS) if frozenset(group) not in KNOWN_CYCLES]
    assert not cycles, "import cycles between product files:\n" + "\n".join(
        " <-> ".join(group) + ":\n    " + "\n    ".join(_cycle_lines(group, IMPORTS)) for group in cycles)


def test_every_exception_is_still_needed() -> None:
    edges = {(imp.importer, imp.imported) for imp in IMPORTS}
    stale = [f"{a} -> {b}" for a, b in ALLOWED_AGAINST_ORDER if (a, b) not in edges]
    cycles = {frozenset(group) for group in import_cycles(IMPORTS)}
    stale += [" <-> ".join(sorted(group)) for group in KNOWN_CYCLES if group not in cycles]
    assert not stale, "exceptions no longer needed, delete them from tests/test_import_order.py: " + "; ".join(stale)


# -- the checker itself ------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


def test_the_checker_catches_a_bad_edge_a_cycle_and_an_eager_command(tmp_path: Path) -> None:
    _write(tmp_path, {
        "retrieval/__init__.py": "",
        "retrieval/errors.py": "",
        "retrieval/index/__init__.py": "",
        "retrieval/index/store.py": (  # a lazy import of search from index: against the order, and a cycle
            "from retrieval.errors import *\n"
            "def search():\n"
            "    from retrieval.search.rerank import Reranker\n"),
        "retrieval/search/__init__.py": "",
        "retrieval/search/rerank.py": "from ..index import store\n",  # relative, in order
        "retrieval/cli/__init__.py": "",
        "retrieval/cli/serve.py": (
            "import app.serve\n"  # the server at module level: the command line would load it on --help
            "from training import catalog\n"  # torch-free: allowed at module level
            "def train():\n"
            "    import training.trainer\n"),  # lazy: allowed
        "app/__init__.py": "",
        "app/serve.py": "",
        "training/__init__.py": "",
        "training/catalog.py": "",
        "training/trainer.py": "import app.serve\n",  # siblings never import each other
    })
    modules, imports = read_imports(tmp_path)
    assert {i.where() for i in imports} >= {"retrieval/index/store.py:1 -> retrieval.errors",
                                            "retrieval/search/rerank.py:1 -> retrieval.index.store"}
    assert [i.lazy for i in imports if i.imported == "retrieval.search.rerank"] == [True]
    problems = order_problems(imports)
    assert len(problems) == 3, problems
    assert problems[0].startswith("retrieval/cli/serve.py:1 -> app.serve  (cli imports serve only inside")
    assert problems[1].startswith("retrieval/index/store.py:3 -> retrieval.search.rerank  (index must not import "
                                  "search)")
    assert problems[2].startswith("training/trainer.py:1 -> app.serve  (training must not import serve)")
    assert import_cycles(imports) == [["retrieval.index.store", "retrieval.search.rerank"]]
    assert order_problems(imports, {("retrieval.index.store", "retrieval.search.rerank"): "test"}) == [
        p for p in problems if "store.py" not in p]
