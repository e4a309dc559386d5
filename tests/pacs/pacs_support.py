"""Helpers for the PACS tests: entries pointing at the test Orthanc, a corpus of real and
generated radiographs with chosen study dates, and pixel comparison."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from orthanc import Orthanc

from tasks.dicom.pacs.config import PacsEntry, build_entry
from tasks.dicom.synth import ImageParams, write_image

REAL_FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm")


def real_file(name: str) -> Path:
    """A file of the pydicom-data package (real radiographs)."""
    import data_store

    path = Path(data_store.__file__).parent / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in pydicom-data ({path})")
    return path


def dicomweb_entry(pacs: Orthanc, name: str = "test", **fields) -> PacsEntry:
    values = {
        "url": pacs.dicomweb_url,
        "username": pacs.username,
        "password": pacs.password,
        "retries": 2,
        **{k: v for k, v in fields.items()},
    }
    return build_entry(name, values, "CXRSCREEN", "test")


def dimse_entry(pacs: Orthanc, move_port: int, name: str = "test-dimse", **fields) -> PacsEntry:
    values = {
        "url": f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
        "move_port": move_port,
        "move_bind": "127.0.0.1",
        "retries": 2,
        **fields,
    }
    return build_entry(name, values, "CXRSCREEN", "test")


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    study_date: str


def synth_file(
    out_dir: Path,
    *,
    study: int,
    instance: int = 0,
    seed: int = 7,
    study_date: str = "20261128",
    modality: str = "CR",
    syntax: str = "explicit_le",
    body_part: str = "CHEST",
    size: int = 96,
) -> CorpusFile:
    """One generated radiograph with the given study date and modality (UIDs from the seed,
    the study and the instance number; instances of a study share its series)."""
    params = ImageParams(
        rows=size,
        columns=size - 8,
        bits_stored=12,
        photometric="MONOCHROME2",
        syntax=syntax,
        modality=modality,
        view="PA",
        body_part=body_part,
    )
    path = out_dir / f"s{seed}_{study:04d}_{instance:02d}.dcm"
    record = write_image(
        path, params, positive=bool(study % 2), seed=seed, study=study, instance=instance
    )
    ds = pydicom.dcmread(path)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    if instance:  # same series as instance 0, its own instance number
        first = pydicom.dcmread(out_dir / f"s{seed}_{study:04d}_00.dcm", stop_before_pixels=True)
        ds.SeriesInstanceUID = first.SeriesInstanceUID
        ds.InstanceNumber = instance + 1
    ds.save_as(path, enforce_file_format=True)
    return CorpusFile(
        path=path,
        sop_uid=record["sop_instance_uid"],
        study_uid=record["study_instance_uid"],
        series_uid=str(ds.SeriesInstanceUID),
        modality=modality,
        study_date=study_date,
    )


def pixels(data: bytes | os.PathLike) -> np.ndarray:
    """The stored pixel values (decoded, no LUTs applied)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return pydicom.dcmread(source).pixel_array


def sop_uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def transfer_syntax_of(data: bytes) -> str:
    return str(
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    )
