"""The layout's rules, checked on the source (DESIGN.md "Layout" and "Contracts"): no import cycle anywhere in
vitlab/, imports flow down (layers import torch only, data and optim import no models, only lit/ and cli/ import
Lightning or Hydra), and the composition root, the Lightning adapter, the recipes and the CLI never branch on a
task's name or probe a task / backbone / recipe with getattr, hasattr or inspect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PKG = REPO / "vitlab"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[str]:
    """Every module this file imports, at any depth (function-level imports included), TYPE_CHECKING blocks not."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(sub if sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


GRAPH = {name: sorted({m for m in _imports(p) if m in MODULES and m != name}) for name, p in MODULES.items()}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    """The check can fail: a planted cycle a -> b -> c -> a is found, a chain is not."""
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": ["c"], "c": []}) == []


def test_no_import_cycle_in_vitlab():
    assert len(GRAPH) > 80, "the import graph was not built"
    assert _cycles(GRAPH) == [], "import cycles (each line a group of modules that import each other)"


def _third_party(name: str) -> str:
    return name.split(".")[0]


def _all_imports(prefix: str) -> dict[str, set[str]]:
    return {n: set(_imports(p)) for n, p in MODULES.items() if n == prefix or n.startswith(prefix + ".")}


def test_layers_import_torch_only():
    allowed = {"torch", "vitlab", "__future__", "collections", "contextlib", "functools", "logging", "math", "re",
               "warnings", "typing", "dataclasses", "flash_attn", "itertools"}
    for name, imported in _all_imports("vitlab.layers").items():
        bad = {m for m in imported if _third_party(m) not in allowed or
               (m.startswith("vitlab.") and not m.startswith("vitlab.layers"))}
        assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["vitlab.data", "vitlab.optim"])
def test_data_and_optim_import_no_models(package):
    for name, imported in _all_imports(package).items():
        bad = {m for m in imported if m.startswith(("vitlab.backbones", "vitlab.tasks", "vitlab.recipes",
                                                    "vitlab.lit", "vitlab.cli", "vitlab.layers"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_only_lit_and_cli_import_lightning_or_hydra():
    framework = ("pytorch_lightning", "lightning", "lightning_fabric", "hydra")
    for name, path in MODULES.items():
        if name.startswith(("vitlab.lit", "vitlab.cli")):
            continue
        bad = {m for m in _imports(path) if _third_party(m) in framework}
        assert not bad, f"{name} imports {sorted(bad)}"


# ------------------------------------------------------------ contracts ---

def _task_kinds() -> set[str]:
    from vitlab.tasks.base import Task

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    import vitlab.tasks  # noqa: F401  (registers every task class)

    return {c.kind for c in subclasses(Task) if c.__module__.startswith("vitlab.")}


def test_every_task_declares_its_contract():
    from vitlab.tasks.base import Task

    kinds = _task_kinds()
    assert {"classification", "multilabel", "detection", "segmentation", "diffusion"} <= kinds
    for cls in Task.__subclasses__():
        if not cls.__module__.startswith("vitlab."):
            continue                                   # a test's own stand-in
        assert cls.kind != "?" and cls.data_kind != "?" and cls.data_hint != "?", cls
        assert cls.from_data is not Task.from_data, f"{cls.__name__} does not implement from_data"
        for method in ("training_step", "evaluation_step", "metrics", "predict"):
            assert getattr(cls, method) is not getattr(Task, method), f"{cls.__name__} lacks {method}"


COMPOSITION = ["vitlab.lit.build", "vitlab.lit.module", "vitlab.lit.datamodule", "vitlab.recipes", "vitlab.cli"]


def _strings_and_probes(path: Path) -> tuple[list[str], list[str]]:
    tree = ast.parse(path.read_text(), str(path))
    strings, probes = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            probes.append(f"{path.name}:{node.lineno} {node.func.id}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if "inspect" in names:
                probes.append(f"{path.name}:{node.lineno} import inspect")
    return strings, probes


def test_no_task_name_branching_outside_the_tasks():
    kinds = _task_kinds()
    found = []
    for name, path in MODULES.items():
        if name.startswith(tuple(COMPOSITION)):
            strings, _ = _strings_and_probes(path)
            found += [f"{name}: {s!r}" for s in strings if s in kinds]
    assert found == [], "task names used as values outside vitlab/tasks (read a declared attribute instead)"


def test_the_builder_and_the_module_read_declarations_not_probes():
    for name in ("vitlab.lit.build", "vitlab.recipes.supervised", "vitlab.recipes.base"):
        _, probes = _strings_and_probes(MODULES[name])
        assert probes == [], f"{name} probes: {probes}"
