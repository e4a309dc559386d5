"""Helpers for the fan-out tests: a mixed corpus, a model, result snapshots and comparison."""

from __future__ import annotations

import math
import shutil
import tarfile
import zipfile
from pathlib import Path

import sqlalchemy as sa
from support import PG_ADMIN_URL as PG_ADMIN_URL
from support import make_model as make_model

from tasks.dicom import synth

HMAC_KEY = "fan-out-test-key-0123456789abcdef"

# Rows compared between a fan-out and a single-process run: the run-specific columns (run ids,
# timestamps) are left out; scores are compared within SCORE_TOLERANCE because inference
# batches are composed differently.
COMPARED = {
    "instances": (
        "sop_instance_uid",
        "study_instance_uid, series_instance_uid, modality, body_part, view_position, "
        "photometric_interpretation, rows, columns, bits_stored, number_of_frames, "
        "transfer_syntax_uid, study_date, accession_number, patient_id_hash, content_sha256, "
        "source_uri",
    ),
    "file_outcomes": (
        "source_uri",
        "sop_instance_uid, study_instance_uid, content_sha256, outcome, reason, facts, "
        "thumbnail_path",
    ),
    "image_predictions": (
        "sop_instance_uid",
        "study_instance_uid, score, label, threshold, preprocessing_sha256",
    ),
    "study_predictions": ("study_instance_uid", "aggregation, n_images, score, label, threshold"),
    "studies": ("study_instance_uid", "accession_number, study_date, patient_id_hash"),
}
SCORE_TOLERANCE = 1e-5


def write_sources(root: Path, n_studies: int, *, seed: int = 11) -> dict:
    """A tree of studies (frontal + lateral), broken and unselected files, plus a .zip, an
    uncompressed .tar and a .tar.gz of a few more studies. Returns the sources and counts."""
    tree = root / "tree"
    synth.write_corpus(
        tree / "studies",
        n_studies,
        seed=seed,
        size_range=(128, 192),
        syntaxes=["explicit_le", "rle", "jpeg_ls", "jpeg_baseline"],
        lateral_fraction=0.5,
    )
    (tree / "studies" / "labels.csv").unlink()
    synth.write_broken(tree / "broken")
    synth.write_unselected(tree / "unselected")
    # The synthetic broken and unselected files share one SOP Instance UID. The tests screen
    # laterals too (so studies have two images to split across manifests), which would make
    # this lateral a *predicted* file with that UID: which copy is then "already predicted"
    # would depend on the order workers happen to run in, as for any duplicated UID.
    (tree / "unselected" / "lateral.dcm").unlink()
    staging = root / "archived"
    synth.write_corpus(staging, 6, seed=seed + 1, size_range=(128, 192), lateral_fraction=0.5)
    (staging / "labels.csv").unlink()
    files = sorted(staging.rglob("*.dcm"))
    third = len(files) // 3
    with zipfile.ZipFile(root / "part.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files[:third]:
            zf.write(f, f.relative_to(staging).as_posix())
    with tarfile.open(root / "part.tar", "w") as tf:
        for f in files[third : 2 * third]:
            tf.add(f, f.relative_to(staging).as_posix())
    with tarfile.open(root / "part.tar.gz", "w:gz") as tf:
        for f in files[2 * third :]:
            tf.add(f, f.relative_to(staging).as_posix())
    shutil.rmtree(staging)
    sources = [str(tree), str(root / "part.zip"), str(root / "part.tar"), str(root / "part.tar.gz")]
    n_tree = sum(1 for p in tree.rglob("*") if p.is_file())
    return {"sources": sources, "files": n_tree + len(files), "tree": tree}


def results(url: str) -> dict[str, dict[str, dict]]:
    """The compared columns of every result table, keyed by each row's key."""
    engine = sa.create_engine(url)
    out: dict[str, dict[str, dict]] = {}
    try:
        with engine.connect() as conn:
            for table, (key, columns) in COMPARED.items():
                rows = conn.execute(sa.text(f"SELECT {key}, {columns} FROM {table}")).mappings()
                out[table] = {r[key]: dict(r) for r in rows}
    finally:
        engine.dispose()
    return out


def assert_same_results(got: dict, expected: dict) -> None:
    """Equal row sets and values; scores within SCORE_TOLERANCE, labels equal unless the score
    sits within the tolerance of the threshold."""
    for table in COMPARED:
        assert got[table].keys() == expected[table].keys(), table
        for key, row in expected[table].items():
            other = got[table][key]
            for column, value in row.items():
                if column == "score":
                    assert math.isclose(other[column], value, abs_tol=SCORE_TOLERANCE), (
                        table,
                        key,
                    )
                elif column == "label" and abs(row["score"] - row["threshold"]) < SCORE_TOLERANCE:
                    continue
                else:
                    assert other[column] == value, (table, key, column, other[column], value)
