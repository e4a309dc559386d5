"""Discovery over real trees and archives: order, URIs, streaming, and every unsafe case."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import pickle
import shutil
import stat
import struct
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tasks.dicom.discovery import ArchiveLimits, SourceFile, discover
from tasks.dicom.headers import read_header
from tasks.dicom.outcomes import InputError

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))
KEY = b"test-key"


def uris(entries: list[SourceFile], root: Path) -> list[str]:
    """URIs relative to ``root`` (the part after it) for readable assertions."""
    prefix = str(root) + "/"
    return [e.uri.removeprefix(prefix) for e in entries]


def errors(entries: list[SourceFile]) -> dict[str, str]:
    return {e.uri.rsplit("/", 1)[-1]: e.error for e in entries if e.error is not None}


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data))


def add_special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tf.addfile(info)


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    root = tmp_path / "drop"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "c.dcm").mkdir()  # a directory that looks like a file
    shutil.copy(CT, root / "a" / "ct.dcm")
    shutil.copy(MR, root / "b" / "deep" / "MR1")  # no extension, as PACS exports often are
    shutil.copy(CT, root / "c.dcm" / "inner.dcm")
    (root / "a" / "DICOMDIR").write_bytes(b"index")
    (root / "b" / "dicomdir").write_bytes(b"index")
    (root / ".hidden").mkdir()
    shutil.copy(CT, root / ".hidden" / "secret.dcm")
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "readme.txt").write_text("not an image")
    with zipfile.ZipFile(root / "z.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(CT, "study/ct.dcm")
        zf.write(MR, "study/mr.dcm")
        zf.writestr("study/", b"")
        zf.writestr("__MACOSX/study/._ct.dcm", b"appledouble")
        zf.writestr("study/DICOMDIR", b"index")
    with tarfile.open(root / "t.tar", "w") as tf:
        tf.add(CT, "./x/ct.dcm")
    with tarfile.open(root / "g.tar.gz", "w:gz") as tf:
        tf.add(MR, "y/mr.dcm")
        tf.add(CT, "y/ct.dcm")
    return root


def test_mixed_tree_order_and_uris(mixed_tree: Path) -> None:
    found = list(discover([mixed_tree]))
    assert uris(found, mixed_tree) == [
        "a/ct.dcm",
        "b/deep/MR1",
        "c.dcm/inner.dcm",
        "g.tar.gz!/y/mr.dcm",
        "g.tar.gz!/y/ct.dcm",
        "readme.txt",
        "t.tar!/x/ct.dcm",
        "z.zip!/study/ct.dcm",
        "z.zip!/study/mr.dcm",
    ]
    assert all(e.error is None for e in found)
    assert all(e.uri.startswith(str(mixed_tree) + "/") for e in found)
    containers = {e.uri.rsplit("!", 1)[0].rsplit("/", 1)[-1]: e.container for e in found}
    assert containers["g.tar.gz"] == "inline"
    assert containers["t.tar"] == "tar"
    assert containers["z.zip"] == "zip"
    # Stable: the same answer again, and sources are taken in the order given.
    assert list(discover([mixed_tree])) == found
    single = list(discover([mixed_tree / "readme.txt", mixed_tree / "a" / "ct.dcm"]))
    assert [e.uri.rsplit("/", 1)[-1] for e in single] == ["readme.txt", "ct.dcm"]


def test_files_named_as_sources_are_yielded_whatever_their_name(mixed_tree: Path) -> None:
    """A walk leaves out DICOMDIR and hidden names; a file named on the command line is not
    left out, also when a directory given before or after it holds it, and is read once."""
    named = [
        mixed_tree / "a" / "DICOMDIR",
        mixed_tree / ".hidden" / "secret.dcm",
        mixed_tree / "a" / ".DS_Store",
    ]
    for order in ([mixed_tree, *named], [*named, mixed_tree]):
        found = uris(list(discover(order)), mixed_tree)
        for path in named:
            assert found.count(str(path.relative_to(mixed_tree))) == 1, (order, found)
        assert found.count("a/ct.dcm") == 1
        assert "b/dicomdir" not in found  # not named: the walk still leaves it out
    # a file the walk does yield is still read once when it is also named
    again = uris(list(discover([mixed_tree, mixed_tree / "a" / "ct.dcm"])), mixed_tree)
    assert again.count("a/ct.dcm") == 1


def test_an_image_named_dicomdir_gets_a_header(tmp_path: Path) -> None:
    shutil.copy(CT, tmp_path / "DICOMDIR")
    (entry,) = discover([tmp_path, tmp_path / "DICOMDIR"])
    assert read_header(entry, KEY).modality == "CT"


def test_every_member_reads_back_its_bytes(mixed_tree: Path) -> None:
    originals = {"ct.dcm": CT.read_bytes(), "mr.dcm": MR.read_bytes(), "MR1": MR.read_bytes()}
    originals["inner.dcm"] = CT.read_bytes()
    for entry in discover([mixed_tree]):
        name = entry.uri.rsplit("/", 1)[-1]
        if name == "readme.txt":
            continue
        data = entry.read_bytes()
        assert data == originals[name], entry.uri
        assert entry.size == len(data)
        with entry.open() as fp:  # seekable, as pydicom needs
            fp.seek(128)
            assert fp.read(4) == b"DICM"
        header = read_header(entry, KEY)
        assert header.source_uri == entry.uri


def test_source_files_pickle_and_reopen_in_another_process(mixed_tree: Path) -> None:
    found = [e for e in discover([mixed_tree]) if not e.uri.endswith("readme.txt")]
    assert {e.container for e in found} == {"file", "zip", "tar", "inline"}
    assert [pickle.loads(pickle.dumps(e)) for e in found] == found
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        remote = pool.map(SourceFile.read_bytes, found)
    assert remote == [e.read_bytes() for e in found]


def test_discovery_is_a_lazy_generator(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "z").mkdir()
    shutil.copy(CT, tmp_path / "a" / "1.dcm")
    gen = discover([tmp_path])
    assert isinstance(gen, types.GeneratorType)
    first = next(gen)
    assert first.uri.endswith("a/1.dcm")
    # The rest of the tree has not been listed yet: a file added now is still found.
    shutil.copy(CT, tmp_path / "z" / "late.dcm")
    assert [e.uri.rsplit("/", 1)[-1] for e in gen] == ["late.dcm"]


def test_missing_source_and_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.dcm")  # opening it would block; discovery must not
    (tmp_path / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    found = list(discover([tmp_path, tmp_path / "absent"]))
    errs = errors(found)
    assert errs["pipe.dcm"] == "not a regular file but a FIFO"
    assert errs["dangling.dcm"].startswith("broken symbolic link: its target")
    assert "nowhere.dcm" in errs["dangling.dcm"]
    assert errs["loop1"].startswith("symbolic link loop")
    assert errs["loop2"].startswith("symbolic link loop")
    assert errs["absent"] == "No such file or directory"
    with pytest.raises(InputError, match="FIFO"):
        read_header(next(e for e in found if e.uri.endswith("pipe.dcm")), KEY)


def test_symlinked_directory_loop_is_reported_once(tmp_path: Path) -> None:
    (tmp_path / "study" / "series").mkdir(parents=True)
    shutil.copy(CT, tmp_path / "study" / "series" / "1.dcm")
    (tmp_path / "study" / "series" / "back").symlink_to(tmp_path / "study")
    (tmp_path / "alias").symlink_to(tmp_path / "study")  # same directory, walked once
    found = list(discover([tmp_path]))
    assert uris(found, tmp_path) == ["alias/series/1.dcm", "alias/series/back"]
    assert found[0].error is None
    assert found[1].error is not None
    assert "symbolic link loop" in found[1].error
    assert "not followed" in found[1].error


def test_non_utf8_file_names_are_usable(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.dcm")  # Latin-1 name on a UTF-8 system
    shutil.copy(CT, os.path.join(tmp_path, name))
    tar_path = tmp_path / "names.tar.gz"
    with tarfile.open(tar_path, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        add_bytes(tf, name, CT.read_bytes())
    found = list(discover([tmp_path]))
    assert [e.uri.rsplit("/", 1)[-1] for e in found] == ["caf\\xe9.dcm", "caf\\xe9.dcm"]
    for entry in found:
        assert entry.error is None
        entry.uri.encode("utf-8")  # storable and printable
        assert read_header(entry, KEY).modality == "CT"


def _unprivileged(fn):
    """Run ``fn`` where permissions apply: as is for a normal user, in a forked child that
    drops to ``nobody`` when the tests run as root (root reads any file)."""
    if os.geteuid() != 0:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = json.dumps(fn())
        except BaseException as exc:
            out = json.dumps({"child_error": repr(exc)})
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fp:
        data = fp.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_unreadable_file_and_directory() -> None:
    root = Path(tempfile.mkdtemp(prefix="cxr-perm-"))
    try:
        root.chmod(0o755)
        shutil.copy(CT, root / "locked.dcm")
        (root / "locked.dcm").chmod(0)
        (root / "closed").mkdir()
        shutil.copy(CT, root / "closed" / "hidden-inside.dcm")
        (root / "closed").chmod(0)

        def scan() -> dict[str, str]:
            out = {}
            for entry in discover([root]):
                name = entry.uri.rsplit("/", 1)[-1]
                try:
                    read_header(entry, KEY)
                    out[name] = "read"
                except InputError as exc:
                    out[name] = str(exc)
            return out

        scan()  # as root first: imports everything the child will need
        result = _unprivileged(scan)
    finally:
        (root / "closed").chmod(0o755)
        shutil.rmtree(root)
    assert result == {
        "closed": "cannot list the directory: Permission denied",
        "locked.dcm": "cannot open the file: Permission denied",
    }


# --- unsafe and broken archives ----------------------------------------------------------------


def test_unsafe_tar_members_are_refused_one_by_one(tmp_path: Path) -> None:
    ct = CT.read_bytes()
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        path = tmp_path / f"evil{suffix}"
        with tarfile.open(path, mode) as tf:
            add_bytes(tf, "ok/first.dcm", ct)
            add_bytes(tf, "../escape.dcm", ct)
            add_bytes(tf, "/etc/abs.dcm", ct)
            add_bytes(tf, "a/../../up.dcm", ct)
            add_special(tf, "link.dcm", tarfile.SYMTYPE, "/etc/passwd")
            add_special(tf, "hard.dcm", tarfile.LNKTYPE, "ok/first.dcm")
            add_special(tf, "dev.dcm", tarfile.CHRTYPE)
            add_special(tf, "fifo.dcm", tarfile.FIFOTYPE)
            add_bytes(tf, "nested.zip", b"PK\x05\x06" + bytes(18))
            add_bytes(tf, "ok/last.dcm", ct)
        found = list(discover([path]))
        assert [e.error is None for e in found] == [True] + [False] * 8 + [True], suffix
        reasons = [e.error for e in found[1:-1]]
        assert all(r.startswith("archive member refused: ") for r in reasons)
        assert "'..' component" in reasons[0] and "path traversal" in reasons[0]
        assert "absolute path" in reasons[1]
        assert "'..' component" in reasons[2]
        assert "symbolic link (to '/etc/passwd')" in reasons[3]
        assert "hard link (to 'ok/first.dcm')" in reasons[4]
        assert "device file" in reasons[5]
        assert "FIFO" in reasons[6]
        assert "archive inside an archive" in reasons[7]
        assert found[-1].read_bytes() == ct
        for refused in found[1:-1]:
            with pytest.raises(InputError, match="archive member refused"):
                refused.open()


def test_unsafe_zip_members_are_refused_one_by_one(tmp_path: Path) -> None:
    ct = CT.read_bytes()
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok/first.dcm", ct)
        zf.writestr("../escape.dcm", ct)
        zf.writestr(zipfile.ZipInfo("/abs.dcm"), ct)
        zf.writestr(zipfile.ZipInfo("C:/windows.dcm"), ct)
        zf.writestr("sub\\..\\..\\backslash.dcm", ct)
        link = zipfile.ZipInfo("link.dcm")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("bomb.dcm", bytes(4 * 1024 * 1024))  # 4 MiB of zeros: ~1000:1
        zf.writestr("inner.tar.gz", b"\x1f\x8b")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("twice.dcm", b"first")
            zf.writestr("twice.dcm", ct)
        zf.writestr("ok/last.dcm", ct)
    found = list(discover([path]))
    errs = [e.error for e in found]
    assert errs[0] is None and errs[-1] is None and errs[-2] is None
    assert "'..' component" in errs[1]
    assert "absolute path" in errs[2]
    assert "drive letter" in errs[3]
    assert "'..' component" in errs[4]
    assert "symbolic link" in errs[5]
    assert "expand" in errs[6] and "above the limit of 200:1" in errs[6]
    assert "archive inside an archive" in errs[7]
    assert "a later member has the same name" in errs[8]
    assert found[-2].read_bytes() == ct  # the second twice.dcm
    assert found[-1].read_bytes() == ct


def test_zip_with_overlapping_and_encrypted_entries(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("aa.dcm", CT.read_bytes())
        zf.writestr("lk.dcm", b"secret")
    raw = bytearray(buf.getvalue())
    eocd = raw.rindex(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", raw[eocd + 12 : eocd + 20])
    first = raw.index(b"PK\x01\x02", cd_offset)
    second = raw.index(b"PK\x01\x02", first + 4)
    # Mark the second member encrypted (general purpose bit 0, local and central headers).
    local_second = struct.unpack("<I", raw[second + 42 : second + 46])[0]
    raw[local_second + 6] |= 1
    raw[second + 8] |= 1
    # Add a third central entry pointing at the first member's data under another name.
    clone = bytearray(raw[first:second])
    clone[46 : 46 + 6] = b"bb.dcm"
    raw[eocd:eocd] = clone
    eocd += len(clone)
    count = struct.unpack("<H", raw[eocd + 10 : eocd + 12])[0] + 1
    raw[eocd + 8 : eocd + 12] = struct.pack("<HH", count, count)
    raw[eocd + 12 : eocd + 16] = struct.pack("<I", cd_size + len(clone))
    path = tmp_path / "crafted.zip"
    path.write_bytes(bytes(raw))

    found = list(discover([path]))
    assert [e.uri.rsplit("/", 1)[-1] for e in found] == ["aa.dcm", "lk.dcm", "bb.dcm"]
    assert "overlaps another member" in found[0].error
    assert "encrypted" in found[1].error
    assert "overlaps another member" in found[2].error


def test_compressed_tar_bomb_is_refused_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tgz"
    with tarfile.open(path, "w:gz") as tf:
        add_bytes(tf, "zeros.dcm", bytes(32 * 1024 * 1024))  # ~1000:1
        add_bytes(tf, "after.dcm", CT.read_bytes())
    found = list(discover([path]))
    assert found[0].data is None
    assert "above the limit of 200:1" in found[0].error
    assert "compression bomb" in found[0].error
    assert found[1].error is None
    assert found[1].read_bytes() == CT.read_bytes()
    # A tighter ratio refuses a smaller member: the rule, not the example, is what counts.
    small = tmp_path / "small.tgz"
    with tarfile.open(small, "w:gz") as tf:
        add_bytes(tf, "zeros.dcm", bytes(4 * 1024 * 1024))
    relaxed, strict = ArchiveLimits(), ArchiveLimits(max_ratio=20)
    assert next(discover([small], relaxed)).error is None
    assert "above the limit of 20:1" in next(discover([small], strict)).error


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz"])
def test_member_count_total_and_size_limits(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"many{suffix}"
    blobs = [os.urandom(3000) for _ in range(5)]
    if suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for i, blob in enumerate(blobs):
                zf.writestr(f"{i}.dcm", blob)
    else:
        with tarfile.open(path, "w:gz" if suffix == ".tar.gz" else "w") as tf:
            for i, blob in enumerate(blobs):
                add_bytes(tf, f"{i}.dcm", blob)

    found = list(discover([path], ArchiveLimits(max_members=3)))
    assert [e.error is None for e in found] == [True, True, True, False]
    assert found[3].uri == str(path)
    assert "more than the limit of 3" in found[3].error and "not read" in found[3].error

    found = list(discover([path], ArchiveLimits(max_total_bytes=7000)))
    assert [e.error is None for e in found] == [True, True, False]
    assert "more than the limit of 7,000 bytes" in found[2].error

    found = list(discover([path], ArchiveLimits(max_member_bytes=2999)))
    assert len(found) == 5
    assert all("more than the per-member limit of 2,999" in e.error for e in found)
    assert [e.read_bytes() for e in discover([path])] == blobs


def test_corrupt_archives_give_one_error_each(tmp_path: Path) -> None:
    junk = os.urandom(4096)
    for name in ("junk.zip", "junk.tar", "junk.tar.gz", "empty.tgz"):
        (tmp_path / name).write_bytes(b"" if name.startswith("empty") else junk)
    gz_junk = tmp_path / "notatar.tar.gz"
    gz_junk.write_bytes(gzip.compress(junk))
    found = list(discover([tmp_path]))
    assert len(found) == 5
    assert all(e.error is not None for e in found)
    by_name = errors(found)
    assert by_name["junk.zip"].startswith("zip archive cannot be read")
    assert by_name["junk.tar"].startswith("tar archive cannot be read")
    assert by_name["junk.tar.gz"].startswith("tar archive cannot be read")
    assert by_name["empty.tgz"].startswith("tar archive cannot be read")
    assert by_name["notatar.tar.gz"].startswith("gzip-compressed tar archive cannot be read")


def test_truncated_archives_keep_what_was_read(tmp_path: Path) -> None:
    big = os.urandom(200_000)  # incompressible, so a cut lands inside it
    source = tmp_path / "src"
    source.mkdir()
    whole_gz = source / "whole.tar.gz"
    whole_tar = source / "whole.tar"
    for path, mode in ((whole_gz, "w:gz"), (whole_tar, "w")):
        with tarfile.open(path, mode) as tf:
            add_bytes(tf, "first.dcm", CT.read_bytes())
            add_bytes(tf, "big.dcm", big)
            add_bytes(tf, "third.dcm", MR.read_bytes())

    cut = tmp_path / "cut"
    cut.mkdir()
    data = whole_gz.read_bytes()
    (cut / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    data = whole_tar.read_bytes()
    (cut / "cut-data.tar").write_bytes(data[:100_000])
    third_header = data.index(b"third.dcm")
    (cut / "cut-header.tar").write_bytes(data[: third_header + 100])
    corrupt = bytearray(data)
    corrupt[third_header + 148 : third_header + 156] = b"garbage!"  # header checksum
    (cut / "bad-header.tar").write_bytes(bytes(corrupt))

    found = list(discover([cut]))
    got = [(e.uri.removeprefix(str(cut) + "/"), e.error) for e in found]
    assert [u for u, _ in got] == [
        "bad-header.tar!/first.dcm",
        "bad-header.tar!/big.dcm",
        "bad-header.tar",
        "cut-data.tar!/first.dcm",
        "cut-data.tar!/big.dcm",
        "cut-header.tar!/first.dcm",
        "cut-header.tar!/big.dcm",
        "cut-header.tar",
        "cut.tar.gz!/first.dcm",
        "cut.tar.gz",
    ]
    errs = dict(got)
    assert errs["bad-header.tar!/first.dcm"] is None
    assert "invalid member header" in errs["bad-header.tar"]
    assert "is corrupt or truncated after 2 member(s)" in errs["bad-header.tar"]
    assert "runs past the end of the archive" in errs["cut-data.tar!/big.dcm"]
    assert "ends inside a member header" in errs["cut-header.tar"]
    assert errs["cut.tar.gz!/first.dcm"] is None
    assert errs["cut.tar.gz"].startswith("gzip-compressed tar archive is corrupt or truncated")
    assert found[0].read_bytes() == CT.read_bytes()


def test_archive_limits_validate() -> None:
    with pytest.raises(ValueError, match="max_members should be at least 1 instead of 0"):
        ArchiveLimits(max_members=0)
    with pytest.raises(ValueError, match="max_ratio"):
        ArchiveLimits(max_ratio=0.5)
