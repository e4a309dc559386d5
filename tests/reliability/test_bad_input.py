"""Bad input through the real CLI: every entry ends skipped or failed with a clear reason, the
run completes, the counts add up and memory stays bounded."""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
import warnings
import zipfile

import bad_corpus
import pytest
import sqlalchemy as sa
from reliability_support import cli_env, drop_file_permission_override, run_cli

from tasks.dicom.discovery import discover
from tasks.ingest import estimate_total

# Peak RSS of the screening process (or of its largest child): torch, the model, a decode
# pool and a shard stay far below this; reading any of the 1 GiB bombs would not.
RSS_BOUND_MIB = 1536
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s+File \"", re.MULTILINE)


def outcome_rows(db_url: str) -> tuple[list[dict], list[dict]]:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM file_outcomes"))]
        runs = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM v_run_summary"))]
    engine.dispose()
    return rows, runs


@pytest.mark.slow
def test_bad_input_corpus_through_the_cli(open_tmp, prefect_api_url, model_path):
    corpus = open_tmp / "in"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom and zipfile warn about what is written
        kinds = bad_corpus.build(corpus)
    bad = [k for k in kinds if not k.control]
    assert len({k.name for k in bad}) >= 40
    work = open_tmp / "work"
    db_url = f"sqlite:///{work / 'results.db'}"
    # Overlapping sources on purpose: a folder, a folder inside it, an archive inside it.
    sources = [corpus, corpus / "generated", corpus / "archives" / "links.tar"]
    args = ["--model", str(model_path), "--db", db_url, "--shard-size", "8", "--workers", "1"]
    result = run_cli(
        ["screen", *map(str, sources), *args],
        cli_env(work / "home", prefect_api_url),
        work,
        timeout=1200,
        # as root, but obeying file permissions (mode 000 files must be unreadable)
        preexec_fn=drop_file_permission_override,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not TRACEBACK.search(result.stdout + result.stderr), result.stderr[-3000:]

    rows, runs = outcome_rows(db_url)
    (run,) = runs
    assert run["status"] == "completed"
    assert run["files_seen"] == len(kinds) == len(rows)
    assert run["predicted"] + run["skipped"] + run["failed"] == run["files_seen"]
    assert len({r["source_uri"] for r in rows}) == len(rows)  # one outcome per entry
    problems = []
    for kind in kinds:
        found = [r for r in rows if r["source_uri"].endswith(kind.uri_end)]
        if len(found) != 1:
            problems.append(f"{kind.name}: {len(found)} outcome rows end with {kind.uri_end!r}")
            continue
        (row,) = found
        if row["outcome"] != kind.outcome:
            problems.append(f"{kind.name}: {row['outcome']} ({row['reason']}), not {kind.outcome}")
        elif kind.reason is not None and not re.search(kind.reason, row["reason"] or ""):
            problems.append(f"{kind.name}: reason {row['reason']!r} !~ {kind.reason!r}")
        elif kind.outcome == "predicted" and row["reason"] is not None:
            problems.append(f"{kind.name}: predicted with a reason {row['reason']!r}")
        if kind.fact is not None and kind.fact not in (row["facts"] or {}):
            problems.append(f"{kind.name}: facts lack {kind.fact!r}: {row['facts']}")
    assert not problems, "\n".join(problems)
    # every skipped or failed entry says why, in a sentence rather than an exception name
    for row in rows:
        if row["outcome"] != "predicted":
            assert len(row["reason"]) >= 20 and "Traceback" not in row["reason"], row
    print(f"{len(kinds)} entries, {len(bad)} bad kinds; peak RSS {result.max_rss_kib} KiB")
    assert result.max_rss_kib < RSS_BOUND_MIB * 1024, f"peak RSS {result.max_rss_kib} KiB"
    # the run summary printed for the user matches the database
    table_row = next(line for line in result.stdout.splitlines() if line.startswith("│"))
    cells = [c.strip() for c in table_row.strip("│").split("│")]
    assert cells[:4] == [str(run[k]) for k in ("files_seen", "predicted", "skipped", "failed")]


def test_progress_estimate_never_opens_a_fifo(tmp_path):
    """A named pipe in a drop folder once hung the run before its first file (the progress
    estimate opened it to sniff for an archive, waiting forever for a writer)."""
    (tmp_path / "a.dcm").write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.dcm")
    totals: list = []
    worker = threading.Thread(target=lambda: totals.append(estimate_total([tmp_path])))
    worker.daemon = True
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # unblock the reader before failing
        fd = os.open(tmp_path / "pipe.dcm", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=10)
        pytest.fail("estimate_total blocked opening a FIFO")
    assert totals == [2]
    assert [e.error for e in discover([tmp_path / "pipe.dcm"])] == ["not a regular file but a FIFO"]


def test_every_discovered_entry_has_its_own_uri(tmp_path):
    """Outcomes are keyed by URI: the same file named twice, or two archive members of one
    name, once ended the whole run ("outcome dict ... appears twice in the shard")."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.dcm").write_bytes(b"a")
    (tree / "b.dcm").write_bytes(b"b")
    os.symlink(tree / "sub", tmp_path / "link_to_sub")
    zpath = tree / "dups.zip"
    with zipfile.ZipFile(zpath, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("x.dcm", b"first")
        zf.writestr("x.dcm", b"second")
        zf.writestr("y/./z.dcm", b"z1")
        zf.writestr("y/z.dcm", b"z2")
    tpath = tree / "dups.tar"
    with tarfile.open(tpath, "w") as tf:
        for name, data in (("m.dcm", b"1"), ("./m.dcm", b"2"), ("m.dcm", b"3"), ("m.dcm#2", b"4")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sources = [
        tree / "sub" / "a.dcm",  # a file, then the tree holding it
        tree,
        tree,  # the tree again
        tree / "sub",  # a folder inside it
        tmp_path / "link_to_sub",  # the same folder through a link
        zpath,  # an archive inside it
        tree / "b.dcm",
    ]
    found = list(discover(sources))
    uris = [e.uri.removeprefix(str(tmp_path) + "/") for e in found]
    assert len(uris) == len(set(uris)), uris
    assert uris == [
        "tree/sub/a.dcm",
        "tree/b.dcm",
        "tree/dups.tar!/m.dcm",
        "tree/dups.tar!/m.dcm#2",
        "tree/dups.tar!/m.dcm#3",
        "tree/dups.tar!/m.dcm#2#2",
        "tree/dups.zip!/x.dcm",
        "tree/dups.zip!/x.dcm#2",
        "tree/dups.zip!/y/z.dcm",
        "tree/dups.zip!/y/z.dcm#2",
    ]
    data = {
        u: (e.error, e.read_bytes() if e.error is None else None)
        for u, e in zip(uris, found, strict=True)
    }
    assert [data[f"tree/dups.tar!/{n}"][1] for n in ("m.dcm", "m.dcm#2", "m.dcm#3")] == [
        b"1",
        b"2",
        b"3",
    ]
    assert "a later member has the same name" in data["tree/dups.zip!/x.dcm"][0]
    assert data["tree/dups.zip!/x.dcm#2"][1] == b"second"
    assert {data["tree/dups.zip!/y/z.dcm"][1], data["tree/dups.zip!/y/z.dcm#2"][1]} == {
        b"z1",
        b"z2",
    }
