"""The training data builder, the ``train`` flow and the ``train`` command."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from model.checkpoint import file_sha256, load_checkpoint
from model.predictor import Predictor
from model.spec import PreprocessSpec
from tasks.dicom.discovery import discover
from tasks.dicom.pixels import preprocess
from tasks.dicom.synth import read_labels, write_broken, write_corpus, write_unselected
from tasks.ingest import decode_item
from tasks.training_data import (
    CONFLICT_REASON,
    DUPLICATE_REASON,
    TrainingDataError,
    build_training_data,
    choose_positive,
    group_ids,
    split_groups,
)

KEY = b"test-hmac-key"
SPEC = PreprocessSpec(input_size=48)


@pytest.fixture(scope="module")
def labelled_tree(tmp_path_factory) -> Path:
    """16 studies (some with a lateral) in negative/ and positive/, plus files that must be
    left out: two broken, one CT, one duplicate copy and one copy filed under the other class."""
    root = tmp_path_factory.mktemp("labelled") / "data"
    write_corpus(root, 16, seed=11, size_range=(160, 256), lateral_fraction=0.3)
    broken = write_broken(root.parent / "broken")
    shutil.copy(root.parent / "broken" / "not_dicom.dcm", root / "positive" / "not_dicom.dcm")
    shutil.copy(root.parent / "broken" / "truncated_pixel_data.dcm", root / "positive" / "t.dcm")
    assert "not_dicom.dcm" in broken
    write_unselected(root.parent / "other")
    shutil.copy(root.parent / "other" / "ct_chest.dcm", root / "negative" / "ct_chest.dcm")
    negative = sorted((root / "negative").rglob("1_*.dcm"))
    positive = sorted((root / "positive").rglob("1_*.dcm"))
    (root / "negative" / "copies").mkdir()
    shutil.copy(negative[0], root / "negative" / "copies" / "same_image.dcm")
    shutil.copy(positive[0], root / "negative" / "copies" / "filed_twice.dcm")
    return root


def _discovered(root: Path) -> int:
    return sum(1 for _ in discover([root / "negative", root / "positive"]))


def test_folder_dataset_counts_every_file_and_splits_by_study(labelled_tree):
    data = build_training_data(labelled_tree, SPEC, hmac_key=KEY, val_fraction=0.25, seed=3)
    rep = data.report
    assert rep.layout == "folder"
    assert rep.class_names == ["negative", "positive"] and rep.positive_class == "positive"
    # Conservation: every discovered file under the class folders is used, skipped or failed.
    assert rep.files_seen == _discovered(labelled_tree) == rep.used + rep.skipped + rep.failed
    # one frontal image per study; laterals, CT, copies and the image filed under both
    # classes left out
    assert rep.used == 15
    assert rep.per_class == {"negative": 8, "positive": 7}
    assert rep.failed == 2
    laterals = sum(1 for _ in labelled_tree.rglob("2_LL.dcm"))
    assert laterals > 0
    assert rep.reasons[DUPLICATE_REASON] == 1 and rep.reasons[CONFLICT_REASON] == 2
    assert sum(n for r, n in rep.reasons.items() if "lateral" in r) == laterals
    assert any("Modality" in r or "CT" in r for r in rep.reasons)
    assert rep.run_counts() == {
        "files_seen": rep.files_seen,
        "predicted": 15,
        "skipped": rep.skipped,
        "failed": 2,
    }
    # No study on both sides; both classes on both sides; 25% of each class's studies held out.
    train_studies, val_studies = set(data.train.studies), set(data.validation.studies)
    assert not train_studies & val_studies
    assert len(train_studies | val_studies) == 15
    assert rep.per_split["validation"] == {"negative": 2, "positive": 2}
    assert rep.per_split["train"] == {"negative": 6, "positive": 5}
    assert rep.studies_per_split == {"train": 11, "validation": 4}
    # The labels follow the folders, as the manifest says.
    truth = {
        r["study_instance_uid"]: int(r["label"]) for r in read_labels(labelled_tree / "labels.csv")
    }
    for part in (data.train, data.validation):
        for study, label in zip(part.studies, part.labels.tolist(), strict=True):
            assert truth[study] == label


def test_dataset_images_are_the_inference_pixels(labelled_tree):
    data = build_training_data(labelled_tree, SPEC, hmac_key=KEY, val_fraction=0.25, seed=3)
    x, y = data.train[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and int(y) in (0, 1)
    assert data.train.images.shape[1] == 1  # identical channels are stored once
    # Find the file of one training image and compare with the screening pixel path.
    study = data.train.studies[0]
    rows = [
        r for r in read_labels(labelled_tree / "labels.csv") if r["study_instance_uid"] == study
    ]
    frontal = next(r for r in rows if r["view_position"] != "LL")
    expected = preprocess(frontal["path"], SPEC, reduced=True).image
    assert np.array_equal(x.numpy(), expected)
    src = next(discover([frontal["path"]]))
    assert np.array_equal(
        decode_item(src, frontal["sop_instance_uid"], SPEC.to_dict()).image, expected
    )


def test_worker_processes_give_the_same_dataset(labelled_tree):
    a = build_training_data(labelled_tree, SPEC, hmac_key=KEY, seed=5, workers=0)
    b = build_training_data(labelled_tree, SPEC, hmac_key=KEY, seed=5, workers=2)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.validation.labels, b.validation.labels)
    assert a.report.to_dict() == b.report.to_dict()
    c = build_training_data(labelled_tree, SPEC, hmac_key=KEY, seed=6, workers=0)
    assert set(c.validation.studies) != set(a.validation.studies)  # the seed matters


def test_csv_dataset_with_relative_paths_and_a_missing_file(labelled_tree, tmp_path):
    rows = read_labels(labelled_tree / "labels.csv")
    listing = tmp_path / "sub" / "train.csv"
    listing.parent.mkdir()
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for r in rows:  # relative to the CSV's folder
            writer.writerow([os.path.relpath(r["path"], listing.parent), r["class"]])
        writer.writerow(["does/not/exist.dcm", "positive"])
    data = build_training_data(listing, SPEC, hmac_key=KEY, seed=1)
    rep = data.report
    assert rep.layout == "csv"
    assert rep.files_seen == len(rows) + 1
    assert rep.used == 16  # the CSV lists each image once, under its class
    assert rep.failed == 1 and any("exist" in r or "No such" in r for r in rep.reasons)


def test_positive_class_choice_and_data_errors(tmp_path, labelled_tree):
    assert choose_positive(["abnormal", "normal"]) == "abnormal"
    assert choose_positive(["a", "b", "c"]) == "c"
    assert choose_positive(["Normal", "Positive"]) == "Positive"
    with pytest.raises(TrainingDataError, match="'x' is not one of the classes"):
        choose_positive(["a", "b"], "x")
    one = tmp_path / "one"
    shutil.copytree(labelled_tree / "negative", one / "negative")
    with pytest.raises(TrainingDataError, match="at least two"):
        build_training_data(one, SPEC, hmac_key=KEY)
    (one / "positive").mkdir()
    shutil.copy(labelled_tree / "positive" / "not_dicom.dcm", one / "positive" / "x.dcm")
    with pytest.raises(TrainingDataError, match="no usable image of class\\(es\\) 'positive'"):
        build_training_data(one, SPEC, hmac_key=KEY)
    with pytest.raises(TrainingDataError, match="does not exist"):
        build_training_data(tmp_path / "nothing", SPEC, hmac_key=KEY)
    with pytest.raises(TrainingDataError, match="val_fraction"):
        build_training_data(labelled_tree, SPEC, hmac_key=KEY, val_fraction=1.0)


def test_groups_join_studies_that_share_a_patient():
    studies = ["s1", "s1", "s2", "s3", "s4", "s5"]
    patients = ["p1", "p1", "p1", None, "p2", "p2"]
    groups = group_ids(studies, patients)
    assert groups[0] == groups[1] == groups[2]  # s1 and s2: same patient
    assert groups[4] == groups[5] != groups[3]
    assert len(set(groups)) == 3


def test_split_is_stratified_seeded_and_keeps_groups_whole():
    rng = np.random.default_rng(0)
    groups = [g for g in range(40) for _ in range(int(rng.integers(1, 4)))]
    labels = [int(g % 4 == 0) for g in groups]  # 10 positive groups, 30 negative
    train, val = split_groups(groups, labels, 0.2, seed=9)
    assert sorted(train + val) == list(range(len(groups)))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    val_groups = {groups[i] for i in val}
    assert sum(g % 4 == 0 for g in val_groups) == 2 and len(val_groups) == 8
    assert split_groups(groups, labels, 0.2, seed=9) == (train, val)
    # a class with two groups still gets one on each side
    train, val = split_groups([0, 1, 2, 3, 4], [1, 1, 0, 0, 0], 0.1, seed=0)
    assert {0, 1} & set(val) and {0, 1} & set(train)


# --- the flow ---------------------------------------------------------------------------------


def _train(data: Path, out: Path, url: str, **kwargs):
    """The train flow, small; the database URL reaches it through the settings."""
    from flows.parameters import TrainParameters
    from flows.train import train

    os.environ["CXR_SCREEN_DATABASE_URL"] = url  # restored by _database_setting
    params = dict(epochs=2, batch_size=8, input_size=48, workers=0, val_fraction=0.25)
    return train(str(data), str(out), params=TrainParameters(**{**params, **kwargs}))


@pytest.fixture(autouse=True)
def _database_setting(monkeypatch, tmp_path):
    """Whatever a test or a command sets CXR_SCREEN_DATABASE_URL to, it is restored after."""
    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", f"sqlite:///{tmp_path / 'unset.db'}")


def test_train_flow_writes_registers_and_reports(
    prefect_harness, labelled_tree, tmp_path, db_url, monkeypatch
):
    monkeypatch.setenv("CXR_SCREEN_HOME", str(tmp_path / "home"))
    out = tmp_path / "model.pt"
    summary = _train(labelled_tree, out, db_url, name="unit", notes="test run", seed=4)

    ckpt = load_checkpoint(out)
    assert summary["sha256"] == ckpt.sha256 == file_sha256(out)
    assert ckpt.name == "unit" and ckpt.notes == "test run"
    assert re.fullmatch(r"\d{8}\.\d{6}-[0-9a-f]{8}", ckpt.version)
    assert ckpt.class_names == ["negative", "positive"] and ckpt.positive_class == "positive"
    assert ckpt.preprocessing == PreprocessSpec(input_size=48)
    assert 0.0 <= ckpt.threshold <= 1.0
    val = ckpt.metrics["validation"]
    assert val["n"] == 4 and val["tp"] + val["fn"] == 2 and val["threshold"] == ckpt.threshold
    assert val["sensitivity"] >= 0.95  # the threshold is chosen for the target on validation
    assert len(ckpt.metrics["history"]) == 2
    prov = ckpt.provenance
    assert prov["data_source"] == str(labelled_tree) and prov["seed"] == 4
    assert prov["per_split"] == {
        "train": {"negative": 6, "positive": 5},
        "validation": {"negative": 2, "positive": 2},
    }
    assert prov["studies_per_split"] == {"train": 11, "validation": 4}
    assert prov["files_used"] == 15 and prov["files_failed"] == 2
    assert prov["torch_version"] == torch.__version__
    assert "git_commit" in prov and prov["config"]["epochs"] == 2

    # The checkpoint predicts on images from the screening pixel path.
    frontal = sorted(labelled_tree.rglob("1_*.dcm"))[:3]
    batch = np.stack([preprocess(p, ckpt.preprocessing).image for p in frontal])
    scores = Predictor(ckpt, device="cpu").predict(batch)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))

    # Registered as a model version, with a completed train run that names it.
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            model = conn.execute(
                sa.text("SELECT model_id, name, version, sha256 FROM models")
            ).one()
            run = conn.execute(
                sa.text(
                    "SELECT run_id, kind, status, model_id, files_seen, predicted, skipped, "
                    "failed, prefect_flow_run_id FROM runs"
                )
            ).one()
    finally:
        engine.dispose()
    assert (model.name, model.version, model.sha256) == ("unit", ckpt.version, ckpt.sha256)
    assert summary["model_id"] == model.model_id and summary["run_id"] == run.run_id
    assert (run.kind, run.status, run.model_id) == ("train", "completed", model.model_id)
    assert run.predicted == 15 and run.failed == 2
    assert run.files_seen == run.predicted + run.skipped + run.failed == _discovered(labelled_tree)
    assert run.prefect_flow_run_id

    # The evaluation report artifact.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-evaluation"]))
        )
    report = next(a for a in artifacts if ckpt.version in (a.description or ""))
    assert "AUROC" in report.data and "Confusion matrix" in report.data
    assert "| 2 |" in report.data  # the history table has a row for epoch 2


def test_train_flow_refuses_a_registered_version_before_training(
    prefect_harness, labelled_tree, tmp_path, monkeypatch
):
    monkeypatch.setenv("CXR_SCREEN_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    _train(labelled_tree, tmp_path / "a.pt", url, version="v1", name="unit")
    with pytest.raises(ValueError, match="'unit' version 'v1' is already registered"):
        _train(labelled_tree, tmp_path / "b.pt", url, version="v1", name="unit")
    assert not (tmp_path / "b.pt").exists()


def test_train_flow_records_a_failed_run(prefect_harness, labelled_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SCREEN_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    shutil.copytree(labelled_tree / "negative", data / "normal")
    (data / "abnormal").mkdir()
    shutil.copy(labelled_tree / "positive" / "not_dicom.dcm", data / "abnormal" / "a.dcm")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with pytest.raises(TrainingDataError, match="'abnormal'"):
        _train(data, tmp_path / "m.pt", url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT kind, status, model_id, error FROM runs")).one()
    engine.dispose()
    assert (run.kind, run.status, run.model_id) == ("train", "failed", None)
    assert "no usable image of class(es) 'abnormal'" in run.error
    assert not (tmp_path / "m.pt").exists()


def test_train_command_output_and_fatal_error(
    prefect_harness, labelled_tree, tmp_path, monkeypatch
):
    import typer
    from typer.testing import CliRunner

    from cli.train import train_command

    monkeypatch.setenv("CXR_SCREEN_HOME", str(tmp_path / "home"))
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("other")(lambda: None)  # two commands: "train" stays a subcommand
    runner = CliRunner()
    url = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["train", str(labelled_tree), "--out", str(tmp_path / "m.pt"), "--db", url]
    ok = runner.invoke(
        app, [*args, "--epochs", "1", "--input-size", "48", "--batch-size", "8", "--workers", "0"]
    )
    assert ok.exit_code == 0, ok.output
    assert "validation AUROC" in ok.output and "Traceback" not in ok.output
    assert load_checkpoint(tmp_path / "m.pt").preprocessing.input_size == 48

    missing = runner.invoke(app, ["train", str(tmp_path / "nope"), "--out", "x.pt", "--db", url])
    assert missing.exit_code == 2
    assert "error: training data does not exist" in missing.output
    assert "Traceback" not in missing.output
