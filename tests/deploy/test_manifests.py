"""Fan-out without Prefect: manifests, resumption, lost claims, and equality with one process.

Runs the plain functions of ``tasks/manifests.py`` and ``sql/manifests.py`` on SQLite and
PostgreSQL; ``test_fanout.py`` runs the same through a real Prefect server and two workers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from fanout_support import HMAC_KEY, assert_same_results, make_model, results, write_sources

from model.checkpoint import load_checkpoint
from sql import manifests as store
from sql.db import connect, session_factory
from sql.shards import write_shard
from tasks import manifests as fan
from tasks.dicom.discovery import discover
from tasks.dicom.selection import SelectionPolicy
from tasks.ingest import scan, scan_file, shards
from tasks.screening import ShardProcessor, close_run, open_run
from tasks.shard_loop import ShardLoop, ShardSteps

KEY = HMAC_KEY.encode()
# Laterals are screened too, so studies have two predicted images that manifests can split.
POLICY = SelectionPolicy(views=("PA", "AP", "LL"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fan_corpus")
    out = write_sources(root, 8)
    out["model"] = make_model(root / "model.pt")
    return out


def single_process(url: str, corpus: dict, shard_size: int = 6) -> dict:
    """The reference: the single-process screening path (the loop the screen flow runs)."""
    ckpt = load_checkpoint(corpus["model"])
    engine = connect(url)
    try:
        run = open_run(
            engine,
            ckpt,
            kind="reprocess",
            source="reference",
            parameters={},
            selection_policy=POLICY.to_dict(),
        )
        with ShardProcessor(ckpt, device="cpu", workers=0) as processor:
            tally = ShardLoop(ShardSteps(run, processor)).run(
                shards(scan(corpus["sources"], KEY, POLICY), shard_size)
            )
        close_run(run, tally.counts)
    finally:
        engine.dispose()
    return dict(tally.counts)


def parameters(ckpt, shard_size: int = 4) -> dict:
    return {
        "force": False,
        "reduced": True,
        "aggregation": "max",
        "shard_size": shard_size,
        "selection": POLICY.to_dict(),
        "model_sha256": ckpt.sha256,
        "key_fingerprint": fan.key_fingerprint(KEY),
    }


def plan(url: str, corpus: dict, spool: Path, *, job_key="job-1", manifest_size=5):
    ckpt = load_checkpoint(corpus["model"])
    engine = connect(url)
    sessions = session_factory(engine)
    try:
        job = fan.open_job(
            sessions, ckpt, job_key=job_key, source="test", parameters=parameters(ckpt)
        )
        manifests = fan.plan_job(
            sessions,
            job_key=job_key,
            sources=corpus["sources"],
            run_id=job.run_id,
            model_id=job.model_id,
            parameters=parameters(ckpt),
            manifest_size=manifest_size,
            spool_dir=spool,
        )
    except BaseException:
        engine.dispose()  # a leaked connection's ResourceWarning would land in a file's reason
        raise
    return engine, sessions, ckpt, job, manifests


def finish(sessions, job, *, force=False) -> dict:
    with sessions() as session:
        final = store.job_manifests(session, job.job_key)
    fan.aggregate_studies(
        sessions,
        fan.split_study_uids(final),
        model_id=job.model_id,
        run_id=job.run_id,
        aggregation="max",
        force=force,
    )
    counts = fan.job_counts(final)
    fan.close_job(sessions, job, counts=counts)
    return counts


def test_records_reopen_every_file_and_compressed_tar_needs_a_spool(corpus, tmp_path):
    with pytest.raises(fan.CompressedTarError, match=r"part\.tar\.gz is a compressed tar stream"):
        list(fan.file_records(corpus["sources"], job_key="j"))
    records = list(fan.file_records(corpus["sources"], job_key="j", spool_dir=tmp_path))
    originals = list(discover(corpus["sources"]))
    assert [r["uri"] for r in records] == [s.uri for s in originals]
    assert len(records) == corpus["files"]
    containers = Counter(r.get("container", "file") for r in records)
    assert containers["zip"] > 0 and containers["tar"] > 0
    for record, original in zip(records, originals, strict=True):
        assert "data" not in record
        if original.container == "inline":  # written out under the job's spool folder
            assert record["path"].startswith(str(fan.job_spool(tmp_path, "j")))
        copy = fan.from_record(record)
        if original.error is None:
            assert copy.read_bytes() == original.read_bytes()
        else:
            assert copy.error == original.error
    fan.remove_spool(tmp_path, "j")
    assert not fan.job_spool(tmp_path, "j").exists()


def test_fanout_equals_single_process_with_split_studies(
    corpus, db_url, database_factory, tmp_path
):
    reference = database_factory("sqlite" if db_url.startswith("sqlite") else "postgresql")
    expected_counts = single_process(reference, corpus)

    engine, sessions, ckpt, job, manifests = plan(db_url, corpus, tmp_path / "spool")
    assert sum(m.n_files for m in manifests) == corpus["files"]
    assert len(manifests) == -(-corpus["files"] // 5)
    with ShardProcessor(ckpt, device="cpu", workers=0) as processor:
        for m in reversed(manifests):  # any order: each manifest stands alone
            done = fan.screen_manifest(engine, m.manifest_id, processor, hmac_key=KEY, worker="w")
            assert done.manifest.done and done.files == m.n_files
    with sessions() as session:
        final = store.job_manifests(session, job.job_key)
    split = fan.split_study_uids(final)
    assert split, "the corpus must put some study's images in two manifests"
    # What a worker racing another one can leave behind: a study aggregated from part of it.
    with sessions.begin() as session:
        session.execute(
            sa.text(
                "UPDATE study_predictions SET n_images = 1, score = 0.0, label = false "
                "WHERE study_instance_uid = :s"
            ),
            [{"s": s} for s in split],
        )
    counts = finish(sessions, job)
    engine.dispose()

    assert {k: counts[k] for k in expected_counts} == expected_counts
    assert counts["files_seen"] == corpus["files"]
    assert_same_results(results(db_url), results(reference))
    engine = connect(db_url)
    with session_factory(engine)() as session:
        after = store.job_manifests(session, job.job_key)
        (run,) = session.execute(
            sa.text("SELECT status, files_seen FROM runs WHERE run_id = :r"), {"r": job.run_id}
        ).all()
        assert store.get_manifest(session, after[0].manifest_id).files == []  # compacted
    engine.dispose()
    assert run == ("completed", corpus["files"])
    assert all(m.done for m in after)


class Crashing(ShardProcessor):
    """A processor that dies (an exception) scoring its n-th chunk."""

    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.crash_at = crash_at

    def collect(self, pending, lookup=None):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("worker died mid-manifest")
        return super().collect(pending, lookup)


def test_a_worker_dying_mid_manifest_is_resumed_after_its_last_chunk(
    corpus, sqlite_url, database_factory, tmp_path
):
    reference = database_factory("sqlite")
    single_process(reference, corpus)
    engine, sessions, ckpt, job, manifests = plan(
        sqlite_url, corpus, tmp_path / "spool", manifest_size=1000
    )
    (only,) = manifests
    with (
        Crashing(ckpt, device="cpu", workers=0, crash_at=3) as crashing,
        pytest.raises(RuntimeError, match="died mid-manifest"),
    ):
        fan.screen_manifest(engine, only.manifest_id, crashing, hmac_key=KEY, worker="a")
    with sessions() as session:
        failed = store.get_manifest(session, only.manifest_id, with_files=False)
    assert (failed.status, failed.files_done, failed.attempts) == ("failed", 8, 1)  # 2 chunks
    assert "RuntimeError: worker died mid-manifest" in failed.error
    committed = sum(failed.counts.values())
    assert committed == 8

    # The resuming worker decodes in a process pool (overlapping decode with scoring).
    with ShardProcessor(ckpt, device="cpu", workers=1) as processor:
        resumed = fan.screen_manifest(engine, only.manifest_id, processor, hmac_key=KEY, worker="b")
    assert resumed.files == only.n_files - 8  # only what was left
    assert resumed.manifest.done and resumed.manifest.attempts == 2
    assert resumed.manifest.worker == "b"
    counts = finish(sessions, job)
    engine.dispose()
    assert counts["files_seen"] == corpus["files"]  # nothing counted twice
    assert_same_results(results(sqlite_url), results(reference))

    # Claiming a done manifest again does nothing.
    engine = connect(sqlite_url)
    with ShardProcessor(ckpt, device="cpu", workers=0) as processor:
        again = fan.screen_manifest(engine, only.manifest_id, processor, hmac_key=KEY, worker="c")
    assert again.already_done and again.files == 0
    engine.dispose()


def test_a_lost_claim_rolls_back_its_chunk(corpus, db_url, tmp_path):
    engine, sessions, ckpt, job, manifests = plan(db_url, corpus, tmp_path / "spool")
    first = manifests[0]
    with sessions.begin() as session:
        zombie = store.claim_manifest(session, first.manifest_id, worker="zombie")
    with sessions.begin() as session:
        store.claim_manifest(session, first.manifest_id, worker="replacement")
    with ShardProcessor(ckpt, device="cpu", workers=0) as processor:
        items = [scan_file(fan.from_record(r), POLICY, KEY) for r in zombie.files[:4]]
        rows = processor.process(items)
    with (
        pytest.raises(store.ManifestLost, match="claim 1 at file 0.*claim 2"),
        sessions.begin() as session,
    ):
        written = write_shard(
            session,
            run_id=job.run_id,
            model_id=job.model_id,
            instances=rows.instances,
            outcomes=rows.outcomes,
            predictions=rows.predictions,
        )
        store.record_progress(
            session,
            first.manifest_id,
            attempt=zombie.attempts,
            files_done_before=0,
            files=4,
            counts=rows.final_counts(written),
            study_uids=written.study_uids,
        )
    with sessions() as session:
        assert session.execute(sa.text("SELECT COUNT(*) FROM file_outcomes")).scalar() == 0
        current = store.get_manifest(session, first.manifest_id, with_files=False)
    assert (current.files_done, current.attempts, current.worker) == (0, 2, "replacement")
    # The zombie cannot mark the replacement's claim failed either.
    with sessions.begin() as session:
        assert not store.fail_manifest(session, first.manifest_id, attempt=1, error="zombie")
    engine.dispose()


def test_a_worker_with_another_key_or_model_is_refused(corpus, sqlite_url, tmp_path):
    engine, sessions, ckpt, job, manifests = plan(sqlite_url, corpus, tmp_path / "spool")
    # A worker whose database is not the parent's finds another job's manifest under the id
    # the parent sent: refused before the claim, so that job's manifest is left alone.
    with (
        ShardProcessor(ckpt, device="cpu", workers=0) as processor,
        pytest.raises(fan.FanoutMismatch, match="belongs to fan-out job 'job-1', not 'job-2'"),
    ):
        fan.screen_manifest(
            engine, manifests[0].manifest_id, processor, hmac_key=KEY, worker="w", job_key="job-2"
        )
    with sessions() as session:
        untouched = store.get_manifest(session, manifests[0].manifest_id, with_files=False)
    assert (untouched.status, untouched.attempts, untouched.worker) == ("pending", 0, None)
    with (
        ShardProcessor(ckpt, device="cpu", workers=0) as processor,
        pytest.raises(fan.FanoutMismatch, match="CXR_SCREEN_HMAC_KEY"),
    ):
        fan.screen_manifest(
            engine, manifests[0].manifest_id, processor, hmac_key=b"other", worker="w"
        )
    other = load_checkpoint(make_model(tmp_path / "other.pt", version="other-1", seed=1))
    with (
        ShardProcessor(other, device="cpu", workers=0) as processor,
        pytest.raises(fan.FanoutMismatch, match="same checkpoint at the same path"),
    ):
        fan.screen_manifest(engine, manifests[1].manifest_id, processor, hmac_key=KEY, worker="w")
    with sessions() as session:
        assert session.execute(sa.text("SELECT COUNT(*) FROM file_outcomes")).scalar() == 0
        statuses = {m.status for m in store.job_manifests(session, job.job_key)[:2]}
    assert statuses == {"failed"}
    engine.dispose()


def test_a_job_resumes_with_the_same_plan_and_refuses_a_changed_source(
    corpus, sqlite_url, tmp_path
):
    engine, sessions, _, job, manifests = plan(sqlite_url, corpus, tmp_path / "spool")
    fan.close_job(sessions, job, error="the parent died")
    engine.dispose()
    engine, sessions, _, again, replanned = plan(sqlite_url, corpus, tmp_path / "spool")
    assert again.resumed and not again.completed and again.run_id == job.run_id
    assert [m.manifest_id for m in replanned] == [m.manifest_id for m in manifests]
    with sessions() as session:
        status = session.execute(
            sa.text("SELECT status FROM runs WHERE run_id = :r"), {"r": job.run_id}
        ).scalar()
    assert status == "running"
    (corpus_tree := Path(corpus["tree"]) / "zz_late.dcm").write_bytes(b"arrived later")
    try:
        with pytest.raises(store.ManifestError, match="sources changed since the job started"):
            plan(sqlite_url, corpus, tmp_path / "spool")
    finally:
        corpus_tree.unlink()
    engine.dispose()
