"""Deployments: ``prefect.yaml`` resolves to the real flows, and ``serve`` really schedules runs.

The serve test starts ``python -m cli.serve`` as a real process with a short interval
schedule; it starts its own Prefect server (SQLite, temporary PREFECT_HOME), whose scheduler
must create a nightly flow run that the served runner executes to completion, writing a
``kind='nightly'`` run into a temporary results database. Every process it starts is killed
at the end, whatever happens.
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
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from support import make_model

from tasks.dicom.synth import write_study

REPO = Path(__file__).resolve().parents[2]

EXPECTED = {
    "nightly": ("flows/screen.py:nightly", "nightly"),
    "reprocess": ("flows/screen.py:screen", "screen"),
    "train": ("flows/train.py:train", "train"),
}


# --- prefect.yaml ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _deployment(config: dict, name: str) -> dict:
    matches = [d for d in config["deployments"] if d["name"] == name]
    assert len(matches) == 1, f"expected one deployment named {name!r}"
    return matches[0]


def test_prefect_yaml_validates_with_prefects_own_model(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_yaml)
    assert sorted(d.name for d in model.deployments) == sorted(EXPECTED)
    for d in model.deployments:
        assert d.work_pool is not None and d.work_pool.name == "cxr-screen"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prefect_yaml_entrypoint_resolves_to_the_flow(prefect_yaml, name, monkeypatch):
    from prefect.flows import Flow, load_flow_from_entrypoint

    entrypoint, flow_name = EXPECTED[name]
    deployment = _deployment(prefect_yaml, name)
    assert deployment["entrypoint"] == entrypoint
    monkeypatch.chdir(REPO)  # entrypoints are relative to the repository root
    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    assert isinstance(flow, Flow)
    assert flow.name == flow_name
    # Every parameter given in the file is one the flow accepts.
    unknown = set(deployment.get("parameters") or {}) - set(flow.parameters.properties)
    assert not unknown, f"{name}: parameters the flow does not take: {sorted(unknown)}"


def test_prefect_yaml_schedules(prefect_yaml):
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.schedules import CronSchedule

    nightly = _deployment(prefect_yaml, "nightly")
    assert len(nightly["schedules"]) == 1
    schedule = _schedule_config_to_deployment_schedule(nightly["schedules"][0])["schedule"]
    assert isinstance(schedule, CronSchedule)
    assert schedule.cron == "0 2 * * *"
    assert schedule.timezone == "UTC"
    assert nightly["concurrency_limit"]["limit"] == 1
    for name in ("reprocess", "train"):
        assert not _deployment(prefect_yaml, name).get("schedules")


# --- serve: option checks (in-process, no server) -------------------------------------------


def test_serve_rejects_bad_schedule_options():
    from cli.serve import ServeError, make_schedule
    from flows.settings import get_settings

    settings = get_settings()
    with pytest.raises(ServeError, match=r"cron expression of '0 25 \* \* \*' is invalid"):
        make_schedule("0 25 * * *", None, None, settings=settings)
    with pytest.raises(ServeError, match=r"timezone of 'Mars/Olympus' is invalid"):
        make_schedule(None, "Mars/Olympus", None, settings=settings)
    with pytest.raises(ServeError, match=r"--interval of 0 s is invalid"):
        make_schedule(None, None, 0, settings=settings)
    schedule = make_schedule(None, "Europe/Berlin", None, settings=settings)
    assert (schedule.cron, schedule.timezone) == (settings.nightly_cron, "Europe/Berlin")


# --- serve: a real process, a real server, a real scheduled run ----------------------------


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    for p in [pid, *_children(pid)]:
        for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(p)


def _api(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_inputs(tmp_path) -> dict:
    drop = tmp_path / "drop"
    for study in range(2):
        write_study(drop, seed=5, study=study, positive=bool(study), size_range=(200, 260))
    model = make_model(tmp_path / "model.pt", "serve-test-1")
    return {"drop": drop, "model": model, "db": tmp_path / "results.db", "tmp": tmp_path}


def _wait_for_nightly(api: str, proc, log: Path, deadline: float) -> dict:
    """The first nightly flow run in a final state, created by the server's scheduler."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited early with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            runs = _api(
                api,
                "/flow_runs/filter",
                {
                    "flows": {"name": {"any_": ["nightly"]}},
                    "deployments": {"name": {"any_": ["nightly"]}},
                    "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
                    "sort": "START_TIME_ASC",
                },
            )
        except OSError:
            runs = []  # the server is not up yet
        if runs:
            return runs[0]
        time.sleep(2)
    pytest.fail(f"no nightly flow run finished in time; serve's output:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_serve_schedules_and_completes_a_nightly_run(serve_inputs):
    tmp = serve_inputs["tmp"]
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CXR_SCREEN_"))}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        DO_NOT_TRACK="1",
        CXR_SCREEN_HOME=str(tmp / "cxr-home"),
        CXR_SCREEN_DEVICE="cpu",
        CXR_SCREEN_WORKERS="0",
        PYTHONUNBUFFERED="1",
        PREFECT_RUNNER_POLL_FREQUENCY="2",  # look for due runs every 2 s, not 10
    )
    log = tmp / "serve.log"
    command = [
        sys.executable,
        "-m",
        "cli.serve",
        "--interval",
        "5",
        "--drop-folder",
        str(serve_inputs["drop"]),
        "--model",
        str(serve_inputs["model"]),
        "--db",
        f"sqlite:///{serve_inputs['db']}",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        run = _wait_for_nightly(api, proc, log, time.monotonic() + 240)
        deployment = _api(api, f"/deployments/{run['deployment_id']}")
        flow = _api(api, f"/flows/{deployment['flow_id']}")
        assert (flow["name"], deployment["name"]) == ("nightly", "nightly")
        assert run["auto_scheduled"], "the run was not created by the schedule"
        assert run["state_type"] == "COMPLETED", f"nightly run ended {run['state_type']}"

        engine = sa.create_engine(f"sqlite:///{serve_inputs['db']}")
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT status, files_seen, predicted, prefect_flow_run_id FROM runs "
                    "WHERE kind = 'nightly' ORDER BY run_id"
                )
            ).all()
        engine.dispose()
        assert rows, "no nightly run in the results database"
        first = rows[0]
        assert (first.status, first.files_seen, first.predicted) == ("completed", 2, 2)
        assert first.prefect_flow_run_id in {r["id"] for r in _api(api, "/flow_runs/filter", {})}

        # Clean shutdown on SIGTERM: serve exits 0, its server goes away, no tracebacks.
        server_pids = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
        output = log.read_text()
        assert "Traceback" not in output, output[-4000:]
        assert "Stopping the local Prefect server" in output
        running = [pid for pid in server_pids if _is_running(pid)]
        assert not running, f"processes started by serve still run: {running}"
        with pytest.raises(OSError):
            _api(api, "/health")
    finally:
        _kill_tree(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = (Path(f"/proc/{pid}") / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
