"""The C-STORE receiver, driven by dcmtk (storescu, dcmsend, echoscu) as the independent client.

What is shown: every common transfer syntax is stored as sent, under a name derived from the
SOP Instance UID; non-radiograph SOP classes are refused with DIMSE 0x0122 and nothing is
written; associations are bounded; a write failure is answered 0xA700 and leaves nothing;
SIGKILL in the middle of a transfer loses no acknowledged instance and leaves no partial file
under a final name; 1,000 instances from 4 concurrent storescu processes go through
``cxr-screen listen`` and ``cxr-screen nightly`` and are each predicted exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from support import make_model

from tasks.dicom import synth
from tasks.dicom.pacs import receiver as rx

BIN = Path(sys.executable).parent
CXR_SCREEN = str(BIN / "cxr-screen")
REPO = Path(__file__).resolve().parents[2]

# storescu proposes a compressed syntax only when told which; -R: only the contexts the files
# need. Lossless JPEG process 14 has no storescu option: dcmsend proposes each file's own syntax.
STORESCU_OPTION = {
    "explicit_le": "-xe",
    "implicit_le": "-xi",
    "deflated_le": "-xd",
    "explicit_be": "-xb",
    "rle": "-xr",
    "jpeg_baseline": "-xy",
    "jpeg_lossless_sv1": "-xs",
    "jpeg_ls": "-xt",
    "jpeg_ls_near": "-xu",
    "j2k_lossless": "-xv",
    "j2k": "-xw",
}


def _require_dcmtk() -> None:
    for tool in ("storescu", "dcmsend", "echoscu"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} (dcmtk) is missing: apt-get install dcmtk", pytrace=False)


@pytest.fixture
def receiver(tmp_path):
    """An in-process receiver on a free loopback port, writing to tmp_path/drop."""
    _require_dcmtk()
    drop = tmp_path / "drop"
    drop.mkdir()
    r = rx.Receiver(rx.ReceiverConfig(drop_folder=drop, port=0, host="127.0.0.1"))
    r.start()
    yield r
    r.stop()


def storescu(port: int, files: list[Path], *options: str, timeout: float = 120):
    return subprocess.run(
        ["storescu", "-v", "-R", *options, "-aec", "CXRSCREEN", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def acknowledged(storescu_output: str) -> list[str]:
    """The files storescu sent and got a Success response for, in order."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if m := re.match(r"I: Sending file: (.+)$", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def responses(storescu_output: str) -> list[str]:
    return re.findall(r"Received Store Response \(([^)]*)\)", storescu_output)


def visible_files(drop: Path) -> list[Path]:
    """What discovery would see: files with no path part starting with a dot."""
    return sorted(
        p
        for p in drop.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(drop).parts)
    )


def write_images(folder: Path, n: int, *, seed: int, rows: int = 64, columns: int = 56):
    """``n`` small synthetic DX images (two per study); returns their manifest records."""
    params = synth.ImageParams(rows=rows, columns=columns, bits_stored=12)
    return [
        synth.write_image(
            folder / f"{i:05d}.dcm",
            params,
            positive=bool(i % 3 == 0),
            seed=seed,
            study=i // 2,
            instance=i % 2,
        )
        for i in range(n)
    ]


# --- transfer syntaxes, names, refusals --------------------------------------------------------


def test_every_common_transfer_syntax_is_stored_as_sent(receiver, tmp_path):
    src = tmp_path / "src"
    records = {}
    for i, syntax in enumerate(synth.SYNTAXES):
        params = synth.ImageParams(
            rows=72, columns=64, bits_stored=8 if syntax == "jpeg_baseline" else 12, syntax=syntax
        )
        records[syntax] = synth.write_image(
            src / f"{syntax}.dcm", params, positive=False, seed=7, study=0, instance=i
        )
    for syntax, option in STORESCU_OPTION.items():
        done = storescu(receiver.port, [src / f"{syntax}.dcm"], option)
        assert responses(done.stdout + done.stderr) == ["Success"], (syntax, done.stderr)
    sent = subprocess.run(
        [
            "dcmsend",
            "-aec",
            "CXRSCREEN",
            "127.0.0.1",
            str(receiver.port),
            str(src / "jpeg_lossless.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr

    drop = receiver.config.drop_folder
    expected = set(STORESCU_OPTION) | {"jpeg_lossless"}
    assert len(visible_files(drop)) == len(expected)
    for syntax in expected:
        rec = records[syntax]
        stored = drop / rx.instance_file_name(rec["sop_instance_uid"])
        assert stored.is_file(), syntax
        original, copy = pydicom.dcmread(src / f"{syntax}.dcm"), pydicom.dcmread(stored)
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, syntax
        assert copy.SOPInstanceUID == rec["sop_instance_uid"]
        assert copy.PixelData == original.PixelData, syntax  # as sent: not re-encoded
        assert copy.file_meta.MediaStorageSOPInstanceUID == rec["sop_instance_uid"]
        assert (stored.stat().st_mode & 0o777) == 0o600
        # the name carries no patient data
        assert rec["patient_id"] not in str(stored) and rec["accession_number"] not in str(stored)
    assert receiver.counts.stored == len(expected)
    assert receiver.counts.refused == receiver.counts.rejected == receiver.counts.failed == 0


def test_non_radiograph_sop_classes_are_refused_with_0122_and_nothing_is_written(
    receiver, tmp_path
):
    # an SR, an RT plan (pydicom's test files) and a Secondary Capture image
    sc = tmp_path / "sc.dcm"
    synth.write_image(sc, synth.ImageParams(rows=32, columns=32, modality="OT"), positive=False)
    assert pydicom.dcmread(sc).SOPClassUID == synth.SC_STORAGE
    for path in (get_testdata_file("test-SR.dcm"), get_testdata_file("rtplan.dcm"), sc):
        done = storescu(receiver.port, [Path(path)])
        out = done.stdout + done.stderr
        assert responses(out) == ["Refused: SOPClassNotSupported"], (path, out[-2000:])

    # the exact status, through an independent SCU as well
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    rt = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    ae.add_requested_context(rt.SOPClassUID, rt.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CXRSCREEN")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(rt)
    finally:
        assoc.release()
    assert status.Status == 0x0122

    assert visible_files(receiver.config.drop_folder) == []
    assert receiver.counts.refused == 4 and receiver.counts.stored == 0


def test_a_data_set_that_contradicts_its_command_is_rejected(receiver, tmp_path, monkeypatch):
    """In chunked mode pynetdicom sends a file's bytes as they are, its command UIDs from the
    file meta: a meta naming another SOP instance than the data set makes the two disagree."""
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    path = tmp_path / "x.dcm"
    synth.write_image(path, synth.ImageParams(rows=32, columns=32), positive=False)
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CXRSCREEN")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status.Status == rx.ERROR_DATASET_DOES_NOT_MATCH
    assert visible_files(receiver.config.drop_folder) == []
    assert receiver.counts.rejected == 1


def test_echo_wrong_called_ae_and_bounded_associations(tmp_path):
    _require_dcmtk()
    drop = tmp_path / "drop"
    drop.mkdir()
    config = rx.ReceiverConfig(drop_folder=drop, port=0, host="127.0.0.1", max_associations=1)
    with rx.Receiver(config) as r:
        echo = subprocess.run(
            ["echoscu", "-aec", "CXRSCREEN", "127.0.0.1", str(r.port)], capture_output=True
        )
        assert echo.returncode == 0
        wrong = subprocess.run(
            ["echoscu", "-aec", "SOMEONEELSE", "127.0.0.1", str(r.port)],
            capture_output=True,
            text=True,
        )
        assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr

        from pynetdicom import AE

        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(rx.VERIFICATION)
        held = ae.associate("127.0.0.1", r.port, ae_title="CXRSCREEN")
        assert held.is_established
        try:
            second = subprocess.run(
                ["echoscu", "-aec", "CXRSCREEN", "127.0.0.1", str(r.port)],
                capture_output=True,
                text=True,
            )
            assert second.returncode != 0 and "Local Limit Exceeded" in second.stderr
        finally:
            held.release()
        time.sleep(0.2)
        again = subprocess.run(
            ["echoscu", "-aec", "CXRSCREEN", "127.0.0.1", str(r.port)], capture_output=True
        )
        assert again.returncode == 0
        assert r.counts.associations_rejected == 2


def test_a_write_failure_is_answered_out_of_resources_and_leaves_nothing(
    receiver, tmp_path, monkeypatch
):
    src = tmp_path / "src"
    write_images(src, 1, seed=11)
    real_replace = os.replace

    def disk_full(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rx.os, "replace", disk_full)
    done = storescu(receiver.port, sorted(src.glob("*.dcm")))
    monkeypatch.setattr(rx.os, "replace", real_replace)
    assert responses(done.stdout + done.stderr) == ["Refused: OutOfResources"]
    drop = receiver.config.drop_folder
    assert [p for p in drop.rglob("*") if p.is_file() and p.suffix != ".json"] == []
    assert receiver.counts.failed == 1


def test_atomic_write_and_stale_temporaries(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()

    def chunks():
        yield b"first half "
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        rx.write_atomically(drop, "ab/abc.dcm", chunks())
    assert list(drop.rglob("*.*")) == []  # neither the final name nor a temporary
    final = rx.write_atomically(drop, "ab/abc.dcm", [b"whole"])
    assert final.read_bytes() == b"whole"
    stale = drop / "ab" / ".abc.x1.part"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    fresh = drop / "ab" / ".abd.x2.part"
    fresh.write_bytes(b"being written")
    assert rx.remove_stale_temporaries(drop) == 1
    assert not stale.exists() and fresh.exists() and final.exists()


def test_study_tracker_settles_idle_studies_and_the_state_file_lists_the_others(tmp_path):
    now = [1000.0]
    tracker = rx.StudyTracker(idle_seconds=30, clock=lambda: now[0])
    tracker.saw("1.2.3")
    tracker.saw("1.2.3")
    now[0] += 20
    tracker.saw("1.2.4")
    now[0] += 15  # 1.2.3 idle for 35 s, 1.2.4 for 15 s
    assert tracker.settle() == 1
    receiving = tracker.receiving()
    assert set(receiving) == {"1.2.4"} and receiving["1.2.4"].instances == 1
    assert tracker.settled == 1

    drop = tmp_path / "drop"
    drop.mkdir()
    r = rx.Receiver(rx.ReceiverConfig(drop_folder=drop, port=0, host="127.0.0.1"))
    r.tracker.saw("9.8.7")
    r._write_state()
    assert set(rx.studies_receiving(drop)) == {"9.8.7"}
    assert rx.studies_receiving(tmp_path) == {}


def test_bad_settings_name_the_value_and_the_rule(tmp_path):
    with pytest.raises(rx.ReceiverError, match="AE title of 'A_VERY_LONG_AE_TITLE'"):
        rx.ReceiverConfig(drop_folder=tmp_path, ae_title="A_VERY_LONG_AE_TITLE")
    with pytest.raises(rx.ReceiverError, match="port of 70000"):
        rx.ReceiverConfig(drop_folder=tmp_path, port=70000)
    with pytest.raises(rx.ReceiverError, match="maximum of 0 associations"):
        rx.ReceiverConfig(drop_folder=tmp_path, max_associations=0)
    with pytest.raises(rx.ReceiverError, match="does not exist"):
        rx.Receiver(rx.ReceiverConfig(drop_folder=tmp_path / "nope")).start()


# --- the real command: kill, and the 1,000-instance push into nightly ---------------------------


def start_listen(drop: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            CXR_SCREEN,
            "listen",
            "--drop-folder",
            str(drop),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            *extra,
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"cxr-screen listen exited: {log.read_text()[-2000:]}")
        if (
            subprocess.run(
                ["echoscu", "-aec", "CXRSCREEN", "127.0.0.1", str(port)], capture_output=True
            ).returncode
            == 0
        ):
            return proc
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"cxr-screen listen did not answer C-ECHO within 60 s: {log.read_text()[-2000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path):
    _require_dcmtk()
    src, drop = tmp_path / "src", tmp_path / "drop"
    drop.mkdir()
    records = write_images(src, 240, seed=21, rows=384, columns=320)
    uid_of = {r["path"]: r["sop_instance_uid"] for r in records}
    port = free_port()
    proc = start_listen(drop, port, tmp_path / "listen.log")
    sender = subprocess.Popen(
        ["storescu", "-v", "-R", "-aec", "CXRSCREEN", "127.0.0.1", str(port)]
        + [r["path"] for r in records],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(visible_files(drop)) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    out, _ = sender.communicate(timeout=60)

    acked = acknowledged(out)
    # killed once 40 files were in place; the last may be renamed but not yet acknowledged
    assert 39 <= len(acked) < len(records), "the kill must land mid-transfer"
    on_disk = visible_files(drop)
    # every acknowledged instance is there, complete, under its final name
    for path in acked:
        stored = drop / rx.instance_file_name(uid_of[path])
        assert stored.is_file(), path
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(path).PixelData
    # nothing partial under a final name: every visible file parses whole; at most the one
    # instance renamed just before the kill (not yet acknowledged) is extra
    names = {drop / rx.instance_file_name(u) for u in uid_of.values()}
    for stored in on_disk:
        assert stored in names
        ds = pydicom.dcmread(stored)
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
    assert len(acked) <= len(on_disk) <= len(acked) + 1
    print(f"\n[kill] acknowledged {len(acked)} of {len(records)}, on disk {len(on_disk)}")

    # the sender sends again what was not acknowledged; the restarted receiver takes it
    rest = [r["path"] for r in records if r["path"] not in set(acked)]
    proc = start_listen(drop, port, tmp_path / "listen.log")
    try:
        again = storescu(port, [Path(p) for p in rest])
        assert responses(again.stdout + again.stderr) == ["Success"] * len(rest)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert len(visible_files(drop)) == len(records)
    assert proc.returncode == 0


def test_storescu_x4_to_listen_to_nightly_predicts_1000_instances_exactly_once(
    tmp_path, sqlite_url, prefect_api_url
):
    _require_dcmtk()
    src, drop = tmp_path / "src", tmp_path / "drop"
    drop.mkdir()
    t0 = time.monotonic()
    records = write_images(src, 1000, seed=31)
    port = free_port()
    log = tmp_path / "listen.log"
    proc = start_listen(drop, port, log, "--max-associations", "4", "--study-idle-seconds", "2")
    t1 = time.monotonic()
    try:
        quarters = [records[i::4] for i in range(4)]
        senders = [
            subprocess.Popen(
                ["storescu", "-v", "-R", "-aec", "CXRSCREEN", "127.0.0.1", str(port)]
                + [r["path"] for r in quarter],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for quarter in quarters
        ]
        outputs = [s.communicate(timeout=300)[0] for s in senders]
        t2 = time.monotonic()
        assert all(s.returncode == 0 for s in senders), outputs[0][-2000:]
        assert sum(len(acknowledged(o)) for o in outputs) == 1000
        time.sleep(3)  # let the idle timer settle the studies
        state = json.loads((drop / rx.STATE_DIR / rx.STATE_FILE).read_text())
        assert state["counts"]["stored"] == 1000
        assert state["receiving"] == {} and state["studies_settled"] == 500
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert "stored 1000" in text
    for r in records[:50]:  # no UIDs or patient data in the receiver's log
        assert r["sop_instance_uid"] not in text and r["patient_id"] not in text
    assert len(visible_files(drop)) == 1000

    model = make_model(tmp_path / "model.pt", "push-1", 0, name="push")
    # the session's Prefect server: not a temporary one per command
    env = {
        **os.environ,
        "CXR_SCREEN_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": prefect_api_url,
    }

    def nightly() -> dict:
        done = subprocess.run(
            [
                CXR_SCREEN,
                "nightly",
                "--drop-folder",
                str(drop),
                "--model",
                str(model),
                "--db",
                sqlite_url,
                "--device",
                "cpu",
                "--json",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = nightly()
    t3 = time.monotonic()
    assert (first["files_seen"], first["predicted"], first["skipped"], first["failed"]) == (
        1000,
        1000,
        0,
        0,
    )
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        predicted = conn.execute(sa.text("SELECT sop_instance_uid FROM image_predictions")).all()
        outcomes = conn.execute(
            sa.text("SELECT sop_instance_uid, outcome FROM file_outcomes")
        ).all()
    engine.dispose()
    uids = sorted(r["sop_instance_uid"] for r in records)
    assert sorted(u for (u,) in predicted) == uids  # each exactly once
    assert sorted(u for u, o in outcomes if o == "predicted") == uids and len(outcomes) == 1000
    second = nightly()
    assert second["files_seen"] == 0 and second["predicted"] == 0
    print(
        f"\n[timing] generate {t1 - t0:.1f} s, 4 x storescu 1000 instances {t2 - t1:.1f} s "
        f"({1000 / (t2 - t1):.0f}/s), nightly {t3 - t2:.1f} s"
    )


def test_serve_runs_the_receiver_beside_the_schedule(tmp_path, sqlite_url):
    """`cxr-screen serve --listen-port`: pushes land in the drop folder the schedule reads;
    SIGTERM stops both cleanly."""
    _require_dcmtk()
    src, drop = tmp_path / "src", tmp_path / "drop"
    drop.mkdir()
    records = write_images(src, 3, seed=51)
    model = make_model(tmp_path / "model.pt", "serve-1", 0, name="serve")
    port = free_port()
    env = {
        **os.environ,
        "CXR_SCREEN_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [
            CXR_SCREEN,
            "serve",
            "--drop-folder",
            str(drop),
            "--model",
            str(model),
            "--db",
            sqlite_url,
            "--listen-port",
            str(port),
            "--interval",
            "3600",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(
            ["echoscu", "-aec", "CXRSCREEN", "127.0.0.1", str(port)], capture_output=True
        ).returncode:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        done = storescu(port, [Path(r["path"]) for r in records])
        assert responses(done.stdout + done.stderr) == ["Success"] * 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert {p.name for p in visible_files(drop)} == {
        Path(rx.instance_file_name(r["sop_instance_uid"])).name for r in records
    }
    assert "stopped; totals: stored 3" in log.read_text()
