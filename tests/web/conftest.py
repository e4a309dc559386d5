"""Fixtures for the review page: a corpus screened by the real CLI on SQLite and PostgreSQL,
250 studies written by the pipeline's writers, the app on a live loopback server, a browser."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import scratch_postgres_database
from web_support import (
    CHROMIUM,
    PASSWORD,
    REVIEWER,
    LiveServer,
    bulk_studies,
    make_web_model,
    reviewer_login,
    screen,
    write_corpus,
)

BACKENDS = ["sqlite", "postgresql"]
VIEWER = "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("web-corpus")
    found = write_corpus(root)
    found["model"] = make_web_model(root / "model.pt")
    return found


@contextlib.contextmanager
def _database(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'results.db'}"
    else:
        with scratch_postgres_database() as url:
            yield url


def _users(url: str) -> None:
    from sql import db
    from web.auth import add_user

    engine = db.connect(url)
    try:
        add_user(engine, REVIEWER, PASSWORD)
        add_user(engine, "dr.lee", PASSWORD)
    finally:
        engine.dispose()


@contextlib.contextmanager
def _serve(backend: str, url: str, home: Path, **settings) -> Iterator[dict]:
    """The app on a live server. On PostgreSQL it connects as a login granted cxr_reviewer."""
    from web.app import create_app
    from web.settings import get_web_settings

    with contextlib.ExitStack() as stack:
        app_url = url
        if backend == "postgresql":
            app_url = stack.enter_context(reviewer_login(url))
        config = get_web_settings(
            database_url=url,
            web_database_url=app_url,
            home=home,
            web_secret_key="test-session-key",
            viewer_url_template=VIEWER,
            **settings,
        )
        app = create_app(config)
        server = LiveServer(app)
        try:
            yield {
                "url": server.url,
                "app": app,
                "engine": app.state.engine,
                "db_url": url,
                "app_db_url": app_url,
                "backend": backend,
                "home": home,
                "settings": config,
            }
        finally:
            server.stop()
            app.state.engine.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def screened(request, corpus, tmp_path_factory, prefect_api_url) -> Iterator[dict]:
    """The corpus screened by `cxr-screen screen` into a fresh database, with two logins."""
    folder = tmp_path_factory.mktemp(f"web-{request.param}")
    with _database(request.param, folder) as url:
        summary = screen(corpus["tree"], corpus["model"], url, folder, prefect_api_url)
        assert summary["predicted"] > 0
        _users(url)
        yield {"url": url, "home": folder / "cxr", "backend": request.param, "summary": summary}


@pytest.fixture(scope="session")
def site(screened) -> Iterator[dict]:
    with _serve(screened["backend"], screened["url"], screened["home"]) as served:
        yield {**served, "screened": screened}


@pytest.fixture(scope="session", params=BACKENDS)
def bulk_site(request, tmp_path_factory) -> Iterator[dict]:
    """250 flagged studies (two model versions, some reviewed) behind a live server."""
    folder = tmp_path_factory.mktemp(f"web-bulk-{request.param}")
    with _database(request.param, folder) as url:
        expected = bulk_studies(url)
        _users(url)
        with _serve(request.param, url, folder / "cxr", web_page_size=50) as served:
            yield {**served, "expected": expected}


@pytest.fixture(scope="module")
def browser():
    """The system's headless Chromium driven by Playwright (its own download is not used)."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium-headless-shell (make system-deps)",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()
