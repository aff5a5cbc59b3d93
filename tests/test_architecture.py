"""The package's shape (issue 19, item 4): no import cycle between modules of compt_scale, and no
function over MAX_FUNCTION_LINES lines. Static (grimp's import graph, ast): no torch import, < 2 s.

The graph leaves out `if TYPE_CHECKING:` imports, as `lint-imports` does (pyproject
[tool.importlinter] exclude_type_checking_imports): they are annotations, never run."""
from __future__ import annotations

import ast
from pathlib import Path

import grimp

import compt_scale

PACKAGE = "compt_scale"
PACKAGE_DIR = Path(compt_scale.__file__).parent
MAX_FUNCTION_LINES = 60   # the style guide's ~60 (a def line to its last line, docstring included)


def import_cycles(graph) -> list[list[str]]:
    """Every strongly connected component of the module graph with more than one module (or a
    module importing itself), each as a cycle through it: [a, b, ..., a]. Tarjan's algorithm."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1 or m in edges[m]:
                components.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    return [_cycle_through(comp, edges) for comp in components]


def _cycle_through(comp: list[str], edges: dict[str, list[str]]) -> list[str]:
    """The shortest cycle from the component's first module back to it (breadth-first)."""
    start, members = comp[0], set(comp)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for n in edges[m]:
                if n == start:
                    path = [m]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if n in members and n not in came_from:
                    came_from[n] = m
                    nxt.append(n)
        frontier = nxt
    raise AssertionError(f"{comp} is not strongly connected")


def long_functions(package_dir: Path, limit: int) -> list[str]:
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(package_dir.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)
    assert len(graph.modules) > 50   # the whole package was read
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    """The finder itself, on hand-made graphs: a 3-module circle, a self-import, an acyclic diamond."""
    g = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.x", "p.x"),
                 ("p.e", "p.f"), ("p.e", "p.g"), ("p.f", "p.h"), ("p.g", "p.h")):
        g.add_import(importer=a, imported=b)
    assert sorted(import_cycles(g)) == [["p.a", "p.b", "p.c", "p.a"], ["p.x", "p.x"]]


def test_no_long_functions():
    too_long = long_functions(PACKAGE_DIR, MAX_FUNCTION_LINES)
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)
