"""The CLI's own temporary Prefect server (cli.server): used when no Prefect API is
configured, gone with the command even when the command is SIGKILLed, and never told a
database password."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import cli_env, make_model

from cli import server as local_server
from tasks.dicom import synth

CLI = str(Path(sys.executable).parent / "cxr-screen")
SERVER_MODULE = "cli.prefect_server"  # in the server process's command line


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        found.append((int(stat.parent.name), cmdline))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(600)
def test_db_password_never_reaches_prefect(tmp_path, pg_url):
    """``--db`` travels through the settings, not as a flow parameter Prefect would store."""
    corpus = tmp_path / "corpus"
    synth.write_corpus(corpus, 2, seed=5, size_range=(128, 160), lateral_fraction=0.0)
    (corpus / "labels.csv").unlink()
    model = make_model(tmp_path / "model.pt")
    secret = "pw-9d41c7-never-stored"  # trust auth: PostgreSQL ignores it, Prefect must too
    url = pg_url.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in url
    home = tmp_path / "home"
    proc = subprocess.run(
        [CLI, "screen", str(corpus), "--model", str(model), "--db", url, "--json"],
        env=cli_env(home, "cli-server-test-key"),
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["predicted"] > 0
    assert secret not in proc.stdout + proc.stderr

    # Prefect's database recorded the flow run and its parameters, without the URL.
    prefect_db = home / "prefect" / "prefect.db"
    con = sqlite3.connect(prefect_db)
    params = [json.loads(p) for (p,) in con.execute("SELECT parameters FROM flow_run")]
    con.close()
    assert any(p.get("sources") == [str(corpus)] for p in params), params
    assert all(not p.get("database_url") for p in params)
    for path in (home / "prefect").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path

    # Nor does cxr-screen's own run record hold it.
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT source, parameters FROM runs")).all()
    engine.dispose()
    assert stored and all(secret not in str(row) for row in stored)


@pytest.mark.timeout(300)
def test_killed_cli_takes_its_server_with_it(tmp_path):
    """SIGKILL the command while it boots: its temporary server must not outlive it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    model = make_model(tmp_path / "model.pt")
    cli = subprocess.Popen(
        [CLI, "screen", str(empty), "--model", str(model), "--db", f"sqlite:///{tmp_path}/r.db"],
        env=cli_env(tmp_path / "home", "cli-server-test-key"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    server = None
    while server is None and time.monotonic() < deadline and cli.poll() is None:
        server = next((pid for pid, cmd in children(cli.pid) if SERVER_MODULE in cmd), None)
        time.sleep(0.05)
    assert server is not None, "the command started no Prefect server of its own"
    time.sleep(1.0)  # the server is booting; the command is importing
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    deadline = time.monotonic() + 30
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = alive(server)
    if still:
        os.kill(server, signal.SIGKILL)
    assert not still, "the temporary Prefect server outlived the killed command"


def test_configured_api_means_no_temporary_server(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "prefect.settings", raising=False)  # read the files
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_ENABLED", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert local_server.start_local_server() is None

    monkeypatch.delenv("PREFECT_API_URL")
    (tmp_path / "profiles.toml").write_text(
        'active = "site"\n\n[profiles.site]\nPREFECT_API_URL = "http://prefect.example:4200/api"\n'
    )
    assert local_server.configured_api_url() == "http://prefect.example:4200/api"
    assert local_server.start_local_server() is None


def test_the_server_is_deaf_to_stop_signals_and_stops_when_told(tmp_path, monkeypatch):
    """A terminal's Ctrl-C or systemd's SIGTERM to every process reaches the server too: it
    must keep answering until the command, done with it, closes its stdin; then it stops
    gracefully (exit status 0, not killed) within seconds."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "prefect.settings", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    server = local_server.start_local_server()
    assert server is not None
    try:
        server.wait_ready()
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        mask = next(x for x in status.splitlines() if x.startswith("SigBlk:"))
        blocked = int(mask.split()[1], 16)
        for sig in (signal.SIGINT, signal.SIGTERM):
            assert blocked & (1 << (sig - 1)), f"{sig.name} is not blocked in the server"
            os.kill(server.process.pid, sig)
            os.killpg(server.process.pid, sig)
        time.sleep(2.0)
        assert server.process.poll() is None, "the server died on SIGINT/SIGTERM"
        assert local_server.is_healthy(server.api_url)
        started = time.monotonic()
        server.stop(grace=30)
        took = time.monotonic() - started
    finally:
        server.stop(grace=0)
    assert server.process.returncode == 0, "the server was killed, not stopped"
    assert took < 10, f"the server took {took:.1f} s to stop"


def test_temporary_server_answers_and_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "prefect.settings", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    server = local_server.start_local_server()
    assert server is not None
    try:
        assert os.environ["PREFECT_API_URL"] == server.api_url
        server.wait_ready()
        assert server.process.poll() is None
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ


# --- failures are loud: never an orphan server, never a silently ignored configuration -----


@pytest.fixture
def no_api(tmp_path, monkeypatch):
    """No Prefect API configured anywhere: a temporary server would be started."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./prefect.toml
    # As in a fresh command: Prefect not imported yet, so the files are read, not Prefect.
    monkeypatch.delitem(sys.modules, "prefect.settings", raising=False)
    return tmp_path


def test_refused_pdeathsig_starts_no_server(no_api, monkeypatch):
    """When the kernel cannot be asked to kill the server with the command, there is no server
    (it could outlive a killed command) and the command is told why, in one line."""
    import ctypes
    import errno

    def refusing_prctl(option, signum):  # runs in the forked child, like the real one
        # the server is deaf to SIGTERM: the kernel is asked to SIGKILL it
        assert (option, signum) == (local_server.PR_SET_PDEATHSIG, signal.SIGKILL)
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(local_server, "_prctl", refusing_prctl)
    before = {pid for pid, _ in children(os.getpid())}
    with pytest.raises(local_server.LocalServerError) as caught:
        local_server.start_local_server()
    message = str(caught.value)
    assert "did not start Prefect's temporary server" in message
    assert "PR_SET_PDEATHSIG failed: Operation not permitted" in message
    assert "\n" not in message
    assert "PREFECT_API_URL" not in os.environ
    started = [cmd for pid, cmd in children(os.getpid()) if pid not in before]
    assert not any(SERVER_MODULE in cmd for cmd in started), started


def test_missing_prctl_starts_no_server(no_api, monkeypatch):
    monkeypatch.setattr(local_server, "_prctl", None)

    class NoLibc:
        def __init__(self, *args, **kwargs):
            raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr("ctypes.CDLL", NoLibc)
    with pytest.raises(local_server.LocalServerError, match="libc's prctl is unavailable"):
        local_server.start_local_server()


@pytest.mark.parametrize(
    ("where", "content", "reason"),
    [
        ("prefect/profiles.toml", 'active = "site"\n[profiles.site\n', "is not valid TOML"),
        ("prefect/profiles.toml", 'active = "site"\nprofiles = 3\n', "[profiles] is not a table"),
        (
            "prefect/profiles.toml",
            'active = "site"\n[profiles]\nsite = "x"\n',
            "the profile [profiles.site] is not a table",
        ),
        ("prefect.toml", "[api\nurl = 1\n", "is not valid TOML"),
    ],
)
def test_broken_prefect_configuration_is_an_error(no_api, where, content, reason):
    """A profiles.toml or prefect.toml that cannot be read may name the server the user
    meant: it is an error naming the file, not 'no API configured'."""
    path = no_api / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with pytest.raises(local_server.LocalServerError) as caught:
        local_server.start_local_server()
    message = str(caught.value)
    assert reason in message and where.split("/")[-1] in message, message
    assert "PREFECT_API_URL" not in os.environ


def test_broken_profiles_toml_through_the_cli(tmp_path):
    """The real command: one line naming the file, exit status 2, no server started."""
    home = tmp_path / "home"
    (home / "prefect").mkdir(parents=True)
    (home / "prefect" / "profiles.toml").write_text("active = [\n")
    (tmp_path / "m.pt").touch()  # the options are checked first: let them pass
    proc = subprocess.run(
        [CLI, "screen", str(tmp_path), "--model", str(tmp_path / "m.pt")],
        env=cli_env(home, "cli-server-test-key"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "profiles.toml is not valid TOML" in lines[0]
    assert not (home / "prefect" / "cxr-screen-server.log").exists()


def test_waiting_for_a_server_never_started_is_an_error(tmp_path):
    server = local_server.LocalPrefectServer(home=tmp_path)
    with pytest.raises(local_server.LocalServerError, match="was never started"):
        server.wait_ready()
