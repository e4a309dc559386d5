"""tasks.dicom stays self-contained and does not hide errors (checked on its source)."""

from __future__ import annotations

import ast
from pathlib import Path

import tasks.dicom

PACKAGE = Path(tasks.dicom.__file__).parent
ROOT = PACKAGE.parents[1]
FIRST_PARTY = {p.parent.name for p in ROOT.glob("*/__init__.py")}
ALLOWED_OUTSIDE = {"model.spec", "model.synthetic"}


def modules() -> list[Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    assert len(found) >= 12  # the package itself, not an empty glob
    return found


def imported(text: str, package: str) -> list[tuple[int, str]]:
    """Absolute names of everything a module of ``package`` imports (in functions too)."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.append((node.lineno, base))
    return sorted(out)


def outside_imports(text: str, package: str) -> list[str]:
    return [
        f"{line}: {name}"
        for line, name in imported(text, package)
        if name.split(".")[0] in FIRST_PARTY
        and not (name == "tasks.dicom" or name.startswith("tasks.dicom."))
        and name not in ALLOWED_OUTSIDE
    ]


def test_imports_stay_inside_the_package_apart_from_the_spec_and_synthetic_images():
    assert {"tasks", "model", "sql", "flows"} <= FIRST_PARTY
    outside = []
    for path in modules():
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        outside += [
            f"{path.relative_to(ROOT)}:{o}" for o in outside_imports(path.read_text(), package)
        ]
    assert not outside, "tasks.dicom imports outside itself:\n" + "\n".join(outside)


def test_the_import_check_sees_relative_nested_and_plain_imports():
    text = (
        "import numpy\nfrom model.spec import PreprocessSpec\nfrom . import common\n"
        "def f():\n    from ...ingest import scan\n    import sql.db\n"
        "    from model import training\n"
    )
    assert outside_imports(text, "tasks.dicom.pacs") == [
        "5: tasks.ingest",
        "6: sql.db",
        "7: model",
    ]


def hidden_errors(text: str) -> list[str]:
    """``assert`` statements and broad ``except`` clauses that only pass."""
    problems = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Assert):
            problems.append(f"{node.lineno}: assert (raise a named error instead)")
        elif isinstance(node, ast.ExceptHandler):
            broad = node.type is None or (
                isinstance(node.type, ast.Name) and node.type.id in ("Exception", "BaseException")
            )
            silent = all(
                isinstance(s, ast.Pass)
                or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                for s in node.body
            )
            if broad and silent:
                problems.append(f"{node.lineno}: exception swallowed (record or raise it)")
    return problems


def test_no_assert_guards_and_no_swallowed_exceptions():
    problems = [
        f"{path.relative_to(ROOT)}:{p}"
        for path in modules()
        for p in hidden_errors(path.read_text())
    ]
    assert not problems, "\n".join(problems)


def test_the_error_check_sees_asserts_and_silent_excepts():
    text = (
        "def f(x):\n    assert x\n    try:\n        g()\n    except Exception:\n        pass\n"
        "    try:\n        g()\n    except:\n        ...\n"
        "    try:\n        g()\n    except KeyError:\n        pass\n"
    )
    assert [p.split(":")[0] for p in hidden_errors(text)] == ["2", "5", "9"]
