"""Fixtures for the reliability tests: a model, databases (the Prefect API that CLI subprocesses
report to, ``prefect_api_url``, is the session's, from tests/conftest.py)."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from reliability_support import cli_env, make_model, result_rows, run_cli, write_corpus
from support import scratch_postgres_database


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, prefect_api_url, model_path) -> Iterator[dict]:
    """``write_corpus``'s 74 files screened once without interruption (shards of 3, one decode
    worker) into a fresh PostgreSQL database: the rows the crash and the outage tests must end
    with. Shared, so that the corpus and its reference run are made once, not once per test;
    those tests run the command with the same corpus and home (``env``: same key, same
    thumbnails) and never write to this database."""
    root = tmp_path_factory.mktemp("reference-run")
    corpus = root / "corpus"
    n_files = write_corpus(corpus)
    env = cli_env(root / "home", prefect_api_url)
    with scratch_postgres_database() as url:
        args = ["screen", str(corpus), "--model", str(model_path), "--shard-size", "3"]
        done = run_cli([*args, "--workers", "1", "--db", url], env, root / "ref", timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = result_rows(url)
        assert len(rows["file_outcomes"]) == n_files
        yield {"corpus": corpus, "n_files": n_files, "env": env, "rows": rows, "root": root}


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other OS users can traverse (pytest's tmp_path is mode 0700)."""
    from bad_corpus import remove

    path = Path(tempfile.mkdtemp(prefix="cxr-reliability-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        remove(path)


@pytest.fixture
def pg_database(pg_url) -> Iterator:
    """``pg_url`` plus a factory of further fresh databases on the same server (dropped after)."""
    made: list[str] = []
    admin = sa.create_engine(
        pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT", pool_pre_ping=True
    )

    def another() -> str:
        name = f"cxr_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return pg_url.rsplit("/", 1)[0] + f"/{name}"

    try:
        yield pg_url, another
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
