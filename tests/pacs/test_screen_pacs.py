"""PACS sources in the screening flows, through the real ``cxr-screen`` command and a real Orthanc.

- The same corpus (real pydicom-data radiographs and generated ones in four transfer syntaxes,
  one lateral view that the selection skips) screened from a folder, from Orthanc over DICOMweb
  and over DIMSE (C-MOVE to our short-lived SCP) gives the same SOP UIDs, outcomes and scores
  (within 1e-6); the counts add up; a second run changes nothing.
- A study whose second instance the PACS announces but cannot deliver is *partial*: its other
  file is predicted with the reason, the study is not aggregated and is kept for the next run;
  once the instance is back, the next nightly run completes the study and aggregates it once.
- A PACS that is unreachable, or refuses our credentials (HTTP 401): one line naming the PACS,
  exit status 2, no password echoed, no run recorded.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest
import sqlalchemy as sa
from orthanc import Orthanc, free_port
from pacs_support import CorpusFile, real_file, synth_file
from support import make_model

CLI = str(Path(sys.executable).with_name("cxr-screen"))
HMAC_KEY = "pacs-flow-test-hmac-0b6f2d"
SYNTH_DAY = "2026-11-20"
REAL_DAY = "2004-08-26"
SCORE_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model.pt")


class HoldingProxy:
    """A real HTTP server in front of Orthanc's DICOMweb that passes every request through
    (QIDO-RS listings and counts included) except the WADO-RS retrieval of the instances in
    ``held``, answered HTTP 404: a PACS that announces an instance it cannot deliver yet (a
    study still arriving; what Orthanc itself cannot be made to do)."""

    def __init__(self, target: str) -> None:
        import requests

        parts = urlsplit(target)
        self.target = f"{parts.scheme}://{parts.netloc}"  # the request paths keep the rest
        self.held: set[str] = set()
        self.session = requests.Session()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if any(path.endswith(f"/instances/{uid}") for uid in proxy.held):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("accept", "authorization")
                }
                r = proxy.session.get(proxy.target + self.path, headers=headers, timeout=60)
                self.send_response(r.status_code)
                for key in ("Content-Type", "Warning"):
                    if key in r.headers:
                        self.send_header(key, r.headers[key])
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{urlsplit(target).path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def holding_proxy(pacs) -> Iterator[HoldingProxy]:
    proxy = HoldingProxy(pacs.dicomweb_url)
    yield proxy
    proxy.close()


def env_for(home: Path, api_url: str, db_url: str, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "CXR_SCREEN_HOME": str(home / "cxr"),
        "CXR_SCREEN_HMAC_KEY": HMAC_KEY,
        "CXR_SCREEN_DATABASE_URL": db_url,
        "CXR_SCREEN_DEVICE": "cpu",
        "CXR_SCREEN_PIXEL_PATH": "cpu",
        "CXR_SCREEN_WORKERS": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }


def web_env(
    pacs: Orthanc, name: str = "WEB", password: str | None = None, url: str | None = None
) -> dict[str, str]:
    return {
        f"CXR_SCREEN_PACS__{name}__URL": url or pacs.dicomweb_url,
        f"CXR_SCREEN_PACS__{name}__USERNAME": pacs.username,
        f"CXR_SCREEN_PACS__{name}__PASSWORD": password or pacs.password,
        f"CXR_SCREEN_PACS__{name}__RETRIES": "0",
    }


def dimse_env(pacs: Orthanc, move_port: int, name: str = "OLD") -> dict[str, str]:
    return {
        f"CXR_SCREEN_PACS__{name}__URL": f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
        f"CXR_SCREEN_PACS__{name}__MOVE_PORT": str(move_port),
        f"CXR_SCREEN_PACS__{name}__MOVE_BIND": "127.0.0.1",
        f"CXR_SCREEN_PACS__{name}__RETRIES": "0",
    }


def cxr(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def summary_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0]
    return lines[0]


# --- reading a results database ----------------------------------------------------------------


def query(url: str, sql: str, **params) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def outcomes(url: str, run_id: int) -> dict[str, tuple[str, str | None]]:
    """SOP Instance UID -> (outcome, reason) of one run's files (the lateral and errored
    entries included: every file yields a row)."""
    rows = query(
        url,
        "SELECT sop_instance_uid, source_uri, outcome, reason FROM file_outcomes WHERE run_id = :r",
        r=run_id,
    )
    return {(sop or uri): (outcome, reason) for sop, uri, outcome, reason in rows}


def scores(url: str) -> dict[str, float]:
    return dict(query(url, "SELECT sop_instance_uid, score FROM image_predictions"))


def studies(url: str) -> dict[str, tuple]:
    rows = query(url, "SELECT study_instance_uid, n_images, score, run_id FROM study_predictions")
    return {r[0]: r[1:] for r in rows}


def snapshot(url: str) -> dict[str, list[tuple]]:
    """What a second run must not change."""
    return {
        "instances": query(
            url,
            "SELECT sop_instance_uid, study_instance_uid, source_uri, pixel_fingerprint, "
            "codestream_fingerprint FROM instances ORDER BY sop_instance_uid",
        ),
        "image_predictions": query(
            url,
            "SELECT sop_instance_uid, model_id, score, label, run_id FROM image_predictions "
            "ORDER BY sop_instance_uid",
        ),
        "study_predictions": query(
            url,
            "SELECT study_instance_uid, model_id, n_images, score, label, run_id, predicted_at "
            "FROM study_predictions ORDER BY study_instance_uid",
        ),
    }


def run_count(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("runs"):
                return 0
            return conn.execute(sa.text("SELECT COUNT(*) FROM runs")).scalar_one()
    finally:
        engine.dispose()


# --- the corpus --------------------------------------------------------------------------------


def corpus(folder: Path, day: str = SYNTH_DAY) -> list[CorpusFile | Path]:
    """Two real radiographs (uncompressed and JPEG 2000), six generated files in five studies
    (explicit little endian, RLE, JPEG-LS, JPEG 2000 lossless; CR and DX; one study of two
    instances) and a generated lateral view (skipped by the selection from every source)."""
    folder.mkdir(parents=True, exist_ok=True)
    made: list[CorpusFile | Path] = []
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        target = folder / name
        target.write_bytes(real_file(name).read_bytes())
        made.append(target)
    date = day.replace("-", "")
    syntaxes = ["explicit_le", "rle", "jpeg_ls", "j2k_lossless", "explicit_le"]
    for study, syntax in enumerate(syntaxes):
        modality = "DX" if study % 2 else "CR"
        made.append(
            synth_file(folder, study=study, study_date=date, syntax=syntax, modality=modality)
        )
    made.append(synth_file(folder, study=1, instance=1, study_date=date, modality="DX"))
    lateral = synth_file(folder, study=9, study_date=date)
    ds = pydicom.dcmread(lateral.path)
    ds.ViewPosition = "LL"
    ds.save_as(lateral.path, enforce_file_format=True)
    made.append(lateral)
    return made


def paths(files: list[CorpusFile | Path]) -> list[Path]:
    return [f if isinstance(f, Path) else f.path for f in files]


# --- the tests ---------------------------------------------------------------------------------


def test_folder_dicomweb_and_dimse_give_the_same_results(
    pacs, move_port, prefect_api_url, model, tmp_path
):
    files = corpus(tmp_path / "corpus")
    pacs.upload_files(paths(files))
    n_files = len(files)
    urls = {k: f"sqlite:///{tmp_path / k}.db" for k in ("folder", "web", "dimse")}
    window = f"{REAL_DAY}..{SYNTH_DAY}"
    pacs_env = {**web_env(pacs), **dimse_env(pacs, move_port)}

    def screen(kind: str, source: str, *extra: str) -> dict:
        env = env_for(tmp_path / f"home-{kind}", prefect_api_url, urls[kind], **pacs_env)
        args = ["screen", source, "--model", str(model), "--json", *extra]
        return summary_of(cxr(args, env, tmp_path / f"cwd-{kind}"))

    runs = {
        "folder": screen("folder", str(tmp_path / "corpus")),
        "web": screen("web", "pacs://web", "--study-date", window, "--connections", "2"),
        "dimse": screen("dimse", "pacs://old", "--study-date", window),
    }
    results = {k: outcomes(urls[k], runs[k]["run_id"]) for k in runs}
    for kind, summary in runs.items():
        # Counts add up: every file is one outcome row, predicted + skipped + failed
        assert summary["files_seen"] == n_files, (kind, summary)
        assert summary["predicted"] + summary["skipped"] + summary["failed"] == n_files
        assert len(results[kind]) == n_files, kind
        assert summary["predicted"] == n_files - 1 and summary["skipped"] == 1, summary
    for kind in ("web", "dimse"):
        (line,) = runs[kind]["pacs"]
        assert f"{n_files}/{n_files} instances retrieved (0 failed)" in line, line
        assert "(0 partial)" in line and runs[kind]["partial_studies"] == 0
    # Same SOP UIDs, outcomes and reasons; scores within 1e-6; studies aggregated alike
    assert results["web"] == results["folder"]
    assert results["dimse"] == results["folder"]
    reference = scores(urls["folder"])
    assert len(reference) == n_files - 1
    for kind in ("web", "dimse"):
        got = scores(urls[kind])
        assert got.keys() == reference.keys(), kind
        worst = max(abs(got[k] - reference[k]) for k in reference)
        assert worst <= SCORE_TOLERANCE, (kind, worst)
        a, b = studies(urls[kind]), studies(urls["folder"])
        assert a.keys() == b.keys() and len(a) == 6
        assert all(a[s][0] == b[s][0] and abs(a[s][1] - b[s][1]) <= 1e-6 for s in a)
    uris = query(urls["web"], "SELECT source_uri FROM instances")
    assert all(u.startswith("dicomweb://web/studies/") for (u,) in uris)
    assert pacs.password not in json.dumps(query(urls["web"], "SELECT * FROM runs"))

    # A second run from the PACS changes nothing: every file already predicted
    before = snapshot(urls["web"])
    again = screen("web", "pacs://web", "--study-date", window)
    assert again["files_seen"] == n_files and again["predicted"] == 0
    assert again["skipped"] == n_files and again["failed"] == 0
    assert snapshot(urls["web"]) == before
    spool = tmp_path / "home-web" / "cxr" / "spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def test_partial_study_is_completed_and_aggregated_once_by_the_next_night(
    pacs, holding_proxy, prefect_api_url, model, tmp_path
):
    today = dt.datetime.now(dt.UTC).date().strftime("%Y%m%d")
    folder = tmp_path / "tonight"
    folder.mkdir()
    a0 = synth_file(folder, study=3, instance=0, study_date=today)
    a1 = synth_file(folder, study=3, instance=1, study_date=today)
    b = synth_file(folder, study=4, instance=0, study_date=today)
    pacs.upload_files([a0.path, a1.path, b.path])
    holding_proxy.held.add(a1.sop_uid)
    url = f"sqlite:///{tmp_path / 'nightly.db'}"
    env = env_for(tmp_path / "home", prefect_api_url, url, **web_env(pacs, url=holding_proxy.url))
    args = ["nightly", "--pacs", "web", "--model", str(model), "--json"]

    first = summary_of(cxr(args, env, tmp_path / "cwd"))
    assert first["files_seen"] == 3 and first["predicted"] == 2 and first["failed"] == 1
    assert first["partial_studies"] == 1 and "(1 partial)" in first["pacs"][0]
    got = outcomes(url, first["run_id"])
    outcome, reason = got[a0.sop_uid]
    assert outcome == "predicted", outcome
    assert reason.startswith(
        "study partial: PACS 'web' announced 2 instance(s) in 1 series, 1 arrived"
    ), reason
    failed = next(v for k, v in got.items() if a1.sop_uid in k)
    assert failed == (
        "failed",
        f"PACS 'web' has no instance {a1.sop_uid} (HTTP 404: deleted since the query?)",
    )
    assert got[b.sop_uid] == ("predicted", None)
    assert a0.study_uid not in studies(url)  # partial: not aggregated
    assert studies(url)[b.study_uid][0] == 1
    pending = query(url, "SELECT pacs, study_instance_uid, attempts FROM pacs_pending_studies")
    assert pending == [("web", a0.study_uid, 1)]
    (mark,) = query(url, "SELECT value, run_id FROM watermarks WHERE name = 'nightly:pacs:web'")
    assert mark[1] == first["run_id"]

    # The instance can be delivered now; tonight's run completes the study, aggregates it once
    holding_proxy.held.clear()
    b_before = studies(url)[b.study_uid]
    second = summary_of(cxr(args, env, tmp_path / "cwd"))
    assert second["files_seen"] == 3 and second["predicted"] == 1 and second["failed"] == 0
    assert second["skipped"] == 2 and second["partial_studies"] == 0
    got = outcomes(url, second["run_id"])
    assert got[a1.sop_uid] == ("predicted", None)
    n_images, _, run_id = studies(url)[a0.study_uid]
    assert n_images == 2 and run_id == second["run_id"]
    assert studies(url)[b.study_uid] == b_before  # the complete study is left alone
    assert query(url, "SELECT COUNT(*) FROM pacs_pending_studies") == [(0,)]

    # A third night changes nothing
    before = snapshot(url)
    third = summary_of(cxr(args, env, tmp_path / "cwd"))
    assert third["predicted"] == 0 and third["files_seen"] == 3
    assert snapshot(url) == before


def test_unreachable_pacs_and_wrong_password_are_one_line_and_record_nothing(
    pacs, prefect_api_url, model, tmp_path
):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    gone = {"CXR_SCREEN_PACS__GONE__URL": f"http://127.0.0.1:{free_port()}/dicom-web"}
    wrong = "Wr0ng-Passw0rd-4242"
    env = env_for(tmp_path / "home", prefect_api_url, url, **gone, **web_env(pacs, password=wrong))
    base = ["--model", str(model), "--study-date", SYNTH_DAY]

    done = cxr(["screen", "pacs://gone", *base], env, tmp_path / "cwd")
    line = one_line(done)
    assert "PACS 'gone'" in line and "unreachable" in line, line
    assert run_count(url) == 0

    done = cxr(["screen", "pacs://web", *base], env, tmp_path / "cwd")
    line = one_line(done)
    assert "PACS 'web'" in line and "401" in line, line
    assert wrong not in done.stdout + done.stderr
    assert run_count(url) == 0

    done = cxr(["nightly", "--pacs", "gone", "--model", str(model)], env, tmp_path / "cwd")
    assert "PACS 'gone'" in one_line(done)
    assert run_count(url) == 0
    assert query(url, "SELECT COUNT(*) FROM watermarks") == [(0,)]

    # Options that cannot work are refused before anything starts
    done = cxr(["screen", "pacs://web", "--model", str(model)], env, tmp_path / "cwd")
    assert "needs --study-date" in one_line(done)
    done = cxr(["screen", "pacs://nowhere", *base], env, tmp_path / "cwd")
    assert "no PACS named 'nowhere' is configured" in one_line(done)
    done = cxr(["screen", "pacs://web", *base, "--since", "2026-11-01"], env, tmp_path / "cwd")
    assert "either --study-date or --since" in one_line(done)
    assert run_count(url) == 0
