"""How sql/ is put together: one upsert engine, one engine factory, no silent guards.

Read from the source (ast), so a copied helper or a stray ``create_engine`` fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sql
from sql import manifests, predictions, reviews, runs, shards, upsert

SQL_DIR = Path(sql.__file__).resolve().parent
MODULES = sorted(SQL_DIR.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _name(path: Path) -> str:
    return str(path.relative_to(SQL_DIR.parent))


def test_the_modules_are_found():
    names = {_name(p) for p in MODULES}
    assert {"sql/upsert.py", "sql/shards.py", "sql/manifests.py", "sql/db.py"} <= names
    assert "sql/writes.py" not in names


def test_only_sql_upsert_builds_dialect_inserts():
    """``postgresql.insert`` / ``sqlite.insert`` (the ON CONFLICT builders) and the time and
    insert helpers live in sql/upsert.py only: manifests and shards share them."""
    found = []
    for path in MODULES:
        if path.name == "upsert.py":
            continue
        for node in ast.walk(_tree(path)):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "insert"
                and isinstance(node.value, ast.Name)
                and node.value.id in ("postgresql", "sqlite")
            ):
                found.append(f"{_name(path)}:{node.lineno} {node.value.id}.insert")
            if (
                isinstance(node, ast.ImportFrom)
                and node.module in ("sqlalchemy.dialects.postgresql", "sqlalchemy.dialects.sqlite")
                and any(alias.name == "insert" for alias in node.names)
            ):
                found.append(f"{_name(path)}:{node.lineno} imports insert")
            if isinstance(node, ast.FunctionDef) and node.name in (
                "_now",
                "_insert",
                "utc_now",
                "dialect_insert",
                "on_conflict",
            ):
                found.append(f"{_name(path)}:{node.lineno} defines {node.name}")
    assert found == []


def test_the_writers_use_the_same_helpers():
    for module in (manifests, runs, reviews, predictions):
        assert module.utc_now is upsert.utc_now, module.__name__
    for module in (manifests, runs, predictions):
        assert module.dialect_insert is upsert.dialect_insert, module.__name__
    for module in (shards, predictions):
        assert module.upsert_rows is upsert.upsert_rows, module.__name__


def test_only_sql_db_creates_engines():
    found = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("create_engine", "create_async_engine"):
                    found.append(f"{_name(path)}:{node.lineno}")
    assert found and all(place.startswith("sql/db.py:") for place in found), found


def test_no_bare_assert_or_swallowed_exception():
    """No ``assert`` guards a production path and no broad handler hides an error."""
    found = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Assert):
                found.append(f"{_name(path)}:{node.lineno} assert")
            if (
                isinstance(node, ast.ExceptHandler)
                and _catches_everything(node)
                and all(isinstance(stmt, ast.Pass) for stmt in node.body)
            ):
                found.append(f"{_name(path)}:{node.lineno} except Exception: pass")
    assert found == []


def _catches_everything(handler: ast.ExceptHandler) -> bool:
    """``except:``, ``except Exception`` or ``except BaseException`` (alone or in a tuple)."""
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException") for n in names)


def test_sql_does_not_import_prefect_at_run_time():
    """Prefect types only under ``if TYPE_CHECKING:`` (sql/errors.py)."""
    found = []
    for path in MODULES:
        tree = _tree(path)
        guarded = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("prefect", "torch", "torchvision"):
                    found.append(f"{_name(path)}:{node.lineno} {name}")
    assert found == []
