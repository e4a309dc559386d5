"""Generated hostile header values, through the whole path, on SQLite and PostgreSQL.

Each example writes a small shard of real DICOM files (``tasks.dicom.synth`` images) whose
headers hold generated values: NUL and other control characters, lone surrogate escapes, very
long strings, NaN / infinities / overflowing numbers, and elements written with the wrong VR
(a number as a string, a string as binary, a float where text belongs), sometimes two files
with the same SOP Instance UID. The files go through discovery, header scan and selection
(``tasks.ingest.scan``), the pixel path and inference (``tasks.screening.ShardProcessor``) and
the shard writer (``tasks.screening.persist_shard`` -> ``sql.shards.write_shard``) into both
databases, sometimes with the writer's sanitiser switched off (the header reader's is then the
only one). Whatever the values: the shard commits, the run closes as completed, every file has
exactly one outcome row, and the run's counts equal those rows.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import struct
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from support import scratch_postgres_database

from model.checkpoint import load_checkpoint, untrained_checkpoint
from sql import db, rows
from tasks.dicom import synth
from tasks.ingest import scan
from tasks.screening import ShardProcessor, close_run, open_run, persist_shard

KEY = b"hostile-values-key"

# Elements and the VR the dictionary gives them; a generated value may come with another VR.
TEXT_ELEMENTS = {
    "AccessionNumber": "SH",
    "Modality": "CS",
    "BodyPartExamined": "CS",
    "ViewPosition": "CS",
    "PhotometricInterpretation": "CS",
    "StudyDate": "DA",
    "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI",
    "SOPInstanceUID": "UI",
    "PatientID": "LO",
    "SeriesDescription": "LO",
    "VOILUTFunction": "CS",
    "LUTExplanation": "LO",
    "PresentationLUTShape": "CS",
}
NUMBER_ELEMENTS = {
    "WindowCenter": "DS",
    "WindowWidth": "DS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "NumberOfFrames": "IS",
    "Rows": "US",
    "Columns": "US",
    "BitsStored": "US",
}
WRONG_VRS = ("LO", "UT", "DS", "IS", "FD", "FL", "US", "SL", "OB", "UN", "UI")

CONTROL = st.characters(min_codepoint=0, max_codepoint=0x1F) | st.characters(
    min_codepoint=0x7F, max_codepoint=0x9F
)
HOSTILE_TEXT = st.one_of(
    st.text(CONTROL | st.characters(max_codepoint=0x2FF, exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(
        [
            "ACC\x00NUL",
            "\x00\x00",
            "LINEAR\x00EXACT",
            "1.2.3.ZEBULON^QUIXOTE",
            "1.2.840.10008.1.2\x00",
            "monochrome2",
            " CR\r\n",
            "\x1b[31mred\x1b[0m",
        ]
    ),
    st.integers(1000, 20_000).map(lambda n: "x" * n),
)
HOSTILE_NUMBER = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "-1e999", "1e308", "0", "-0", ""]),
    st.sampled_from(["99999999999999999999999", "-2147483649", "4294967296", "1\\2\\3", "abc"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
)


@st.composite
def element_values(draw) -> tuple[str, str, bytes]:
    """(keyword, VR written, raw value bytes) of one hostile element."""
    if draw(st.booleans()):
        keyword, vr = draw(st.sampled_from(sorted(TEXT_ELEMENTS.items())))
        text = draw(HOSTILE_TEXT)
    else:
        keyword, vr = draw(st.sampled_from(sorted(NUMBER_ELEMENTS.items())))
        text = draw(HOSTILE_NUMBER)
    if draw(st.integers(0, 4)) == 0:  # the wrong VR
        vr = draw(st.sampled_from(WRONG_VRS))
    return keyword, vr, _encode(vr, text, draw(st.floats(allow_nan=True)))


def _encode(vr: str, text: str, number: float) -> bytes:
    if vr == "FD":
        return struct.pack("<d", number)
    if vr == "FL":
        return struct.pack("<f", number if math.isnan(number) or abs(number) < 3e38 else math.inf)
    if vr in ("US", "SS"):
        return struct.pack("<H", abs(hash(text)) % 65536)
    if vr in ("UL", "SL"):
        return struct.pack("<I", abs(hash(text)) % 2**32)
    raw = text.encode("utf-8", "surrogateescape")[:60_000]
    return raw + (b" " if len(raw) % 2 else b"")


@st.composite
def shards(draw) -> tuple[list[list[tuple[str, str, bytes]]], list[int | None], bool]:
    """Per file its hostile elements and the index of an earlier file whose SOP Instance UID
    it reuses (None: its own); and whether the writer's sanitiser is on."""
    n = draw(st.integers(1, 4))
    files = [draw(st.lists(element_values(), max_size=4)) for _ in range(n)]
    same_uid = [None] + [draw(st.none() | st.integers(0, i - 1)) for i in range(1, n)]
    return files, same_uid, draw(st.booleans())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    untrained_checkpoint(version="hostile", head_std=0.2, calibrate=True).save(path)
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Iterator[dict[str, sa.Engine]]:
    """A migrated SQLite file and PostgreSQL database for the whole module."""
    with scratch_postgres_database() as pg_url:
        made = {
            "sqlite": db.connect(f"sqlite:///{tmp_path_factory.mktemp('db') / 'results.db'}"),
            "postgresql": db.connect(pg_url),
        }
        try:
            yield made
        finally:
            for engine in made.values():
                engine.dispose()


@pytest.fixture(scope="module")
def processor(checkpoint) -> Iterator[ShardProcessor]:
    with ShardProcessor(checkpoint, device="cpu", workers=0, reduced=True) as proc:
        yield proc


def write_files(root: Path, files, same_uid) -> list[Path]:
    """The files, each a synthetic image with its hostile elements written as raw bytes (read
    back first, so that pydicom writes them as they are instead of converting them)."""
    paths, uids = [], []
    for index, (elements, reuse) in enumerate(zip(files, same_uid, strict=True)):
        base, _ = synth._small_dataset(int(reuse if reuse is not None else index) % 3)
        ds = pydicom.dcmread(io.BytesIO(synth._bytes_of(base)))
        uid = uids[reuse] if reuse is not None else generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID = generate_uid()
        uids.append(uid)
        for keyword, vr, value in elements:
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buf)
        path = root / f"file{index}.dcm"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


@contextlib.contextmanager
def writer_sanitiser(on: bool) -> Iterator[None]:
    """The writer's text and JSON cleaning as it is, or off (values as the reader left them)."""
    if on:
        yield
        return
    saved = rows.clean_text, rows.clean_json
    rows.clean_text = lambda value, limit, *, key=False: value
    rows.clean_json = lambda value, depth=0, *, max_items=0: value
    try:
        yield
    finally:
        rows.clean_text, rows.clean_json = saved


def stored_outcomes(engine: sa.Engine, root: Path) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT source_uri, outcome FROM file_outcomes WHERE source_uri LIKE :p"),
            {"p": f"{root}/%"},
        )
        return [(uri, outcome) for uri, outcome in found]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=shards())
def test_hostile_headers_always_commit_with_one_outcome_per_file(
    case, checkpoint, engines, processor
):
    files, same_uid, sanitiser_on = case
    root = Path(tempfile.mkdtemp(prefix="cxr-hostile-"))
    try:
        paths = write_files(root, files, same_uid)
        items = list(scan([str(root)], KEY))
        assert len(items) == len(paths)  # discovery yields every file, however broken
        shard = processor.process(items)
        assert shard.files == len(paths)
        for name, engine in engines.items():
            run = open_run(
                engine,
                checkpoint,
                kind="reprocess",
                source=str(root),
                parameters={},
                selection_policy={},
            )
            with writer_sanitiser(sanitiser_on):
                written = persist_shard(
                    run.sessions, run_id=run.run_id, model_id=run.model_id, rows=shard, force=False
                )
            counts = shard.final_counts(written)
            assert sum(counts.values()) == len(paths), name
            close_run(run, counts)  # completed: refused unless every file has one outcome

            stored = stored_outcomes(engine, root)
            assert sorted(uri for uri, _ in stored) == sorted(str(p) for p in paths), name
            assert Counter(outcome for _, outcome in stored) == +counts, name
            with engine.connect() as conn:
                summary = conn.execute(
                    sa.text(
                        "SELECT status, files_seen, predicted, skipped, failed "
                        "FROM v_run_summary WHERE run_id = :r"
                    ),
                    {"r": run.run_id},
                ).one()
            assert tuple(summary) == (
                "completed",
                len(paths),
                counts["predicted"],
                counts["skipped"],
                counts["failed"],
            ), name
            for refused in written.refused:  # named by column, never by a hostile value
                assert "\x00" not in refused["reason"], name
    finally:
        shutil.rmtree(root, ignore_errors=True)
