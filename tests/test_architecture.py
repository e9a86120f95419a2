"""The import rules of docs/architecture.md, checked on the source (no imports are executed):

- no import cycles among the project's modules, counting imports inside functions (which would otherwise
  hide a cycle) and leaving out `if TYPE_CHECKING:` blocks, which never run;
- `engine` imports neither `sweep` nor `ray`;
- only `sweep.execution` imports `ray`;
- nothing outside `sweep.cli` imports `sweep.cli`;
- an import inside a function defers a heavy import: a library from HEAVY, or a project module that
  imports one when it is loaded. Anything else is imported at the top of its module.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "sweep")

# Libraries worth not loading until needed, with why. Measured with `python -X importtime` on this machine.
HEAVY = {
    "torch": "about 1.5 s and 300 MB; validating, planning and reporting never need it",
    "transformers": "seconds, and pulls in torch",
    "lm_eval": "seconds: its task registry and transformers",
    "datasets": "about 1 s, pyarrow and fsspec",
    "ray": "about 1 s; only the execution layer runs on Ray",
    "matplotlib": "about 0.5 s; only figures need it",
    "polars": "only the reducer and the report need it",
    "pyarrow": "only Parquet needs it",
    "numpy": "only analyses and figures need it",
    "safetensors": "pulls in torch for its torch API",
    "huggingface_hub": "its HTTP stack; only hub access needs it",
    "gguf": "an optional extra (real-models), absent on most installs",
    "fsspec": "an optional extra (object storage)",
    "accelerate": "pulls in torch",
    "tokenizers": "only tokenizer training needs it",
    "jinja2": "only the report needs it",
    "rich": "about 0.05 s; only `sweep status --watch` on a terminal draws with it",
    "wandb": "an optional extra (sweep export --to wandb); about 0.6 s to import",
    "mlflow": "an optional extra (sweep export --to mlflow); about 2 s to import",
}


@dataclass(frozen=True)
class ImportSite:
    importer: str  # dotted module name
    target: str  # dotted module or library name as written
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, importer: str, is_package: bool, known: set[str]):
        self.importer, self.is_package, self.known = importer, is_package, known
        self.sites: list[ImportSite] = []
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, line: int) -> None:
        self.sites.append(ImportSite(self.importer, target, line, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            module = _resolve_relative(self.importer, self.is_package, node.level, node.module)
        for alias in node.names:
            # `from package import module` imports the module itself
            candidate = f"{module}.{alias.name}"
            self._add(candidate if candidate in self.known else module, node.lineno)


def import_sites() -> list[ImportSite]:
    modules = project_modules()
    known = set(modules)
    sites = []
    for name, path in modules.items():
        collector = _Collector(name, path.name == "__init__.py", known)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        sites.extend(collector.sites)
    return sites


def project_target(target: str, known: set[str]) -> str | None:
    """The project module an import loads (the longest known prefix), or None for a library."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or with a self-import (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _graph(sites: list[ImportSite], known: set[str], module_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in known}
    for site in sites:
        if module_level_only and site.in_function:
            continue
        target = project_target(site.target, known)
        if target is not None and target != site.importer:
            graph[site.importer].add(target)
            # loading a module loads the packages above it
            parts = target.split(".")
            for end in range(1, len(parts)):
                parent = ".".join(parts[:end])
                if parent in known and not in_package(site.importer, parent):
                    graph[site.importer].add(parent)
    return graph


def heavy_modules(sites: list[ImportSite], known: set[str]) -> set[str]:
    """Project modules that load a HEAVY library when they are imported (directly or through others)."""
    graph = _graph(sites, known, module_level_only=True)
    heavy = {s.importer for s in sites if not s.in_function and s.target.split(".")[0] in HEAVY}
    changed = True
    while changed:
        changed = False
        for module, targets in graph.items():
            if module not in heavy and targets & heavy:
                heavy.add(module)
                changed = True
    return heavy


@pytest.fixture(scope="module")
def sites() -> list[ImportSite]:
    return import_sites()


@pytest.fixture(scope="module")
def known() -> set[str]:
    return set(project_modules())


def where(site: ImportSite) -> str:
    return f"{site.importer} (line {site.line}) imports {site.target}"


def test_no_import_cycles(sites, known):
    cycles = find_cycles(_graph(sites, known))
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_engine_imports_neither_sweep_nor_ray(sites):
    bad = [where(s) for s in sites if in_package(s.importer, "engine")
           and s.target.split(".")[0] in ("sweep", "ray")]
    assert not bad, "\n".join(bad)


def test_only_execution_imports_ray(sites):
    bad = [where(s) for s in sites if s.target.split(".")[0] == "ray"
           and not in_package(s.importer, "sweep.execution")]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli(sites, known):
    bad = [where(s) for s in sites if not in_package(s.importer, "sweep.cli")
           and (t := project_target(s.target, known)) is not None and in_package(t, "sweep.cli")]
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_defer_heavy_ones(sites, known):
    heavy = heavy_modules(sites, known)
    bad = []
    for site in sites:
        if not site.in_function:
            continue
        target = project_target(site.target, known)
        if target is None and site.target.split(".")[0] not in HEAVY:
            bad.append(f"{where(site)}: a light library; import it at the top")
        elif target is not None and target not in heavy:
            bad.append(f"{where(site)}: loads no heavy library; import it at the top")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------- the checker itself on known graphs
def test_cycle_finder_sees_long_and_self_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_collector_sees_function_level_and_skips_type_checking():
    source = ("from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    import torch\n"
              "def f():\n    from sweep.cli import main\n    import json\n")
    collector = _Collector("sweep.x", False, {"sweep.cli", "sweep.cli.main"})
    collector.visit(ast.parse(source))
    seen = {(s.target, s.in_function) for s in collector.sites}
    assert seen == {("typing", False), ("os", False), ("sweep.cli.main", True), ("json", True)}


def test_the_cli_starts_without_heavy_libraries(sites, known):
    """`sweep validate` and `sweep plan` answer in a moment: loading the CLI loads no HEAVY library
    (commands that need one import it when they run)."""
    heavy = heavy_modules(sites, known)
    graph = _graph(sites, known, module_level_only=True)
    seen, stack = set(), ["sweep.cli.main"]
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack.extend(graph[module])
    culprits = sorted(m for m in seen if m in heavy and not graph[m] & heavy)
    assert "sweep.cli.main" not in heavy, f"loading sweep.cli.main loads a heavy library through {culprits}"


def test_sweep_folders_depend_one_way(sites, known):
    """The folders of sweep/ form a hierarchy (cli > execution > plan, results > store, study): no two of
    them import each other, even through other folders, so each can be read and tested from below."""
    folders: dict[str, set[str]] = {}
    for site in sites:
        target = project_target(site.target, known)
        if target is None or not in_package(site.importer, "sweep") or not in_package(target, "sweep"):
            continue
        here, there = ".".join(site.importer.split(".")[:2]), ".".join(target.split(".")[:2])
        if here != there:
            folders.setdefault(here, set()).add(there)
    assert not find_cycles(folders), folders
    assert not folders.get("sweep.study"), folders.get("sweep.study")
    assert not folders.get("sweep.store"), folders.get("sweep.store")
    assert folders.get("sweep.results", set()) <= {"sweep.store"}, folders.get("sweep.results")
