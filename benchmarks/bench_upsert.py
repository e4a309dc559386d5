"""Benchmark: bulk upserts of image predictions on PostgreSQL (and SQLite for reference).

    .venv/bin/python benchmarks/bench_upsert.py            # 100k rows, both databases
    .venv/bin/python benchmarks/bench_upsert.py --rows 20000 --only postgresql

For each database it creates a scratch database (PostgreSQL: a throwaway database on the
server named by --pg-admin-url, dropped afterwards; SQLite: a file in a temp folder), inserts
the instances the predictions refer to (timed separately), then times, each in one
transaction:

  insert      N new predictions            (PostgreSQL: COPY into a staging table + one upsert)
  insert-nv   the same without the per-call check that the instances exist
  no-op       the same N again, unchanged  (ON CONFLICT ... WHERE something differs: no writes)
  force       the same N with new scores   (updated in place)
  executemany N new predictions without the COPY path (PostgreSQL only, for comparison)
  write_shard --shard-files files in shards of 256 (instances + outcomes + predictions + study
              aggregation, one transaction per shard), as the pipeline writes them

and prints rows/s. Numbers, not assertions: the target is >= 50,000 rows/s for the PostgreSQL
insert of 100k predictions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from sql import db, predictions, runs, shards, upsert

SHARD = 256  # files per write_shard call, as in the pipeline
PRE_SHA = hashlib.sha256(b"bench preprocessing").hexdigest()


def _metadata(version: str) -> dict:
    return {
        "format": "cxr-screen-checkpoint/1",
        "name": "bench",
        "version": version,
        "architecture": "lg_mobilenet_v2",
        "arch_kwargs": {},
        "class_names": ["normal", "abnormal"],
        "positive_class": "abnormal",
        "threshold": 0.5,
        "input_size": 150,
        "preprocessing": {},
        "preprocessing_sha256": PRE_SHA,
        "provenance": {},
        "metrics": {},
        "notes": "",
    }


def _instances(n: int, prefix: str) -> list[dict]:
    return [
        {
            "sop_instance_uid": f"1.2.826.0.1.{prefix}.{i}",
            "study_instance_uid": f"1.2.826.0.2.{prefix}.{i // 2}",
            "source_uri": f"file:///bench/{prefix}/{i:07d}.dcm",
            "content_sha256": hashlib.sha256(f"{prefix}{i}".encode()).hexdigest(),
            "modality": "CR",
            "body_part": "CHEST",
            "view_position": "PA",
            "rows": 2048,
            "columns": 2048,
            "study_date": "20240102",
        }
        for i in range(n)
    ]


def _prediction_rows(instances: list[dict], model_id: int, run_id: int, shift: float) -> list:
    now = dt.datetime.now(dt.UTC)
    rows = []
    for i, inst in enumerate(instances):
        score = ((i * 7919) % 1000) / 1000 * (1 - shift) + shift / 2
        rows.append(
            {
                "sop_instance_uid": inst["sop_instance_uid"],
                "model_id": model_id,
                "study_instance_uid": inst["study_instance_uid"],
                "score": score,
                "label": score >= 0.5,
                "threshold": 0.5,
                "preprocessing_sha256": PRE_SHA,
                "run_id": run_id,
                "predicted_at": now,
            }
        )
    return rows


_SERVER_CPU = [0.0, True]  # seconds of PostgreSQL backend CPU seen so far; measurable?


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a local process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _track_server_cpu(engine: sa.Engine) -> None:
    """Add each PostgreSQL backend's CPU time between pool checkout and checkin to
    _SERVER_CPU (a local server only: reads /proc/<backend pid>/stat)."""
    if engine.dialect.name != "postgresql":
        return

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection, record, _proxy):
        pid = dbapi_connection.info.backend_pid
        try:
            record.info["cpu_start"] = (pid, _proc_cpu(pid))
        except OSError:
            _SERVER_CPU[1] = False

    @sa.event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection, record):
        start = record.info.pop("cpu_start", None)
        if start is not None:
            _SERVER_CPU[0] += _proc_cpu(start[0]) - start[1]


def _timed(label: str, n: int, fn: Callable[[], None], results: list) -> None:
    """Wall time, and CPU time (this process + the PostgreSQL backend): on a shared machine the
    CPU figure says what the step costs, the wall figure what it took under the load."""
    server0, start, cpu0 = _SERVER_CPU[0], time.perf_counter(), time.process_time()
    fn()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0 + _SERVER_CPU[0] - server0
    results.append((label, n, seconds, cpu))
    print(
        f"  {label:<12} {n:>8} rows  {seconds:7.2f} s  {n / seconds:>10,.0f} rows/s   "
        f"cpu {cpu:6.2f} s  {n / max(cpu, 1e-9):>10,.0f} rows/cpu-s",
        flush=True,
    )


def bench(url: str, n: int, repeat: int, shard_files: int) -> list:
    engine = db.connect(url)
    _track_server_cpu(engine)
    Session = db.session_factory(engine)
    results: list = []
    try:
        with Session.begin() as session:
            models = [
                runs.register_model(
                    session, _metadata(f"a{r}"), hashlib.sha256(f"a{r}".encode()).hexdigest()
                )
                for r in range(repeat + 1)
            ]
            run_id = runs.start_run(session, kind="demo", model_id=models[0])
        instances = _instances(n, "p")

        def load_instances():
            with Session.begin() as session:
                shards.write_shard(
                    session,
                    run_id=run_id,
                    model_id=models[0],
                    instances=instances,
                    outcomes=[],
                    predictions=[],
                )

        _timed("instances", n, load_instances, results)

        def upsert_predictions(rows, force=False, verify=True):
            def go():
                with Session.begin() as session:
                    predictions.upsert_image_predictions(session, rows, force=force, verify=verify)

            return go

        for model_id in models[:repeat]:  # each repetition inserts N rows for a new model
            rows = _prediction_rows(instances, model_id, run_id, 0.0)
            _timed("insert", n, upsert_predictions(rows), results)
            _timed(
                "no-op",
                n,
                upsert_predictions(_prediction_rows(instances, model_id, run_id, 0.0)),
                results,
            )
            rows = _prediction_rows(instances, model_id, run_id, 0.1)
            _timed("force", n, upsert_predictions(rows, force=True), results)
        expected = repeat * n
        # The same insert without the per-call reference check (write_shard has checked the
        # instances already when it calls this).
        with Session.begin() as session:
            models.append(
                runs.register_model(session, _metadata("nv"), hashlib.sha256(b"nv").hexdigest())
            )
        rows = _prediction_rows(instances, models[-1], run_id, 0.0)
        _timed("insert-nv", n, upsert_predictions(rows, verify=False), results)
        expected += n
        if engine.dialect.name == "postgresql":
            saved = upsert.COPY_THRESHOLD
            upsert.COPY_THRESHOLD = 10**12
            try:
                rows = _prediction_rows(instances, models[repeat], run_id, 0.0)
                _timed("executemany", n, upsert_predictions(rows), results)
                expected += n
            finally:
                upsert.COPY_THRESHOLD = saved

        n_files = min(n, shard_files)
        files = _instances(n_files, "s")
        outcomes = [
            {
                "source_uri": f["source_uri"],
                "outcome": "predicted",
                "sop_instance_uid": f["sop_instance_uid"],
                "study_instance_uid": f["study_instance_uid"],
                "facts": {"decoder": "pylibjpeg", "inverted": False},
                "thumbnail_path": f"thumbs/{i}.png",
            }
            for i, f in enumerate(files)
        ]
        file_predictions = [
            {
                "source_uri": f["source_uri"],
                "sop_instance_uid": f["sop_instance_uid"],
                "score": 0.25,
                "label": False,
                "threshold": 0.5,
                "preprocessing_sha256": PRE_SHA,
            }
            for f in files
        ]

        def write_shards():
            for start in range(0, n_files, SHARD):
                end = start + SHARD
                with Session.begin() as session:
                    result = shards.write_shard(
                        session,
                        run_id=run_id,
                        model_id=models[0],
                        instances=files[start:end],
                        outcomes=outcomes[start:end],
                        predictions=file_predictions[start:end],
                    )
                    predictions.upsert_study_predictions(
                        session, models[0], run_id, study_uids=result.study_uids
                    )

        _timed("write_shard", n_files, write_shards, results)
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT COUNT(*) FROM image_predictions")).scalar_one()
        expected += n_files
        if count != expected:
            raise RuntimeError(f"expected {expected} image_predictions rows, found {count}")
    finally:
        engine.dispose()
    return results


def report(results: list) -> None:
    """Best and median per step (the machine may be shared: best is closest to capability)."""
    print("  summary: wall rows/s best / median;  rows per CPU-second (client + server) median")
    for label in dict.fromkeys(r[0] for r in results):
        rates = sorted(n / seconds for name, n, seconds, _ in results if name == label)
        cpu_rates = [n / max(cpu, 1e-9) for name, n, _, cpu in results if name == label]
        print(
            f"    {label:<12} {rates[-1]:>10,.0f} / {statistics.median(rates):>10,.0f};"
            f"  {statistics.median(cpu_rates):>10,.0f}"
        )
    if not _SERVER_CPU[1]:
        print("  (PostgreSQL backend CPU not readable: remote server; CPU figures are client only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--only", choices=["postgresql", "sqlite"])
    parser.add_argument("--repeat", type=int, default=3, help="insert/no-op/force rounds")
    parser.add_argument(
        "--shard-files", type=int, default=20_000, help="files for the write_shard step"
    )
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")

    if args.only in (None, "postgresql"):
        admin = sa.create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
        name = f"cxr_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            print(f"PostgreSQL ({admin.url.host}), {args.rows} rows:")
            report(
                bench(
                    args.pg_admin_url.rsplit("/", 1)[0] + f"/{name}",
                    args.rows,
                    args.repeat,
                    args.shard_files,
                )
            )
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"SQLite (WAL file), {args.rows} rows:")
            report(
                bench(
                    f"sqlite:///{Path(tmp) / 'bench.db'}", args.rows, args.repeat, args.shard_files
                )
            )


if __name__ == "__main__":
    main()
