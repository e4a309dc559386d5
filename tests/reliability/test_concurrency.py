"""Concurrent runs on PostgreSQL: a nightly run and a reprocess run over overlapping data at
once end with the rows of the same two runs one after the other: no duplicates, nothing lost,
no deadlock. And the reason why: two writers of one study are serialised by its row lock."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from reliability_support import (
    Cli,
    cli_env,
    consistency_problems,
    differences,
    result_rows,
    run_cli,
)

from model.checkpoint import load_checkpoint
from sql import db, predictions, runs, shards
from tasks.dicom import synth


def image_rows(study: str, sop: str, score: float) -> dict:
    sha = hashlib.sha256(sop.encode()).hexdigest()
    uri = f"/data/{sop}.dcm"
    return {
        "instances": [
            {
                "sop_instance_uid": sop,
                "study_instance_uid": study,
                "source_uri": uri,
                "content_sha256": sha,
            }
        ],
        "outcomes": [
            {
                "source_uri": uri,
                "outcome": "predicted",
                "sop_instance_uid": sop,
                "study_instance_uid": study,
            }
        ],
        "predictions": [
            {
                "source_uri": uri,
                "sop_instance_uid": sop,
                "score": score,
                "label": score >= 0.5,
                "threshold": 0.5,
                "preprocessing_sha256": sha,
            }
        ],
    }


def test_two_shards_of_one_study_at_once_aggregate_both_images(pg_url, model_path):
    """Shard A (image 1) and shard B (image 2) of a known study are written by two runs at the
    same time. B's study aggregate must include A's image: B waits on the study's row, which A
    locked (``INSERT ... ON CONFLICT DO UPDATE`` locks the row even when its WHERE is false),
    so B's aggregate, a later statement, sees A's committed image. Without that wait the study
    would end with n_images 2 instead of 3 (a lost update)."""
    engine = db.connect(pg_url)
    sessions = db.session_factory(engine)
    ckpt = load_checkpoint(model_path)
    with sessions.begin() as session:
        model_id = runs.register_model(session, ckpt.metadata(), ckpt.sha256)
        run_a = runs.start_run(session, kind="nightly", model_id=model_id)
        run_b = runs.start_run(session, kind="reprocess", model_id=model_id)
    study = "1.2.826.0.1.3680043.10.1"

    def write(session, run_id: int, sop: str, score: float) -> None:
        result = shards.write_shard(
            session, run_id=run_id, model_id=model_id, **image_rows(study, sop, score)
        )
        predictions.upsert_study_predictions(session, model_id, run_id, "max", result.study_uids)

    with sessions.begin() as session:  # the study is already known (an earlier shard)
        write(session, run_a, f"{study}.0", 0.1)
    first = sessions()
    first.begin()
    write(first, run_a, f"{study}.1", 0.2)  # A writes and aggregates, not yet committed
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with sessions.begin() as session:
                write(session, run_b, f"{study}.2", 0.9)
        except BaseException as exc:  # asserted below
            errors.append(exc)

    worker = threading.Thread(target=second)
    worker.start()
    waited = False
    deadline = time.monotonic() + 60
    with engine.connect() as probe:
        while time.monotonic() < deadline and not waited:
            waited = bool(
                probe.execute(
                    sa.text(
                        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                ).scalar()
            )
            time.sleep(0.02)
    first.commit()
    first.close()
    worker.join(timeout=120)
    assert not worker.is_alive() and not errors, errors
    assert waited, "the second writer never waited for the first"
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT n_images, score FROM study_predictions WHERE study_instance_uid = :s"),
            {"s": study},
        ).one()
    engine.dispose()
    assert tuple(row) == (3, 0.9)


def write_drop_folder(root: Path) -> None:
    """Studies of two frontal images (PA and AP: both are scored and aggregated) and of one."""
    base = synth.ImageParams(rows=128, columns=112, bits_stored=12)
    for study in range(30):
        for instance, view in enumerate(("PA", "AP")):
            params = synth.ImageParams(**{**base.__dict__, "view": view})
            synth.write_image(
                root / f"s{study:02d}" / f"{instance}_{view}.dcm",
                params,
                positive=bool(study % 2),
                seed=31,
                study=study,
                instance=instance,
            )
    synth.write_corpus(root / "single", 10, seed=32, size_range=(128, 160), lateral_fraction=0.2)
    (root / "single" / "labels.csv").unlink()
    synth.write_broken(root / "broken")


@pytest.mark.slow
def test_nightly_and_reprocess_at_once_on_overlapping_data(
    tmp_path, pg_database, prefect_api_url, model_path
):
    concurrent_url, another = pg_database
    sequential_url = another()
    drop, extra = tmp_path / "drop", tmp_path / "extra"
    write_drop_folder(drop)
    synth.write_corpus(extra, 6, seed=33, size_range=(128, 192), lateral_fraction=0.2)
    (extra / "labels.csv").unlink()
    # Different shard sizes and source order: the two runs split the studies differently.
    env = cli_env(tmp_path / "home", prefect_api_url, CXR_SCREEN_SHARD_SIZE="3")
    model = ["--model", str(model_path)]

    def commands(url: str) -> list[list[str]]:
        return [
            ["nightly", "--drop-folder", str(drop), *model, "--db", url],
            ["screen", str(extra), str(drop), *model, "--db", url, "--shard-size", "2"],
        ]

    for args in commands(sequential_url):
        done = run_cli(args, env, tmp_path / "sequential")
        assert done.returncode == 0, done.stderr[-2000:]

    # The premise, made certain: both runs are recorded before either may write a row. A
    # share lock on ``instances`` (reads pass, writes wait) holds each run's first shard until
    # the other run has started; left to chance, one small run sometimes finished before the
    # other's process had booted. (Concurrent first-use migration has its own test in
    # tests/sql/test_sql_concurrency.py; here the schema exists so it can be locked.)
    db.upgrade(concurrent_url)
    deadlocks_before = deadlocks(concurrent_url)
    gate = sa.create_engine(concurrent_url)
    with gate.connect() as hold:
        hold.execute(sa.text("LOCK TABLE instances IN SHARE MODE"))
        clis = [
            Cli(args, env, tmp_path / f"concurrent{i}")
            for i, args in enumerate(commands(concurrent_url))
        ]
        both_running = wait_for_runs(gate, 2, clis, timeout=300)
        hold.commit()  # let both write
    gate.dispose()
    results = [cli.wait(timeout=900) for cli in clis]
    assert both_running, [r.stderr[-2000:] for r in results]
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    assert not consistency_problems(concurrent_url)
    assert not differences(result_rows(sequential_url), result_rows(concurrent_url))

    engine = sa.create_engine(concurrent_url)
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT * FROM v_run_summary ORDER BY kind")).mappings().all()
    engine.dispose()
    n_drop = sum(1 for p in drop.rglob("*") if p.is_file())
    n_extra = sum(1 for p in extra.rglob("*") if p.is_file())
    assert [(r["kind"], r["status"], r["files_seen"]) for r in runs] == [
        ("nightly", "completed", n_drop),
        ("reprocess", "completed", n_drop + n_extra),
    ]
    # the premise: the two runs were writing at the same time
    assert max(r["started_at"] for r in runs) < min(r["finished_at"] for r in runs)
    assert deadlocks(concurrent_url) == deadlocks_before


def wait_for_runs(engine: sa.Engine, n: int, clis: list[Cli], timeout: float) -> bool:
    """Poll until ``n`` runs are recorded as running (False if a CLI exits or time runs out)."""
    deadline = time.monotonic() + timeout
    with engine.connect() as probe:
        while time.monotonic() < deadline and all(cli.alive() for cli in clis):
            running = probe.execute(
                sa.text("SELECT COUNT(*) FROM runs WHERE status = 'running'")
            ).scalar_one()
            probe.rollback()  # a fresh snapshot on the next poll
            if running >= n:
                return True
            time.sleep(0.2)
    return False


def deadlocks(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        n = conn.execute(
            sa.text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
    engine.dispose()
    return int(n or 0)
