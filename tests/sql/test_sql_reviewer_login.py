"""A real PostgreSQL login granted cxr_reviewer runs what `cxr-screen query` and `cxr-screen
review` run (sql.db.connect, sql.queries.run_query, sql.reviews.add_review), and still reads no
base table."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import sqlalchemy as sa
from conftest import model_metadata
from test_sql_views_queries import QUERY_CASES, STUDY, V1, V2, run_model

from sql import db, reviews
from sql.queries import list_queries, run_query


@pytest.fixture(scope="module")
def setup(module_pg_url):
    """The views-and-queries scenario, the reviewer role, and a login granted it."""
    import datetime as dt

    owner = db.connect(module_pg_url)
    Session = db.session_factory(owner)
    v1, run1 = run_model(Session, model_metadata("1.0.0"), "v1", V1, "nightly")
    time.sleep(0.01)
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    v2, run2 = run_model(Session, model_metadata("2.0.0"), "v2", V2, "reprocess")
    t0 = dt.datetime.now(dt.UTC)
    with Session.begin() as session:
        reviews.add_review(
            session, study_instance_uid=STUDY[2], decision="agree", reviewer="alice", model_id=v2
        )
        for seconds, decision in ((1, "disagree"), (2, "agree")):
            reviews.add_review(
                session,
                study_instance_uid=STUDY[3],
                decision=decision,
                reviewer="bob",
                created_at=t0 + dt.timedelta(seconds=seconds),
            )
    db.apply_reviewer_role(owner)
    login = f"cxr_login_{uuid.uuid4().hex[:8]}"
    with owner.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"CREATE ROLE {login} LOGIN IN ROLE cxr_reviewer")
    url = sa.make_url(module_pg_url).set(username=login).render_as_string(hide_password=False)
    try:
        yield {
            "owner": owner,
            "login": login,
            "url": url,
            "engine": owner,
            "v1": v1,
            "v2": v2,
            "run1": run1,
            "run2": run2,
            "between": between,
        }
    finally:
        with owner.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE usename = '{login}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {login}")
        owner.dispose()


@pytest.fixture
def as_login(setup):
    """``sql.db.connect`` as the reviewer login (what the CLI does with its URL)."""
    engines: list[sa.Engine] = []

    def connect() -> sa.Engine:
        engines.append(db.connect(setup["url"]))
        return engines[-1]

    yield connect
    for engine in engines:
        engine.dispose()


def owner_sql(setup, statement: str) -> None:
    with setup["owner"].begin() as conn:
        conn.exec_driver_sql(statement)


def test_the_login_is_a_reviewer_and_nothing_more(setup, as_login):
    engine = as_login()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT current_user").scalar() == setup["login"]
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == (
            db.head_revision()
        )
    for statement in (
        "SELECT * FROM reviews",
        "SELECT review_id FROM reviews",
        "SELECT * FROM studies",
        "SELECT * FROM runs",
        "SELECT nextval(pg_get_serial_sequence('reviews', 'review_id'))",
        "UPDATE alembic_version SET version_num = 'x'",
    ):
        with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission"):
            conn.exec_driver_sql(statement)


@pytest.mark.parametrize("name", sorted(QUERY_CASES))
def test_the_login_runs_every_example_query(setup, as_login, name):
    assert set(QUERY_CASES) == set(list_queries())
    params, check = QUERY_CASES[name]
    df = run_query(as_login(), name, params(setup))
    assert len(df) > 0
    assert check(df, setup), df.to_string()


def test_the_login_appends_reviews_with_add_review(setup, as_login):
    login = setup["login"]
    sessions = db.session_factory(as_login())
    try:
        with sessions.begin() as session:
            with pytest.raises(ValueError, match="study 9.9.9 is not in the database"):
                reviews.add_review(
                    session, study_instance_uid="9.9.9", decision="agree", reviewer=login
                )
            with pytest.raises(ValueError, match="model_id 999 is not registered"):
                reviews.add_review(
                    session,
                    study_instance_uid=STUDY[4],
                    decision="agree",
                    reviewer=login,
                    model_id=999,
                )
            # The refused inserts left the transaction usable (savepoints).
            review_id = reviews.add_review(
                session,
                study_instance_uid=STUDY[4],
                decision="disagree",
                reviewer=login,
                note="it's a nipple shadow; see O'Brien",
                model_id=setup["v1"],
            )
        with sessions() as session:
            latest = session.execute(
                sa.text(
                    "SELECT review_id, decision, reviewer, note, model_version "
                    "FROM v_latest_reviews WHERE study_instance_uid = :s"
                ),
                {"s": STUDY[4]},
            ).one()
        assert tuple(latest) == (
            review_id,
            "disagree",
            login,
            "it's a nipple shadow; see O'Brien",
            "1.0.0",
        )
        with setup["owner"].connect() as conn:
            stored = conn.exec_driver_sql(
                f"SELECT COUNT(*) FROM reviews WHERE reviewer = '{login}'"
            ).scalar()
        assert stored == 1
    finally:
        owner_sql(setup, f"DELETE FROM reviews WHERE reviewer = '{login}'")


def test_a_login_that_may_not_read_the_version_is_not_refused(setup, as_login, caplog):
    owner_sql(setup, "REVOKE SELECT ON alembic_version FROM cxr_reviewer")
    try:
        with caplog.at_level(logging.WARNING, logger="sql.db"):
            engine = as_login()
        assert "was not checked" in caplog.text
        assert len(run_query(engine, "positives_for_date", {"day": "2024-01-02"})) == 6
    finally:
        db.apply_reviewer_role(setup["owner"])


def test_a_login_on_a_database_behind_head_is_told_what_to_do(setup, as_login):
    head = db.head_revision()
    owner_sql(setup, "UPDATE alembic_version SET version_num = '0002'")
    try:
        with pytest.raises(RuntimeError) as refused:
            as_login()
        message = str(refused.value)
        assert "at Alembic revision '0002'" in message and f"needs '{head}'" in message
        assert "may not migrate it" in message and "cxr-screen db upgrade" in message
    finally:
        owner_sql(setup, f"UPDATE alembic_version SET version_num = '{head}'")
    assert db.current_revision(setup["owner"]) == head
