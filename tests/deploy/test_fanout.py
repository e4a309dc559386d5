"""A real multi-worker fan-out on one machine.

Starts ``prefect server start`` on a temporary PostgreSQL database of its own, registers
everything with ``docker/register.sh`` (the compose stack's start-up script: results database,
work pool, fan-out deployments, ``prefect.yaml``), starts two ``prefect worker start``
processes on the process work pool (each with its own device slot), and runs a fan-out
reprocess of a couple of hundred small synthetic images. Checks: both workers screened
manifests, every shard ran as one sub-flow run of the shard deployment, the device slots exist
as limit-1 concurrency limits, the results database equals a single-process ``screen`` run of
the same input, and re-running the parent with the same job key starts no new shard runs and
changes nothing. Every process it starts runs in its own process group and is killed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from fanout_support import (
    HMAC_KEY,
    PG_ADMIN_URL,
    assert_same_results,
    make_model,
    results,
    write_sources,
)

from tasks.dicom.discovery import discover

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SLOTS = ("slot-a", "slot-b")
SELECTION = {"views": ["PA", "AP", "LL"]}  # two images per study: some studies get split

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Processes:
    """Child processes, each in its own session (process group), killed group by group."""

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((process, log))
        return process

    def check_alive(self) -> None:
        for process, log in self.started:
            if process.poll() is not None:
                pytest.fail(
                    f"{' '.join(process.args[:5])} exited with {process.returncode}:\n{_tail(log)}"
                )

    def stop(self) -> None:
        for process, _ in reversed(self.started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process, _ in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for process, _ in self.started:  # whatever is left of each group, flow runs included
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)


@pytest.fixture(scope="module")
def databases():
    """Prefect's own database, the fan-out's results database and the reference's."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    names = {k: f"cxr_test_{k}_{uuid.uuid4().hex[:10]}" for k in ("prefect", "fanout", "single")}
    try:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc.orig}", False)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield {
            "prefect": base.replace("+psycopg", "+asyncpg") + f"/{names['prefect']}",
            "fanout": f"{base}/{names['fanout']}",
            "single": f"{base}/{names['single']}",
        }
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, databases):
    """A PostgreSQL-backed Prefect server, everything registered, two workers polling."""
    root = tmp_path_factory.mktemp("stack")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "CXR_SCREEN_")) and k != "DO_NOT_TRACK"
    }
    base_env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    cxr_env = {
        "PREFECT_API_URL": api,
        "CXR_SCREEN_DATABASE_URL": databases["fanout"],
        "CXR_SCREEN_HMAC_KEY": HMAC_KEY,
        "CXR_SCREEN_HOME": str(root / "home"),
    }
    processes = Processes()
    try:
        server = processes.start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            {**base_env, "PREFECT_API_DATABASE_CONNECTION_URL": databases["prefect"]},
            root / "server.log",
        )
        # The input is written while the server starts.
        corpus = write_sources(root / "data", 130)
        corpus["model"] = str(make_model(root / "data" / "model.pt"))
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Prefect server did not start:\n{_tail(root / 'server.log')}")
            with contextlib.suppress(OSError):
                if _api(api, "/health") is True:
                    break
            time.sleep(1)

        # The workers start while everything is registered (both take a while here).
        for slot in SLOTS:
            processes.start(
                [
                    str(BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    "cxr-screen",
                    "--type",
                    "process",
                    "--work-queue",
                    "shards",
                    "--limit",
                    "1",
                    "--name",
                    f"test-{slot}",
                ],
                {
                    **base_env,
                    **cxr_env,
                    "CXR_SCREEN_DEVICE": "cpu",
                    "CXR_SCREEN_DEVICE_SLOT": slot,
                    "CXR_SCREEN_WORKERS": "0",  # decode in the flow-run process: 2 cores here
                    "PREFECT_WORKER_QUERY_SECONDS": "1",
                },
                root / f"worker-{slot}.log",
            )
        register = subprocess.run(
            ["sh", str(REPO / "docker" / "register.sh")],
            env={**base_env, **cxr_env, "CXR_SCREEN_CODE_DIR": str(REPO)},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert register.returncode == 0, register.stdout[-3000:] + register.stderr[-5000:]
        assert "cxr-screen: registered" in register.stdout

        yield {
            "api": api,
            "root": root,
            "corpus": corpus,
            "processes": processes,
            "cxr_env": cxr_env,
        }
    finally:
        processes.stop()


@pytest.fixture
def as_parent(stack, monkeypatch):
    """This process talks to the test server with the workers' settings (URL, key, home)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in stack["cxr_env"].items():
        monkeypatch.setenv(key, value)
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with temporary_settings(updates={PREFECT_API_URL: stack["api"]}):
        try:
            yield
        finally:
            # Send this process's run logs and events while the server still runs (else they
            # are retried at interpreter exit, against a server that is gone).
            APILogWorker.drain_all(timeout=20)
            EventsWorker.drain_all(timeout=20)


def _shard_runs(api: str) -> list[dict]:
    return _api(
        api,
        "/flow_runs/filter",
        {"deployments": {"name": {"any_": ["shard"]}}, "sort": "START_TIME_ASC", "limit": 200},
    )


def test_fanout_across_two_workers_equals_a_single_process_run(
    stack, as_parent, databases, monkeypatch
):
    from flows.fanout import screen_fanout
    from flows.parameters import FanoutParameters, ScreenParameters
    from flows.screen import screen

    corpus, api = stack["corpus"], stack["api"]
    stack["processes"].check_alive()
    deployments = {d["name"] for d in _api(api, "/deployments/filter", {})}
    assert {"shard", "reprocess-fanout", "nightly", "reprocess", "train"} <= deployments

    # Two manifests (one round: a shard's run costs a fresh Python process), cut right before
    # a lateral whose frontal image is in the first: that study is split across the workers.
    uris = [src.uri for src in discover(corpus["sources"])]
    size = next(i for i in range(len(uris) // 2 + 1, len(uris)) if uris[i].endswith("2_LL.dcm"))
    summary = screen_fanout(
        corpus["sources"],
        model=corpus["model"],
        params=FanoutParameters(
            manifest_size=size,
            shard_size=16,
            max_in_flight=4,
            shard_timeout_s=240,
            selection=SELECTION,
            spool_dir=str(stack["root"] / "spool"),
            poll_s=1,
        ),
    )
    stack["processes"].check_alive()
    n_manifests = 2
    assert corpus["files"] >= 200
    assert summary["files_seen"] == corpus["files"]
    assert summary["manifests"] == n_manifests
    assert summary["predicted"] + summary["skipped"] + summary["failed"] == corpus["files"]
    assert summary["split_studies"] >= 1
    # Both workers screened shards, and each shard ran once, as one run of the deployment.
    assert set(summary["workers"]) == {f"{socket.gethostname()}/{s}" for s in SLOTS}
    assert all(n >= 1 for n in summary["workers"].values())
    runs = _shard_runs(api)
    assert len(runs) == n_manifests
    assert {r["state_type"] for r in runs} == {"COMPLETED"}
    # The workers took their database from their own environment: the parent sent only which
    # manifest of which job, and the model file.
    assert all(set(r["parameters"]) == {"manifest_id", "model", "job_key"} for r in runs)
    assert {r["parameters"]["job_key"] for r in runs} == {summary["job_key"]}
    engine = sa.create_engine(databases["fanout"])
    with engine.connect() as conn:
        manifests = conn.execute(
            sa.text("SELECT status, attempts, worker, n_files FROM shard_manifests")
        ).all()
        run = conn.execute(
            sa.text("SELECT status, kind, files_seen FROM runs WHERE run_id = :r"),
            {"r": summary["run_id"]},
        ).one()
    engine.dispose()
    assert {(m.status, m.attempts) for m in manifests} == {("done", 1)}
    assert sum(m.n_files for m in manifests) == corpus["files"]
    assert tuple(run) == ("completed", "reprocess", corpus["files"])
    # The device slots are concurrency limits of one, free again.
    limits = {
        c["name"]: c for c in _api(api, "/v2/concurrency_limits/filter", {}) if "slot-" in c["name"]
    }
    assert set(limits) == {f"cxr-screen-device:{s}" for s in SLOTS}
    assert all(c["limit"] == 1 and c["active_slots"] == 0 for c in limits.values())
    assert not (stack["root"] / "spool").exists() or not any((stack["root"] / "spool").iterdir())

    # The same input through the single-process screen flow, into another database (given
    # through the settings, as every database URL is).
    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", databases["single"])
    single = screen(
        corpus["sources"],
        model=corpus["model"],
        params=ScreenParameters(workers=0, shard_size=40, selection=SELECTION),
    )
    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", databases["fanout"])
    assert {k: single[k] for k in ("files_seen", "predicted", "skipped", "failed")} == {
        k: summary[k] for k in ("files_seen", "predicted", "skipped", "failed")
    }
    assert_same_results(results(databases["fanout"]), results(databases["single"]))

    # A retried parent (same job key) starts no shard run and changes nothing.
    before = results(databases["fanout"])
    again = screen_fanout(
        corpus["sources"],
        model=corpus["model"],
        params=FanoutParameters(
            manifest_size=size,
            shard_size=16,
            selection=SELECTION,
            spool_dir=str(stack["root"] / "spool"),
            job_key=summary["job_key"],
            poll_s=1,
        ),
    )
    assert again["run_id"] == summary["run_id"]
    assert {k: again[k] for k in ("files_seen", "predicted", "skipped", "failed")} == {
        k: summary[k] for k in ("files_seen", "predicted", "skipped", "failed")
    }
    assert len(_shard_runs(api)) == n_manifests
    assert results(databases["fanout"]) == before


def test_launches_stay_within_max_in_flight_and_failures_are_collected(as_parent, monkeypatch):
    """``_launch_all`` with a stand-in for the shard launch: never more than max_in_flight
    launches at once, every manifest launched once, a failing shard reported with its reason."""
    import threading

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    import flows.fanout as fanout
    from sql.manifests import Manifest

    lock = threading.Lock()
    running, peak, launched = [0], [0], []

    @task(cache_policy=NO_CACHE)
    def fake_launch(sessions, manifest, *, parameters, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            launched.append(parameters["manifest_id"])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        if manifest.shard_index == 4:
            raise RuntimeError("worker lost")
        return manifest

    monkeypatch.setattr(fanout, "launch_shard", fake_launch)
    manifests = [
        Manifest(
            manifest_id=100 + i,
            job_key="j",
            shard_index=i,
            run_id=1,
            model_id=1,
            parameters={},
            n_files=10,
            files_sha256="0" * 64,
            status="done" if i == 0 else "pending",
            files_done=0,
            counts={},
            study_uids=[],
            attempts=0,
            worker=None,
            prefect_flow_run_id=None,
            error=None,
        )
        for i in range(10)
    ]

    @flow(task_runner=fanout.ThreadPoolTaskRunner(max_workers=fanout.MAX_IN_FLIGHT_CAP))
    def parent():
        return fanout._launch_all(
            None, manifests, run_id=1, max_in_flight=3, parameters={"model": "m"}, poll_s=1
        )

    failures = parent()
    assert peak[0] == 3
    assert sorted(launched) == [100 + i for i in range(1, 10)]  # the done one is not launched
    ((manifest, exc),) = failures
    assert manifest.shard_index == 4 and "worker lost" in str(exc)


@pytest.mark.parametrize("command", [["register"], ["run", "/nonexistent", "--model", "m.pt"]])
def test_fanout_commands_need_a_prefect_server(command, monkeypatch):
    """Prefect's temporary server has no workers: fan-out refuses to start without a real one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from cli.fanout import app as cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(cli, command)
    assert result.exit_code == 2, result.output
    assert "fan-out needs a Prefect server with workers: set PREFECT_API_URL" in result.output
