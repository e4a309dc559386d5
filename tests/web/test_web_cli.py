"""`cxr-screen web adduser` (argon2 hashes, password from stdin) and `cxr-screen web` (serves
on 127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cli.web import app as web_cli
from sql import db
from web.auth import verify_login


def users(url: str) -> list[dict]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    sa.text("SELECT username, password_hash, active FROM web_users")
                )
            ]
    finally:
        engine.dispose()


def test_adduser_stores_an_argon2_hash_never_the_password(db_url):
    runner = CliRunner()
    result = runner.invoke(web_cli, ["adduser", "dr.new", "--db", db_url], input="s3cret-pass\n")
    assert result.exit_code == 0, result.output
    [user] = users(db_url)
    assert user["username"] == "dr.new" and user["active"]
    assert user["password_hash"].startswith("$argon2id$")
    assert "s3cret-pass" not in user["password_hash"]
    engine = db.connect(db_url)
    try:
        assert verify_login(engine, "dr.new", "s3cret-pass")
        assert not verify_login(engine, "dr.new", "s3cret-pasS")
        assert not verify_login(engine, "nobody", "s3cret-pass")
        # Adding the same name again is refused; --update sets a new password.
        again = runner.invoke(web_cli, ["adduser", "dr.new", "--db", db_url], input="other-pass\n")
        assert again.exit_code == 2 and "exists; use --update" in again.output
        update = runner.invoke(
            web_cli, ["adduser", "dr.new", "--update", "--db", db_url], input="other-pass\n"
        )
        assert update.exit_code == 0, update.output
        assert verify_login(engine, "dr.new", "other-pass")
        assert not verify_login(engine, "dr.new", "s3cret-pass")
        disabled = runner.invoke(web_cli, ["disable", "dr.new", "--db", db_url])
        assert disabled.exit_code == 0
        assert not verify_login(engine, "dr.new", "other-pass")
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("dr.short", "short\n", "at least 8 characters"),
        ("bad name", "long-enough\n", "a user name is"),
        ("<script>", "long-enough\n", "a user name is"),
        ("dr.empty", "", "at least 8 characters"),
    ],
)
def test_adduser_refuses_bad_names_and_passwords(sqlite_url, name, password, message):
    result = CliRunner().invoke(web_cli, ["adduser", name, "--db", sqlite_url], input=password)
    assert result.exit_code == 2
    assert message in result.output
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists() or not users(sqlite_url)


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                address, state = fields[1], fields[3]
                if state == "0A" and int(address.rsplit(":", 1)[1], 16) == port:
                    found.append(address.rsplit(":", 1)[0])
    return found


def test_serve_binds_loopback_unless_told_otherwise(tmp_path, sqlite_url):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "CXR_SCREEN_HOME": str(tmp_path / "home"),
        "CXR_SCREEN_DATABASE_URL": sqlite_url,
    }
    env.pop("CXR_SCREEN_WEB_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cli.web import app; app()", "--port", str(port)],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the page did not start listening"
            time.sleep(0.1)
        assert _listening(port) == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0 or ::
        answer = httpx.get(f"http://127.0.0.1:{port}/worklist", follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        assert "server" not in answer.headers
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"review page on http://127.0.0.1:{port}/" in out
    assert (tmp_path / "home" / "web_secret.key").stat().st_mode & 0o777 == 0o600


def test_the_web_command_group_is_registered():
    from cli.app import app

    result = CliRunner().invoke(app, ["web", "--help"])
    assert result.exit_code == 0
    assert "adduser" in result.output and "--host" in result.output


def test_web_settings_refuse_a_dangerous_viewer_template_or_proxy_list():
    from pydantic import ValidationError

    from web.settings import get_web_settings

    with pytest.raises(ValidationError, match="must be an http"):
        get_web_settings(viewer_url_template="javascript:alert(1)//{study_uid}")
    with pytest.raises(ValidationError, match=r"only \{study_uid\} and \{accession\}"):
        get_web_settings(viewer_url_template="https://pacs/{study_uid.__class__}")
    with pytest.raises(ValidationError, match="not an IP address or network"):
        get_web_settings(web_trusted_proxies="proxy.example")
    settings = get_web_settings(web_trusted_proxies="10.0.0.5, 10.1.0.0/16")
    assert settings.web_trusted_proxies == ["10.0.0.5", "10.1.0.0/16"]
    assert settings.web_host == "127.0.0.1"
