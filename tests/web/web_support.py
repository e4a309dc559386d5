"""Helpers for the review page's tests: a screened corpus, a live server, reviewer logins."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import sqlalchemy as sa
from pydicom.uid import generate_uid
from support import cli_env

from tasks.dicom import synth

CLI = str(Path(sys.executable).parent / "cxr-screen")
CHROMIUM = "/usr/bin/chromium-headless-shell"
PASSWORD = "correct horse battery"
REVIEWER = "dr.kim"
N_STUDIES = 10
SEED = 21
# Scores of the calibrated seeded model on this corpus spread over about 0.05-0.85; at this
# threshold about half the studies are flagged (the tests read which from the database).
THRESHOLD = 0.5


def write_corpus(root: Path) -> dict[str, Any]:
    """Ten small studies (some with a lateral, which is skipped), one study with a second
    frontal whose pixel data is cut short (failed), and broken and unselected files."""
    tree = root / "tree"
    records = synth.write_corpus(
        tree,
        N_STUDIES,
        seed=SEED,
        size_range=(160, 224),
        syntaxes=["explicit_le", "rle", "jpeg_baseline", "j2k_lossless", "jpeg_ls"],
        lateral_fraction=0.5,
        positive_fraction=0.5,
    )
    (tree / "labels.csv").unlink()
    # A second image of the first study whose pixel data is cut short: failed, with a reason.
    first = next(r for r in records if r["view_position"] in ("PA", "AP"))
    ds = pydicom.dcmread(first["path"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["cxr-screen-web-broken"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pixels = ds.pixel_array
    ds.PixelData = pixels.tobytes()[: pixels.nbytes // 3]
    ds.InstanceNumber = 3
    broken = Path(first["path"]).parent / "3_cut.dcm"
    ds.save_as(broken, enforce_file_format=True)
    synth.write_broken(tree / "broken")
    synth.write_unselected(tree / "unselected")
    patients = {
        "ids": sorted({r["patient_id"] for r in records}),
        "names": sorted({r["patient_name"] for r in records}),
        "birth_dates": sorted(
            {synth.make_identity(SEED, i, 0).birth_date for i in range(N_STUDIES)}
        ),
    }
    return {
        "tree": tree,
        "records": records,
        "broken_study": first["study_instance_uid"],
        "broken_sop": str(ds.SOPInstanceUID),
        "patients": patients,
    }


def make_web_model(path: Path, version: str = "web-1", threshold: float = THRESHOLD) -> Path:
    """A seeded, calibrated untrained network: its scores spread over (0, 1)."""
    from model.checkpoint import untrained_checkpoint

    ckpt = untrained_checkpoint(
        version=version, name="webtest", seed=3, head_std=0.2, calibrate=True, threshold=threshold
    )
    ckpt.save(path)
    return path


def screen(tree: Path, model: Path, url: str, home: Path, api_url: str) -> dict[str, Any]:
    """A real `cxr-screen screen` run, reporting to the Prefect server at ``api_url`` (the
    session's: a temporary server per command would add ~10 s to each)."""
    proc = subprocess.run(
        [CLI, "screen", str(tree), "--model", str(model), "--db", url, "--json", "--workers", "0"],
        env={**cli_env(home, "web-test-key"), "PREFECT_API_URL": api_url},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- many studies through the real writers -----------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bulk_studies(url: str, n: int = 250, seed: int = 5) -> dict[str, Any]:
    """``n`` flagged studies under two model versions (every 4th study also scored by the
    newer one), written with the pipeline's own writers, plus a few reviews.

    Study dates spread over 2024; scores are distinct. Returns what the tests compare with.
    """
    from sql import db, predictions, reviews, runs, shards

    rng = np.random.default_rng(seed)
    engine = db.connect(url)
    Session = db.session_factory(engine)
    versions = {}
    for version in ("bulk-1", "bulk-2"):
        meta = {
            "format": "cxr-screen-checkpoint/1",
            "name": "bulk",
            "version": version,
            "architecture": "lg_mobilenet_v2",
            "arch_kwargs": {"num_classes": 2},
            "class_names": ["normal", "abnormal"],
            "positive_class": "abnormal",
            "threshold": 0.0,
            "input_size": 150,
            "preprocessing": {"input_size": 150},
            "preprocessing_sha256": _sha("spec"),
            "provenance": {},
            "metrics": {},
            "notes": "",
        }
        with Session.begin() as session:
            model_id = runs.register_model(session, meta, _sha(version))
            run_id = runs.start_run(session, kind="reprocess", model_id=model_id)
        versions[version] = (model_id, run_id)
    studies = [f"1.2.826.0.1.3680043.10.{i}" for i in range(n)]
    dates = [dt.date(2024, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 366, n)]
    for version, (model_id, run_id) in versions.items():
        chosen = range(n) if version == "bulk-1" else range(0, n, 4)
        instances, outcomes, preds = [], [], []
        for i in chosen:
            sop = f"1.2.826.0.1.3680043.11.{i}"
            uri = f"/data/bulk/{i:04d}.dcm"
            instances.append(
                {
                    "sop_instance_uid": sop,
                    "study_instance_uid": studies[i],
                    "series_instance_uid": studies[i] + ".1",
                    "source_uri": uri,
                    "content_sha256": _sha(sop),
                    "modality": "DX",
                    "body_part": "CHEST",
                    "view_position": "PA",
                    "study_date": dates[i].strftime("%Y%m%d"),
                    "accession_number": f"BULK{i:05d}",
                    "patient_id_hash": _sha(f"patient-{i}"),
                }
            )
            outcomes.append(
                {
                    "source_uri": uri,
                    "outcome": "predicted",
                    "sop_instance_uid": sop,
                    "study_instance_uid": studies[i],
                    "facts": {"decoder": "native"},
                }
            )
            score = float(rng.uniform(0.05, 0.999))
            preds.append(
                {
                    "source_uri": uri,
                    "sop_instance_uid": sop,
                    "score": score,
                    "label": True,
                    "threshold": 0.0,
                    "preprocessing_sha256": _sha("spec"),
                }
            )
        with Session.begin() as session:
            result = shards.write_shard(
                session,
                run_id=run_id,
                model_id=model_id,
                instances=instances,
                outcomes=outcomes,
                predictions=preds,
            )
            predictions.upsert_study_predictions(
                session, model_id, run_id, study_uids=result.study_uids
            )
        time.sleep(0.01)  # bulk-2's predictions are the newer ones
    reviewed = {}
    with Session.begin() as session:
        for i in range(1, n, 10):
            decision = ("agree", "disagree", "uncertain")[i % 3]
            reviews.add_review(
                session,
                study_instance_uid=studies[i],
                decision=decision,
                reviewer="dr.bulk",
                reason="no_finding" if decision == "disagree" else None,
            )
            reviewed[studies[i]] = decision
    engine.dispose()
    return {
        "studies": studies,
        "dates": dict(zip(studies, dates, strict=True)),
        "reviewed": reviewed,
    }


# -- live server -------------------------------------------------------------------------------


class LiveServer:
    """The app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: no Nagle delay (40 ms) on reused connections, as
        # when uvicorn binds the socket itself.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", proxy_headers=False, access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the review page's server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@contextlib.contextmanager
def reviewer_login(owner_url: str) -> Iterator[str]:
    """A PostgreSQL LOGIN role granted cxr_reviewer (views and reviews only); its URL."""
    from sql import db

    owner = db.connect(owner_url)
    db.apply_reviewer_role(owner)
    login = f"cxr_web_{uuid.uuid4().hex[:8]}"
    with owner.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"CREATE ROLE {login} LOGIN IN ROLE cxr_reviewer")
    try:
        yield sa.make_url(owner_url).set(username=login).render_as_string(hide_password=False)
    finally:
        with owner.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE usename = '{login}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {login}")
        owner.dispose()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match[1]


def signed_in(base_url: str, user: str = REVIEWER) -> httpx.Client:
    client = httpx.Client(base_url=base_url, follow_redirects=False, timeout=30)
    token = csrf_of(client.get("/login").text)
    answer = client.post(
        "/login",
        data={"username": user, "password": PASSWORD, "csrf_token": token, "next": "/worklist"},
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/worklist"
    return client


def rows(url: str, sql: str, **params) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()
