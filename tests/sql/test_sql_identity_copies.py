"""Identity by content through the real screening path: copies of one instance made by real
encoders (dcmtk's dcmconv and dcmcjpls keep the SOP Instance UID; pydicom's JPEG 2000 encoder),
screened by the shard loop (planner, pixel path, writer) on SQLite and PostgreSQL.

Lossless copies are one instance: one prediction, the other copies *skipped* as duplicates
naming the file and the run that predicted it, in the same shard, in a later shard and in a
later run. A lossy copy under the same UID stays a conflict. The planner gives a file whose UID
was seen before both fingerprints, so that a JPEG 2000 copy decoded at reduced resolution is
still compared by its pixels."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import JPEG2000Lossless

from model.checkpoint import load_checkpoint, untrained_checkpoint
from tasks.dicom import synth
from tasks.ingest import scan, shards
from tasks.screening import ShardProcessor, open_run
from tasks.shard_loop import ShardLoop, ShardSteps


def _run(tool: list[str], src: Path, dst: Path) -> None:
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} (dcmtk) is missing: apt-get install dcmtk", pytrace=False)
    subprocess.run([*tool, str(src), str(dst)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, Path]:
    """One 12-bit chest DX and its copies, each in a folder of its own (a source each)."""
    root = tmp_path_factory.mktemp("copies")
    params = synth.ImageParams(rows=700, columns=640, bits_stored=12)
    (root / "pacs").mkdir()
    original = Path(
        synth.write_image(root / "pacs" / "original.dcm", params, positive=True, seed=3)["path"]
    )
    out = {"original": original}
    tools = {
        "implicit": ["dcmconv", "+ti"],
        "jpeg_ls": ["dcmcjpls"],
        "lossy": ["dcmcjpeg", "+ee", "+un"],  # +un: keeps the UID, as a careless archive would
    }
    for name, tool in tools.items():
        (root / name).mkdir()
        out[name] = root / name / f"{name}.dcm"
        _run(tool, original, out[name])
    ds = pydicom.dcmread(original)
    ds.compress(JPEG2000Lossless, ds.pixel_array, generate_instance_uid=False)
    (root / "j2k").mkdir()
    out["j2k"] = root / "j2k" / "j2k.dcm"
    ds.save_as(out["j2k"], enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    untrained_checkpoint(version="identity", head_std=0.2, calibrate=True).save(path)
    return load_checkpoint(path)  # with the file's sha256, as a run registers it


@pytest.fixture(autouse=True, params=["scanned here", "scanned by the workers"])
def scan_mode(request, monkeypatch):
    """Every test twice: files scanned before they go to the workers, and scanned by the
    worker that reads them (``scan(..., in_workers=True)``: the planner then knows only their
    URIs, and a copy is recognised after decoding, ``ShardProcessor.collect``)."""
    monkeypatch.setitem(SCAN, "in_workers", request.param == "scanned by the workers")


SCAN = {"in_workers": False}


def screen(engine, checkpoint, paths: list[Path], *, shard_size=10, force=False, reduced=True):
    """One run of the shard loop (decoding in this process); returns its run id and tally."""
    run = open_run(
        engine, checkpoint, kind="reprocess", source="test", parameters={}, selection_policy={}
    )
    items = list(scan([str(p) for p in paths], b"identity-key", in_workers=SCAN["in_workers"]))
    with ShardProcessor(checkpoint, device="cpu", workers=0, reduced=reduced) as processor:
        loop = ShardLoop(ShardSteps(run, processor, force=force))
        tally = loop.run(shards(items, shard_size))
    return run.run_id, tally


def counts(tally) -> dict[str, int]:
    return {k: tally.counts[k] for k in ("predicted", "skipped", "failed")}


def outcomes(engine) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT source_uri, outcome, reason FROM file_outcomes"))
        return {Path(uri).name: (outcome, reason) for uri, outcome, reason in rows}


def count(engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def test_real_copies_are_one_instance_and_a_lossy_copy_a_conflict(engine, checkpoint, copies):
    uid = str(pydicom.dcmread(copies["original"]).SOPInstanceUID)
    first = [copies["original"], copies["implicit"], copies["j2k"], copies["lossy"]]
    run1, tally = screen(engine, checkpoint, first)
    assert counts(tally) == {"predicted": 1, "skipped": 2, "failed": 1}
    seen = outcomes(engine)
    assert seen["original.dcm"] == ("predicted", None)
    for name, basis in (("implicit.dcm", "pixel fingerprint"), ("j2k.dcm", "pixel fingerprint")):
        outcome, reason = seen[name]
        assert outcome == "skipped"
        assert reason.startswith(f"duplicate: SOP Instance UID {uid} was already predicted in ")
        assert f"in run {run1} from {copies['original']}, " in reason
        assert f"({basis})" in reason
    outcome, reason = seen["lossy.dcm"]
    assert outcome == "failed" and "has different content (pixel fingerprint" in reason
    assert count(engine, "uid_conflicts") == 1
    assert count(engine, "image_predictions") == 1

    # A later run, another source: a JPEG-LS copy is a duplicate of run 1's prediction.
    _, tally = screen(engine, checkpoint, [copies["jpeg_ls"]])
    assert counts(tally) == {"predicted": 0, "skipped": 1, "failed": 0}
    outcome, reason = outcomes(engine)["jpeg_ls.dcm"]
    assert outcome == "skipped" and f"in run {run1} from {copies['original']}, " in reason

    # Everything again: the predicted file is skipped by the planner without decoding; the
    # copies are compared again and their rows stay as they were.
    before = outcomes(engine)
    _, tally = screen(engine, checkpoint, [*first, copies["jpeg_ls"]])
    assert counts(tally) == {"predicted": 0, "skipped": 4, "failed": 1}
    assert outcomes(engine) == before
    assert count(engine, "uid_conflicts") == 1


def test_copies_in_consecutive_shards_of_one_run(engine, checkpoint, copies):
    """One file per shard: each copy is planned before the previous shard's write has
    committed, and is still compared by content (the JPEG 2000 copy, decoded at reduced
    resolution, gets its full pixel fingerprint because its UID was seen just before)."""
    paths = [copies["original"], copies["j2k"], copies["implicit"]]
    run_id, tally = screen(engine, checkpoint, paths, shard_size=1)
    assert counts(tally) == {"predicted": 1, "skipped": 2, "failed": 0}, tally.reasons
    seen = outcomes(engine)
    assert seen["original.dcm"][0] == "predicted"
    for name in ("j2k.dcm", "implicit.dcm"):
        assert f"already predicted in run {run_id} from {copies['original']}, " in seen[name][1]


def test_a_reduced_first_copy_cannot_be_compared_with_a_later_native_one(
    engine, checkpoint, copies
):
    """The known limit: a JPEG 2000 file decoded at reduced resolution is stored with its
    codestream fingerprint only; a native copy screened after its shard was planned has no
    codestream, so the two cannot be compared without decoding the first one again. The copy
    fails saying so (not a UID conflict); screening the JPEG 2000 file again with full decoding
    and --force gives it its pixel fingerprint, and the copy is then a duplicate."""
    _, tally = screen(engine, checkpoint, [copies["j2k"], copies["original"]], shard_size=1)
    assert counts(tally) == {"predicted": 1, "skipped": 0, "failed": 1}
    outcome, reason = outcomes(engine)["original.dcm"]
    assert outcome == "failed" and "could not be compared" in reason
    assert "codestream fingerprint" in reason and "--force" in reason
    assert count(engine, "uid_conflicts") == 0

    screen(engine, checkpoint, [copies["j2k"]], force=True, reduced=False)
    _, tally = screen(engine, checkpoint, [copies["original"]])
    assert counts(tally) == {"predicted": 0, "skipped": 1, "failed": 0}
    assert outcomes(engine)["original.dcm"][0] == "skipped"


def test_instances_stored_by_earlier_versions_are_still_compared(engine, checkpoint, copies):
    """A database written before 2026-11-29: the instance holds a ``px1`` (SHA-256) pixel
    fingerprint and the file's plain SHA-256. Its copies screened now (``px2`` by default) are
    still duplicates: the planner asks the pixel path for a ``px1`` for a UID stored with one,
    so nothing needs the stored file; a lossy copy is still a conflict."""
    import hashlib

    from model.spec import PreprocessSpec
    from tasks.dicom import pixels

    run1, _ = screen(engine, checkpoint, [copies["original"]])
    legacy = pixels.preprocess(copies["original"], PreprocessSpec(), pixel_kind="px1").fingerprint
    assert legacy.startswith("px1:")
    file_sha = hashlib.sha256(copies["original"].read_bytes()).hexdigest()
    with engine.begin() as conn:
        for table in ("instances", "file_outcomes"):
            stored = conn.execute(
                sa.text(f"UPDATE {table} SET pixel_fingerprint = :fp, content_sha256 = :sha"),
                {"fp": legacy, "sha": file_sha},
            )
            assert stored.rowcount == 1
    paths = [copies["implicit"], copies["j2k"], copies["lossy"]]
    _, tally = screen(engine, checkpoint, paths)
    assert counts(tally) == {"predicted": 0, "skipped": 2, "failed": 1}, tally.reasons
    seen = outcomes(engine)
    for name in ("implicit.dcm", "j2k.dcm"):
        outcome, reason = seen[name]
        assert outcome == "skipped" and f"in run {run1} from {copies['original']}, " in reason
        assert "(pixel fingerprint)" in reason
    outcome, reason = seen["lossy.dcm"]
    assert outcome == "failed" and "has different content (pixel fingerprint" in reason
    with engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT pixel_fingerprint FROM instances")).scalar_one()
    assert kept == legacy  # the stored instance is left as it was


def test_reprocessing_with_another_model_needs_no_second_fingerprint(
    engine, checkpoint, copies, tmp_path, monkeypatch
):
    """The archive screened again by a new model version: every UID is stored, but each file
    has the stored content hash, so no second fingerprint is computed (for a JPEG 2000 file
    decoded at reduced resolution that would be a full decode per file). A copy from another
    source still gets one."""
    from tasks.dicom import identity

    screen(engine, checkpoint, [copies["j2k"]])  # reduced resolution: stored with its cs1
    path = tmp_path / "second.pt"
    untrained_checkpoint(version="identity-2", head_std=0.2, calibrate=True).save(path)
    second = load_checkpoint(path)
    calls: list[str] = []
    for name in ("pixel_fingerprint", "codestream_fingerprint"):
        real = getattr(identity, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(identity, name, counted)
    _, tally = screen(engine, second, [copies["j2k"]])
    assert counts(tally) == {"predicted": 1, "skipped": 0, "failed": 0}
    assert calls == []  # the same file: its content hash settles it
    _, tally = screen(engine, second, [copies["implicit"]])  # another file, the same UID
    assert calls == ["codestream_fingerprint"]  # native: it has none, and the two cannot be
    assert counts(tally) == {"predicted": 0, "skipped": 0, "failed": 1}  # compared (see above)
