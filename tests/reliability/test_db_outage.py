"""Database outage: PostgreSQL stops in the middle of a shard's transaction and comes back after
five seconds; the run retries and completes with exactly the rows of an undisturbed run, and a
re-run changes nothing. The restarted server is a private cluster: the shared one is never
touched."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from reliability_support import (
    Cli,
    PrivateCluster,
    Watcher,
    consistency_problems,
    differences,
    result_rows,
    run_cli,
)


@pytest.fixture
def cluster():
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def flow_run_logs(flow_run_id: str) -> list[str]:
    """Every log line the run sent to the Prefect API (flow and task runs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while logs := client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
            limit=200,
            offset=len(messages),
        ):
            messages += [log.message for log in logs]
    return messages


@pytest.mark.slow
def test_postgresql_restart_mid_shard_is_retried_and_the_run_completes(
    tmp_path, cluster, reference_run, model_path
):
    # An undisturbed run of the same corpus (conftest.reference_run, shared with the crash
    # test), with the same home: same thumbnails, same key.
    corpus, n_files, env = reference_run["corpus"], reference_run["n_files"], reference_run["env"]
    expected = reference_run["rows"]
    args = ["screen", str(corpus), "--model", str(model_path), "--shard-size", "3"]

    url = cluster.url.rsplit("/", 1)[0] + "/results"
    admin = sa.create_engine(cluster.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE results"))
    admin.dispose()

    cli = Cli([*args, "--db", url], env, tmp_path / "run")
    watcher = Watcher(url)
    restarted_in = None
    try:
        # Wait for two shards to be stored, then for the next shard's open transaction.
        while cli.alive():
            run = watcher.last_run()
            if run and watcher.rows_of(run) >= 6 and (xid := watcher.shard_transaction()):
                restarted_in = xid
                break
            time.sleep(0.005)
    finally:
        watcher.close()
    assert restarted_in is not None, "the run ended before the outage could be staged"
    started = time.monotonic()
    # Fast shutdown (open transactions rolled back, connections cut), then 5 s without a server:
    # a run that only saw a quick restart between two transactions would reconnect through
    # the pool's pre-ping without an error, and nothing would have been tested.
    cluster.restart(down=5.0)
    outage = time.monotonic() - started
    finished = cli.wait(timeout=900)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert not consistency_problems(url)
    assert not differences(expected, result_rows(url))

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        (run,) = conn.execute(sa.text("SELECT * FROM v_run_summary")).mappings().all()
    engine.dispose()
    assert run["status"] == "completed" and run["files_seen"] == n_files
    # The restart really hit the run: Prefect retried a task (the shard's write, or a read).
    messages = flow_run_logs(run["prefect_flow_run_id"])
    retries = [m for m in messages if "Retry 1/" in m]
    print(f"restart took {outage:.1f} s; retried: {retries}")
    assert retries, [m for m in messages if "Completed" not in m]

    again = run_cli([*args, "--db", url], env, tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not differences(expected, result_rows(url))
