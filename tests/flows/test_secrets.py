"""No secret is ever a Prefect parameter: ``--db`` reaches every flow through the settings.

Prefect stores every flow run's parameters in its database and shows them in its UI and API.
The commands run here in-process against the test harness's Prefect server, with a password
planted in the PostgreSQL URL given to ``--db`` (trust authentication ignores it), and the flow
runs' parameters are read back from Prefect's API.
"""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from support import make_model

from tasks.dicom import synth

SECRET = "s3cret-PLANT"
FLOWS = {"screen", "nightly", "train", "screen-fanout", "screen-shard"}

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _images(root, n: int, seed: int):
    synth.write_corpus(root, n, seed=seed, size_range=(128, 160), lateral_fraction=0.0)
    (root / "labels.csv").unlink()
    return root


@pytest.mark.timeout(900)
def test_no_command_puts_the_database_password_in_a_flow_runs_parameters(
    prefect_harness, pg_url, tmp_path, monkeypatch
):
    import prefect.deployments
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from prefect.settings import PREFECT_API_URL
    from typer.testing import CliRunner

    from cli.app import app

    url = pg_url.replace("postgres@", f"postgres:{SECRET}@", 1)
    assert SECRET in url
    # The commands use the harness's server (none of their own); the decode work stays in
    # this process. CXR_SCREEN_DATABASE_URL is set first so that what --db sets is undone.
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", f"sqlite:///{tmp_path / 'not-used.db'}")
    monkeypatch.setenv("CXR_SCREEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_SCREEN_WORKERS", "0")
    monkeypatch.setenv("CXR_SCREEN_DEVICE", "cpu")
    model = str(make_model(tmp_path / "model.pt"))
    archive = _images(tmp_path / "archive", 2, seed=31)
    drop = _images(tmp_path / "drop", 1, seed=32)
    labelled = tmp_path / "labelled"
    synth.write_corpus(labelled, 8, seed=33, size_range=(128, 160), lateral_fraction=0.0)

    # Fan-out: the parent launches each shard with run_deployment; here the shard flow runs
    # in this process (its worker's environment is this one) and what the parent sent is kept.
    sent: list[dict] = []

    def run_deployment(name, *, parameters, **_kwargs):
        from flows.fanout import screen_shard

        sent.append(dict(parameters))
        state = screen_shard(**parameters, return_state=True)
        return SimpleNamespace(id=state.state_details.flow_run_id, state=state)

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)

    started = dt.datetime.now(dt.UTC)
    small = ["--epochs", "1", "--input-size", "48", "--batch-size", "8", "--workers", "0"]
    commands = [
        ["screen", str(archive), "--model", model],
        ["nightly", "--drop-folder", str(drop), "--model", model],
        ["train", str(labelled), "--out", str(tmp_path / "trained.pt"), *small],
        ["fanout", "run", str(archive), "--model", model, "--manifest-size", "1"],
    ]
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(app, [*command, "--db", url])
        assert result.exit_code == 0, (command, result.output)
        assert SECRET not in result.output

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=sorted(FLOWS))),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started)),
        )
        names = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
    # The control: every command's flow ran and its parameters were read back (two shards).
    ran = sorted(names[run.flow_id] for run in runs)
    assert ran == sorted([*FLOWS, "screen-shard"]), ran
    for run in runs:
        stored = json.dumps(run.parameters)
        assert SECRET not in stored, (names[run.flow_id], run.parameters)
        assert "database_url" not in stored, (names[run.flow_id], run.parameters)
    # What the fan-out parent sent its shards: which manifest of which job, and the model.
    assert len(sent) == 2
    assert all(set(p) == {"manifest_id", "model", "job_key"} for p in sent)
    assert SECRET not in json.dumps(sent)

    # The other control: --db did reach every flow (through the settings), and cxr-screen's
    # own run records do not hold the password either.
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT kind, source, parameters FROM runs")).all()
    finally:
        engine.dispose()
    assert sorted(r.kind for r in rows) == ["nightly", "reprocess", "reprocess", "train"]
    assert all(SECRET not in str(tuple(r)) for r in rows)
