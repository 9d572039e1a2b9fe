"""The kit's tiers: every import points down a tier or stays inside one, and no modules import each other round.

ARCHITECTURE "The house": config → components → model/presets/flow → convert, data → synth → inference → training →
systems → eval → cli. Imports inside functions count (they are edges a reader and a cycle both see). The test parses
every module with :mod:`ast` (no import runs) and names each offending edge, so a break says which line to move.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "chatumm_kit"

# Lowest first. A module's tier is the first entry whose name is the module or a package above it.
TIERS: list[tuple[str, ...]] = [
    ("chatumm_kit.config",),
    ("chatumm_kit.components",),
    ("chatumm_kit.model", "chatumm_kit.presets", "chatumm_kit.flow"),
    ("chatumm_kit.convert", "chatumm_kit.data"),
    ("chatumm_kit.synth",),
    ("chatumm_kit.inference",),
    ("chatumm_kit.training",),
    ("chatumm_kit.systems",),
    ("chatumm_kit.eval",),
    ("chatumm_kit.cli", "chatumm_kit.__main__"),
]
# The command-line front ends of lower packages are the cli tier (they parse argv and call down).
CLI_MODULES = ("chatumm_kit.convert.cli", "chatumm_kit.eval.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def tier_of(module: str) -> int | None:
    if module == PACKAGE:
        return None  # the package root holds only __version__
    if module in CLI_MODULES:
        return len(TIERS) - 1
    for index, names in enumerate(TIERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    raise AssertionError(f"{module} belongs to no tier: add it to TIERS in tests/test_layering.py")


def imported_modules(path: Path, module: str, known: dict[str, Path]) -> list[tuple[str, int]]:
    """Every kit module ``module`` imports (top level and inside functions), with the line, resolved to a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    edges: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from pkg import sub` imports the submodule when one exists, else a name from pkg.
            targets = [
                f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in known else base_name
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                edges.append((target, node.lineno))
    return edges


def import_graph() -> dict[str, list[tuple[str, int]]]:
    known = all_modules()
    return {name: imported_modules(path, name, known) for name, path in known.items()}


def upward_edges(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for source, edges in graph.items():
        for target, line in edges:
            s, t = tier_of(source), tier_of(target)
            if s is not None and t is not None and t > s:
                bad.append(f"{source}:{line} imports {target} (tier {t} > tier {s})")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, []):
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def cycle_edges(graph: dict[str, list[tuple[str, int]]], component: list[str]) -> list[str]:
    members = set(component)
    return [
        f"{source}:{line} -> {target}" for source in component for target, line in graph[source] if target in members
    ]


def test_every_module_has_a_tier():
    for name in all_modules():
        tier_of(name)


def test_imports_point_only_down_the_tiers():
    bad = upward_edges(import_graph())
    assert not bad, "imports that point up a tier:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        "  " + " <-> ".join(c) + "\n    " + "\n    ".join(cycle_edges(graph, c)) for c in found
    )


def test_checker_names_an_upward_edge_and_a_cycle():
    """The checks can fail: a fake graph with one upward edge and one two-module cycle is caught, edge by edge."""
    graph = {
        "chatumm_kit.components.vae": [("chatumm_kit.training.callbacks", 7)],
        "chatumm_kit.training.callbacks": [("chatumm_kit.training.ema", 3)],
        "chatumm_kit.training.ema": [("chatumm_kit.training.callbacks", 9)],
    }
    assert upward_edges(graph) == [
        "chatumm_kit.components.vae:7 imports chatumm_kit.training.callbacks (tier 6 > tier 1)"
    ]
    found = cycles(graph)
    assert found == [["chatumm_kit.training.callbacks", "chatumm_kit.training.ema"]]
    assert cycle_edges(graph, found[0]) == [
        "chatumm_kit.training.callbacks:3 -> chatumm_kit.training.ema",
        "chatumm_kit.training.ema:9 -> chatumm_kit.training.callbacks",
    ]


def test_function_level_imports_are_edges(tmp_path):
    source = tmp_path / "presets.py"
    source.write_text("def f():\n    from chatumm_kit.training.callbacks import x\n    return x\n")
    known = {"chatumm_kit.presets": source, "chatumm_kit.training.callbacks": source}
    assert imported_modules(source, "chatumm_kit.presets", known) == [("chatumm_kit.training.callbacks", 2)]


@pytest.mark.parametrize("module", ["chatumm_kit.cli", "chatumm_kit.convert.cli", "chatumm_kit.eval.cli"])
def test_command_lines_are_the_top_tier(module):
    assert tier_of(module) == len(TIERS) - 1
