"""``cxr-screen demo`` end to end (quick size) and its directory safety rule."""

from __future__ import annotations

import csv
import io
import zipfile

import pytest
import sqlalchemy as sa
from rich.console import Console

from cli.demo import MARKER, DemoError, prepare_directory, run_demo
from model.checkpoint import load_checkpoint


@pytest.mark.slow
def test_quick_demo_end_to_end(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_SCREEN_HOME", raising=False)
    directory = tmp_path / "demo"
    buffer = io.StringIO()
    result = run_demo(directory, quick=True, out=Console(file=buffer, width=160))
    text = buffer.getvalue()

    # What it leaves behind
    ckpt = load_checkpoint(directory / "model.pt")
    assert ckpt.name == "demo" and "not for clinical use" in ckpt.notes
    assert ckpt.input_size == 150
    assert (directory / "results.db").is_file()
    assert (directory / ".cxr-screen" / "hmac.key").is_file()  # its own home, not the cwd's
    with zipfile.ZipFile(directory / "studies.zip") as zf:
        names = zf.namelist()
    assert not any("positive" in n or "negative" in n for n in names)  # no labels in paths
    counts = result["archive_counts"]
    assert counts["files"] == len(names)

    # The screen run: every file of the archive ends in one outcome
    screened = result["screen"]
    assert screened["files_seen"] == counts["files"]
    assert screened["predicted"] + screened["skipped"] + screened["failed"] == counts["files"]
    assert screened["failed"] >= counts["broken"] - 1  # a broken file may fail the header scan
    assert screened["predicted"] == counts["studies"]  # one frontal per study; laterals skipped
    assert screened["skipped"] >= counts["unselected"] + (counts["images"] - counts["studies"])

    # The database: one train run and one demo run, both completed, counts conserved
    runs = {r["kind"]: r for r in result["run_summary"]}
    assert set(runs) == {"train", "demo"}
    for r in runs.values():
        assert r["status"] == "completed"
        assert r["files_seen"] == r["predicted"] + r["skipped"] + r["failed"]
        assert r["model_name"] == "demo" and r["model_version"] == ckpt.version
    engine = sa.create_engine(result["database_url"])
    with engine.connect() as conn:
        n_results = conn.execute(sa.text("SELECT COUNT(*) FROM v_study_results")).scalar()
        queue = conn.execute(sa.text("SELECT score FROM v_review_queue")).scalars().all()
    engine.dispose()
    assert n_results == counts["studies"]
    assert result["review_queue_total"] == len(queue)
    assert [r["score"] for r in result["review_queue"]] == queue[:10]
    assert all(s >= ckpt.threshold for s in queue)

    # An honest evaluation on the archive's studies, and the printed report
    # recomputed here from the database and the truth file, by counting ordered pairs
    ev = result["archive_evaluation"]
    truth = dict(csv.reader((directory / "studies_truth.csv").read_text().splitlines()[1:]))
    with engine.connect() as conn:
        scored = conn.execute(sa.text("SELECT study_instance_uid, score FROM v_study_results"))
        by_label = {"0": [], "1": []}
        for uid, score in scored:
            by_label[truth[uid]].append(score)
    engine.dispose()
    pos, neg = by_label["1"], by_label["0"]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert ev["studies"] == counts["studies"] == len(pos) + len(neg)
    assert ev["positives"] == len(pos) == ev["tp"] + ev["fn"]
    assert ev["auroc"] == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    assert ev["tp"] == sum(p >= ckpt.threshold for p in pos)
    assert ev["fp"] == sum(n >= ckpt.threshold for n in neg)
    for title in ("Model demo", "Run summary", "Review queue", "AUROC", "not for clinical use"):
        assert title in text, title

    # A second demo in the same directory replaces the first one's outputs
    again = run_demo(directory, quick=True, n_studies=6, epochs=1)
    assert again["archive_counts"]["studies"] == 6
    assert {r["kind"] for r in again["run_summary"]} == {"train", "demo"}


def test_demo_refuses_a_directory_with_foreign_results(tmp_path):
    (tmp_path / "results.db").write_bytes(b"someone's database")
    with pytest.raises(DemoError, match="results.db not written by `cxr-screen demo`"):
        prepare_directory(tmp_path)
    assert (tmp_path / "results.db").read_bytes() == b"someone's database"
    fresh = tmp_path / "new"
    prepare_directory(fresh)
    assert (fresh / MARKER).is_file()
    (fresh / "model.pt").write_bytes(b"old demo model")
    prepare_directory(fresh)
    assert not (fresh / "model.pt").exists()
