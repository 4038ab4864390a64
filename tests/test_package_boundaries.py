"""Import arrows point one way: t2_jax may build on titans_jax, titans_jax never imports t2_jax,
and no package (titans_jax, t2_jax, experiments) imports another's private names or modules."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("titans_jax", "t2_jax", "experiments")


def _imports(path: pathlib.Path):
    """(imported module, [names]) of every import statement in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]


def _files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_titans_jax_never_imports_t2_jax():
    offenders = [f"{path.relative_to(ROOT)}: {module}" for path in _files("titans_jax")
                 for module, _ in _imports(path) if module.split(".")[0] == "t2_jax"]
    assert not offenders, offenders


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_across_packages(package):
    offenders = []
    for path in _files(package):
        for module, names in _imports(path):
            owner = module.split(".")[0]
            if owner not in PACKAGES or owner == package:
                continue
            private_module = any(part.startswith("_") and not part.startswith("__") for part in module.split("."))
            private_names = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private_module or private_names:
                offenders.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(names)}")
    assert not offenders, offenders
