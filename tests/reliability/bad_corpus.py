"""A corpus of bad input for the screening pipeline: one file (or archive member) per kind.

``build(root)`` writes the corpus under ``root`` and returns one :class:`Kind` per entry the
pipeline will see, with the outcome it must end in and a pattern its stored reason must match.
Sources: files generated here, ``tasks.dicom.synth``'s broken and unselected files, and broken or
out-of-scope files shipped by pydicom and pydicom-data (some relabelled as CR, two bytes
changed, so that the selection policy lets them reach the pixel path).

The unreadable entries (mode 000) are only unreadable to a process that cannot override file
permissions: the test runs the pipeline without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from tasks.dicom import synth

GIB = 1024**3


@dataclass(frozen=True)
class Kind:
    """One kind of bad input and what the pipeline must make of it."""

    name: str  # short label (the table in docs/reliability.md)
    uri_end: str  # how the stored source URI ends (unique in the corpus)
    outcome: str  # predicted | skipped | failed
    reason: str  # regular expression the stored reason must match (None for predicted)
    origin: str  # generated | synth | pydicom | pydicom-data
    fact: str | None = None  # a key the outcome's facts must hold (a recovered problem)

    @property
    def control(self) -> bool:
        """A valid entry placed beside bad ones (it must be predicted)."""
        return self.outcome == "predicted" and self.fact is None


def real(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not in pydicom's or pydicom-data's test files")
    return path


MODALITY = (0x0008, 0x0060)
BODY_PART = (0x0018, 0x0015)


def patch_value(data: bytes, tag: tuple[int, int], old: str, new: str) -> bytes:
    """Replace one element's value in a file's bytes, keeping its length (space padded):
    relabels a test file (e.g. Modality MR -> CR) without re-encoding anything else.
    Explicit or implicit VR little endian; the element must occur exactly once."""
    size = len(old) + len(old) % 2
    if len(new) > size:
        raise ValueError(f"{new!r} does not fit in the {size} bytes of {old!r}")
    value, replacement = old.encode().ljust(size), new.encode().ljust(size)
    tag_bytes = struct.pack("<HH", *tag)
    heads = (
        tag_bytes + b"CS" + struct.pack("<H", size),
        tag_bytes + struct.pack("<I", size),
    )
    found = [(h, data.find(h + value)) for h in heads if data.count(h + value) == 1]
    if len(found) != 1:
        raise ValueError(f"no unique element ({tag[0]:04X},{tag[1]:04X}) = {old!r} found")
    head, at = found[0]
    start = at + len(head)
    return data[:start] + replacement + data[start + size :]


def _dataset(seed: int, **changes):
    """A small valid CR image data set (64 x 48, 12 bits) and its stored values."""
    ds, stored = synth._small_dataset(seed, **changes)
    return ds, stored


def _bytes(ds) -> bytes:
    return synth._bytes_of(ds)


def _declared(ds, syntax: str) -> bytes:
    """The data set encoded as Explicit VR Little Endian under a file meta that declares
    ``syntax`` instead (pydicom will not write such a lie itself)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    plain = Dataset()
    plain.update({elem.tag: elem for elem in ds})
    write_dataset(body, plain)
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + head.getvalue() + body.getvalue()


def _fresh_uids(ds, seed: int) -> None:
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["bad-corpus", "sop", str(seed)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["bad-corpus", "study", str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bad-corpus", "series", str(seed)])


def _good_image(seed: int) -> bytes:
    """A valid, selectable chest CR image with its own UIDs (a control, or an archive member)."""
    ds, _ = _dataset(seed)
    _fresh_uids(ds, seed)
    return _bytes(ds)


# --- hand-made archives ----------------------------------------------------------------------


def _zip_bomb(path: Path, expanded: int) -> None:
    """One deflated member of ``expanded`` zero bytes, written without deflating them all.

    With Z_FULL_FLUSH after every MiB the compressor's output for each further MiB of zeros is
    the same bytes, so the stream is assembled from two compressed blocks.
    """
    mib = bytes(1 << 20)
    if expanded % len(mib):
        raise ValueError("expanded size must be a whole number of MiB")
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    n = expanded // len(mib)
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(mib, crc)
    data_size = len(first) + len(again) * (n - 1) + len(tail)
    name = b"bomb.dcm"
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, data_size, expanded, len(name), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        20,
        20,
        0,
        8,
        0,
        0x21,
        crc,
        data_size,
        expanded,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    with open(path, "wb") as f:
        f.write(local + name + first)
        for _ in range(n - 1):
            f.write(again)
        f.write(tail)
        cd_offset = f.tell()
        f.write(central + name)
        cd_size = f.tell() - cd_offset
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, cd_size, cd_offset, 0))


def _overlapping_zip(path: Path, member: bytes) -> None:
    """Two central-directory entries that share one member's data (the overlapping-entries
    zip bomb, scaled down): the second entry points into the first one's data."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", member)
    raw = buf.getvalue()
    eocd = raw.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", raw[eocd + 12 : eocd + 20])
    central = raw[cd_offset : cd_offset + cd_size]
    second = bytearray(central)
    name_len = struct.unpack("<H", second[28:30])[0]
    second[46 : 46 + name_len] = b"b.dcm"
    struct.pack_into("<I", second, 42, 10)  # header offset inside a.dcm's data
    body = raw[:cd_offset] + central + bytes(second)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 2, 2, cd_size * 2, cd_offset, 0)
    path.write_bytes(body + end)


def _gzip_tar_bomb(path: Path, expanded: int) -> None:
    """A .tar.gz whose one member is ``expanded`` zero bytes: a multi-member gzip stream
    (readers concatenate members), so the same compressed MiB is written again and again."""
    mib = bytes(1 << 20)
    info = tarfile.TarInfo("zeros.dcm")
    info.size = expanded
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    with open(path, "wb") as f:
        f.write(_gzip(header))
        block = _gzip(mib)
        for _ in range(expanded // len(mib)):
            f.write(block)
        f.write(_gzip(bytes(1024)))  # end-of-archive blocks


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=9, mtime=0)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str) -> None:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


# --- the corpus ------------------------------------------------------------------------------


def build(root: str | os.PathLike[str], *, bomb_bytes: int = GIB) -> list[Kind]:
    """Write the corpus under ``root`` (a fresh directory); return what each entry must become."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    kinds: list[Kind] = []

    def add(name, uri_end, outcome, reason, origin, fact=None) -> None:
        kinds.append(Kind(name, uri_end, outcome, reason, origin, fact))

    # 1. tasks.dicom.synth's broken files, with the substring the pixel path's reason contains
    #    (the header scan already refuses a file cut inside its header, naming the element).
    broken = synth.write_broken(root / "synth_broken")
    header_reasons = {"truncated_header.dcm": "the file is truncated: it ends inside (0008,0016)"}
    for fname, substring in sorted(broken.items()):
        add(
            f"synth: {fname[:-4].replace('_', ' ')}",
            f"synth_broken/{fname}",
            "failed",
            _literal(header_reasons.get(fname, substring)),
            "synth",
        )
    # 2. tasks.dicom.synth's valid files a chest CR/DX frontal policy skips.
    unselected = synth.write_unselected(root / "synth_unselected")
    for fname, keyword in sorted(unselected.items()):
        add(
            f"synth: {fname[:-4].replace('_', ' ')}",
            f"synth_unselected/{fname}",
            "skipped",
            _literal(keyword),
            "synth",
        )

    gen = root / "generated"
    gen.mkdir()

    def put(fname: str, data: bytes) -> None:
        (gen / fname).write_bytes(data)

    # 3. Generated here: header lies and impossible values.
    ds, _ = _dataset(11)
    ds.Rows = ds.Columns = 65535
    put("rows_columns_65535.dcm", _bytes(ds))
    add(
        "Rows x Columns 65535 x 65535 (native)",
        "generated/rows_columns_65535.dcm",
        "failed",
        "exceeds the limit",
        "generated",
    )

    ds, stored = _dataset(12)
    put("lying_syntax_native_as_j2k.dcm", _declared(ds, JPEG2000Lossless))  # native pixels
    add(
        "transfer syntax lies: JPEG 2000 declared, native pixels",
        "generated/lying_syntax_native_as_j2k.dcm",
        "failed",
        "decoding JPEG 2000 .* failed with every available decoder",
        "generated",
    )

    ds, stored = _dataset(13)
    ds.compress(JPEGLSLossless, stored, generate_instance_uid=False)
    put("lying_syntax_jpegls_as_rle.dcm", _declared(ds, RLELossless))  # JPEG-LS said RLE
    add(
        "transfer syntax lies: RLE declared, JPEG-LS codestream",
        "generated/lying_syntax_jpegls_as_rle.dcm",
        "failed",
        "decoding RLE Lossless pixel data failed with every available decoder",
        "generated",
    )

    ds, stored = _dataset(14)
    ds.compress(RLELossless, stored, generate_instance_uid=False)
    put("lying_syntax_rle_as_j2k.dcm", _declared(ds, JPEG2000Lossless))  # RLE said J2K
    add(
        "transfer syntax lies: JPEG 2000 declared, RLE data",
        "generated/lying_syntax_rle_as_j2k.dcm",
        "failed",
        "decoding JPEG 2000 .* failed with every available decoder",
        "generated",
    )

    ds, _ = _dataset(15)
    put("lying_syntax_deflate.dcm", _declared(ds, "1.2.840.10008.1.2.1.99"))  # not deflated
    add(
        "transfer syntax lies: Deflated declared, plain data set",
        "generated/lying_syntax_deflate.dcm",
        "failed",
        "cannot be parsed: Error -3 while decompressing",
        "generated",
    )

    ds, _ = _dataset(16)
    ds.PhotometricInterpretation = "YBR_FULL"
    put("ybr_full.dcm", _bytes(ds))
    add(
        "YBR_FULL photometric interpretation",
        "generated/ybr_full.dcm",
        "skipped",
        "PhotometricInterpretation",
        "generated",
    )

    ds, _ = _dataset(17)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    put("palette_color.dcm", _bytes(ds))
    add(
        "PALETTE COLOR photometric interpretation",
        "generated/palette_color.dcm",
        "skipped",
        "PhotometricInterpretation",
        "generated",
    )

    ds, _ = _dataset(18)
    ds.SamplesPerPixel = 3  # MONOCHROME2 with three samples: the header contradicts itself
    put("mono_with_three_samples.dcm", _bytes(ds))
    add(
        "MONOCHROME2 with Samples per Pixel 3",
        "generated/mono_with_three_samples.dcm",
        "skipped",
        "SamplesPerPixel is 3; only single-sample",
        "generated",
    )

    ds, _ = _dataset(19)
    del ds.PhotometricInterpretation
    put("no_photometric.dcm", _bytes(ds))
    add(
        "Photometric Interpretation missing",
        "generated/no_photometric.dcm",
        "failed",
        "\\(0028,0004\\) 'Photometric Interpretation' value '\\(missing\\)'",
        "generated",
    )

    ds, _ = _dataset(20)
    ds.PixelRepresentation = 2
    put("pixel_representation_2.dcm", _bytes(ds))
    add(
        "Pixel Representation 2",
        "generated/pixel_representation_2.dcm",
        "failed",
        "\\(0028,0103\\) 'Pixel Representation' value '2' is invalid",
        "generated",
    )

    ds, _ = _dataset(21)
    ds.WindowCenter, ds.WindowWidth = "2048", "0"
    put("window_width_zero.dcm", _bytes(ds))
    add(
        "Window Width 0 (recovered: window rejected, percentiles used, recorded in facts)",
        "generated/window_width_zero.dcm",
        "predicted",
        None,
        "generated",
        fact="window_rejected",
    )

    ds, _ = _dataset(22)
    ds.NumberOfFrames = 0
    put("zero_frames.dcm", _bytes(ds))
    add(
        "Number of Frames 0",
        "generated/zero_frames.dcm",
        "skipped",
        "NumberOfFrames is 0",
        "generated",
    )

    ds, _ = _dataset(23)
    del ds.SOPInstanceUID
    put("no_sop_instance_uid.dcm", _bytes(ds))
    add(
        "SOP Instance UID missing",
        "generated/no_sop_instance_uid.dcm",
        "failed",
        "\\(0008,0018\\) 'SOP Instance UID' is missing or empty",
        "generated",
    )

    ds, _ = _dataset(24)
    del ds.StudyInstanceUID
    put("no_study_instance_uid.dcm", _bytes(ds))
    add(
        "Study Instance UID missing",
        "generated/no_study_instance_uid.dcm",
        "failed",
        "\\(0020,000D\\) 'Study Instance UID' is missing or empty",
        "generated",
    )

    ds, _ = _dataset(25)
    ds.SOPInstanceUID = "1.2.3" + ".4" * 40  # 85 characters
    put("sop_uid_too_long.dcm", _bytes(ds))
    add(
        "SOP Instance UID longer than 64 characters",
        "generated/sop_uid_too_long.dcm",
        "failed",
        "'SOP Instance UID' value is not a valid UID: it is 85 characters long; a UID has at most",
        "generated",
    )

    ds, _ = _dataset(26)
    ds.PresentationIntentType = "FOR PROCESSING"
    put("dx_for_processing.dcm", _bytes(ds))
    add(
        "DX For Processing (raw detector data)",
        "generated/dx_for_processing.dcm",
        "skipped",
        "'For Processing' image",
        "generated",
    )

    whole = _good_image(27)
    # an element header in the middle claiming 4 GB of value: cut the file right after it
    at = whole.find(b"\x08\x00\x90\x00")  # (0008,0090) Referring Physician's Name
    put(
        "huge_element_length.dcm",
        whole[:at] + b"\x08\x00\x90\x00PN" + struct.pack("<H", 0xFFFF) + whole[at + 8 :],
    )
    add(
        "element length runs past the end of the file",
        "generated/huge_element_length.dcm",
        "failed",
        "truncated: it ends inside \\(0008,0090\\) 'Referring Physician's Name'",
        "generated",
    )

    # duplicate SOP Instance UID, different pixels: the first file seen is stored, the other
    # fails with both names (nothing is merged)
    ds, stored = _dataset(28)
    _fresh_uids(ds, 28)
    put("duplicate_uid_a.dcm", _bytes(ds))
    ds.PixelData = (stored[::-1].copy()).tobytes()
    put("duplicate_uid_b.dcm", _bytes(ds))
    add(
        "duplicate SOP Instance UID: first copy (control)",
        "generated/duplicate_uid_a.dcm",
        "predicted",
        None,
        "generated",
    )
    add(
        "duplicate SOP Instance UID, different pixels",
        "generated/duplicate_uid_b.dcm",
        "failed",
        "already stored from .*duplicate_uid_a.dcm.*different content",
        "generated",
    )

    # 4. Names and file-system objects.
    fs = root / "filesystem"
    fs.mkdir()
    (fs / "unreadable.dcm").write_bytes(_good_image(30))
    os.chmod(fs / "unreadable.dcm", 0)
    add(
        "unreadable file (permissions)",
        "filesystem/unreadable.dcm",
        "failed",
        "Permission denied",
        "generated",
    )
    (fs / "locked_dir").mkdir()
    (fs / "locked_dir" / "inside.dcm").write_bytes(_good_image(31))
    os.chmod(fs / "locked_dir", 0)
    add(
        "unreadable directory (permissions)",
        "filesystem/locked_dir",
        "failed",
        "cannot list the directory: Permission denied",
        "generated",
    )
    (fs / "loop").mkdir()
    os.symlink("..", fs / "loop" / "back_up")
    add(
        "symbolic link loop (link to an ancestor)",
        "filesystem/loop/back_up",
        "failed",
        "symbolic link loop",
        "generated",
    )
    os.symlink("self_link.dcm", fs / "self_link.dcm")
    add(
        "symbolic link to itself",
        "filesystem/self_link.dcm",
        "failed",
        "symbolic link loop",
        "generated",
    )
    os.symlink("gone.dcm", fs / "dangling.dcm")
    add(
        "dangling symbolic link",
        "filesystem/dangling.dcm",
        "failed",
        "broken symbolic link",
        "generated",
    )
    os.mkfifo(fs / "pipe.dcm")
    add("named pipe (FIFO)", "filesystem/pipe.dcm", "failed", "FIFO", "generated")
    bad_name = os.fsencode(fs) + b"/caf\xe9_latin1.dcm"
    with open(bad_name, "wb") as f:
        f.write(b"not DICOM, and a file name that is not UTF-8\n" * 4)
    add(
        "non-UTF-8 file name (broken content)",
        "filesystem/caf\\xe9_latin1.dcm",
        "failed",
        "not a DICOM file",
        "generated",
    )
    good_bad_name = os.fsencode(fs) + b"/\xff\xfe_good.dcm"
    with open(good_bad_name, "wb") as f:
        f.write(_good_image(32))
    add(
        "non-UTF-8 file name, valid image (control)",
        "filesystem/\\xff\\xfe_good.dcm",
        "predicted",
        None,
        "generated",
    )

    # 5. Archives.
    arc = root / "archives"
    arc.mkdir()
    with zipfile.ZipFile(arc / "traversal.zip", "w") as zf:
        zf.writestr("../escape.dcm", _good_image(40))
        zf.writestr("/etc/absolute.dcm", _good_image(41))
        zf.writestr("ok/inner.zip", b"PK\x05\x06" + bytes(18))
        zf.writestr("dup.dcm", _good_image(42))
        zf.writestr("dup.dcm", _good_image(43))
    add(
        "zip member with ../",
        "traversal.zip!/../escape.dcm",
        "failed",
        "'..' component",
        "generated",
    )
    add(
        "zip member with an absolute path",
        "traversal.zip!//etc/absolute.dcm",
        "failed",
        "absolute path",
        "generated",
    )
    add(
        "archive inside an archive",
        "traversal.zip!/ok/inner.zip",
        "failed",
        "archive inside an archive",
        "generated",
    )
    add(
        "zip with two members of one name (the shadowed first one)",
        "traversal.zip!/dup.dcm",
        "failed",
        "a later member has the same name",
        "generated",
    )
    add(
        "zip with two members of one name (the second, control)",
        "traversal.zip!/dup.dcm#2",
        "predicted",
        None,
        "generated",
    )
    _tar(
        arc / "twice.tar",
        [
            (tarfile.TarInfo("a.dcm"), _good_image(48)),
            (tarfile.TarInfo("./a.dcm"), _good_image(49)),
        ],
        "w",
    )
    add(
        "tar with two members of one name (first, control)",
        "twice.tar!/a.dcm",
        "predicted",
        None,
        "generated",
    )
    add(
        "tar with two members of one name (second, control)",
        "twice.tar!/a.dcm#2",
        "predicted",
        None,
        "generated",
    )

    enc = io.BytesIO()
    with zipfile.ZipFile(enc, "w") as zf:
        zf.writestr("secret.dcm", _good_image(44))
    raw = bytearray(enc.getvalue())
    struct.pack_into("<H", raw, 6, 1)  # local header: encrypted
    cd = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<H", raw, cd + 8, 1)  # central directory: encrypted
    (arc / "encrypted.zip").write_bytes(bytes(raw))
    add(
        "encrypted zip member",
        "encrypted.zip!/secret.dcm",
        "failed",
        "encrypted",
        "generated",
    )

    _zip_bomb(arc / "bomb.zip", bomb_bytes)
    add(
        f"zip bomb ({bomb_bytes // (1 << 20)} MiB of zeros)",
        "bomb.zip!/bomb.dcm",
        "failed",
        "zip bomb protection",
        "generated",
    )
    _overlapping_zip(arc / "overlap.zip", _good_image(45) + bytes(200_000))
    add(
        "overlapping-entries zip bomb (first entry)",
        "overlap.zip!/a.dcm",
        "failed",
        "overlaps another member",
        "generated",
    )
    add(
        "overlapping-entries zip bomb (second entry)",
        "overlap.zip!/b.dcm",
        "failed",
        "overlaps another member",
        "generated",
    )
    _gzip_tar_bomb(arc / "bomb.tar.gz", bomb_bytes)
    add(
        f"gzip-compressed tar bomb ({bomb_bytes // (1 << 20)} MiB of zeros)",
        "bomb.tar.gz!/zeros.dcm",
        "failed",
        "compression bomb protection",
        "generated",
    )
    rng = np.random.default_rng(5)
    (arc / "corrupt.zip").write_bytes(b"PK\x03\x04" + rng.bytes(4000))
    add("corrupt zip", "archives/corrupt.zip", "failed", "zip archive cannot be read", "generated")

    good = _good_image(46)
    _tar(
        arc / "links.tar",
        [
            (tarfile.TarInfo("/abs/path.dcm"), _good_image(47)),
            (_link("sym.dcm", tarfile.SYMTYPE, "/etc/passwd"), None),
            (_link("hard.dcm", tarfile.LNKTYPE, "/etc/shadow"), None),
            (_link("dev.dcm", tarfile.CHRTYPE, ""), None),
            (tarfile.TarInfo("good.dcm"), good),
        ],
        "w",
    )
    add(
        "tar member with an absolute path",
        "links.tar!//abs/path.dcm",
        "failed",
        "absolute path",
        "generated",
    )
    add(
        "tar symbolic-link member",
        "links.tar!/sym.dcm",
        "failed",
        "symbolic link",
        "generated",
    )
    add("tar hard-link member", "links.tar!/hard.dcm", "failed", "hard link", "generated")
    add("tar device member", "links.tar!/dev.dcm", "failed", "device file", "generated")
    add(
        "tar: a valid member after refused ones (control)",
        "links.tar!/good.dcm",
        "predicted",
        None,
        "generated",
    )

    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w:gz") as tf:
        for i in range(3):
            data = _good_image(50 + i) + rng.bytes(30_000)  # incompressible tail
            info = tarfile.TarInfo(f"m{i}.dcm")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    blob = full.getvalue()
    (arc / "truncated.tar.gz").write_bytes(blob[: len(blob) * 2 // 3])
    add(
        "truncated tar.gz (members before the cut, control)",
        "truncated.tar.gz!/m0.dcm",
        "predicted",
        None,
        "generated",
    )
    add(
        "truncated tar.gz",
        "archives/truncated.tar.gz",
        "failed",
        "corrupt or truncated",
        "generated",
    )

    # 6. pydicom / pydicom-data files.
    pyd = root / "pydicom"
    pyd.mkdir()

    def copy(name: str, *patches: tuple[tuple[int, int], str, str], to: str | None = None) -> str:
        data = Path(real(name)).read_bytes()
        for tag, old, new in patches:
            data = patch_value(data, tag, old, new)
        target = to or name
        (pyd / target).write_bytes(data)
        return f"pydicom/{target}"

    def cr(old: str) -> tuple[tuple[int, int], str, str]:
        return (MODALITY, old, "CR")

    add(
        "truncated pixel data (MR_truncated as CR)",
        copy("MR_truncated.dcm", cr("MR")),
        "failed",
        r"\(7FE0,0010\) 'Pixel Data' is truncated: 8130 bytes present, 8192 expected",
        "pydicom",
    )
    add(
        "JPEG 2000 codestream with a sequence delimiter inside (as a chest CR)",
        copy(
            "JPEG2000-embedded-sequence-delimiter.dcm",
            cr("NM"),
            (BODY_PART, "WHOLE BODY", "CHEST"),
        ),
        "failed",
        r"decoding JPEG 2000 .* failed with every available decoder",
        "pydicom",
    )
    add(
        "1-bit segmentation (liver_1frame as CR)",
        copy("liver_1frame.dcm", cr("SEG")),
        "failed",
        r"\(0028,0100\) 'Bits Allocated' value '1' is not supported",
        "pydicom",
    )
    add(
        "Structured Report, no pixel data (test-SR as CR)",
        copy("test-SR.dcm", cr("SR"), to="test-SR_as_CR.dcm"),
        "failed",
        r"'Pixel Data' is missing",
        "pydicom",
    )
    add(
        "Structured Report (wrong modality)",
        copy("test-SR.dcm"),
        "skipped",
        r"Modality 'SR' is not one of CR, DX",
        "pydicom",
    )
    add(
        "RT Plan (wrong modality, no pixel data)",
        copy("rtplan.dcm"),
        "skipped",
        r"Modality 'RTPLAN'",
        "pydicom",
    )
    add(
        "truncated RT Plan",
        copy("rtplan_truncated.dcm"),
        "failed",
        r"the file is truncated: it ends inside \(300A,00B0\) 'Beam Sequence'",
        "pydicom",
    )
    add(
        "big-endian data set without file meta (RT Plan)",
        copy("ExplVR_BigEndNoMeta.dcm"),
        "skipped",
        r"Modality 'RTPLAN'",
        "pydicom",
    )
    add(
        "ECG waveform (wrong modality)",
        copy("waveform_ecg.dcm"),
        "skipped",
        r"Modality 'ECG'",
        "pydicom",
    )
    add(
        "invalid IS value in Number of Frames (badVR)",
        copy("badVR.dcm"),
        "failed",
        r"\(0028,0008\) 'Number of Frames' value of '1A' is invalid",
        "pydicom",
    )
    add(
        "file meta without Transfer Syntax UID",
        copy("meta_missing_tsyntax.dcm"),
        "failed",
        r"'SOP Instance UID', .* are missing or empty",
        "pydicom",
    )
    add(
        "data set fragment with no UIDs (nested_priv_SQ)",
        copy("nested_priv_SQ.dcm"),
        "failed",
        r"are missing or empty; the instance cannot be identified",
        "pydicom",
    )
    add(
        "raw data set without preamble or UIDs (no_meta)",
        copy("no_meta.dcm"),
        "failed",
        r"not a DICOM file: there is no 'DICM' prefix",
        "pydicom",
    )
    add(
        "no Modality, GB18030 text, YBR_RCT JPEG 2000",
        copy("GDCMJ2K_TextGBR.dcm"),
        "skipped",
        r"Modality is missing",
        "pydicom",
    )
    add(
        "palette color (examples_palette as CR)",
        copy("examples_palette.dcm", cr("US")),
        "skipped",
        r"PhotometricInterpretation 'PALETTE COLOR' is not grayscale",
        "pydicom",
    )
    add(
        "RGB, odd size (SC_rgb_small_odd as CR)",
        copy("SC_rgb_small_odd.dcm", cr("OT")),
        "skipped",
        r"PhotometricInterpretation 'RGB' is not grayscale",
        "pydicom",
    )
    add(
        "YBR_FULL_422 multi-frame JPEG (examples_ybr_color as CR)",
        copy("examples_ybr_color.dcm", cr("US")),
        "skipped",
        r"NumberOfFrames is 30",
        "pydicom",
    )
    add(
        "multi-frame RLE (emri_small_RLE as a chest CR)",
        copy("emri_small_RLE.dcm", cr("MR"), (BODY_PART, "HEAD", "LUNG")),
        "skipped",
        r"NumberOfFrames is 10",
        "pydicom-data",
    )
    add(
        "gzip file that is not an archive (zipMR.gz)",
        copy("zipMR.gz"),
        "failed",
        r"not a DICOM file",
        "pydicom",
    )
    add(
        "DICOMDIR under another name",
        copy("dicomdirtests/DICOMDIR", to="index.dcm"),
        "skipped",
        r"a DICOMDIR index, not an image",
        "pydicom",
    )
    _hostile_and_degenerate(gen, add)
    return kinds


def _hostile_and_degenerate(gen: Path, add) -> None:
    """Issue #13: hostile header values and degenerate images (appended kinds)."""
    from pydicom.dataset import Dataset

    def lut(descriptor: list[int], vr: str = "US") -> Dataset:
        item = Dataset()
        item.add_new("LUTDescriptor", vr, descriptor)
        item.add_new("LUTData", "US", np.linspace(0, 65535, 4096).astype(int).tolist())
        return item

    def entry(seed, fname, name, outcome, reason, fact=None, **changes) -> None:
        ds, _ = _dataset(seed)
        for keyword, value in changes.items():
            if keyword == "pixels":
                ds.Rows, ds.Columns = value.shape
                ds.PixelData = value.astype(np.uint16).tobytes()
            elif keyword in ("VOILUTSequence", "ModalityLUTSequence"):
                setattr(ds, keyword, [lut(*value)])
            else:
                setattr(ds, keyword, value)
        (gen / fname).write_bytes(_bytes(ds))
        add(name, f"generated/{fname}", outcome, reason, "generated", fact)

    entry(
        60,
        "uid_holding_a_name.dcm",
        "Study Instance UID holding a name",
        "failed",
        r"^A \(0020,000D\) 'Study Instance UID' value is not a valid UID: it holds characters "
        r"other than digits and dots; a UID holds only those$",
        StudyInstanceUID="1.2.3.ZEBULON^QUIXOTEPHI",
    )
    entry(
        61,
        "accession_nul.dcm",
        "Accession Number with a NUL",
        "predicted",
        None,
        AccessionNumber="ACC\0NUL",
    )
    entry(
        62,
        "voi_function_nul.dcm",
        "VOI LUT Function with a NUL",
        "predicted",
        None,
        "window_rejected",
        VOILUTFunction="LIN\0EAR",
    )
    entry(
        63,
        "lut_explanation_name.dcm",
        "LUT Explanation holding a name (not stored)",
        "predicted",
        None,
        "window",
        VOILUTSequence=([4096, 0, 16],),
        LUTExplanation="ZEBULON^QUIXOTEPHI",
    )
    entry(
        64,
        "monochrome2_lower_case.dcm",
        "Photometric Interpretation in lower case",
        "predicted",
        None,
        "photometric",
        PhotometricInterpretation="monochrome2",
    )
    for seed, (rows, cols) in enumerate(((1, 1), (1, 5000), (4000, 1), (600, 100)), start=65):
        entry(
            seed,
            f"shape_{rows}x{cols}.dcm",
            f"{rows} x {cols} image",
            "skipped",
            rf"'Rows' x \(0028,0011\) 'Columns' {rows} x {cols}: .* not a radiograph",
            pixels=np.full((rows, cols), 1000),
        )
    entry(
        70,
        "constant.dcm",
        "constant image",
        "failed",
        r"the image is blank: every pixel of \(7FE0,0010\) 'Pixel Data' holds the stored value",
        pixels=np.full((64, 48), 1000),
    )
    entry(
        71,
        "window_saturates.dcm",
        "window that saturates the whole image",
        "failed",
        r"the image is nearly constant after \(0028,1050\) 'Window Center'",
        WindowCenter=60000,
        WindowWidth=10,
    )
    entry(
        72,
        "voi_lut_zero_bits.dcm",
        "VOI LUT with 0 bits per entry (NaN before)",
        "predicted",
        None,
        "window_rejected",
        VOILUTSequence=([4096, 0, 0],),
    )
    entry(
        73,
        "voi_lut_negative_bits.dcm",
        "VOI LUT with a negative bit count",
        "predicted",
        None,
        "window_rejected",
        VOILUTSequence=([4096, 0, -3], "SS"),
    )
    entry(
        74,
        "modality_lut_zero_bits.dcm",
        "Modality LUT with 0 bits per entry",
        "failed",
        r"\(0028,3000\) 'Modality LUT Sequence' item 1 \(0028,3002\) 'LUT Descriptor' "
        r"declares 0 bits per entry; it must be between 8 and 16",
        ModalityLUTSequence=([4096, 0, 0],),
    )
    entry(
        75,
        "rescale_overflow.dcm",
        "Rescale Slope that overflows",
        "failed",
        r"maps stored values to NaN or infinite values",
        RescaleSlope="1e308",
    )


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def remove(root: str | os.PathLike[str]) -> None:
    """Delete the corpus (restoring permissions first)."""
    root = Path(root)
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    shutil.rmtree(root, ignore_errors=True)
