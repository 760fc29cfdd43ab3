"""The package's layers (README, "Where things live"): every module imports only from its
own room (module or package) and from the rooms its row of the table allows, all in
layers below; no imports form a cycle. Imports are read with `ast` from every module,
those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"

ANY_BELOW = None
# Bottom to top, one layer per row: room -> the rooms it may import (all in lower layers),
# or ANY_BELOW. The rooms of one row may not import each other.
LAYERS: list[dict[str, set[str] | None]] = [
    {"tropd": set()},  # the package itself: its version
    {"tropd.config": set(), "tropd.console": set(), "tropd.kernels": set()},
    {"tropd.batch": set(), "tropd.head": {"tropd.kernels"}},
    {"tropd.objectives": {"tropd.batch", "tropd.head"}},
    {"tropd.models": set(), "tropd.compress": set(), "tropd.lora": set()},
    {"tropd.rollout": {"tropd.batch", "tropd.head", "tropd.kernels"}},
    {"tropd.teacher": {"tropd.batch", "tropd.head", "tropd.rollout"}},
    {"tropd.tasks": set()},  # prompts and verifiers: no models, no teacher
    {"tropd.task_eval": {"tropd.console", "tropd.rollout", "tropd.tasks"}},
    {
        "tropd.recipes": {
            "tropd.console",
            "tropd.models",
            "tropd.rollout",
            "tropd.tasks",
            "tropd.teacher",
        }
    },
    {
        "tropd.model_names": {
            "tropd.config",
            "tropd.models",
            "tropd.compress",
            "tropd.lora",
            "tropd.recipes",
            "tropd.tasks",
        },
        "tropd.train.trackers": {"tropd.config"},  # metrics out to trackers: no models
    },
    {"tropd.train": ANY_BELOW},
    {"tropd.plot": set()},
    {"tropd.demo": ANY_BELOW},
    {"tropd.cli": ANY_BELOW},
    {"tropd.__main__": {"tropd.cli"}},
]

# Imports allowed against the table, as (importer module, imported module) -> the reason;
# the README names the same ones. There are none.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((SRC / "tropd").rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The tropd modules `name` imports anywhere in its file (a `from package import
    submodule` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: relative import; the package imports absolutely"
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {m for m in found if m in MODULES}


def room(name: str) -> str:
    """The table entry a module belongs to: itself, or the package it is in (`tropd`
    holds only the package's own `__init__`)."""
    for row in LAYERS:
        for entry in row:
            if name == entry or (entry != "tropd" and name.startswith(entry + ".")):
                return entry
    raise AssertionError(f"{name} is in no layer; add it to LAYERS and the README table")


def layer(room_name: str) -> int:
    return next(i for i, row in enumerate(LAYERS) if room_name in row)


def may_import(importer: str, target: str) -> bool:
    """Whether room `importer` may import room `target` by the table."""
    allowed = LAYERS[layer(importer)][importer]
    below = layer(target) < layer(importer)
    return below and (allowed is ANY_BELOW or target in allowed)


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for name in MODULES:
        room(name)


def test_the_table_allows_only_rooms_below() -> None:
    for row in LAYERS:
        for importer, allowed in row.items():
            for target in allowed or ():
                assert layer(target) < layer(importer), (importer, target)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_table(name: str) -> None:
    mine = room(name)
    upward = []
    for target in sorted(GRAPH[name]):
        theirs = room(target)
        if theirs == mine or may_import(mine, theirs):
            continue
        if (name, target) not in ALLOWED_UPWARD:
            upward.append(f"{target} ({theirs}, layer {layer(theirs)})")
    assert not upward, f"{name} ({mine}, layer {layer(mine)}) may not import: {upward}"


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the import graph: every one is a
    single module that does not import itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in GRAPH[node]:
                cycles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_imports_inside_functions() -> None:
    """Function-local imports count (what would dodge a cycle at run time still shows
    here), and `from package import submodule` is an edge to the submodule."""
    assert "tropd.train.loop" in GRAPH["tropd.cli"]  # imported inside a CLI handler
    assert "tropd.objectives.methods" in GRAPH["tropd.objectives"]
