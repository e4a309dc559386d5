"""Streamed discovery of input files: directory trees, single files and archives.

``discover(sources)`` is a generator: it walks one directory at a time and reads archives member
by member, so memory does not grow with the size of the tree or the archive. Every file it finds
becomes a :class:`SourceFile` that can be re-opened in another process. :class:`LocalFiles` is
this as a ``tasks.dicom.sources.Source`` (the seam PACS sources implement too), and
``SourceFile`` is its ``InputFile``; the rules below are that contract for files on disk.

Rules (what a radiology informatics engineer expects from a drop folder or an old archive):

- Order is stable: entries of a directory are visited in sorted name order, depth first;
  archive members in the order they are stored.
- Archives (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, also ``.tar.bz2``/``.tbz2`` and
  ``.tar.xz``/``.txz``) are read in place, never unpacked to disk, whether they are given as a
  source or found inside a tree. The tar compression is recognised from the file's magic bytes,
  not only its suffix. An archive inside an archive is not opened (errored entry): extract it
  and give it as its own source.
- Not yielded by a walk of a directory or an archive, because they are not instances:
  ``DICOMDIR`` index files (by name, any case; a DICOMDIR under another name is recognised by
  its SOP Class in ``tasks.dicom.headers``), hidden files and directories (a name starting with
  ``.``: ``.DS_Store``, macOS ``._*`` AppleDouble files, ``.git``...), macOS ``__MACOSX/``
  folders inside archives, and directories themselves.
- A file named as a source is always yielded, whatever its name (``src/DICOMDIR``,
  ``.hidden.dcm``), also when a directory given as another source holds it: the person named
  it, so it gets an outcome (a real DICOMDIR index is then *skipped* by the header scan, with
  that reason). When the walk of such a directory reaches the same file, it is read once.
- Symbolic links are followed (drop folders are often links into mounted archives), but a
  directory is entered only once: a link back to one of its own ancestors is a loop and gives an
  errored entry; a link to a directory already walked elsewhere is not walked twice.
- A problem with one file or member never raises out of the generator: the entry is yielded
  with ``error`` set to the reason, so the file still ends in a *failed* outcome. A corrupt or
  truncated archive yields the members read so far and then one errored entry for the archive.
- Every entry of one ``discover`` call has its own URI (the key its outcome is stored under):
  a source given twice, or inside another source, is read once; the n-th member of an archive
  with a name an earlier member already had (duplicates, or names equal after ``./`` and
  ``//`` are removed) gets ``#n`` after its URI. To find duplicates, a run keeps each
  archive's member URIs in memory while it reads that archive.
- File names that are not valid UTF-8 are not an error: the file opens through its OS name and
  its URI shows the undecodable bytes as ``\\xNN`` escapes, so it can be stored and displayed.
- Unreadable files (permissions) are found when they are opened: ``SourceFile.open`` raises
  ``InputError`` with the OS's reason ("cannot open the file: Permission denied"). Discovery
  itself opens only directories and archives, never FIFOs or devices (those are errored).

Archive safety (:class:`ArchiveLimits`): members whose names would escape an extraction
directory (``..``, absolute paths, drive letters, NUL), link and device members, encrypted or
unsupported-compression zip members, members larger than ``max_member_bytes``, zip members
whose declared sizes expand more than ``max_ratio`` times or whose data overlaps another
member's (the overlapping-entries zip bomb) are refused one by one. Reaching ``max_members`` or
``max_total_bytes`` stops reading the archive with one errored entry for it. For compressed tar
streams the ratio is measured while the member is read, so a bomb is refused before it is held
in memory. Zip members cannot expand past their declared size (``zipfile`` stops there and
checks the CRC).
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import itertools
import lzma
import os
import posixpath
import re
import stat
import tarfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from tasks.dicom.outcomes import InputError
from tasks.dicom.sources import InputFile

Container = Literal["file", "zip", "tar", "inline"]

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_GIB = 1024**3
_CHUNK = 1024 * 1024
# Compressed bytes a decompressing reader may have read ahead of the data it returned; added to
# the measured compressed size so that read-ahead never makes a member look like a bomb.
_READ_AHEAD_SLACK = 64 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_ZIP_LOCAL_HEADER = 30  # fixed part of a zip local file header, in bytes


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps that keep a hostile or broken archive from exhausting memory, disk or time.

    max_members: members read from one archive before it is abandoned.
    max_total_bytes: sum of declared uncompressed member sizes before it is abandoned.
    max_member_bytes: a larger member is refused (for tar.gz its bytes would be held in memory).
    max_ratio: uncompressed / compressed size above which a member is refused as a bomb,
        judged once the member is larger than ``ratio_floor_bytes`` (small files of zeros are
        harmless whatever their ratio).
    """

    max_members: int = 1_000_000
    max_total_bytes: int = 1024 * _GIB
    max_member_bytes: int = 2 * _GIB
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_members", "max_total_bytes", "max_member_bytes", "ratio_floor_bytes"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} should be at least 1 instead of {value}")
        if self.max_ratio < 1:
            raise ValueError(f"max_ratio should be at least 1 instead of {self.max_ratio}")


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One input file: where it came from and how to open it again, in any process.

    uri: ``/abs/dir/a.dcm`` or ``/abs/arch.zip!/path/in/archive.dcm``; shown to people and
        stored with the outcome.
    path: the file on disk (the archive for a member), as the OS names it.
    member: the member's name inside the archive, as stored there.
    container: ``file``; ``zip`` (member re-read from the archive); ``tar`` (uncompressed tar:
        ``size`` bytes at ``offset``); ``inline`` (member of a compressed tar stream, where random
        access would decompress from the start: its bytes travel in ``data``).
    size: bytes of the file or member (uncompressed); None when unknown (errored entries).
    error: why this entry cannot be used; None for a usable entry.
    """

    uri: str
    path: str
    member: str | None = None
    container: Container = "file"
    offset: int = 0
    size: int | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)
    error: str | None = None

    def open(self) -> BinaryIO:
        """A seekable binary stream of the file's bytes; the caller closes it.

        Raises ``InputError`` (with the reason) for an errored entry or a file or member that
        cannot be opened. Reading the stream can still raise ``OSError`` or, for a damaged zip
        member, ``zipfile.BadZipFile`` (CRC mismatch at its end); ``read_bytes`` turns those
        into ``InputError`` too.
        """
        if self.error is not None:
            raise InputError(self.error)
        try:
            return self._open()
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"cannot open the {self._noun}: {_read_reason(exc)}") from exc

    def read_bytes(self) -> bytes:
        """All the bytes of the file or member; ``InputError`` when they cannot be read."""
        if self.container == "inline" and self.error is None and self.data is not None:
            return self.data
        with self.open() as fp:
            try:
                return fp.read()
            except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise InputError(f"cannot read the {self._noun}: {_read_reason(exc)}") from exc

    @property
    def _noun(self) -> str:
        return "file" if self.member is None else "archive member"

    def _open(self) -> BinaryIO:
        if self.container == "file":
            return open(self.path, "rb")
        if self.container == "inline":
            if self.data is None:
                raise InputError("the member's bytes were not carried with it")
            return io.BytesIO(self.data)
        if self.container == "tar":
            return io.BufferedReader(_Window(self.path, self.offset, self.size or 0))
        if self.container == "zip":
            return _zip_open(self.path, self.member or "")
        raise ValueError(f"container {self.container!r} is not one of file, zip, tar, inline")


@dataclass(frozen=True)
class LocalFiles:
    """Folders, single files and archives on disk (or mounted), as one source."""

    paths: tuple[str, ...]
    limits: ArchiveLimits = DEFAULT_LIMITS

    @classmethod
    def of(cls, paths: Iterable[str | Path], limits: ArchiveLimits = DEFAULT_LIMITS) -> LocalFiles:
        return cls(tuple(os.fspath(p) for p in paths), limits)

    @property
    def uri(self) -> str:
        return ", ".join(_display(os.path.abspath(p)) for p in self.paths)

    def files(self) -> Iterator[InputFile]:
        return discover(self.paths, self.limits)


def discover(
    sources: Iterable[str | Path], limits: ArchiveLimits = DEFAULT_LIMITS
) -> Iterator[SourceFile]:
    """Yield every input file under ``sources`` (directories, files, archives), lazily."""
    visited: set[tuple[int, int]] = set()  # directories walked
    given: set[tuple[int, int]] = set()  # files named as sources
    for source in sources:
        path = os.path.abspath(os.fspath(source))
        try:
            st = os.stat(path)
        except OSError as exc:
            yield _errored(path, _os_reason(exc, path))
            continue
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            if key in visited:  # given twice, or inside a source walked already
                continue
            visited.add(key)
            yield from _walk(path, {key}, visited, limits, given)
        elif key not in given and not _walked(path, visited):
            given.add(key)
            yield from _file(path, st, limits)


def _walked(path: str, directories: set[tuple[int, int]]) -> bool:
    """Whether the walk of one of these directories yielded ``path`` (links resolved): it lies
    in one of them and no name on the way down is one the walk leaves out (hidden, DICOMDIR)."""
    real = os.path.realpath(path)
    names = [os.path.basename(real)]
    parent = os.path.dirname(real)
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) in directories:
            return not any(_ignored_name(name) for name in names)
        names.append(os.path.basename(parent))
        up = os.path.dirname(parent)
        if up == parent:
            return False
        parent = up


# --- directory trees ---------------------------------------------------------------------------


def _walk(
    directory: str,
    ancestors: set[tuple[int, int]],
    visited: set[tuple[int, int]],
    limits: ArchiveLimits,
    given: set[tuple[int, int]],
) -> Iterator[SourceFile]:
    try:
        with os.scandir(directory) as it:
            names = sorted(entry.name for entry in it)
    except OSError as exc:
        yield _errored(directory, f"cannot list the directory: {_os_reason(exc)}")
        return
    for name in names:
        if _ignored_name(name):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)  # follows symbolic links
        except OSError as exc:
            yield _errored(path, _os_reason(exc, path))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                target = os.path.realpath(path)
                yield _errored(
                    path,
                    f"symbolic link loop: {_display(path)!r} leads back to {_display(target)!r}, "
                    "a directory that contains it; not followed",
                )
            elif key not in visited:  # else: already walked through another path
                visited.add(key)
                ancestors.add(key)
                yield from _walk(path, ancestors, visited, limits, given)
                ancestors.discard(key)
        elif (st.st_dev, st.st_ino) not in given:  # else: named as a source, read already
            yield from _file(path, st, limits)


def _file(path: str, st: os.stat_result, limits: ArchiveLimits) -> Iterator[SourceFile]:
    if not stat.S_ISREG(st.st_mode):
        yield _errored(path, f"not a regular file but a {_file_kind(st.st_mode)}")
    elif _is_archive_name(path):
        yield from _archive(path, st.st_size, limits)
    else:
        yield SourceFile(uri=_display(path), path=path, size=st.st_size)


# --- archives ----------------------------------------------------------------------------------


def _archive(path: str, size: int, limits: ArchiveLimits) -> Iterator[SourceFile]:
    try:
        with open(path, "rb") as fp:
            magic = fp.read(6)
    except OSError as exc:
        yield _errored(path, f"cannot open the archive: {_os_reason(exc)}")
        return
    if path.lower().endswith(".zip"):
        yield from _zip_members(path, limits)
    else:
        yield from _tar_members(path, size, magic, limits)


def _zip_members(path: str, limits: ArchiveLimits) -> Iterator[SourceFile]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        yield _errored(path, f"zip archive cannot be read: {exc}")
        return
    with zf:
        infos = zf.infolist()
        overlapping = _overlapping_zip_members(infos)
        names = _UniqueUris()
        total = 0
        for index, info in enumerate(infos):
            if index >= limits.max_members:
                yield _errored(
                    path,
                    f"zip archive has {len(infos)} members, more than the limit of "
                    f"{limits.max_members}; the remaining {len(infos) - index} were not read",
                )
                return
            if info.is_dir():
                continue
            name = info.filename
            normal = _normal_member_name(name)
            if normal is not None and _ignored_member(normal):
                continue
            uri = names.unique(_member_uri(path, normal if normal is not None else name))
            total += info.file_size
            if total > limits.max_total_bytes:
                yield _errored(
                    path,
                    f"zip archive expands to more than the limit of {limits.max_total_bytes:,} "
                    f"bytes at member {index + 1} of {len(infos)}; the rest were not read",
                )
                return
            reason = _member_name_problem(name) or _zip_member_problem(
                zf, info, overlapping, limits
            )
            yield SourceFile(
                uri=uri,
                path=path,
                member=name,
                container="zip",
                size=info.file_size if reason is None else None,
                error=None if reason is None else f"archive member refused: {reason}",
            )


def _zip_member_problem(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, overlapping: set[int], limits: ArchiveLimits
) -> str | None:
    mode = info.external_attr >> 16  # Unix st_mode when made on Unix; file type bits optional
    if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return f"it is a {_file_kind(mode)}, not a regular file"
    if _is_archive_name(info.filename):
        return "it is an archive inside an archive; extract it and give it as its own source"
    if zf.NameToInfo.get(info.filename) is not info:
        return "a later member has the same name, so this one cannot be addressed"
    if info.flag_bits & 0x1:
        return "it is encrypted"
    if info.compress_type not in _ZIP_METHODS:
        return f"zip compression method {info.compress_type} is not supported"
    if info.file_size > limits.max_member_bytes:
        return (
            f"it declares {info.file_size:,} bytes, more than the per-member limit of "
            f"{limits.max_member_bytes:,}"
        )
    if id(info) in overlapping:
        return "its data overlaps another member's (overlapping-entries zip bomb)"
    if info.file_size > limits.ratio_floor_bytes:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            return (
                f"it would expand {ratio:,.0f}:1 ({info.compress_size:,} -> {info.file_size:,} "
                f"bytes), above the limit of {limits.max_ratio:,.0f}:1 (zip bomb protection)"
            )
    return None


def _overlapping_zip_members(infos: list[zipfile.ZipInfo]) -> set[int]:
    """ids of members whose local header + data overlap another member's (both are marked)."""
    spans = sorted((i for i in infos if not i.is_dir()), key=lambda i: i.header_offset)
    overlapping: set[int] = set()
    for info, following in itertools.pairwise(spans):
        # The stored name is UTF-8 when flag bit 11 is set, else CP437 (which round-trips).
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        name_len = len(info.orig_filename.encode(encoding, errors="replace"))
        # A lower bound of the member's extent: extra fields and data descriptors add to it.
        if info.header_offset + _ZIP_LOCAL_HEADER + name_len + info.compress_size > (
            following.header_offset
        ):
            overlapping.update((id(info), id(following)))
    return overlapping


def _tar_members(path: str, size: int, magic: bytes, limits: ArchiveLimits) -> Iterator[SourceFile]:
    """Members of a tar file: uncompressed tars by offset, compressed ones read as a stream."""
    compression = _compression(magic)
    label = "tar archive" if compression is None else f"{compression}-compressed tar archive"
    progress = _Progress()
    names = _UniqueUris()
    try:
        with open(path, "rb") as raw, _decompressing(raw, compression) as stream:
            tf = tarfile.TarFile(fileobj=stream, mode="r")
            first, tf.firstmember = tf.firstmember, None
            for info in _tar_infos(tf, first):
                progress.members += 1
                problem = progress.limit_problem(info.size, limits, label)
                if problem is not None:
                    yield _errored(path, problem)
                    return
                if info.isdir():
                    continue
                normal = _normal_member_name(info.name)
                if normal is not None and _ignored_member(normal):
                    continue
                uri = names.unique(_member_uri(path, normal if normal is not None else info.name))
                reason = _member_name_problem(info.name) or _tar_member_problem(info, limits)
                end = info.offset_data + info.size
                if reason is None and compression is None and end > size:
                    reason = (
                        f"its data ({info.size:,} bytes at offset {info.offset_data:,}) runs "
                        f"past the end of the archive ({size:,} bytes): truncated archive"
                    )
                if reason is not None:
                    yield SourceFile(
                        uri=uri,
                        path=path,
                        member=info.name,
                        error=f"archive member refused: {reason}",
                    )
                elif compression is None:
                    yield SourceFile(
                        uri=uri,
                        path=path,
                        member=info.name,
                        container="tar",
                        offset=info.offset_data,
                        size=info.size,
                    )
                else:
                    data, reason = _read_member(stream, raw, info, limits)
                    yield SourceFile(
                        uri=uri,
                        path=path,
                        member=info.name,
                        container="inline",
                        size=info.size if reason is None else None,
                        data=data,
                        error=None if reason is None else f"archive member refused: {reason}",
                    )
    except OSError as exc:
        if progress.members == 0 and exc.filename is not None:
            yield _errored(path, f"cannot open the archive: {_os_reason(exc)}")
        else:
            yield _errored(path, f"{label} {progress.where()}: {_exc_text(exc)}")
    except (_TarCorrupt, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        yield _errored(path, f"{label} {progress.where()}: {_exc_text(exc)}")


class _Progress:
    """Members and declared bytes read so far from one archive, against the limits."""

    def __init__(self) -> None:
        self.members = 0
        self.total = 0

    def limit_problem(self, size: int, limits: ArchiveLimits, label: str) -> str | None:
        if self.members > limits.max_members:
            return (
                f"{label} has more than the limit of {limits.max_members:,} members; "
                "the rest were not read"
            )
        self.total += size
        if self.total > limits.max_total_bytes:
            return (
                f"{label} expands to more than the limit of {limits.max_total_bytes:,} bytes "
                f"at member {self.members:,}; the rest were not read"
            )
        return None

    def where(self) -> str:
        if self.members == 0:
            return "cannot be read"
        return f"is corrupt or truncated after {self.members:,} member(s)"


def _decompressing(raw: BinaryIO, compression: str | None) -> AbstractContextManager[BinaryIO]:
    """A reader of the decompressed stream; these raise EOFError when the data is truncated."""
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "bzip2":
        return bz2.BZ2File(raw, mode="rb")  # type: ignore[return-value]
    if compression == "xz":
        return lzma.LZMAFile(raw, mode="rb")  # type: ignore[return-value]
    return nullcontext(raw)


class _TarCorrupt(Exception):
    pass


def _tar_infos(tf: tarfile.TarFile, first: tarfile.TarInfo | None) -> Iterator[tarfile.TarInfo]:
    """Members one by one without keeping them (``TarFile.next`` keeps every header in memory
    and ends silently at a corrupt or truncated header; here those raise)."""
    if first is None:
        return
    yield first
    while True:
        if tf.fileobj.tell() != tf.offset:
            tf.fileobj.seek(tf.offset)  # past the data of the previous member
        try:
            info = tarfile.TarInfo.fromtarfile(tf)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
            return  # end-of-archive blocks, or the end of the file right after a member
        except tarfile.TruncatedHeaderError as exc:
            raise _TarCorrupt(f"the archive ends inside a member header ({exc})") from None
        except (tarfile.InvalidHeaderError, tarfile.SubsequentHeaderError) as exc:
            raise _TarCorrupt(f"invalid member header at offset {tf.offset:,} ({exc})") from None
        yield info


def _tar_member_problem(info: tarfile.TarInfo, limits: ArchiveLimits) -> str | None:
    if info.issym():
        return f"it is a symbolic link (to {info.linkname!r}); links are not followed"
    if info.islnk():
        return f"it is a hard link (to {info.linkname!r}); links are not followed"
    if info.ischr() or info.isblk():
        return "it is a device file, not a regular file"
    if info.isfifo():
        return "it is a FIFO, not a regular file"
    if not info.isreg():
        return f"tar member type {info.type!r} is not a regular file"
    if info.issparse():
        return "it is a sparse file; its declared size is not its real size"
    if _is_archive_name(info.name):
        return "it is an archive inside an archive; extract it and give it as its own source"
    if info.size > limits.max_member_bytes:
        return (
            f"it declares {info.size:,} bytes, more than the per-member limit of "
            f"{limits.max_member_bytes:,}"
        )
    return None


def _read_member(
    stream: BinaryIO, raw: BinaryIO, info: tarfile.TarInfo, limits: ArchiveLimits
) -> tuple[bytes | None, str | None]:
    """Read a member of a compressed stream, refusing it as soon as its ratio says bomb."""
    stream.seek(info.offset_data)
    compressed_start = raw.tell()
    chunks: list[bytes] = []
    done = 0
    while done < info.size:
        chunk = stream.read(min(_CHUNK, info.size - done))
        if not chunk:
            raise EOFError(f"the archive ends inside member {info.name!r}")
        chunks.append(chunk)
        done += len(chunk)
        if done > limits.ratio_floor_bytes:
            compressed = raw.tell() - compressed_start + _READ_AHEAD_SLACK
            ratio = done / compressed
            if ratio > limits.max_ratio:
                return None, (
                    f"it expanded {ratio:,.0f}:1 ({done:,} bytes from about {compressed:,} "
                    f"compressed), above the limit of {limits.max_ratio:,.0f}:1 "
                    "(compression bomb protection)"
                )
    return b"".join(chunks), None


def _compression(magic: bytes) -> str | None:
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    if magic.startswith(b"BZh"):
        return "bzip2"
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return None


# --- names -------------------------------------------------------------------------------------


def _ignored_name(name: str) -> bool:
    return name.startswith(".") or name.upper() == "DICOMDIR"


def _ignored_member(normal: str) -> bool:
    parts = normal.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or _ignored_name(parts[-1])


def _normal_member_name(name: str) -> str | None:
    """The member's path with ``./`` and duplicate slashes removed; None when it is unsafe."""
    if _member_name_problem(name) is not None:
        return None
    return posixpath.normpath(name.replace("\\", "/"))


def _member_name_problem(name: str) -> str | None:
    if "\x00" in name:
        return f"its name {_display(name)!r} contains a NUL character"
    slashed = name.replace("\\", "/")
    if slashed.startswith("/"):
        return f"its name {_display(name)!r} is an absolute path (path traversal protection)"
    if _DRIVE.match(slashed):
        return f"its name {_display(name)!r} starts with a drive letter (path traversal protection)"
    if ".." in slashed.split("/"):
        return (
            f"its name {_display(name)!r} has a '..' component that would escape the archive "
            "(path traversal protection)"
        )
    return None


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


class _UniqueUris:
    """The member URIs of one archive so far; a repeated one gets ``#n`` (n-th occurrence)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def unique(self, uri: str) -> str:
        candidate, n = uri, 1
        while candidate in self._seen:
            n += 1
            candidate = f"{uri}#{n}"
        self._seen.add(candidate)
        return candidate


def _member_uri(archive: str, member: str) -> str:
    return f"{_display(archive)}!/{_display(member)}"


def _display(name: str) -> str:
    """``name`` with undecodable bytes (surrogate escapes) shown as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _errored(path: str, reason: str) -> SourceFile:
    return SourceFile(uri=_display(path), path=path, error=reason)


def _os_reason(exc: OSError, path: str | None = None) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop: the link cannot be resolved (too many levels of links)"
    if exc.errno == errno.ENOENT and path is not None and os.path.islink(path):
        return f"broken symbolic link: its target {_display(os.readlink(path))!r} does not exist"
    return exc.strerror or str(exc)


def _read_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _exc_text(exc)


def _exc_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    return f"file of type {stat.S_IFMT(mode):o}"


# --- re-opening members ------------------------------------------------------------------------


class _Window(io.RawIOBase):
    """``size`` bytes at ``offset`` of a file, as a seekable read-only stream."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        self._fp = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._offset = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._fp.seek(self._offset + self._pos)
        got = self._fp.readinto(memoryview(buffer)[:n])
        self._pos += got or 0
        return got or 0

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._fp.close()
        super().close()


class _ZipCache:
    """A few open ``ZipFile`` objects per process: re-reading a large central directory for
    every member would make a shard cost O(members x archive size). Entries are keyed by
    path, size and mtime, so a replaced archive is re-read."""

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._open: OrderedDict[tuple[str, int, int], zipfile.ZipFile] = OrderedDict()
        self._lock = threading.Lock()

    def open_member(self, path: str, member: str) -> BinaryIO:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        with self._lock:
            zf = self._open.get(key)
            if zf is None:
                zf = zipfile.ZipFile(path)
                self._open[key] = zf
                while len(self._open) > self._capacity:
                    # Members already open keep the file open until they are closed.
                    self._open.popitem(last=False)[1].close()
            else:
                self._open.move_to_end(key)
            return zf.open(member)  # type: ignore[return-value]


_ZIPS = _ZipCache()


def _zip_open(path: str, member: str) -> BinaryIO:
    return _ZIPS.open_member(path, member)
