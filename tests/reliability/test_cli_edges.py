"""The command line's rough edges, through the real command, each with what a user should see.

Fail before starting: an option this machine cannot honour (``--device cuda`` without a GPU,
``--device tpu``, ``--kind bogus``), a missing source, a model file that is not a checkpoint,
an unreachable database and a database whose tables, columns or views differ from the schema
are refused with one line (no Python class names) and exit status 2, before a run row is
written. A file named on the command line is screened whatever its name. ``query --out`` and a
repeated ``-p`` are one line; ``model info`` on a file that is not a checkpoint says so.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from reliability_support import cli_env, free_port, make_model, run_cli

from sql import db as sql_db
from tasks.dicom import synth

REFUSED_QUICKLY_S = 30.0  # before the Prefect server and torch: a second or two when idle


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edges") / "corpus"
    synth.write_corpus(root, 2, seed=41, size_range=(96, 128), lateral_fraction=0.0)
    (root / "labels.csv").unlink()
    return root


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Prefect API: the command starts its own temporary server when it gets that far."""
    env = cli_env(tmp_path / "home", "", **extra)
    del env["PREFECT_API_URL"]
    return env


def server_started(tmp_path: Path) -> bool:
    return (tmp_path / "home" / "prefect" / "cxr-screen-server.log").exists()


def run_rows(url: str) -> int | None:
    """Runs recorded in the database; None when it has no runs table (never touched)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("runs"):
                return None
            return conn.execute(sa.text("SELECT COUNT(*) FROM runs")).scalar_one()
    finally:
        engine.dispose()


def one_line(result) -> str:
    """The command failed with exit status 2 and exactly one line, ``error: ...``, free of
    Python class names and tracebacks; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for noise in ("Error:", "Exception", "Traceback", "KeyError", "NameError"):
        assert noise not in lines[0], lines[0]
    return lines[0]


# --- options refused before anything starts -------------------------------------------------


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--device", "tpu"], "error: --device 'tpu' is not one of auto, cpu, cuda or cuda:N"),
        (["--kind", "bogus"], "error: --kind 'bogus' is not a screening run's kind: "),
        (["--model", "/no/such/model.pt"], "error: checkpoint '/no/such/model.pt' does not exist"),
    ],
    ids=["device-tpu", "kind-bogus", "model-missing"],
)
def test_a_bad_option_is_refused_at_once_and_nothing_is_recorded(
    option, said, corpus, model, tmp_path
):
    db = tmp_path / "results.db"
    started = time.monotonic()
    result = run_cli(
        ["screen", str(corpus), "--model", str(model), *option, "--db", f"sqlite:///{db}"],
        env_for(tmp_path),
        tmp_path,
    )
    took = time.monotonic() - started
    assert one_line(result).startswith(said)
    assert took < REFUSED_QUICKLY_S, took
    assert not server_started(tmp_path)
    assert not db.exists()  # no run row: the database was never even opened


@pytest.mark.timeout(300)
def test_a_device_this_machine_lacks_is_refused_before_the_run_row(corpus, model, tmp_path):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = "cuda" if count == 0 else f"cuda:{count}"  # cuda without a GPU, or one too many
    db = tmp_path / "results.db"
    result = run_cli(
        [
            "screen",
            str(corpus),
            "--model",
            str(model),
            "--device",
            device,
            "--db",
            f"sqlite:///{db}",
        ],
        env_for(tmp_path),
        tmp_path,
    )
    line = one_line(result)
    assert line.startswith(f"error: --device {device!r}: "), line
    assert ("no CUDA GPU is available" if count == 0 else f"has {count} CUDA GPU") in line
    assert not db.exists()


def test_a_missing_source_is_refused_at_once(model, tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_cli(
        ["screen", str(missing), "--model", str(model), "--db", f"sqlite:///{tmp_path}/r.db"],
        env_for(tmp_path),
        tmp_path,
    )
    assert one_line(result) == f"error: source does not exist: {missing}"
    assert not server_started(tmp_path)


# --- the model file and the database, on both databases ---------------------------------------


@pytest.mark.timeout(300)
def test_a_model_file_that_is_not_a_checkpoint_is_refused_before_the_run_row(
    corpus, db_url, tmp_path
):
    text = tmp_path / "text.pt"
    text.write_text("hello, I am not a model\n")
    result = run_cli(
        ["screen", str(corpus), "--model", str(text), "--db", db_url], env_for(tmp_path), tmp_path
    )
    assert one_line(result) == (
        f"error: checkpoint '{text}' is not a model checkpoint: not a file torch.save writes "
        "(neither a zip archive nor a pickle)"
    )
    assert run_rows(db_url) in (None, 0)  # refused before the database was opened


@pytest.mark.timeout(300)
def test_an_unreachable_database_is_one_line_at_once(corpus, model, tmp_path):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"
    started = time.monotonic()
    result = run_cli(
        ["screen", str(corpus), "--model", str(model), "--db", url], env_for(tmp_path), tmp_path
    )
    took = time.monotonic() - started
    line = one_line(result)
    assert line.startswith("error: the results database is unreachable: "), line
    assert "Connection refused" in line or "connection" in line.lower(), line
    assert took < 60, f"{took:.0f} s: a refused connection at start is not retried"


def _drop_column(engine: sa.Engine) -> str:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":  # SQLite refuses to drop a column a view reads
            conn.exec_driver_sql("DROP VIEW v_instance_outcomes")
            conn.exec_driver_sql("ALTER TABLE file_outcomes DROP COLUMN facts")
        else:  # PostgreSQL drops the views that read it
            conn.exec_driver_sql("ALTER TABLE file_outcomes DROP COLUMN facts CASCADE")
    return "table file_outcomes has no column facts"


def _drop_view(engine: sa.Engine) -> str:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP VIEW v_run_summary")
    return "view v_run_summary is missing"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("alter", [_drop_column, _drop_view], ids=["column", "view"])
def test_a_schema_that_differs_is_named_with_what_to_run_before_the_run_row(
    alter, corpus, model, db_url, tmp_path
):
    sql_db.upgrade(db_url)
    engine = sa.create_engine(db_url)
    try:
        difference = alter(engine)
    finally:
        engine.dispose()
    result = run_cli(
        ["screen", str(corpus), "--model", str(model), "--db", db_url], env_for(tmp_path), tmp_path
    )
    line = one_line(result)
    assert line.startswith("error: the results database does not match the schema"), line
    assert difference in line and "cxr-screen db upgrade" in line, line
    assert run_rows(db_url) == 0


# --- files named on the command line ----------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_file_named_on_the_command_line_is_screened_whatever_its_name(
    model, tmp_path, prefect_api_url
):
    """An image called DICOMDIR and a hidden .dcm are left out of a folder's walk, but named
    explicitly they are screened. (A whole run: it reports to the session's Prefect server
    rather than starting a temporary one, ~10 s.)"""
    src = tmp_path / "src"
    synth.write_corpus(src, 1, seed=42, size_range=(96, 128), lateral_fraction=0.0)
    (src / "labels.csv").unlink()
    extra = tmp_path / "extra"
    synth.write_corpus(extra, 2, seed=43, size_range=(96, 128), lateral_fraction=0.0)
    images = sorted(extra.rglob("*.dcm"))
    named = [src / "DICOMDIR", src / ".hidden.dcm"]
    for image, name in zip(images, named, strict=False):
        shutil.copyfile(image, name)
    url = f"sqlite:///{tmp_path / 'results.db'}"
    result = run_cli(
        ["screen", str(src), *map(str, named), "--model", str(model), "--db", url],
        cli_env(tmp_path / "home", prefect_api_url),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            outcomes = dict(
                conn.execute(sa.text("SELECT source_uri, outcome FROM file_outcomes")).all()
            )
    finally:
        engine.dispose()
    for path in named:
        assert outcomes.get(str(path)) == "predicted", (path, outcomes)


# --- query and model info ---------------------------------------------------------------------


@pytest.fixture
def results_db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    sql_db.upgrade(url)
    return url


def query(tmp_path: Path, url: str, *args: str):
    return run_cli(["query", "positives_for_date", *args, "--db", url], env_for(tmp_path), tmp_path)


def test_query_out_to_a_missing_folder_or_a_folder_is_one_line(results_db, tmp_path):
    missing = tmp_path / "no-such-dir" / "out.csv"
    said = one_line(query(tmp_path, results_db, "-p", "day=2026-11-26", "--out", str(missing)))
    assert said == f"error: --out {missing}: the folder {missing.parent} does not exist"
    folder = tmp_path / "reports"
    folder.mkdir()
    said = one_line(query(tmp_path, results_db, "-p", "day=2026-11-26", "--out", str(folder)))
    assert said.startswith(f"error: --out {folder} is a directory; name a file in it"), said
    assert list(folder.iterdir()) == []


def test_query_out_replaces_an_existing_file_whole(results_db, tmp_path):
    out = tmp_path / "positives.csv"
    out.write_text("yesterday's export\n" * 1000)
    result = query(
        tmp_path, results_db, "-p", "day=2026-11-26", "--format", "csv", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(replaced)" in result.stdout
    assert "yesterday" not in out.read_text()
    assert out.read_text().splitlines()[0].count(",") >= 1  # a CSV header
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file


def test_a_repeated_query_parameter_is_one_line_naming_it(results_db, tmp_path):
    said = one_line(query(tmp_path, results_db, "-p", "day=2026-11-26", "-p", "day=2026-11-27"))
    assert said == (
        "error: --param day is given twice ('2026-11-26' and '2026-11-27'); "
        "a query parameter takes one value"
    )


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"hello\n", "neither a zip archive nor a pickle"), (b"", "it is empty")],
    ids=["text", "empty"],
)
def test_model_info_on_a_file_that_is_not_a_checkpoint_says_so(content, why, tmp_path):
    path = tmp_path / f"{uuid.uuid4().hex}.pt"
    path.write_bytes(content)
    result = run_cli(["model", "info", str(path)], env_for(tmp_path), tmp_path)
    assert one_line(result) == (
        f"error: checkpoint '{path}' is not a model checkpoint: not a file torch.save writes "
        f"({why})"
    )
