"""The pure core stays pure, and the ledger never imports streamflow.

Checked on the import statements themselves (followed through our own modules), so a
package's `__init__` importing the world does not hide or fake a violation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_MODULES = [
    "ledger.rules",
    "ledger.blockers",
    "ledger.jsonsafe",
    "ledger.placeholders",
    "ledger.errors",
    "streamflow.validation",
]
FORBIDDEN = ("sqlalchemy", "redis", "psycopg", "alembic")
OURS = ("ledger", "streamflow")


def _module_file(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imports(module: str) -> set[str]:
    tree = ast.parse(_module_file(module).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _transitive_imports(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in _imports(current):
            if name in seen:
                continue
            seen.add(name)
            if name.split(".")[0] in OURS and _module_file(name).exists():
                todo.append(name)
    return seen


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_no_io_library(module: str) -> None:
    offending = sorted(m for m in _transitive_imports(module) if m.split(".")[0] in FORBIDDEN)
    assert offending == [], f"{module} imports {offending}"


def test_rules_import_without_sqlalchemy_in_a_fresh_interpreter() -> None:
    code = "import sys, ledger.rules, ledger.blockers; print('sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_ledger_never_imports_streamflow() -> None:
    for path in (ROOT / "ledger").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "streamflow" for n in names), path
