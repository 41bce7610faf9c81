"""The package's import graph: no circle, and no import from a lower layer to a higher one.

The graph is read with the standard ``ast`` module from the source files (every ``import`` and
``from ... import`` statement, including those inside functions), so it is the graph a reader
sees, not the one a particular run happens to execute.

Layers, lowest first (a module may import its own layer and the layers below it):

0. shared basics: ``vpr_localizer.{errors, files, device, geodesy, param_files}``
1. ``vpr_localizer.io``            image files, ROS image messages as arrays, bags, image sets
2. ``vpr_localizer.segmentation``  Cityscapes classes, backends
3. ``vpr_localizer.models``        backbones, aggregators, PCA, the encoder
4. ``vpr_localizer.mapping``       index, map store, map building, loop closure
5. ``vpr_localizer.localization``  retrieval, pose, re-ranking, sequences
6. ``vpr_localizer.evaluation``    metrics, scenarios, plots, tables
7. ``vpr_localizer.training``      training
8. ``vpr_ros`` glue                conversions, QoS, workers, parameters, diagnostics, spin
9. the nodes                       segmentation_node, attention_node, localizer_node, map_builder
10. ``vpr_ros.{graph, replay, demo}`` in-process launcher, bag replay, ROS demo
11. ``vpr_localizer.cli``           the command line
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vpr_localizer", "vpr_ros", "segmentation_node", "attention_node", "localizer_node", "map_builder")

# most specific prefix wins
LAYERS: Dict[str, int] = {
    "vpr_localizer": 0,
    "vpr_localizer.io": 1,
    "vpr_localizer.segmentation": 2,
    "vpr_localizer.models": 3,
    "vpr_localizer.mapping": 4,
    "vpr_localizer.localization": 5,
    "vpr_localizer.evaluation": 6,
    "vpr_localizer.training": 7,
    "vpr_ros": 8,
    "segmentation_node": 9,
    "attention_node": 9,
    "localizer_node": 9,
    "map_builder": 9,
    "vpr_ros.graph": 10,
    "vpr_ros.replay": 10,
    "vpr_ros.demo": 10,
    "vpr_localizer.cli": 11,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Package modules imported by one module (absolute and relative, any nesting depth).
    ``from a.b import c`` counts ``a.b.c`` when that is a module, else ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` where only a.b is ours, etc.
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer_of(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"module {name} is in no layer: add its package to LAYERS in {__file__}")
    return LAYERS[best]


def import_graph() -> Dict[str, Set[str]]:
    mods = package_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_is_read_from_every_package(graph):
    # the check would pass vacuously on an empty or partial graph
    for pkg in PACKAGES:
        assert pkg in graph, f"package {pkg} not found under {REPO}"
    assert "vpr_localizer.models.encoder" in graph["vpr_localizer.mapping.build"]
    assert "vpr_localizer.models.registry" in graph["vpr_localizer.models.encoder"]


def test_no_import_circle(graph):
    assert circles(graph) == []


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    bad = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                 for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))
    assert bad == []


def test_the_checks_catch_what_they_claim():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(planted) == [["a", "b", "c"]]
    assert layer_of("vpr_localizer.models.encoder") < layer_of("vpr_localizer.mapping.store") \
        < layer_of("vpr_ros.convert") < layer_of("attention_node.node") < layer_of("vpr_ros.graph") \
        < layer_of("vpr_localizer.cli.main")
    known = {"vpr_localizer.models", "vpr_localizer.models.encoder", "vpr_localizer.errors"}
    src = REPO / "vpr_localizer" / "models" / "encoder.py"
    found = imports_of("vpr_localizer.models.encoder", src, known)
    assert "vpr_localizer.errors" in found
