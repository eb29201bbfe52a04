"""The package's shape, enforced: imports go one way through the layers written in
``partialize/__init__.py``, no module-level import cycle, no operator class named outside ops/ and
models/, no function over 100 lines. Read from the source with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "partialize"

# lowest first; a module may import from its own layer and the layers below it, never above
LAYERS = [
    {"errors", "_version", "_modes", "macs", "_fs", "datasets"},
    {"ops"},
    {"models", "recipe"},
    {"base_model"},
    {"engine"},
    {"inference"},
    {"serialization"},
    {"exporting"},
    {"measure"},
    {"train", "calibration", "recipe_search"},
    {"api"},
    {"cli", "__init__", "__main__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] or ["__init__"]
        out[".".join(parts)] = p
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool, known: dict) -> list[str]:
    """Absolute partialize-relative names an ``from ... import`` refers to (module and, when a name is a
    submodule, the submodule)."""
    if node.level == 0:
        if not (node.module or "").startswith("partialize"):
            return []
        base = (node.module or "")[len("partialize") :].lstrip(".")
    else:
        pkg = module.split(".") if is_pkg and module != "__init__" else module.split(".")[:-1]
        if module == "__init__":
            pkg = []
        pkg = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
        base = ".".join(pkg + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}" if base else a.name for a in node.names]
    if all(n in known for n in subs):  # ``from . import engine``: the submodules themselves
        return subs
    return [base or "__init__"] + subs  # a name defined by the package (``from . import __version__``)


def _imports(module: str, path: pathlib.Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    known = _modules()
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            for name in _resolve(module, node, is_pkg, known):
                if name in known:
                    found.add(name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("partialize."):
                    name = a.name[len("partialize.") :]
                    if name in known:
                        found.add(name)
    found.discard(module)
    return found


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in _modules()} - set(LAYER_OF))
    assert not missing, f"add {missing} to LAYERS here and to the layer list in partialize/__init__.py"


def test_imports_go_down_the_layers_only():
    bad = []
    for module, path in _modules().items():
        mine = LAYER_OF[_top(module)]
        for dep in _imports(module, path, module_level_only=False):
            if LAYER_OF[_top(dep)] > mine:
                bad.append(f"{module} (layer {mine}) imports {dep} (layer {LAYER_OF[_top(dep)]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_module_level_import_cycle():
    graph = {m: _imports(m, p, module_level_only=True) for m, p in _modules().items()}
    # a package's __init__ importing its own submodules is how packages work; the submodules must
    # not import the package's __init__ back
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


def _operator_class_names() -> set[str]:
    names = set()
    for p in (PKG / "ops").glob("*.py"):
        if p.name == "base.py":  # the contract itself: what everyone is meant to use
            continue
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
    return names


def test_no_operator_class_is_named_outside_ops_and_models():
    classes = _operator_class_names()
    bad = []
    for module, path in _modules().items():
        if _top(module) in ("ops", "models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id in classes:
                bad.append(f"{module}:{node.lineno} names {node.id}")
            elif isinstance(node, ast.ImportFrom):
                bad += [f"{module}:{node.lineno} imports {a.name}" for a in node.names if a.name in classes]
    assert not bad, "operator classes named outside ops/ and models/ (use the contract):\n" + "\n".join(bad)


@pytest.mark.parametrize("limit", [100])
def test_no_function_over_100_lines(limit):
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, "functions over the limit:\n" + "\n".join(long)
