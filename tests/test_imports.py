"""The import graph of pipeline/ and shards/, read with ast (nothing is imported): no cycle, every edge allowed by
the module map of docs/architecture.md (kept equal to LAYERS below), and DeepSpeed, accelerate and datasets each
imported by their own modules only.

Every ``import`` counts, at module top or inside a function. ``from pipeline import distributed`` is an edge to the
module pipeline.distributed, ``from pipeline.models import create_model`` one to the package pipeline.models. For
cycles, an import of ``a.b.c`` also counts as one of the packages ``a.b`` and ``a`` (Python runs their
``__init__.py`` first) unless the importer is inside them.
"""

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "shards")
DOC = REPO / "docs" / "architecture.md"

# The module map, top layer first: a module may import the modules of its own layer and of the layers below it.
# docs/architecture.md holds the same table (between its module-map markers); test_doc_map_is_this_map keeps them equal.
LAYERS = {
    "entry points": ("pipeline.pretrain", "pipeline.finetune", "pipeline.finetune_lib", "pipeline.demo",
                     "pipeline.demo_ablation", "pipeline.evaluate",
                     "pipeline.models.__main__"),
    "trainer": ("pipeline.trainer",),
    "export": ("pipeline.export",),
    "backends": ("pipeline.engine", "pipeline.accel"),
    "training components": ("pipeline.backend", "pipeline.checkpoint", "pipeline.runlock", "pipeline.preemption",
                            "pipeline.ema", "pipeline.bn", "pipeline.optim", "pipeline.losses", "pipeline.metrics"),
    "schedule": ("pipeline.progressive",),
    "data": ("pipeline.data", "pipeline.data.loader", "pipeline.data.hf", "pipeline.data.shards",
             "pipeline.data.tar", "pipeline.data.transforms", "pipeline.data.decode", "pipeline.data.mixing",
             "pipeline.data.protocol", "pipeline.data.workers", "pipeline.data._forkserver"),
    "config": ("pipeline.config",),
    "base": ("pipeline", "pipeline.distributed", "pipeline.testhooks", "pipeline.watchdog", "pipeline.models",
             "pipeline.models.efficientnetv2", "pipeline.models.builder", "pipeline.models.blocks",
             "pipeline.models.timm_import"),
    "shards": ("shards", "shards.__main__", "shards.cli", "shards.writer", "shards.verify", "shards.plan",
               "shards.sources", "shards.images", "shards.demo", "shards.photos", "shards.format", "shards.remote"),
}

# pipeline reaches the shard toolkit through its format contract (file names, sample members, info.json) and its
# remote transport (http(s):// and s3:// with retries and the node cache) only.
SHARDS_INTERFACE = {"shards.format", "shards.remote"}

# The only importers of the heavy optional libraries (anywhere in pipeline/ and shards/; tests and bench may).
ONLY_IMPORTERS = {
    "deepspeed": {"pipeline.engine"},
    "accelerate": {"pipeline.accel"},
    "datasets": {"pipeline.data.hf", "shards.sources"},
}

# Edges the map refuses that the code has today, (importer, imported) -> why. Each is left out of the cycle check
# too. The goal is none: when the code no longer has the edge, test_exceptions_are_still_needed asks to delete it.
EXCEPTIONS: dict = {}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    path: str
    line: int
    via: str | None = None  # set on the package a.b that importing a.b.c (via) runs first

    @property
    def explicit(self) -> bool:
        return self.via is None

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def discover_modules() -> dict:
    """Dotted module name -> (file, is_package) for every .py file of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            mods[".".join(parts)] = (path, is_package)
    return mods


MODULES = discover_modules()


def owning_module(name: str) -> str | None:
    """The longest prefix of ``name`` that is a project module (``pipeline.models.create_model`` ->
    ``pipeline.models``); None for a name outside the project."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def import_targets(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The dotted names one import statement loads (a module, or a package that holds the names imported)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    targets = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        targets.append(sub if sub in MODULES else source)
    return list(dict.fromkeys(targets))


def read_imports() -> tuple[list[Edge], dict]:
    """The edges between the project's modules, and library root name -> {importer: [file:line, ...]}."""
    edges: list[Edge] = []
    libraries: dict = {}
    for module, (path, is_package) in MODULES.items():
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in import_targets(module, is_package, node):
                dst = owning_module(target)
                if dst is None:
                    libraries.setdefault(target.split(".")[0], {}).setdefault(module, []).append(
                        f"{rel}:{node.lineno}")
                    continue
                edges.append(Edge(module, dst, rel, node.lineno))
                parts = dst.split(".")
                for n in range(1, len(parts)):
                    parent = ".".join(parts[:n])
                    if parent in MODULES and not (module + ".").startswith(parent + "."):
                        edges.append(Edge(module, parent, rel, node.lineno, via=dst))
    return edges, libraries


EDGES, LIBRARIES = read_imports()
LAYER_OF = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}  # 0 = top


def excused(edge: Edge) -> bool:
    """An edge that an EXCEPTIONS entry covers (a package edge goes with the import that makes it)."""
    return (edge.src, edge.via or edge.dst) in EXCEPTIONS


def refused(edge: Edge) -> str | None:
    """Why the module map refuses an explicit edge; None when it allows it."""
    src, dst = edge.src, edge.dst
    if src == dst:
        return None
    src_pkg, dst_pkg = src.split(".")[0], dst.split(".")[0]
    if src_pkg != dst_pkg:
        if src_pkg == "pipeline" and dst in SHARDS_INTERFACE:
            return None
        if src_pkg == "pipeline":
            return f"pipeline may import from shards only {sorted(SHARDS_INTERFACE)}"
        return f"{src_pkg} may not import {dst_pkg}"
    missing = [m for m in (src, dst) if m not in LAYER_OF]
    if missing:
        return f"{' and '.join(missing)} not in the module map"
    if LAYER_OF[dst] < LAYER_OF[src]:
        layer = list(LAYERS)
        return f"layer '{layer[LAYER_OF[src]]}' imports the higher layer '{layer[LAYER_OF[dst]]}'"
    return None


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of the graph as its edges, or None."""
    graph: dict = {}
    for e in edges:
        if e.src != e.dst:
            graph.setdefault(e.src, {}).setdefault(e.dst, e)  # the first import of dst is the one shown
    state: dict = {}  # 1: on the current path, 2: done
    path: list[Edge] = []

    def visit(node: str) -> list[Edge] | None:
        state[node] = 1
        for nxt, edge in sorted(graph.get(node, {}).items()):
            if state.get(nxt) == 1:
                start = next(i for i, e in enumerate(path) if e.src == nxt)  # no self-edges: nxt is earlier
                return path[start:] + [edge]
            if nxt not in state:
                path.append(edge)
                found = visit(nxt)
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def format_cycle(cycle: list[Edge]) -> str:
    return cycle[0].src + "".join(f"\n  -> {e.dst}   ({e.where()}{'' if e.explicit else f', importing {e.via}'})"
                                  for e in cycle)


# ---------------------------------------------------------------------------------------------- the tests


def test_the_graph_is_read():
    pairs = {(e.src, e.dst) for e in EDGES if e.explicit}
    assert len(MODULES) >= 40
    assert ("pipeline.trainer", "pipeline.distributed") in pairs  # from pipeline import distributed
    assert ("pipeline.trainer", "pipeline") not in pairs  # ... is no edge to the package
    assert ("pipeline.data.loader", "pipeline.config") in pairs  # from ..config import DataConfig
    assert ("pipeline.pretrain", "pipeline.models") in pairs  # from pipeline.models import create_model
    assert ("pipeline.trainer", "pipeline.accel") in pairs  # inside a function
    assert "pipeline.engine" in LIBRARIES["deepspeed"]  # inside a function
    assert any(e.src == "pipeline.trainer" and e.dst == "pipeline.data" and not e.explicit for e in EDGES)


def test_no_import_cycle():
    cycle = find_cycle([e for e in EDGES if not excused(e)])
    assert cycle is None, "import cycle:\n" + format_cycle(cycle)


def test_every_import_is_allowed_by_the_module_map():
    bad = [f"{e.where()}: {e.src} -> {e.dst}: {why}" for e in EDGES
           if e.explicit and not excused(e) and (why := refused(e))]
    assert not bad, ("imports the module map (docs/architecture.md) refuses:\n  " + "\n  ".join(bad)
                     + "\nmove the code, or change the map in both places")


def test_exceptions_are_still_needed():
    for (src, dst), why in EXCEPTIONS.items():
        found = [e for e in EDGES if e.explicit and e.src == src and e.dst == dst]
        assert found, f"{src} no longer imports {dst}: delete its entry from EXCEPTIONS"
        assert refused(found[0]), f"the map now allows {src} -> {dst}: delete its entry from EXCEPTIONS"
        assert why


def test_heavy_libraries_have_their_own_importers():
    for lib, allowed in ONLY_IMPORTERS.items():
        importers = LIBRARIES.get(lib, {})
        assert set(importers) == allowed, (
            f"{lib} is imported by {sorted(importers)} ({', '.join(w for ws in importers.values() for w in ws)}); "
            f"only {sorted(allowed)} may (and do) import it")


def test_every_module_is_placed_once():
    placed = [m for mods in LAYERS.values() for m in mods]
    twice = sorted({m for m in placed if placed.count(m) > 1})
    assert not twice, f"modules in two layers: {twice}"
    unplaced = sorted(set(MODULES) - set(placed))
    assert not unplaced, f"modules missing from the module map (place them in LAYERS and the doc): {unplaced}"
    gone = sorted(set(placed) - set(MODULES))
    assert not gone, f"the module map names modules that do not exist: {gone}"


def doc_map() -> dict:
    """The layer table between ``<!-- module-map -->`` and ``<!-- /module-map -->`` in docs/architecture.md: layer ->
    the backquoted module names of its second column, in order."""
    text = DOC.read_text()
    m = re.search(r"<!-- module-map -->(.*?)<!-- /module-map -->", text, re.DOTALL)
    assert m, f"{DOC}: no <!-- module-map --> ... <!-- /module-map --> section"
    rows = [line.strip() for line in m.group(1).splitlines() if line.strip().startswith("|")]
    out = {}
    for row in rows[2:]:  # the header and the |---| line
        cells = [c.strip() for c in row.strip("|").split("|")]
        layer = cells[0].strip("*").strip()
        out[layer] = tuple(re.findall(r"`([\w.]+)`", cells[1]))
    return out


def test_doc_map_is_this_map():
    doc = doc_map()
    assert list(doc) == list(LAYERS), f"layers of docs/architecture.md {list(doc)} != LAYERS {list(LAYERS)}"
    for layer, mods in LAYERS.items():
        assert sorted(doc[layer]) == sorted(mods), (
            f"layer '{layer}': docs/architecture.md lists {sorted(doc[layer])}, the test {sorted(mods)}")


@pytest.mark.parametrize("lib", sorted(ONLY_IMPORTERS))
def test_doc_names_the_heavy_importers(lib):
    text = DOC.read_text()
    for module in ONLY_IMPORTERS[lib]:
        assert f"`{module}`" in text and f"`{lib}`" in text, f"docs/architecture.md: say that {module} imports {lib}"
