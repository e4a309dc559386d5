"""Crash and resume: SIGKILL ``cxr-screen screen`` at random points, re-run without --force,
and end with exactly the database an uninterrupted run writes.

The kill points are chosen by watching the database (PostgreSQL's ``pg_stat_activity``):
before the run is recorded, right after it opens (discovery, header scan, first decode),
between shard commits, and while a shard's transaction is open. After every kill the database
must be consistent (no half-written shard), and the transaction that was open is checked to
have been rolled back.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from reliability_support import (
    Cli,
    Watcher,
    consistency_problems,
    differences,
    group_members,
    process_alive,
    result_rows,
    run_cli,
)

# The planned kill points of the 20 trials (20 kills are required; a trial whose process ends
# before its kill point is redone). A shard's transaction is short: some of the kills aimed
# at one land just after its commit, and count as "between commits".
PLANS = {"start-up": 4, "run opened": 3, "shard commit": 8, "between commits": 5}
MAX_TRIALS = 30


def kill_at(cli: Cli, watcher: Watcher, plan: str, rng: random.Random, before: int) -> dict:
    """Wait for the planned point, SIGKILL the CLI; return what was observed at the kill."""
    started = time.monotonic()
    delay = rng.uniform(0.3, 3.0)
    target = rng.randint(1, 4)
    skip = rng.randint(0, 2)  # shard transactions to let through before the one killed
    seen: set[str] = set()
    xid = None
    while cli.alive():
        run = watcher.last_run()
        if plan == "start-up" and time.monotonic() - started > delay:
            break
        if plan == "run opened" and run > before:
            time.sleep(rng.uniform(0.0, 0.8))
            break
        if plan == "between commits" and run > before and watcher.rows_of(run) >= target:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        if plan == "shard commit" and run > before:
            # a shard's transaction lasts a few statements: poll without pausing, kill at once
            xid = watcher.shard_transaction()
            if xid is not None:
                seen.add(xid)
                if len(seen) > skip:
                    cli.kill()
                    break
            continue
        time.sleep(0.005)
    if plan == "shard commit" and len(seen) > skip:
        open_xid, rows = xid, None
    else:
        run = watcher.last_run()
        rows = watcher.rows_of(run) if run > before else 0
        if not cli.alive():
            return {"plan": plan, "killed": False}
        open_xid = watcher.shard_transaction() if run > before else None
    cli.kill()
    finished = cli.wait(timeout=120)
    observed = {"plan": plan, "killed": finished.returncode == -9, "run": run > before}
    if run <= before:
        observed["phase"] = "start-up"
    elif open_xid is not None:
        deadline = time.monotonic() + 60
        while (state := watcher.status(open_xid)) == "in progress" and time.monotonic() < deadline:
            time.sleep(0.05)
        observed["xact"] = state
        observed["phase"] = "shard commit" if state == "aborted" else "between commits"
    elif rows == 0:
        observed["phase"] = "run opened"
    else:
        observed["phase"] = "between commits"
    observed["leftovers"] = cli.leftovers(grace=30)
    return observed


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 21+ kill-and-resume trials: minutes on a busy 2-core machine
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(
    tmp_path, pg_url, reference_run, model_path
):
    crashed_url = pg_url
    # The uninterrupted run of the same command (conftest.reference_run, shared with the
    # outage test): same corpus, one home (same thumbnails, same key).
    corpus, n_files, env = reference_run["corpus"], reference_run["n_files"], reference_run["env"]
    args = ["--model", str(model_path), "--shard-size", "3", "--workers", "1"]
    expected = reference_run["rows"]
    assert len(expected["file_outcomes"]) == n_files

    rng = random.Random(20240607)
    plans = [plan for plan, n in PLANS.items() for _ in range(n)]
    rng.shuffle(plans)
    watcher = Watcher(crashed_url)
    trials: list[dict] = []
    try:
        for i, plan in enumerate(plans):
            if i >= MAX_TRIALS:
                break
            before = watcher.last_run()
            cli = Cli(["screen", str(corpus), *args, "--db", crashed_url], env, tmp_path / f"t{i}")
            trial = kill_at(cli, watcher, plan, rng, before)
            if not trial["killed"]:
                finished = cli.wait(timeout=900)
                assert finished.returncode == 0, finished.stderr[-2000:]
                plans.append(plan)
            trial["seconds"] = round(time.monotonic() - cli.started, 1)
            trial["files_done"] = watcher.scalar("SELECT COUNT(*) FROM file_outcomes") or 0
            trials.append(trial)
            if trial["killed"]:
                problems = consistency_problems(crashed_url)
                assert not problems, (trial, problems)
    finally:
        watcher.close()
    for t in trials:
        print(t)

    killed = [t for t in trials if t["killed"]]
    phases = Counter(t["phase"] for t in killed)
    print(f"{len(killed)} kills by phase: {dict(phases)}")
    assert len(killed) >= 20, trials
    assert phases["shard commit"] >= 1 and phases["between commits"] >= 2, phases
    assert phases["run opened"] >= 1 and phases["start-up"] >= 1, phases
    assert all(t["xact"] == "aborted" for t in killed if t["phase"] == "shard commit")
    # A killed CLI leaves no process behind (its decode workers exit with it).
    assert not [t for t in killed if t["leftovers"]], [t for t in killed if t["leftovers"]]

    final = run_cli(["screen", str(corpus), *args, "--db", crashed_url], env, tmp_path / "final")
    assert final.returncode == 0, final.stderr[-2000:]
    assert not differences(expected, result_rows(crashed_url))
    assert not consistency_problems(crashed_url)

    # Killed runs stay visible as 'running' until their heartbeat is older than
    # sql.runs.STALE_RUN_AFTER (6 hours) when a later run starts, which then marks them
    # 'abandoned' (tests/sql/test_sql_run_liveness.py); every other run completed and
    # conserved its files.
    engine = sa.create_engine(crashed_url)
    with engine.connect() as conn:
        runs = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM v_run_summary"))]
    engine.dispose()
    stale = [r for r in runs if r["status"] == "running"]
    assert len(stale) == sum(1 for t in killed if t["run"])
    assert all(r["finished_at"] is None for r in stale)
    done = [r for r in runs if r["status"] == "completed"]
    assert done and all(r["files_seen"] == n_files for r in done)


def test_decode_workers_exit_when_their_parent_is_killed(tmp_path):
    """A decode worker blocks on its task queue, whose write end it holds itself: killed
    runs used to leave their workers (and the resource tracker) running forever."""
    script = textwrap.dedent(
        """
        import multiprocessing, os, sys, time
        from concurrent.futures import ProcessPoolExecutor
        from tasks.ingest import init_worker
        pool = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker
        )
        print(pool.submit(os.getpid).result(), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )
    try:
        worker = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=60)
        deadline = time.monotonic() + 60
        while process_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(worker), "the worker outlived its parent"
    finally:
        for pid in group_members(parent.pid):
            os.kill(pid, signal.SIGKILL)
