"""The source seam: local files implement it, and any other source written against it (as a
PACS source will be) goes through the header scan and the pixel path unchanged."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import pytest

import tasks.dicom.pixels as px
from model.spec import PreprocessSpec
from tasks.dicom import synth
from tasks.dicom.discovery import LocalFiles, SourceFile, discover
from tasks.dicom.headers import read_header
from tasks.dicom.outcomes import InputError
from tasks.dicom.sources import ErroredFile, InputFile, Source, guarded

KEY = b"site-secret-key"


@dataclass(frozen=True)
class MemoryFile:
    """An input file whose bytes a source fetched (as WADO-RS would) and keeps in memory."""

    uri: str
    data: bytes = field(repr=False)
    error: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> BinaryIO:
        if self.error is not None:
            raise InputError(self.error)
        return io.BytesIO(self.data)

    def read_bytes(self) -> bytes:
        with self.open() as fp:
            return fp.read()


@dataclass(frozen=True)
class FlakyServer:
    """A source whose listing breaks after ``good`` files (server gone, say)."""

    files_data: tuple[bytes, ...]
    good: int
    uri: str = "dicomweb://pacs.example/studies?StudyDate=20240101"

    def files(self) -> Iterator[InputFile]:
        for i, data in enumerate(self.files_data):
            if i == self.good:
                raise ConnectionError("connection reset by peer")
            yield MemoryFile(f"dicomweb://pacs.example/instances/{i}", data)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("src")
    params = synth.ImageParams(rows=128, columns=112, modality="CR")
    paths = [
        synth.write_image(folder / f"{i}.dcm", params, positive=True, seed=i, study=i)["path"]
        for i in (1, 2)
    ]
    return [open(p, "rb").read() for p in paths]


def test_local_files_are_a_source_of_input_files(tmp_path, images):
    (tmp_path / "a.dcm").write_bytes(images[0])
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        zf.writestr("b.dcm", images[1])
    source = LocalFiles.of([tmp_path, tmp_path / "missing"])
    assert isinstance(source, Source)
    entries = list(source.files())
    assert [e.uri for e in entries] == [e.uri for e in discover([tmp_path, tmp_path / "missing"])]
    assert all(isinstance(e, SourceFile) and isinstance(e, InputFile) for e in entries)
    assert [e.error is None for e in entries] == [True, True, False]
    assert str(tmp_path / "missing") in source.uri


def test_another_source_goes_through_headers_and_pixels_unchanged(images):
    source = FlakyServer(tuple(images), good=2)
    entries = list(guarded(source))
    assert [e.uri for e in entries] == [
        "dicomweb://pacs.example/instances/0",
        "dicomweb://pacs.example/instances/1",
    ]
    for entry in entries:
        header = read_header(entry, KEY)
        assert header.source_uri == entry.uri and header.modality == "CR"
        pre = px.preprocess(entry.read_bytes(), PreprocessSpec())
        assert pre.image.shape == (3, 150, 150) and pre.facts["decoder"] == "native"


def test_a_listing_that_breaks_yields_what_it_had_and_one_errored_entry(images):
    source = FlakyServer(tuple(images), good=1)
    entries = list(guarded(source))
    assert len(entries) == 2 and entries[0].error is None
    failed = entries[1]
    assert failed.uri == source.uri
    assert failed.error == (
        "listing the source failed part-way: ConnectionError: connection reset by peer"
    )
    with pytest.raises(InputError, match="^listing the source failed part-way"):
        read_header(failed, KEY)


def test_errored_entries_fail_with_their_reason_and_travel_to_workers():
    entry = ErroredFile("dicomweb://pacs.example/instances/9", "WADO-RS returned 404 Not Found")
    assert isinstance(entry, InputFile)
    for call in (entry.open, entry.read_bytes, lambda: read_header(entry, KEY)):
        with pytest.raises(InputError, match="^WADO-RS returned 404 Not Found$"):
            call()
    # decode workers run in a spawn-context pool: entries must pickle
    assert pickle.loads(pickle.dumps(entry)) == entry
    local = SourceFile(uri="/x/a.zip!/a.dcm", path="/x/a.zip", member="a.dcm", container="zip")
    assert pickle.loads(pickle.dumps(local)) == local
