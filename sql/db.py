"""Engines, sessions and migrations for the results database.

Callers pass the URL (the CLI and flows read it from settings); nothing here reads the
environment. Typical use::

    engine = connect(url)                     # engine + migrations on first use
    Session = session_factory(engine)
    with Session.begin() as session:          # one transaction, committed on exit
        run_id = runs.start_run(session, kind="nightly", ...)

SQLite gets WAL, foreign keys, a busy timeout and transactions that start with
``BEGIN IMMEDIATE`` (so that concurrent writers wait for each other instead of failing with
"database is locked" half-way through). Read-only work can ask for a deferred ``BEGIN`` with
``connection.execution_options(sqlite_begin="DEFERRED")``. A new SQLite file is created
owner-only (mode 0600; SQLite gives its -wal and -shm files the same mode). PostgreSQL uses
psycopg 3, ``pool_pre_ping`` and sessions in UTC.

A user who may not migrate (a login granted ``cxr_reviewer``) can still ``connect``: the
migrate-on-first-use step only reads the schema version, and when that is the head revision
(or cannot be read at all) nothing is changed.

At the head revision ``connect`` also compares the database with the schema this version
expects, tables, columns and views (``schema_differences``), and refuses one that differs
(``SchemaMismatch``, naming what differs and what to run) before anything is written: a dropped
column or view is reported at once, not at the first shard's write. ``cxr-screen db upgrade``
(``connect(url, repair=True)``) recreates missing or altered views from ``sql/views``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.reflection import ObjectKind
from sqlalchemy.orm import Session, sessionmaker

from sql.errors import is_insufficient_privilege
from sql.schema import metadata

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VIEWS_DIR = Path(__file__).resolve().parent / "views"
ROLES_SQL = Path(__file__).resolve().parent / "roles.sql"
SQLITE_BUSY_TIMEOUT_S = 60.0
# pg_advisory_xact_lock key that serialises concurrent first-use migrations ("cxr-scrn").
_MIGRATION_LOCK_KEY = 0x6378722D7363726E
SQLITE_FILE_MODE = 0o600  # a new results file: owner-only (it holds identifying data)


def normalize_url(url: str) -> sa.URL:
    """Parse a URL; plain ``postgresql://`` means psycopg 3 (the only driver installed)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"database URL scheme {parsed.drivername!r} is not supported; "
            "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    return parsed


def get_engine(url: str | sa.URL, **engine_kwargs) -> Engine:
    """An engine configured for this project's use of SQLite or PostgreSQL."""
    parsed = normalize_url(str(url) if isinstance(url, sa.URL) else url)
    # Error messages must not quote bound values (accession numbers, UIDs, file paths): they
    # end up in Prefect's task-run states and logs when a write fails.
    engine_kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        path = None
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S, **engine_kwargs.pop("connect_args", {})}
        engine = sa.create_engine(parsed, connect_args=connect_args, **engine_kwargs)
        _configure_sqlite(engine, path)
        return engine
    connect_args = {"options": "-c timezone=UTC", **engine_kwargs.pop("connect_args", {})}
    engine_kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(parsed, connect_args=connect_args, **engine_kwargs)


def _create_owner_only(path: Path) -> None:
    """Create an empty database file with mode 0600 unless the file exists (an existing file's
    mode is left alone). SQLite opens an empty file as an empty database."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)
    os.chmod(path, SQLITE_FILE_MODE)  # whatever the umask


def _configure_sqlite(engine: Engine, path: Path | None) -> None:
    if path is not None:

        @sa.event.listens_for(engine, "do_connect")
        def _before_connect(_dialect, _record, _cargs, _cparams) -> None:
            # Before sqlite3 would create the file with the process umask (0644 under 022).
            _create_owner_only(path)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # SQLAlchemy emits BEGIN itself (below); sqlite3's implicit transactions are off.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            _journal_mode_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            # The busy timeout is sqlite3's ``timeout`` connect argument (SQLITE_BUSY_TIMEOUT_S).
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode not in ("IMMEDIATE", "DEFERRED", "EXCLUSIVE"):
            raise ValueError(f"sqlite_begin {mode!r} is not one of IMMEDIATE, DEFERRED, EXCLUSIVE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _journal_mode_wal(cursor: sqlite3.Cursor, wait_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Put the file in WAL mode (once per file: the mode is stored in it). Switching needs a
    moment's exclusive lock, and SQLite answers "database is locked" at once rather than wait
    when another connection holds the file (concurrent first use): so wait and try again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions for ``with Session.begin() as session:`` blocks (objects stay usable after).

    ``read_only``: on SQLite, start transactions with a deferred ``BEGIN`` so that readers do
    not take the write lock (and never wait for a writer). No effect on PostgreSQL.
    """
    if read_only:
        engine = engine.execution_options(sqlite_begin="DEFERRED")
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    """An Alembic config pointing at this package's migrations (no ini file needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revisions found under {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, or None for an empty database."""
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction for a migration, on a connection Alembic may rebuild tables on.

    SQLite: rebuilding a table that other tables reference (batch mode: copy, drop, rename)
    fails while foreign keys are enforced, and enforcement can only be switched off outside a
    transaction. So it is off on this connection for the migration; ``PRAGMA
    foreign_key_check`` must then find nothing before the commit, and enforcement is switched
    back on before the connection returns to the pool. PostgreSQL: unchanged.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                yield conn
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(
                            f"the migration left {len(broken)} row(s) breaking a foreign key "
                            f"(first: table {broken[0][0]}, rowid {broken[0][1]}, references "
                            f"{broken[0][2]}); nothing was changed"
                        )
        finally:
            if sqlite:
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` in one transaction (both databases).

    On PostgreSQL an advisory lock makes concurrent first-use upgrades wait for each other.
    """
    engine = get_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with migration_transaction(engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


def ensure_schema(engine: Engine, *, repair: bool = False) -> None:
    """Upgrade to head if the database is behind; refuse a database from a newer version, and
    one whose tables, columns or views differ from this version's schema (``check_schema``).

    A user without the right to migrate (e.g. a reviewer login) is not refused when the
    database is at head. When it may not even read the version (a ``cxr_reviewer`` from before
    ``roles.sql`` granted ``alembic_version``), the check is skipped: such a user cannot
    change the schema anyway, and a query on an out-of-date schema fails on its own. A
    database behind head that this user may not migrate is refused with what to do.
    ``repair``: recreate missing or altered views first (``cxr-screen db upgrade``).
    """
    try:
        current = current_revision(engine)
    except sa.exc.DBAPIError as exc:
        if not is_insufficient_privilege(exc):
            raise
        logger.warning(
            "this database user may not read alembic_version, so the schema version was not "
            "checked; re-run sql/roles.sql (cxr-screen db upgrade --reviewer-role)"
        )
        return
    head = head_revision()
    if current != head:
        _migrate(engine, current, head)
    if repair:
        repair_views(engine)
    check_schema(engine)


def _migrate(engine: Engine, current: str | None, head: str) -> None:
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise RuntimeError(
            f"the database is at Alembic revision {current!r}, which this version of cxr-screen "
            f"does not know (its head is {head!r}); upgrade cxr-screen instead"
        )
    try:
        upgrade(engine)
    except sa.exc.DBAPIError as exc:
        if not is_insufficient_privilege(exc):
            raise
        raise RuntimeError(
            f"the database is at Alembic revision {current!r} and this version of cxr-screen "
            f"needs {head!r}, but this database user may not migrate it (permission denied): "
            "run `cxr-screen db upgrade` as the database owner first"
        ) from None


def connect(url: str, *, repair: bool = False) -> Engine:
    """An engine whose database is migrated to the current schema (first use creates it) and
    checked against it (``check_schema``); ``repair``: recreate missing or altered views
    first (what ``cxr-screen db upgrade`` does)."""
    engine = get_engine(url)
    try:
        ensure_schema(engine, repair=repair)
    except BaseException:
        engine.dispose()
        raise
    return engine


# --- the schema as it should be -------------------------------------------------------------


class SchemaMismatch(RuntimeError):
    """The database's tables, columns or views differ from the schema this version expects.

    ``differences``: one line per table, column or view, e.g. ``table file_outcomes has no
    column facts`` or ``view v_run_summary is missing``. The message adds what to run."""

    def __init__(self, differences: list[str]) -> None:
        self.differences = list(differences)
        views_only = all(d.startswith("view ") for d in differences)
        advice = (
            "run `cxr-screen db upgrade` to recreate the views"
            if views_only
            else "run `cxr-screen db upgrade` (it recreates missing views); a missing table or "
            "column means the database was changed outside cxr-screen's migrations, which an "
            "upgrade cannot undo: restore the database from a backup"
        )
        super().__init__(
            "the results database does not match the schema of this version of cxr-screen "
            f"(revision {head_revision()}): {'; '.join(differences)}. Nothing was written; "
            f"{advice}"
        )


@functools.cache
def expected_views() -> dict[str, tuple[str, ...]]:
    """Each view of ``sql/views`` and its columns, as they come out when the views are created
    on an empty copy of the schema (an in-memory SQLite database)."""
    engine = sa.create_engine("sqlite://")
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            _create_views(conn, {p.stem: p.read_text() for p in sorted(VIEWS_DIR.glob("*.sql"))})
        columns = sa.inspect(engine).get_multi_columns(kind=ObjectKind.VIEW)
        return {name: tuple(c["name"] for c in cols) for (_, name), cols in columns.items()}
    finally:
        engine.dispose()


def _create_views(conn: Connection, pending: dict[str, str]) -> None:
    """Create views that may read each other, in an order that works."""
    while pending:
        failed: dict[str, str] = {}
        errors: list[str] = []
        for name, text in pending.items():
            try:
                with conn.begin_nested():
                    conn.exec_driver_sql(text)
            except sa.exc.DBAPIError as exc:
                if is_insufficient_privilege(exc):
                    raise
                failed[name] = text
                errors.append(f"{name}: {exc.orig}")
        if len(failed) == len(pending):
            raise RuntimeError(f"the views in {VIEWS_DIR} cannot be created: {'; '.join(errors)}")
        pending = failed


def schema_differences(engine: Engine) -> list[str]:
    """How the database differs from this version's tables, columns and views; [] when it
    does not. Extra tables, columns and views (a DBA's own) are not differences."""
    inspector = sa.inspect(engine)
    views = set(inspector.get_view_names())
    differences: list[str] = []
    try:
        found = {
            name: [c["name"] for c in columns]
            for (_, name), columns in inspector.get_multi_columns(kind=ObjectKind.ANY).items()
        }
    except sa.exc.OperationalError:  # a view that reads a missing column cannot be read
        found = {}
        for name in [*inspector.get_table_names(), *sorted(views)]:
            try:
                found[name] = [c["name"] for c in inspector.get_columns(name)]
            except sa.exc.OperationalError:
                differences.append(f"view {name} cannot be read (it reads a missing column)")
                views.discard(name)
    for table in metadata.sorted_tables:
        if table.name not in found or table.name in views:
            differences.append(f"table {table.name} is missing")
            continue
        missing = [c.name for c in table.columns if c.name not in found[table.name]]
        if missing:
            differences.append(
                f"table {table.name} has no column{_s(missing)} {', '.join(missing)}"
            )
    unreadable = {d.split()[1] for d in differences}
    for view, expected in sorted(expected_views().items()):
        if view in unreadable:
            continue
        if view not in views:
            differences.append(f"view {view} is missing")
            continue
        have = found.get(view, [])
        missing = [c for c in expected if c not in have]
        if missing:
            differences.append(f"view {view} has no column{_s(missing)} {', '.join(missing)}")
        elif [c for c in have if c in expected] != list(expected):
            differences.append(f"view {view} has its columns in another order")
    return differences


def _s(items: list[str]) -> str:
    return "s" if len(items) > 1 else ""


def check_schema(engine: Engine) -> None:
    """Refuse (``SchemaMismatch``) a database whose tables, columns or views differ from this
    version's schema. ``connect`` calls it, so a run that connects first is refused before its
    run row is written."""
    differences = schema_differences(engine)
    if differences:
        raise SchemaMismatch(differences)


def repair_views(engine: Engine) -> list[str]:
    """Recreate the views that are missing or differ (``schema_differences``) from
    ``sql/views``, in one transaction; returns their names. Nothing is done while a table or
    column is missing (``check_schema`` then says so). On PostgreSQL an existing
    ``cxr_reviewer`` role may read them again (what ``roles.sql`` grants on every view)."""
    differences = schema_differences(engine)
    if any(not d.startswith("view ") for d in differences):
        return []  # views over a missing table or column cannot be created
    broken = sorted({d.split()[1] for d in differences})
    if not broken:
        return []
    with migration_transaction(engine) as conn:
        for name in broken:
            conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
        _create_views(conn, {name: (VIEWS_DIR / f"{name}.sql").read_text() for name in broken})
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "DO $grants$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = "
                f"'cxr_reviewer') THEN GRANT SELECT ON {', '.join(broken)} TO cxr_reviewer; "
                "END IF; END $grants$"
            )
    logger.warning("recreated the view(s) %s from %s", ", ".join(broken), VIEWS_DIR)
    return broken


def apply_reviewer_role(engine: Engine) -> None:
    """Create or refresh the read-only ``cxr_reviewer`` role from ``sql/roles.sql``.

    PostgreSQL only; needs a user allowed to create roles. Run after ``upgrade``.
    """
    if engine.dialect.name != "postgresql":
        raise ValueError(
            f"reviewer roles need PostgreSQL; this database is {engine.dialect.name} "
            "(SQLite has no users: protect the file with file permissions instead)"
        )
    # Straight to psycopg without parameters: the script's '%' and '$' are not placeholders.
    with engine.begin() as conn, conn.connection.dbapi_connection.cursor() as cursor:
        cursor.execute(ROLES_SQL.read_text())
