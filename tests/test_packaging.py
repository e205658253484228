"""The cart's importable names live under one namespace, ``nirf`` (PRODUCT.md section 9):
the folders keep the product's layout (``config/``, ``hal/`` ...), pyproject maps them to
``nirf.config``, ``nirf.hal`` ..., and no code imports them by their bare folder name (a
bare ``import config`` would find PyPI's ``config`` package, or nothing, once installed).

tests/test_installed.py checks the installed result in a fresh virtual environment; these
checks read the source and need no network."""

from __future__ import annotations

import ast
import tomllib

import pytest

from tests.cartproc import ROOT

TOPS = ("config", "controller", "drivers", "hal", "services", "sim")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> set[str]:
    found = set()
    for top in TOPS:
        for init in (ROOT / top).rglob("__init__.py"):
            found.add("nirf." + ".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_every_package_folder_is_installed_under_the_namespace():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert listed == _package_folders(), (
        f"missing from pyproject: {sorted(_package_folders() - listed)}; "
        f"listed but not a package: {sorted(listed - _package_folders())}")
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert mapping == {f"nirf.{top}": top for top in TOPS}


def test_entry_points_name_namespaced_modules():
    for name, target in _pyproject()["project"]["scripts"].items():
        assert target.startswith("nirf."), f"{name} = {target}"


def _bare_imports(path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in TOPS]
    return bad


@pytest.mark.slow  # seconds of CPU: in make test, not in test-quick
def test_no_code_imports_a_folder_by_its_bare_name():
    files = [p for top in (*TOPS, "tests", "bench") for p in (ROOT / top).rglob("*.py")]
    assert len(files) > 100
    bad = [b for p in files for b in _bare_imports(p)]
    assert not bad, bad
