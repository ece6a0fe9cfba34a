"""The import graph of atp/ runs one way: no circles, and no arrow from a lower layer to a higher one.

The graph is read from the source with `ast` (nothing is imported). Every `import` and
`from ... import` statement counts, also those inside functions (a lazy import still makes a
circle: the module needs the other one to run). Implicit imports of parent packages (Python
runs `atp/__init__.py` before any `atp.x`) are not edges.

Layers, top to bottom (a module may import its own layer and the layers below it):

    integrations  atp.integrations.*                         other tools' entry points (lmms-eval's model plugin)
    lit      atp.lit.*                                       Lightning jobs and modules
    api      atp (the package facade), atp.export, atp.evaluation, atp.budget
    methods  atp.token.*, atp.structural.*, atp.calibration.*
    runtime  atp.runtime.*                                   the decoder-loop engine and the pruner contract
    models   atp.models.*                                    model-family adapters and builders

`support` modules (atp.data.*, atp.metrics.*: datasets, token and FLOPs accounting) may be
imported from every layer and may import only runtime, models and support modules.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = ("models", "runtime", "methods", "api", "lit", "integrations")  # bottom to top
PREFIXES = {  # longest matching prefix wins
    "atp.integrations": "integrations",
    "atp.lit": "lit",
    "atp": "api",  # the package facade itself (exact name only, see layer_of)
    "atp.export": "api",
    "atp.evaluation": "api",
    "atp.budget": "api",
    "atp.comparison": "api",
    "atp.latency": "api",
    "atp.plots": "api",
    "atp.progress": "support",
    "atp.token": "methods",
    "atp.structural": "methods",
    "atp.calibration": "methods",
    "atp.runtime": "runtime",
    "atp.models": "models",
    "atp.data": "support",
    "atp.metrics": "support",
}
SUPPORT_MAY_IMPORT = {"support", "runtime", "models"}


def module_names(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py under package_dir (packages by their __init__)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that `name` refers to: itself, else its longest known prefix."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `module` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds `module`
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """{module: modules it imports} for the package at package_dir."""
    modules = module_names(package_dir)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return list(reversed(error.args[1]))
    return None


def layer_of(module: str) -> str:
    if module == "atp":
        return PREFIXES["atp"]
    matches = [p for p in PREFIXES if p != "atp" and (module == p or module.startswith(p + "."))]
    if not matches:
        raise AssertionError(
            f"{module} has no layer. Add it to PREFIXES in tests/test_imports.py "
            f"(one of {LAYERS} or 'support') where it belongs."
        )
    return PREFIXES[max(matches, key=len)]


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, as 'a (layer) -> b (layer)'."""
    wrong = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = layer_of(importer), layer_of(target)
            if a == "support":
                allowed = b in SUPPORT_MAY_IMPORT
            elif b == "support":
                allowed = True
            else:
                allowed = LAYERS.index(a) >= LAYERS.index(b)
            if not allowed:
                wrong.append(f"{importer} ({a}) -> {target} ({b})")
    return wrong


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT / "atp")


def test_the_graph_is_read(graph):
    """Independent spot checks of the parser against imports written in the source."""
    assert "atp.runtime.engine" in graph and "atp.lit.run" in graph
    assert "atp.models" in graph["atp.runtime.engine"]  # from atp.models import get_adapter
    assert "atp.runtime.pruner" in graph["atp.token.fastv"]
    assert "atp.token.atp" in graph["atp.token"]  # from atp.token import atp (a submodule)


def test_no_import_circles(graph):
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_imports_run_one_way(graph):
    wrong = wrong_way_imports(graph)
    assert not wrong, "imports against the layer order (lit -> api -> methods -> runtime -> models):\n" + "\n".join(
        wrong
    )


def test_the_runtime_never_imports_a_method(graph):
    methods = ("atp.token", "atp.structural", "atp.calibration", "atp.lit")
    for module, targets in graph.items():
        if module.startswith(("atp.runtime", "atp.models")):
            bad = sorted(t for t in targets if t.startswith(methods))
            assert not bad, f"{module} imports method modules {bad}; methods depend on the runtime, not the reverse"


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "atp"


def test_the_checks_catch_a_circle_and_a_wrong_way_import(tmp_path):
    """The same checks on a small fake package with one lazy circle and one upward import."""
    package = write_package(
        tmp_path,
        {
            "atp/__init__.py": "",
            "atp/runtime/__init__.py": "",
            "atp/runtime/engine.py": "from atp.token.base import TokenPruner\n",  # runtime -> methods
            "atp/token/__init__.py": "from atp.token import base\n",
            "atp/token/base.py": "import torch\n",
            "atp/lit/__init__.py": "",
            "atp/lit/run.py": "def job():\n    from atp.lit import other\n",
            "atp/lit/other.py": "from .run import job\n",  # relative import closes the circle
        },
    )
    graph = import_graph(package)
    assert graph["atp.token"] == {"atp.token.base"}
    assert graph["atp.token.base"] == set()  # torch is not ours
    circle = find_circle(graph)
    assert circle is not None and set(circle) == {"atp.lit.run", "atp.lit.other"}
    assert wrong_way_imports(graph) == ["atp.runtime.engine (runtime) -> atp.token.base (methods)"]
    with pytest.raises(AssertionError, match="atp.newthing has no layer"):
        layer_of("atp.newthing")
