"""The package layout of doc/architecture.md: folders name the grouping, so no module repeats its folder's name, and
imports between qwenlab's own modules sit at the top of each file (a lazy one must say why on its line).
The import layers themselves are import-linter's job (`lint-imports`, contracts in pyproject.toml)."""
import ast

import pytest

from qwenlab.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "qwenlab"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_no_module_name_repeats_its_folder():
    offenders = [str(p.relative_to(REPO_ROOT)) for p in MODULES
                 if p.parent != PACKAGE and p.stem.startswith(p.parent.name.rstrip("s"))]
    assert offenders == []


def _own_imports_inside_functions(path):
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            own = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("qwenlab"))) \
                or (isinstance(node, ast.Import) and any(a.name.startswith("qwenlab") for a in node.names))
            if own and "#" not in lines[node.lineno - 1]:
                yield f"{path.relative_to(REPO_ROOT)}:{node.lineno}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_own_imports_are_at_the_top(path):
    assert list(_own_imports_inside_functions(path)) == []


def test_one_repo_root():
    defined = [str(p.relative_to(REPO_ROOT)) for p in MODULES if "REPO_ROOT =" in p.read_text()]
    assert defined == ["qwenlab/paths.py"]
