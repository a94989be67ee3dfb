"""The import graph reads one way: cli -> run/sweep/report -> engine -> methods -> optim/params
-> box -> backbones -> data, over a base of shared utilities.

Every module under src/bbpt is parsed with ``ast`` (nothing is imported) and each of its
bbpt-internal imports is an edge. Module-level imports and imports inside functions (the
deliberate lazy ones) both count: a lazy import still runs when its function is called, so a
lazy back-edge is listed in ALLOWED with its reason or it fails the test. Imports under
``if TYPE_CHECKING:`` never run and are left out.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bbpt

SRC = Path(bbpt.__file__).resolve().parent  # the package under test (src/bbpt)

# Lowest first. A module may import its own layer and the layers below; the longest prefix
# names a module's layer, and a module under no prefix fails the test until it is placed.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("bbpt", "bbpt.errors", "bbpt.registry", "bbpt.plugins", "bbpt.state", "bbpt.progress")),
    ("data", ("bbpt.data",)),
    ("backbones", ("bbpt.models", "bbpt.models.backbone", "bbpt.models.catalog", "bbpt.models.hf",
                   "bbpt.models.openclip", "bbpt.models.fastvit", "bbpt.models.cache")),
    # the black box: in process (models/blackbox and its parts, the white box for CoOp, the
    # meter, the mini model's pretraining script that scores through it), the transports
    # (bbpt.boxes), and the HTTP client of `bbpt serve` with its wire format and batcher
    ("box", ("bbpt.models.blackbox", "bbpt.models.prompts", "bbpt.models.checks", "bbpt.models.protocol",
             "bbpt.models.caches", "bbpt.models.texts", "bbpt.models.localbox", "bbpt.models.whitebox",
             "bbpt.models.meter", "bbpt.models.pretrain", "bbpt.boxes", "bbpt.serve.client", "bbpt.serve.wire",
             "bbpt.serve.batcher")),
    ("optim", ("bbpt.optim", "bbpt.params")),
    ("methods", ("bbpt.methods",)),
    # config, evaluation, loop, run_result, signals and api: the engine's split (branch i27-engine)
    ("engine", ("bbpt.engine", "bbpt.results", "bbpt.runfolder", "bbpt.tracking", "bbpt.config", "bbpt.evaluation", "bbpt.loop",
                "bbpt.run_result", "bbpt.signals")),
    ("run", ("bbpt.sweep", "bbpt.report", "bbpt.report_html", "bbpt.protocols", "bbpt.reproduce", "bbpt.serve",
             "bbpt.api")),
    ("cli", ("bbpt.cli", "bbpt.__main__")),
]

# Back-edges that stay, each with why: (importer, imported) -> reason.
ALLOWED = {
    ("bbpt.data.staging", "bbpt.models.prompts"):
        "the staged few-shot batches are the box's input value type, Images; bbpt.models.prompts "
        "imports nothing of bbpt but bbpt.errors (asserted below), so this pulls in no box",
    ("bbpt.boxes", "bbpt.methods"):
        "lazy, in boxes.check_fit: a box's refusal names the methods that do fit it, read from "
        "the method registry (check_fit's callers, the engine and the tests, pass only the method)",
}


def _layer(mod: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    if best is None:
        raise AssertionError(f"{mod} is in no layer: add it to LAYERS in tests/test_imports.py")
    return best[0]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """The bbpt modules ``mod`` imports at run time (module level or inside functions)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for c in child.orelse:
                    visit(c)
                continue  # never runs
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in known)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m == "bbpt" or m.startswith("bbpt.")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for mod in _modules():
        _layer(mod)


def test_no_module_imports_a_higher_layer():
    back = []
    for mod, deps in _graph().items():
        for dep in deps:
            if _layer(dep) > _layer(mod) and (mod, dep) not in ALLOWED:
                back.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    assert back == [], "imports against the layering:\n" + "\n".join(sorted(back))


def test_the_allowances_are_still_needed():
    graph = _graph()
    stale = [edge for edge in ALLOWED if edge[1] not in graph.get(edge[0], set())]
    assert stale == [], f"allowed back-edges no longer imported, drop them from ALLOWED: {stale}"


@pytest.mark.parametrize("mod, forbidden", [
    ("bbpt.data", ("bbpt.models", "bbpt.boxes", "bbpt.methods", "bbpt.engine", "bbpt.cli", "bbpt.sweep")),
    ("bbpt.models", ("bbpt.boxes", "bbpt.methods", "bbpt.engine", "bbpt.cli", "bbpt.sweep")),
    ("bbpt.models.blackbox", ("bbpt.methods", "bbpt.engine", "bbpt.cli", "bbpt.sweep", "bbpt.optim")),
    ("bbpt.methods", ("bbpt.engine", "bbpt.cli", "bbpt.sweep", "bbpt.report")),
])
def test_the_layers_the_graph_forbids_never_reach_the_importer(mod, forbidden):
    """The graph's rules, by their consequences: what a layer reaches, transitively."""
    graph, seen, todo = _graph(), set(), [mod]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [d for d in graph.get(m, ()) if (m, d) not in ALLOWED]
    bad = sorted(m for m in seen if m.startswith(forbidden))
    assert bad == []


def test_value_types_import_nothing_of_the_box():
    """What makes the one data -> models allowance harmless."""
    assert _graph()["bbpt.models.prompts"] <= {"bbpt.errors"}


def _loaded_after(statement: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    code = f"import sys\n{statement}\nprint('\\n'.join(m for m in sys.modules if m == 'bbpt' or m.startswith('bbpt.')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


@pytest.mark.parametrize("statement, expected, forbidden", [
    ("import bbpt.data", "bbpt.data.core", ("bbpt.models", "bbpt.methods", "bbpt.engine")),
    ("import bbpt.models", "bbpt.models", ("bbpt.data", "bbpt.methods", "bbpt.engine")),
    ("from bbpt.models import BlackBox", "bbpt.models.localbox", ("bbpt.methods", "bbpt.engine", "bbpt.optim", "bbpt.cli")),
    ("import bbpt.data.staging", "bbpt.models.prompts",
     ("bbpt.methods", "bbpt.engine", "bbpt.models.localbox", "bbpt.models.backbone")),
])
def test_a_fresh_interpreter_loads_only_the_layers_below(statement, expected, forbidden):
    loaded = _loaded_after(statement)
    assert expected in loaded
    assert sorted(m for m in loaded if m.startswith(forbidden)) == []
