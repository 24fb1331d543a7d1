"""The package's shape, as issue 17 set it: small modules and functions, layers that only
import downwards (`lint-imports`, run by `make lint`, checks the contract in pyproject.toml;
here: that the contract exists and names every top-level part of the package)."""

from __future__ import annotations

import ast

import tomllib

from tests.conftest import ROOT

PACKAGE = ROOT / "sae_ray"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_no_function_over_80_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, long


def test_the_layers_contract_covers_the_whole_package():
    """A new top-level module or package must take its place in a layer (or lint-imports
    would not look at it)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    assert contract["type"] == "layers"
    named = {m.strip() for layer in contract["layers"] for m in layer.split("|")}
    parts = {
        f"sae_ray.{p.stem if p.is_file() else p.name}"
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert parts == named, (parts - named, named - parts)


def test_no_two_modules_import_each_other_even_lazily():
    """No import cycle anywhere in the package, counting imports inside functions and under
    TYPE_CHECKING (grimp, import-linter's graph): a cycle hidden behind a lazy import is
    still two modules that cannot be understood apart."""
    import grimp

    graph = grimp.build_graph("sae_ray")
    cycles = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(imported, module):
                cycles.add(tuple(sorted((module, imported))))
    assert not cycles, sorted(cycles)
