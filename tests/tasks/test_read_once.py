"""Files scanned by the decode worker that reads them (``scan(..., in_workers=True)``).

The run's process only lists files; each worker reads a file once, scans its header from the
bytes read, applies the selection policy, and decodes it unless the planner said that this
model version already predicted that UID from that URI. The shard's rows must be exactly those
of the scan-first path, bad files and unselected ones included.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import pytest

import tasks.ingest as ingest
from model.checkpoint import untrained_checkpoint
from tasks.dicom.discovery import SourceFile
from tasks.dicom.synth import ImageParams, write_broken, write_image, write_unselected
from tasks.ingest import scan
from tasks.screening import ShardPlan, ShardProcessor

KEY = b"read-once-key"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_broken(root / "broken")
    write_unselected(root / "unselected")
    good = root / "good"
    syntaxes = ["explicit_le", "implicit_le", "deflated_le", "rle", "jpeg_ls", "j2k_lossless"]
    for i, syntax in enumerate(syntaxes):
        params = ImageParams(rows=300, columns=260, syntax=syntax)
        write_image(good / f"{syntax}.dcm", params, positive=bool(i % 2), seed=i)
    with zipfile.ZipFile(root / "archive.zip", "w") as zf:
        zf.write(good / "explicit_le.dcm", "in/zip.dcm")
        zf.write(root / "broken" / "not_dicom.dcm", "in/text.dcm")
    return root


@pytest.fixture(scope="module")
def checkpoint():
    return untrained_checkpoint(version="read-once", head_std=0.2)


def process(checkpoint, items, thumbs: Path, plan: ShardPlan | None = None, workers: int = 0):
    with ShardProcessor(checkpoint, device="cpu", workers=workers, thumbnails_dir=thumbs) as p:
        return p.process(items, plan)


def comparable(rows) -> dict:
    """A shard's rows, in an order that does not depend on the path that made them."""

    def by_uri(dicts):
        return sorted(dicts, key=lambda d: d["source_uri"])

    return {
        "outcomes": by_uri(rows.outcomes),
        "instances": by_uri(rows.instances),
        "predictions": by_uri(rows.predictions),
        "counts": dict(rows.counts),
        "already_done": rows.already_done,
        "reasons": dict(rows.reasons),
    }


def test_the_rows_equal_the_scan_first_paths(corpus, checkpoint, tmp_path) -> None:
    scanned = list(scan([str(corpus)], KEY))
    deferred = list(scan([str(corpus)], KEY, in_workers=True))
    assert [it.uri for it in scanned] == [it.uri for it in deferred]
    assert all(it.deferred is not None and it.header is None for it in deferred)
    first = comparable(process(checkpoint, scanned, tmp_path))
    second = comparable(process(checkpoint, deferred, tmp_path))
    assert first == second
    # the corpus has every kind of ending, so the comparison covers each of them
    assert first["counts"]["predicted"] == 7  # six encodings and the zip member
    assert first["counts"]["skipped"] >= 5  # the unselected files
    assert first["counts"]["failed"] >= 15  # the broken files and the zip's text member
    reasons = {Path(o["source_uri"]).name: o["reason"] for o in first["outcomes"]}
    assert "Modality" in reasons["ct_chest.dcm"]
    assert "'Pixel Data' is truncated" in reasons["truncated_pixel_data.dcm"]


def test_each_file_is_opened_once(corpus, checkpoint, tmp_path, monkeypatch) -> None:
    opened: Counter[str] = Counter()
    real = SourceFile.open

    def counted(self):
        opened[self.uri] += 1
        return real(self)

    monkeypatch.setattr(SourceFile, "open", counted)
    items = list(scan([str(corpus / "good")], KEY, in_workers=True))
    rows = process(checkpoint, items, tmp_path)
    assert rows.counts["predicted"] == 6
    assert set(opened.values()) == {1}, opened
    assert len(opened) == 6
    # the scan-first path opens each selected file twice (header scan, then decoding)
    opened.clear()
    process(checkpoint, list(scan([str(corpus / "good")], KEY)), tmp_path)
    assert set(opened.values()) == {2}


def test_a_file_still_holding_the_uid_predicted_from_its_uri_is_not_decoded(
    corpus, checkpoint, tmp_path, monkeypatch
) -> None:
    path = corpus / "good" / "rle.dcm"
    (scanned,) = scan([str(path)], KEY)
    uid = scanned.header.sop_instance_uid
    decodes: list[str] = []
    real = ingest.preprocess

    def counted(*args, **kwargs):
        decodes.append("decode")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "preprocess", counted)
    plan = ShardPlan(predicted_at={scanned.uri: uid}, known_at={scanned.uri: (uid,)})
    rows = process(checkpoint, list(scan([str(path)], KEY, in_workers=True)), tmp_path, plan)
    assert rows.already_done == 1 and not rows.outcomes and decodes == []
    assert any("already predicted" in reason for reason in rows.reasons)
    # another file at that URI now (another UID): decoded and predicted
    plan = ShardPlan(predicted_at={scanned.uri: "1.2.3.4"})
    rows = process(checkpoint, list(scan([str(path)], KEY, in_workers=True)), tmp_path, plan)
    assert rows.already_done == 0 and rows.counts["predicted"] == 1 and decodes == ["decode"]


def test_worker_processes_scan_the_files(corpus, checkpoint, tmp_path) -> None:
    """The scan request and the planner's hints travel to spawned workers (pickled)."""
    paths = [str(corpus / "good"), str(corpus / "unselected")]
    scanned = comparable(process(checkpoint, list(scan(paths, KEY)), tmp_path))
    items = list(scan(paths, KEY, in_workers=True))
    assert comparable(process(checkpoint, items, tmp_path, workers=1)) == scanned
