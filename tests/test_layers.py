"""The package's layers (physlm.LAYERS): every import goes to the module's own layer or one
below, no two modules import each other (even through others), nothing comes from outside
the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import physlm

PACKAGE = Path(physlm.__file__).resolve().parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
LAYER = {module: rank for rank, (_, modules) in enumerate(physlm.LAYERS) for module in modules}


def imports(module: str) -> set[str]:
    """The physlm modules `module` imports, at its top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "physlm":
            found |= {alias.name for alias in node.names if alias.name in LAYER}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("physlm."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("physlm.")}
    return found - {module}


def test_every_module_has_one_layer():
    listed = [module for _, modules in physlm.LAYERS for module in modules]
    assert sorted(listed) == MODULES, "a module is missing from physlm.LAYERS, or listed twice"


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_the_layers(module):
    upward = {name: physlm.LAYERS[LAYER[name]][0] for name in imports(module)
              if LAYER[name] > LAYER[module]}
    assert not upward, (f"{module} ({physlm.LAYERS[LAYER[module]][0]}) imports from a "
                        f"higher layer: {upward}")


def test_no_import_cycle():
    graph = {module: imports(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for name in graph[module]:
                visit(name, (*path, module))
            done.add(module)

    for module in MODULES:
        visit(module, ())


def test_nothing_is_loaded_from_outside_the_package():
    for path in PACKAGE.glob("*.py"):
        source = path.read_text()
        tree = ast.parse(source)
        names = {alias.name.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.Import | ast.ImportFrom)
                 for alias in (node.names if isinstance(node, ast.Import)
                               else [ast.alias(node.module or "")])}
        assert not names & {"benchmarks", "bench", "tests"}, path.name
        assert "spec_from_file_location" not in source, f"{path.name} loads a file as a module"
