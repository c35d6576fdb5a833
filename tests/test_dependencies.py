"""Dependency declarations match use: every third-party module the package imports is declared in
pyproject.toml, and every declared runtime dependency is imported somewhere."""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "napari_lcm_stain"
#: declared though never imported, with the reason
NOT_IMPORTED = {"npe2": "the napari.yaml manifest format (napari.manifest entry point)"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def _imported_modules() -> dict[str, str]:
    """Top-level third-party module -> one file importing it."""
    found: dict[str, str] = {}
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "napari_lcm_stain":
                    found.setdefault(top, str(f.relative_to(ROOT)))
    return found


@functools.cache
def _module_owners() -> dict[str, list[str]]:
    return packages_distributions()


def _distribution(module: str) -> str:
    dists = _module_owners().get(module, [module])
    return dists[0].lower().replace("_", "-")


def test_every_imported_module_is_declared():
    project = _project()
    declared = _names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= _names(extra)
    missing = {
        m: where for m, where in _imported_modules().items() if _distribution(m) not in declared
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_runtime_dependency_is_imported():
    imported = {_distribution(m) for m in _imported_modules()}
    unused = _names(_project()["dependencies"]) - imported - set(NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
