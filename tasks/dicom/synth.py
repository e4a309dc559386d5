"""Synthetic chest radiograph studies (DICOM files) for tests, demos and benchmarks.

Every file is a plausible CR or DX image: realistic headers (UIDs, dates, accession number,
body part, view, fake patient identifiers), MONOCHROME1 or MONOCHROME2, 8-16 bits stored,
optional rescale and window, and pixels from :func:`model.synthetic.synthetic_image` — two
classes, the positive one carrying a faint localized ring — encoded in any transfer syntax the
pixel path decodes. The same seed always produces the same files, UIDs included.

Also here: generators of broken files (each with the substring its failure reason must contain)
and of valid files that a chest-radiograph selection policy should skip.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from model.synthetic import synthetic_image

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

SYNTAXES: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "deflated_le": DeflatedExplicitVRLittleEndian,
    "explicit_be": ExplicitVRBigEndian,
    "rle": RLELossless,
    "jpeg_baseline": JPEGBaseline8Bit,
    "jpeg_lossless": JPEGLossless,
    "jpeg_lossless_sv1": JPEGLosslessSV1,
    "jpeg_ls": JPEGLSLossless,
    "jpeg_ls_near": JPEGLSNearLossless,
    "j2k_lossless": JPEG2000Lossless,
    "j2k": JPEG2000,
}
"""Short names of the transfer syntaxes the generator writes (JPEG Extended 12-bit and HTJ2K are
decoded by the pixel path but no encoder for them ships here)."""

LOSSY = frozenset({"jpeg_baseline", "jpeg_ls_near", "j2k"})
EIGHT_BIT_ONLY = frozenset({"jpeg_baseline"})
CLASSES = ("negative", "positive")


@dataclass(frozen=True)
class ImageParams:
    """Everything that varies between synthetic images; ``write_study`` draws these at random."""

    rows: int = 512
    columns: int = 448
    bits_stored: int = 12
    photometric: str = "MONOCHROME2"
    signed: bool = False
    syntax: str = "explicit_le"
    modality: str = "DX"
    body_part: str = "CHEST"
    view: str = "PA"
    rescale: tuple[float, float] | None = None  # (slope, intercept)
    window: bool = True  # write Window Center/Width covering the data
    window_scale: float = 1.1  # window width relative to the data range (< 1 clips)
    voi_function: str | None = None  # (0028,1056) when set
    stray_high_bits: bool = False  # set garbage above Bits Stored (native syntaxes only)


# -- pixels ------------------------------------------------------------------------------------


def radiograph(
    rng: np.random.Generator, rows: int, columns: int, positive: bool, base: int = 512
) -> np.ndarray:
    """A [0, 1] float32 image, bright = bone, from ``synthetic_image``.

    The phantom (and its ring) is made at ``base`` px and upsampled bicubically to
    rows x columns, with fine noise added at full resolution; drawing a 2500 px phantom
    directly costs seconds and adds nothing a model could use.
    """
    side = min(base, max(rows, columns))
    small = synthetic_image(rng, side, positive).astype(np.float32)
    img = np.asarray(
        Image.fromarray(small).resize((columns, rows), Image.Resampling.BICUBIC), dtype=np.float32
    )
    img = img + rng.normal(0.0, 0.01, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def stored_values(img01: np.ndarray, params: ImageParams, rng: np.random.Generator) -> np.ndarray:
    """Map a [0, 1] (bright = bone) image to stored values the way a detector might.

    The data occupy part of the range; MONOCHROME1 stores bright as low values.
    """
    top = (1 << params.bits_stored) - 1
    low = rng.uniform(0.02, 0.12) * top
    high = rng.uniform(0.80, 0.97) * top
    values = low + img01.astype(np.float64) * (high - low)
    if params.photometric == "MONOCHROME1":
        values = top - values
    values = np.rint(values).astype(np.int64)
    if params.signed:
        values -= 1 << (params.bits_stored - 1)
    dtype = _dtype(params)
    return values.astype(dtype)


def _dtype(params: ImageParams) -> np.dtype:
    allocated = 8 if params.bits_stored <= 8 else 16
    return np.dtype(f"{'i' if params.signed else 'u'}{allocated // 8}")


# -- data sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The identifiers one synthetic patient/study/series/instance carries."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    study_date: str
    study_time: str
    series_number: int
    instance_number: int


def make_identity(seed: int, study: int, instance: int) -> Identity:
    """Deterministic UIDs (from seed/study/instance) and planted fake patient identifiers.

    Patient- and study-level values depend on (seed, study) only, so every image of a study
    agrees on them.
    """
    uid = _uid_maker(seed)
    rng = np.random.default_rng([seed, study, 0x1D])
    day = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 70 * 365)))
    return Identity(
        patient_id=f"SYNPID{seed:03d}{study:06d}",
        patient_name=f"SYNTHETIC^PATIENT^{seed:03d}-{study:06d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
        study_uid=uid("study", study),
        series_uid=uid("series", study, instance),
        sop_uid=uid("sop", study, instance),
        accession=f"SYNACC{seed:03d}{study:07d}",
        study_date=day.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00",
        series_number=instance + 1,
        instance_number=1,
    )


def _uid_maker(seed: int):
    def make(*parts: object) -> str:
        return generate_uid(entropy_srcs=["cxr-screen-synth", str(seed), *map(str, parts)])

    return make


def make_dataset(
    stored: np.ndarray, params: ImageParams, ident: Identity, *, frames: int = 1
) -> Dataset:
    """A CR/DX (or other) image data set with native (Explicit VR Little Endian) pixel data."""
    ds = Dataset()
    sop_class = {"CR": CR_STORAGE, "DX": DX_STORAGE, "CT": CT_STORAGE}.get(
        params.modality, SC_STORAGE
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ident.sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ident.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ident.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ident.study_time
    ds.AccessionNumber = ident.accession
    ds.Modality = params.modality
    ds.Manufacturer = "cxr-screen synthetic"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = "SYNTHETIC^REFERRER"
    ds.StudyDescription = "XR CHEST" if params.body_part == "CHEST" else f"XR {params.body_part}"
    ds.SeriesDescription = f"{params.body_part} {params.view}"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.BodyPartExamined = params.body_part
    ds.ViewPosition = params.view
    if params.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if params.photometric == "MONOCHROME1" else "IDENTITY"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.StudyID = ident.accession[-6:]
    ds.SeriesNumber = ident.series_number
    ds.InstanceNumber = ident.instance_number
    ds.PatientOrientation = ["L", "F"] if params.view in ("PA", "AP") else ["A", "F"]

    samples = 1 if stored.ndim == 2 + (frames > 1) else stored.shape[-1]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = params.photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = stored.shape[-3:-1] if samples > 1 else stored.shape[-2:]
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = params.bits_stored
    ds.HighBit = params.bits_stored - 1
    ds.PixelRepresentation = int(params.signed)
    if params.rescale is not None:
        ds.RescaleSlope = f"{params.rescale[0]:g}"
        ds.RescaleIntercept = f"{params.rescale[1]:g}"
        ds.RescaleType = "US"
    if params.window and samples == 1:
        slope, intercept = params.rescale or (1.0, 0.0)
        lo, hi = sorted(
            (float(stored.min()) * slope + intercept, float(stored.max()) * slope + intercept)
        )
        ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
        ds.WindowWidth = f"{max(2.0, (hi - lo) * params.window_scale):.1f}"
        if params.voi_function:
            ds.VOILUTFunction = params.voi_function
    ds.LossyImageCompression = "00"
    raw = stored
    if params.stray_high_bits and params.bits_stored < ds.BitsAllocated:
        unsigned = stored.view(stored.dtype.str.replace("i", "u"))
        raw = (unsigned | unsigned.dtype.type(1 << params.bits_stored)).view(stored.dtype)
    ds.PixelData = np.ascontiguousarray(raw).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    return ds


# -- encoding ----------------------------------------------------------------------------------


def encode(ds: Dataset, syntax: str, stored: np.ndarray, path: Path) -> None:
    """Write ``ds`` (native pixel data matching ``stored``) to ``path`` in ``syntax``."""
    uid = SYNTAXES[syntax]
    if syntax in ("explicit_le", "implicit_le", "deflated_le"):
        ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(
            path, implicit_vr=syntax == "implicit_le", little_endian=True, enforce_file_format=True
        )
        return
    if syntax == "explicit_be":
        ds.file_meta.TransferSyntaxUID = uid
        ds.PixelData = (
            np.ascontiguousarray(stored).byteswap().tobytes()
            if stored.dtype.itemsize > 1
            else ds.PixelData
        )
        ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
        return
    if syntax in ("jpeg_lossless", "jpeg_lossless_sv1"):
        _encode_with_gdcm(ds, uid, path)
        return
    if syntax == "jpeg_baseline":
        if stored.dtype != np.uint8:
            raise ValueError(f"baseline JPEG needs 8-bit unsigned pixels instead of {stored.dtype}")
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format="JPEG", quality=92)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = uid
        _mark_lossy(ds, stored.nbytes / len(buf.getvalue()), "ISO_10918_1")
        ds.save_as(path, enforce_file_format=True)
        return
    kwargs: dict[str, Any] = {}
    if syntax == "jpeg_ls_near":
        kwargs["jls_error"] = 2
    if syntax == "j2k":
        kwargs["j2k_cr"] = [15.0]
    ds.compress(uid, stored, generate_instance_uid=False, **kwargs)
    if syntax == "jpeg_ls_near":
        _mark_lossy(ds, None, "ISO_14495_1")
    elif syntax == "j2k":
        _mark_lossy(ds, 15.0, "ISO_15444_1")
    ds.save_as(path, enforce_file_format=True)


def _mark_lossy(ds: Dataset, ratio: float | None, method: str) -> None:
    ds.LossyImageCompression = "01"
    if ratio is not None:
        ds.LossyImageCompressionRatio = f"{ratio:.2f}"
    ds.LossyImageCompressionMethod = method


def _encode_with_gdcm(ds: Dataset, uid: UID, path: Path) -> None:
    import gdcm

    gdcm_syntax = {
        JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
        JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }[uid]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fd, tmp = tempfile.mkstemp(suffix=".dcm", dir=path.parent)
    os.close(fd)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(tmp)
        if not reader.Read():
            raise RuntimeError(f"gdcm could not read the native file written for {path.name}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm_syntax))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm could not encode {path.name} as {uid.name}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"gdcm could not write {path}")
    finally:
        Path(tmp).unlink(missing_ok=True)


# -- studies and corpora -----------------------------------------------------------------------


def write_image(
    path: str | os.PathLike[str],
    params: ImageParams,
    *,
    positive: bool,
    seed: int = 0,
    study: int = 0,
    instance: int = 0,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Write one synthetic image; return its manifest record (label and planted identifiers)."""
    rng = rng if rng is not None else np.random.default_rng([seed, study, instance])
    if params.syntax in EIGHT_BIT_ONLY and (params.bits_stored != 8 or params.signed):
        raise ValueError(f"{params.syntax} needs 8-bit unsigned pixels, got {params.bits_stored}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = radiograph(rng, params.rows, params.columns, positive)
    stored = stored_values(img, params, rng)
    ident = make_identity(seed, study, instance)
    ds = make_dataset(stored, params, ident)
    encode(ds, params.syntax, stored, path)
    return {
        "path": str(path),
        "label": int(positive),
        "class": CLASSES[int(positive)],
        "study_instance_uid": ident.study_uid,
        "series_instance_uid": ident.series_uid,
        "sop_instance_uid": ident.sop_uid,
        "accession_number": ident.accession,
        "patient_id": ident.patient_id,
        "patient_name": ident.patient_name,
        "modality": params.modality,
        "view_position": params.view,
        "transfer_syntax": str(SYNTAXES[params.syntax]),
        "syntax": params.syntax,
        "photometric": params.photometric,
        "bits_stored": params.bits_stored,
        "rows": params.rows,
        "columns": params.columns,
    }


def random_params(
    rng: np.random.Generator,
    syntax: str,
    size_range: tuple[int, int],
    view: str = "PA",
) -> ImageParams:
    """Plausible CR/DX parameters: size, bit depth, photometric, rescale, window."""
    long_side = int(rng.integers(size_range[0], size_range[1] + 1))
    short_side = max(32, int(long_side * rng.uniform(0.82, 1.0)))
    bits = 8 if syntax in EIGHT_BIT_ONLY else int(rng.integers(10, 17))
    rescale = None
    if rng.random() < 0.3:
        rescale = (float(rng.choice([1.0, 0.5, 2.0])), float(rng.choice([0.0, -1024.0])))
    return ImageParams(
        rows=long_side,
        columns=short_side,
        bits_stored=bits,
        photometric=str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
        syntax=syntax,
        modality=str(rng.choice(["CR", "DX"])),
        view=view if view != "PA" else str(rng.choice(["PA", "AP"], p=[0.75, 0.25])),
        rescale=rescale,
        window=bool(rng.random() < 0.6),
        window_scale=float(rng.uniform(0.9, 1.4)),
    )


def write_study(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    study: int = 0,
    positive: bool = False,
    syntax: str = "explicit_le",
    size_range: tuple[int, int] = (384, 768),
    lateral: bool = False,
    params: ImageParams | None = None,
) -> list[dict[str, Any]]:
    """Write one study (a frontal image, plus a lateral when asked) under ``out_dir``.

    Files go to ``out_dir/<class>/study_<seed>_<study>/<n>_<view>.dcm``; returns one manifest
    record per file written.
    """
    rng = np.random.default_rng([seed, study])
    folder = Path(out_dir) / CLASSES[int(positive)] / f"study_{seed:03d}_{study:06d}"
    frontal = params or random_params(rng, syntax, size_range)
    records = [
        write_image(
            folder / f"1_{frontal.view}.dcm",
            frontal,
            positive=positive,
            seed=seed,
            study=study,
            instance=0,
            rng=rng,
        )
    ]
    if lateral:
        side = ImageParams(**{**frontal.__dict__, "view": "LL"})
        records.append(
            write_image(
                folder / "2_LL.dcm",
                side,
                positive=positive,
                seed=seed,
                study=study,
                instance=1,
                rng=rng,
            )
        )
    return records


MANIFEST_FIELDS = (
    "path",
    "label",
    "class",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "accession_number",
    "patient_id",
    "patient_name",
    "modality",
    "view_position",
    "transfer_syntax",
    "syntax",
    "photometric",
    "bits_stored",
    "rows",
    "columns",
)


def write_corpus(
    out_dir: str | os.PathLike[str],
    n_studies: int,
    *,
    seed: int = 0,
    syntaxes: Sequence[str] = tuple(SYNTAXES),
    size_range: tuple[int, int] = (384, 768),
    lateral_fraction: float = 0.15,
    positive_fraction: float = 0.5,
) -> list[dict[str, Any]]:
    """Write ``n_studies`` studies and ``out_dir/labels.csv``; return the manifest records.

    Transfer syntaxes cycle through ``syntaxes`` so each appears; labels alternate in a
    seeded shuffle (balanced for ``positive_fraction`` 0.5). ``labels.csv`` paths are relative
    to ``out_dir``; it also lists the planted fake identifiers (for PHI-leak tests).
    """
    unknown = [s for s in syntaxes if s not in SYNTAXES]
    if unknown:
        raise ValueError(f"unknown syntax name(s) {unknown}; known: {', '.join(SYNTAXES)}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    n_pos = round(n_studies * positive_fraction)
    labels = np.array([1] * n_pos + [0] * (n_studies - n_pos))
    rng.shuffle(labels)
    records: list[dict[str, Any]] = []
    for i in range(n_studies):
        records += write_study(
            out,
            seed=seed,
            study=i,
            positive=bool(labels[i]),
            syntax=syntaxes[i % len(syntaxes)],
            size_range=size_range,
            lateral=bool(rng.random() < lateral_fraction),
        )
    _write_manifest(out / "labels.csv", records, out)
    return records


def _write_manifest(path: Path, records: Iterable[dict[str, Any]], root: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        for rec in records:
            writer.writerow({**rec, "path": os.path.relpath(rec["path"], root)})
    os.replace(tmp, path)


def read_labels(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a ``labels.csv`` written by :func:`write_corpus` (paths made absolute)."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["path"] = str(path.parent / row["path"])
    return rows


# -- broken and unselected files --------------------------------------------------------------


def _small_dataset(seed: int = 99, **changes: Any) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = ImageParams(rows=64, columns=48, bits_stored=12, syntax="explicit_le", **changes)
    stored = stored_values(radiograph(rng, params.rows, params.columns, False), params, rng)
    ds = make_dataset(stored, params, make_identity(seed, 0, 0))
    return ds, stored


def _bytes_of(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    private = not ds.file_meta.TransferSyntaxUID.is_transfer_syntax
    encoding = {"implicit_vr": False, "little_endian": True} if private else {}
    ds.save_as(buf, enforce_file_format=True, **encoding)
    return buf.getvalue()


def write_broken(out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write files the pixel path must refuse; return {file name: substring of the reason}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def put(name: str, data: bytes | Dataset, reason: str) -> None:
        (out / name).write_bytes(_bytes_of(data) if isinstance(data, Dataset) else data)
        expected[name] = reason

    put("empty.dcm", b"", "empty")
    put("not_dicom.dcm", b"This is a text file, not an image.\n" * 20, "not a DICOM file")

    good, stored = _small_dataset()
    whole = _bytes_of(good)
    put("truncated_header.dcm", whole[:400], "'Pixel Data' is missing")

    ds, _ = _small_dataset()
    del ds.PixelData
    put("no_pixel_data.dcm", ds, "(7FE0,0010) 'Pixel Data' is missing")

    ds, _ = _small_dataset()
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile
    put("unsupported_syntax.dcm", ds, "is not supported")

    ds, _ = _small_dataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.9.9999.1")  # private, unknown
    ds.PixelData = encapsulate([bytes(300)])
    ds["PixelData"].VR = "OB"
    put("unknown_syntax.dcm", ds, "is not supported")

    ds, stored = _small_dataset()
    ds.compress(JPEG2000Lossless, stored, generate_instance_uid=False)
    ds.Rows = ds.Columns = 60000
    put("absurd_size.dcm", ds, "exceeds the limit")

    ds, _ = _small_dataset()
    ds.BitsStored = 18
    put("bits_stored_over_allocated.dcm", ds, "(0028,0101) 'Bits Stored' value '18' is invalid")

    ds, _ = _small_dataset()
    ds.BitsAllocated = 12
    put("bits_allocated_12.dcm", ds, "(0028,0100) 'Bits Allocated' value '12'")

    ds, _ = _small_dataset()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    put("truncated_pixel_data.dcm", ds, "'Pixel Data' is truncated")

    ds, _ = _small_dataset()
    del ds.Rows
    put("missing_rows.dcm", ds, "(0028,0010) 'Rows' is missing")

    ds, _ = _small_dataset()
    ds.RescaleSlope = "0"
    put("rescale_slope_zero.dcm", ds, "'Rescale Slope' value '0'")

    ds, stored = _small_dataset()
    ds.compress(JPEG2000Lossless, stored, generate_instance_uid=False)
    frame = _only_frame(ds)
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    put("truncated_codestream.dcm", ds, "failed with every available decoder")

    ds, stored = _small_dataset()
    ds.compress(RLELossless, stored, generate_instance_uid=False)
    frame = bytearray(_only_frame(ds))
    frame[8:12] = (10**6).to_bytes(4, "little")  # RLE header: 2nd segment offset past the end
    ds.PixelData = encapsulate([bytes(frame)])
    put("corrupt_rle_header.dcm", ds, "failed with every available decoder")

    ds, stored = _small_dataset()
    ds.compress(JPEG2000Lossless, stored, generate_instance_uid=False)
    cut = _bytes_of(ds)
    put("truncated_file.dcm", cut[: len(cut) - len(_only_frame(ds)) // 2], "End of file")

    ds, _ = _small_dataset()
    deflated = zlib.compress(_bytes_of(ds))
    put("zlib_stream.dcm", deflated, "not a DICOM file")
    return expected


def _only_frame(ds: Dataset) -> bytes:
    from pydicom.encaps import get_frame

    return get_frame(ds.PixelData, 0, number_of_frames=1)


def write_unselected(out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write valid images a chest CR/DX frontal policy must skip.

    Returns {file name: keyword of the attribute that excludes it}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    why: dict[str, str] = {}

    ds, _ = _small_dataset(modality="CT", body_part="CHEST", view="")
    del ds.ViewPosition
    (out / "ct_chest.dcm").write_bytes(_bytes_of(ds))
    why["ct_chest.dcm"] = "Modality"

    ds, _ = _small_dataset(view="LL")
    (out / "lateral.dcm").write_bytes(_bytes_of(ds))
    why["lateral.dcm"] = "ViewPosition"

    ds, _ = _small_dataset(body_part="KNEE")
    (out / "knee.dcm").write_bytes(_bytes_of(ds))
    why["knee.dcm"] = "BodyPartExamined"

    rng = np.random.default_rng(7)
    params = ImageParams(rows=64, columns=48, bits_stored=12)
    frames = np.stack(
        [stored_values(radiograph(rng, 64, 48, False), params, rng) for _ in range(2)]
    )
    ds = make_dataset(frames, params, make_identity(7, 0, 0), frames=2)
    (out / "multiframe.dcm").write_bytes(_bytes_of(ds))
    why["multiframe.dcm"] = "NumberOfFrames"

    rgb = (radiograph(rng, 64, 48, False)[..., None] * 255).astype(np.uint8).repeat(3, axis=2)
    params = ImageParams(rows=64, columns=48, bits_stored=8, photometric="RGB", window=False)
    ds = make_dataset(rgb, params, make_identity(8, 0, 0))
    (out / "rgb.dcm").write_bytes(_bytes_of(ds))
    why["rgb.dcm"] = "PhotometricInterpretation"
    return why
