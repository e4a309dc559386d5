"""End-to-end: the real `screen` and `nightly` flows on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import tarfile
import zipfile

import pytest
import sqlalchemy as sa
from support import make_model

from tasks.dicom import synth

pytestmark = pytest.mark.usefixtures("prefect_harness")

TABLES = {
    "instances": "sop_instance_uid",
    "file_outcomes": "source_uri, model_id",
    "image_predictions": "sop_instance_uid, model_id",
    "study_predictions": "study_instance_uid, model_id",
    "studies": "study_instance_uid",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A mixed tree (studies, laterals, broken and unselected files) and a zip + tar.gz."""
    root = tmp_path_factory.mktemp("corpus")
    tree = root / "tree"
    synth.write_corpus(
        tree / "studies",
        6,
        seed=3,
        size_range=(192, 320),
        syntaxes=["explicit_le", "rle", "j2k_lossless", "jpeg_ls", "jpeg_baseline", "explicit_be"],
        lateral_fraction=0.4,
    )
    (tree / "studies" / "labels.csv").unlink()  # not a DICOM: keep the tree pure for counting
    broken = synth.write_broken(tree / "broken")
    unselected = synth.write_unselected(tree / "unselected")
    (tree / "notes.txt").write_text("a stray text file in the drop folder\n")
    arch_src = root / "arch_src"
    synth.write_corpus(arch_src, 4, seed=4, size_range=(192, 320), lateral_fraction=0.0)
    (arch_src / "labels.csv").unlink()
    zpath = root / "archive.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(arch_src.rglob("*.dcm"))[:2]:
            zf.write(f, f.relative_to(arch_src).as_posix())
        zf.writestr("../escape.dcm", b"DICM")  # refused member
    tpath = root / "archive.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        for f in sorted(arch_src.rglob("*.dcm"))[2:]:
            tf.add(f, f.relative_to(arch_src).as_posix())
    models = root / "models"
    models.mkdir()
    return {
        "tree": tree,
        "zip": zpath,
        "tgz": tpath,
        "n_tree": sum(1 for p in tree.rglob("*") if p.is_file()),
        "n_arch": 4 + 1,  # four images and the refused member
        "broken": broken,
        "unselected": unselected,
        "model_a": make_model(models / "a.pt", "a-1", 0, name="e2e"),
        "model_b": make_model(models / "b.pt", "b-1", 1, name="e2e"),
    }


def run(corpus, db_url, tmp_path, model="model_a", **kw):
    """The screen flow on the corpus; the database URL reaches it through the settings."""
    import os

    from flows.parameters import ScreenParameters
    from flows.screen import screen

    kw.setdefault("workers", 0)
    os.environ["CXR_SCREEN_DATABASE_URL"] = db_url  # restored by _isolated_home
    return screen(
        [str(corpus["tree"]), str(corpus["zip"]), str(corpus["tgz"])],
        model=str(corpus[model]),
        params=ScreenParameters(shard_size=7, **kw),
    )


def snapshot(db_url: str) -> dict[str, list[tuple]]:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        out = {
            t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY {key}"))]
            for t, key in TABLES.items()
        }
    engine.dispose()
    return out


def rows(db_url: str, sql: str, **params) -> list[dict]:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        out = [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]
    engine.dispose()
    return out


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SCREEN_HOME", str(tmp_path / "home"))
    # set here so that monkeypatch restores it, whatever a test or a command sets it to
    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", f"sqlite:///{tmp_path / 'unset.db'}")


def test_screen_end_to_end_then_idempotent_force_and_new_model(corpus, db_url, tmp_path):
    first = run(corpus, db_url, tmp_path, workers=1)
    seen = corpus["n_tree"] + corpus["n_arch"]
    assert first["files_seen"] == seen
    assert first["predicted"] + first["skipped"] + first["failed"] == seen

    outcomes = rows(
        db_url, "SELECT * FROM v_instance_outcomes WHERE run_id = :r", r=first["run_id"]
    )
    assert len(outcomes) == seen  # one row per file
    assert len({o["source_uri"] for o in outcomes}) == seen
    by = {
        k: sum(1 for o in outcomes if o["outcome"] == k) for k in ("predicted", "skipped", "failed")
    }
    assert by == {k: first[k] for k in by}
    # every broken file failed with its reason; every unselected one was skipped with a reason
    for name in corpus["broken"]:
        (o,) = [o for o in outcomes if o["source_uri"].endswith(f"broken/{name}")]
        assert o["outcome"] == "failed" and o["reason"], name
    for name, keyword in corpus["unselected"].items():
        (o,) = [o for o in outcomes if o["source_uri"].endswith(f"unselected/{name}")]
        assert o["outcome"] == "skipped" and keyword in o["reason"], (name, o["reason"])
    (esc,) = [o for o in outcomes if "escape" in o["source_uri"]]
    assert esc["outcome"] == "failed"
    assert any(
        "archive.tar.gz!/" in o["source_uri"] and o["outcome"] == "predicted" for o in outcomes
    )
    assert any("archive.zip!/" in o["source_uri"] and o["outcome"] == "predicted" for o in outcomes)
    predicted = [o for o in outcomes if o["outcome"] == "predicted"]
    assert all(o["reason"] is None and 0 <= o["score"] <= 1 for o in predicted)

    studies = rows(db_url, "SELECT * FROM v_study_results")
    predicted_studies = {o["study_instance_uid"] for o in predicted}
    assert {s["study_instance_uid"] for s in studies} == predicted_studies
    assert len(studies) == len(predicted_studies)  # one per study
    assert sum(s["n_images"] for s in studies) == len(predicted)
    (summary,) = rows(db_url, "SELECT * FROM v_run_summary WHERE run_id = :r", r=first["run_id"])
    assert summary["status"] == "completed"
    assert summary["files_seen"] == summary["predicted"] + summary["skipped"] + summary["failed"]

    # a second run changes nothing
    before = snapshot(db_url)
    second = run(corpus, db_url, tmp_path)
    assert second["predicted"] == 0
    assert second["files_seen"] == seen
    assert snapshot(db_url) == before

    # --force recomputes in place: same row counts, predictions now from the new run
    forced = run(corpus, db_url, tmp_path, force=True)
    assert forced["predicted"] == first["predicted"]
    after = snapshot(db_url)
    assert {t: len(v) for t, v in after.items()} == {t: len(v) for t, v in before.items()}
    runs = rows(db_url, "SELECT DISTINCT run_id FROM image_predictions")
    assert [r["run_id"] for r in runs] == [forced["run_id"]]

    # a new model version adds rows beside the old ones
    other = run(corpus, db_url, tmp_path, model="model_b")
    assert other["predicted"] == first["predicted"]
    versions = rows(
        db_url,
        "SELECT model_version, COUNT(*) AS n FROM v_study_results GROUP BY model_version "
        "ORDER BY model_version",
    )
    assert [(v["model_version"], v["n"]) for v in versions] == [
        ("a-1", len(predicted_studies)),
        ("b-1", len(predicted_studies)),
    ]


def test_nightly_watermark_picks_up_only_new_files(tmp_path, sqlite_url, corpus, monkeypatch):
    import os
    import time

    from flows.screen import nightly

    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", sqlite_url)

    drop = tmp_path / "drop"
    synth.write_corpus(drop, 2, seed=8, size_range=(192, 256), lateral_fraction=0.0)
    (drop / "labels.csv").unlink()
    first = nightly(drop_folder=str(drop), model=str(corpus["model_a"]))
    assert first["files_seen"] == 2 and first["predicted"] == 2

    time.sleep(1.1)  # file times have 1 s resolution on some file systems
    new = tmp_path / "new"
    synth.write_corpus(new, 1, seed=9, size_range=(192, 256), lateral_fraction=0.0)
    (new / "labels.csv").unlink()
    shutil.move(str(next(new.rglob("*.dcm"))), drop / "arrived_tonight.dcm")
    second = nightly(drop_folder=str(drop), model=str(corpus["model_a"]))
    assert second["files_seen"] == 1 and second["predicted"] == 1

    third = nightly(drop_folder=str(drop), model=str(corpus["model_a"]))
    assert third["files_seen"] == 0
    kinds = rows(sqlite_url, "SELECT kind, files_seen FROM v_run_summary ORDER BY run_id")
    assert kinds == [
        {"kind": "nightly", "files_seen": 2},
        {"kind": "nightly", "files_seen": 1},
        {"kind": "nightly", "files_seen": 0},
    ]
    assert os.path.exists(drop / "arrived_tonight.dcm")


def test_one_engine_per_screening_run_and_per_nightly_run(corpus, tmp_path, monkeypatch):
    """The caller owns the engine: a run opens its database once (migration check included)
    and passes the engine down; no task or sql function creates one of its own."""
    from flows.parameters import ScreenParameters
    from flows.screen import nightly, screen

    url = f"sqlite:///{tmp_path / 'engines.db'}"
    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", url)
    created: list[str] = []
    real = sa.create_engine

    def counting(target, *args, **kwargs):
        created.append(str(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(sa, "create_engine", counting)
    drop = tmp_path / "drop"
    synth.write_corpus(drop, 2, seed=8, size_range=(192, 256), lateral_fraction=0.0)

    summary = screen(
        [str(corpus["zip"]), str(drop)],
        model=str(corpus["model_a"]),
        params=ScreenParameters(shard_size=2, workers=0),  # several shards, one engine
    )
    assert summary["files_seen"] >= 6 and summary["predicted"] >= 4  # a real run
    assert created == [url]

    created.clear()
    night = nightly(drop_folder=str(drop), model=str(corpus["model_a"]))
    assert night["files_seen"] == 3  # two images and labels.csv: new to the watermark
    assert created == [url]  # watermark read, the run, watermark written: one engine


@pytest.mark.parametrize("ending", ["interrupted", "failed", "completed"])
def test_every_ending_closes_the_run_with_the_counts_of_its_committed_rows(
    ending, corpus, db_url, tmp_path
):
    """Completed, failed or stopped by SIGTERM: the run is closed after its last commit, and
    its counts equal the rows its committed shards wrote. The signal is a real one, sent to
    this process from another thread a moment after the second shard committed (so it lands
    wherever the flow then is, often with the next write in flight)."""
    import os
    import signal
    import threading

    from flows.progress import add_listener, remove_listener
    from tasks import interrupts

    stored: list[int] = []

    def after_a_shard(event: str, data: dict) -> None:
        if event != "shard":
            return
        stored.append(data["seen"])
        if len(stored) == 2 and ending == "interrupted":
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        if len(stored) == 2 and ending == "failed":
            raise RuntimeError("the disk is full")

    add_listener(after_a_shard)
    previous = interrupts.install()  # as the CLI does
    try:
        if ending == "completed":
            summary = run(corpus, db_url, tmp_path)
            run_id = summary["run_id"]
        else:
            with pytest.raises(BaseException) as raised:
                run(corpus, db_url, tmp_path)
            # Interrupted, or an error Prefect raised while the signal was being handled
            # (e.g. "Task run is not set" when it lands as a task starts): the stop is in its
            # chain either way, and the run must end as interrupted all the same.
            stop = interrupts.signal_of(raised.value)
            assert stop == (signal.SIGTERM if ending == "interrupted" else None), raised.value
            if ending == "failed":
                assert isinstance(raised.value, RuntimeError)
            (last,) = rows(db_url, "SELECT MAX(run_id) AS r FROM runs")
            run_id = last["r"]
    finally:
        remove_listener(after_a_shard)
        interrupts.uninstall(previous)
        interrupts.reset()

    (summary,) = rows(db_url, "SELECT * FROM v_run_summary WHERE run_id = :r", r=run_id)
    committed = {
        r["outcome"]: r["n"]
        for r in rows(
            db_url,
            "SELECT outcome, COUNT(*) AS n FROM file_outcomes WHERE run_id = :r GROUP BY outcome",
            r=run_id,
        )
    }
    assert summary["status"] == ending, summary
    assert summary["files_seen"] == sum(committed.values()), (summary, committed)
    for outcome in ("predicted", "skipped", "failed"):
        assert summary[outcome] == committed.get(outcome, 0), (summary, committed)
    total = corpus["n_tree"] + corpus["n_arch"]
    if ending == "completed":
        assert summary["files_seen"] == total and summary["error"] is None
    else:
        assert stored[1] <= summary["files_seen"] < total  # stopped part-way, commits kept
        reason = "SIGTERM" if ending == "interrupted" else "RuntimeError: the disk is full"
        assert reason in summary["error"], summary["error"]
