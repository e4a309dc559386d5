"""Benchmark: the review page's worklist over 100,000 studies, rendered on the server.

    .venv/bin/python benchmarks/bench_web.py                    # 100k studies, both databases
    .venv/bin/python benchmarks/bench_web.py --studies 20000 --only sqlite

For each database it makes a scratch database (PostgreSQL: a throwaway database on the server
named by --pg-admin-url, dropped afterwards; SQLite: a file in a temp folder) holding
--studies studies, each with a study prediction of a first model version (60% flagged), a
second model version re-scoring every 10th study, and reviews of 10% of the flagged studies.
Models and runs are registered through sql.runs; the studies and predictions are bulk-inserted
(this measures the read path, not the writers: bench_upsert.py does those).

It serves the page with uvicorn on a loopback port, signs in, and times full HTTP requests
(median and 95th percentile of --repeat) for:

  worklist            the default page: flagged, not reviewed, 50 rows, with its counts
  worklist any        reviewed or not
  worklist deep       a page 30,000 rows down (keyset cursor)
  worklist filtered   a study-date range, one model version, reviewed
  study               one study's page
  thumbnail           one review thumbnail (and checks its caching headers and a 304)

Numbers, not assertions: the target is < 200 ms for the worklist page over 100,000 studies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "web")]  # web/ (until reinstalled), LiveServer
from web_support import LiveServer  # noqa: E402

from sql import db, runs  # noqa: E402
from sql.schema import Review, Study, StudyPrediction  # noqa: E402
from web.auth import add_user  # noqa: E402

PASSWORD = "benchmark-password"


def _metadata(version: str) -> dict:
    return {
        "format": "cxr-screen-checkpoint/1",
        "name": "bench",
        "version": version,
        "architecture": "lg_mobilenet_v2",
        "arch_kwargs": {},
        "class_names": ["normal", "abnormal"],
        "positive_class": "abnormal",
        "threshold": 0.4,
        "input_size": 150,
        "preprocessing": {},
        "preprocessing_sha256": hashlib.sha256(b"bench").hexdigest(),
        "provenance": {},
        "metrics": {},
        "notes": "",
    }


def fill(url: str, n: int, home: Path) -> dict:
    """n studies, their predictions under two model versions, reviews; one thumbnail."""
    engine = db.connect(url)
    Session = db.session_factory(engine)
    with Session.begin() as session:
        m1 = runs.register_model(session, _metadata("b-1"), hashlib.sha256(b"b1").hexdigest())
        r1 = runs.start_run(session, kind="reprocess", model_id=m1)
        m2 = runs.register_model(session, _metadata("b-2"), hashlib.sha256(b"b2").hexdigest())
        r2 = runs.start_run(session, kind="reprocess", model_id=m2)
    rng = np.random.default_rng(7)
    uids = [f"1.2.826.0.1.3680043.9.{i}" for i in range(n)]
    days = rng.integers(0, 730, n)
    scores = rng.uniform(0, 1, n)
    now = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    chunk = 10_000
    with engine.begin() as conn:
        for start in range(0, n, chunk):
            part = range(start, min(n, start + chunk))
            conn.execute(
                sa.insert(Study.__table__),
                [
                    {
                        "study_instance_uid": uids[i],
                        "accession_number": f"ACC{i:08d}",
                        "study_date": dt.date(2024, 1, 1) + dt.timedelta(days=int(days[i])),
                        "patient_id_hash": hashlib.sha256(f"p{i}".encode()).hexdigest(),
                        "first_seen_run_id": r1,
                    }
                    for i in part
                ],
            )
            predictions = [
                {
                    "study_instance_uid": uids[i],
                    "model_id": m1,
                    "aggregation": "max",
                    "n_images": 1 + (i % 3 == 0),
                    "score": float(scores[i]),
                    "label": bool(scores[i] >= 0.4),
                    "threshold": 0.4,
                    "run_id": r1,
                    "predicted_at": now - dt.timedelta(hours=int(i % 2000)),
                }
                for i in part
            ]
            predictions += [
                {
                    **p,
                    "model_id": m2,
                    "run_id": r2,
                    "score": min(1.0, p["score"] * 1.05),
                    "label": p["score"] * 1.05 >= 0.4,
                    "predicted_at": now,
                }
                for k, p in enumerate(predictions)
                if (start + k) % 10 == 0
            ]
            conn.execute(sa.insert(StudyPrediction.__table__), predictions)
        flagged = [i for i in range(n) if scores[i] >= 0.4]
        reviewed = flagged[::10]
        conn.execute(
            sa.insert(Review.__table__),
            [
                {
                    "study_instance_uid": uids[i],
                    "model_id": m1,
                    "decision": ("agree", "disagree", "uncertain")[i % 3],
                    "reviewer": "dr.bench",
                    "reason": "no_finding" if i % 3 == 1 else None,
                    "created_at": now + dt.timedelta(seconds=i % 600),
                }
                for i in reviewed
            ],
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    # One study with an image outcome and a thumbnail file, for the study page and the image.
    thumbs = home / "thumbnails" / "ab"
    thumbs.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (256, 220), dtype=np.uint8)).save(
        thumbs / "0123456789abcdef.jpg", quality=90
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO file_outcomes (source_uri, model_id, sop_instance_uid, "
            "study_instance_uid, outcome, facts, thumbnail_path, run_id, updated_at) VALUES "
            f"('/bench/0.dcm', {m1}, '1.2.3.0', '{uids[flagged[0]]}', 'predicted', "
            f"'{{\"decoder\": \"native\"}}', '{thumbs / '0123456789abcdef.jpg'}', {r1}, "
            "CURRENT_TIMESTAMP)"
        )
        conn.exec_driver_sql(
            "INSERT INTO image_predictions (sop_instance_uid, model_id, study_instance_uid, "
            "score, label, threshold, preprocessing_sha256, run_id, predicted_at) VALUES "
            f"('1.2.3.0', {m1}, '{uids[flagged[0]]}', {float(scores[flagged[0]])}, TRUE, 0.4, "
            f"'{'0' * 64}', {r1}, CURRENT_TIMESTAMP)"
        )
    add_user(engine, "dr.bench", PASSWORD)
    fill_s = time.perf_counter() - t0
    engine.dispose()
    return {
        "flagged": len(flagged),
        "reviewed": len(reviewed),
        "study": uids[flagged[0]],
        "model": m1,
        "fill_s": fill_s,
    }


def timed(
    client: httpx.Client, path: str, repeat: int
) -> tuple[float, float, float, httpx.Response]:
    """Median server time (its Server-Timing header), its 95th percentile, and the median
    round trip seen by the client over loopback HTTP."""
    client.get(path)  # warm
    server, trip = [], []
    answer = None
    for _ in range(repeat):
        t = time.perf_counter()
        answer = client.get(path)
        trip.append((time.perf_counter() - t) * 1000)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        server.append(float(answer.headers["server-timing"].split("dur=")[1]))
    server.sort()
    p95 = server[max(0, int(len(server) * 0.95) - 1)]
    return statistics.median(server), p95, statistics.median(trip), answer


def bench(kind: str, url: str, n: int, repeat: int) -> dict:
    from web.app import create_app
    from web.settings import get_web_settings

    home = Path(tempfile.mkdtemp(prefix="bench-web-home-"))
    print(f"\n== {kind}: filling {n:,} studies ...", flush=True)
    facts = fill(url, n, home)
    print(
        f"   {facts['flagged']:,} flagged, {facts['reviewed']:,} reviewed "
        f"(filled in {facts['fill_s']:.1f} s)"
    )
    settings = get_web_settings(
        database_url=url, home=home, web_secret_key="bench", web_page_size=50
    )
    app = create_app(settings)
    server = LiveServer(app)
    results = {}
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)[1]
        client.post(
            "/login", data={"username": "dr.bench", "password": PASSWORD, "csrf_token": token}
        )
        first = client.get("/worklist?reviewed=any")
        cursor = None
        # A cursor 30,000 rows down: the 30,000th flagged score (from the database).
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT score, study_instance_uid, model_id FROM v_worklist "
                    "WHERE is_latest = 1 ORDER BY score DESC, study_instance_uid, model_id "
                    "LIMIT 1 OFFSET 30000"
                )
            ).first()
        engine.dispose()
        if row is not None:
            cursor = f"{row.score!r}~{row.study_instance_uid}~{row.model_id}"
        assert first.status_code == 200
        cases = {
            "worklist": "/worklist",
            "worklist any": "/worklist?reviewed=any",
            "worklist filtered": (
                f"/worklist?from=2024-06-01&to=2024-12-31&model={facts['model']}&reviewed=yes"
            ),
            "study": f"/study/{facts['study']}",
        }
        if cursor:
            cases["worklist deep"] = "/worklist?reviewed=any&after=" + httpx.QueryParams(
                {"c": cursor}
            )["c"].replace("~", "%7E")
        print(f"   {'':<18} server: median     p95   | client round trip (median)")
        for name, path in cases.items():
            med, p95, trip, answer = timed(client, path, repeat)
            rows = answer.text.count("<tr data-href=")
            results[name] = med
            extra = f" ({rows} rows)" if name.startswith("worklist") else ""
            print(f"   {name:<18} {med:7.1f} ms {p95:7.1f} ms | {trip:7.1f} ms{extra}")
        # The counts that follow the rows: cached 20 s; cold, they read the whole scope.
        from web import data

        engine = app.state.engine
        cold = []
        for _ in range(max(3, repeat // 4)):
            with data.reader(engine) as conn:
                t = time.perf_counter()
                counts = data.worklist_counts(conn, data.Filters.parse({}))
                cold.append((time.perf_counter() - t) * 1000)
        results["counts_cold"] = statistics.median(cold)
        med, p95, trip, _ = timed(client, "/worklist/counts", repeat)
        print(
            f"   {'counts (cold)':<18} {statistics.median(cold):7.1f} ms (in process; "
            f"{counts.total:,} flagged, {counts.unreviewed:,} to review)"
        )
        print(f"   {'counts (cached)':<18} {med:7.1f} ms {p95:7.1f} ms | {trip:7.1f} ms")
        thumb = client.get(f"/study/{facts['study']}").text
        src = re.search(r'src="(/thumbs/[^"]+)"', thumb)[1]
        med, p95, trip, answer = timed(client, src, repeat)
        cache = answer.headers.get("cache-control")
        etag = answer.headers.get("etag")
        again = client.get(src, headers={"if-none-match": etag or ""})
        print(
            f"   {'thumbnail':<18} {med:7.1f} ms {p95:7.1f} ms | {trip:7.1f} ms "
            f"(Cache-Control: {cache}; ETag: {etag}; revalidation: {again.status_code})"
        )
        ok = cache and "max-age" in cache and etag and again.status_code == 304
        print(f"   thumbnail caching headers: {'OK' if ok else 'MISSING'}")
        results["thumbnail_cached"] = bool(ok)
        client.close()
    finally:
        server.stop()
        app.state.engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "CXR_SCREEN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    print(
        f"bench_web: {args.studies:,} studies, {args.repeat} timed requests each; "
        f"{platform.node()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.2f}, "
        f"{dt.datetime.now().isoformat(timespec='minutes')}"
    )
    summary = {}
    if args.only in (None, "sqlite"):
        folder = Path(tempfile.mkdtemp(prefix="bench-web-"))
        summary["sqlite"] = bench(
            "sqlite", f"sqlite:///{folder / 'results.db'}", args.studies, args.repeat
        )
    if args.only in (None, "postgresql"):
        admin = sa.create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
        name = f"cxr_bench_web_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            url = args.pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
            summary["postgresql"] = bench("postgresql", url, args.studies, args.repeat)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()
    print()
    for kind, res in summary.items():
        verdict = "meets" if res["worklist"] < 200 else "misses"
        print(
            f"RESULT {kind}: worklist page over {args.studies:,} studies "
            f"{res['worklist']:.1f} ms median on the server ({verdict} the 200 ms target); "
            f"its counts {res['counts_cold']:.0f} ms cold; "
            f"thumbnail caching headers {'present' if res['thumbnail_cached'] else 'MISSING'}"
        )


if __name__ == "__main__":
    main()
