"""One instance is one instance: copies are told apart by content fingerprints, not bytes.

A copy with the same pixel fingerprint (another encoding, other bytes) is *skipped* as a
duplicate naming the instance, the run that predicted it and the file it came from, within a
shard, across shards, runs and sources; a copy with other pixels is a UID conflict; a copy that
cannot be compared fails without being called a conflict. On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from conftest import Shard, file_entry, model_metadata, sha

from sql import predictions, runs, shards

UID = "1.2.826.0.1.3680043.3.0"
PIXELS = "px1:" + sha("pixels")
LOSSY = "px1:" + sha("lossy pixels")
CODESTREAM = "cs1:" + sha("j2k codestream")


def copy(
    shard: Shard,
    uri: str,
    *,
    content: str,
    pixel: str | None = PIXELS,
    codestream: str | None = None,
    score: float = 0.3,
) -> None:
    """A file holding instance 0 (bytes differ with ``content``) and its fingerprints."""
    file_entry(shard, 0, uri=uri, content=content, score=score)
    shard.instances[-1].update(pixel_fingerprint=pixel, codestream_fingerprint=codestream)


def write(Session, run_id, model_id, shard: Shard, force=False) -> shards.ShardResult:
    with Session.begin() as session:
        result = shards.write_shard(
            session, run_id=run_id, model_id=model_id, force=force, **shard.kwargs()
        )
        predictions.upsert_study_predictions(
            session, model_id, run_id, study_uids=result.study_uids, force=force
        )
    return result


def new_run(Session, model_id) -> int:
    with Session.begin() as session:
        return runs.start_run(session, kind="reprocess", source="/data", model_id=model_id)


def outcome(engine, uri: str) -> dict:
    with engine.connect() as conn:
        return dict(
            conn.execute(sa.text("SELECT * FROM file_outcomes WHERE source_uri = :u"), {"u": uri})
            .mappings()
            .one()
        )


def count(engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def test_a_lossless_copy_in_the_same_shard_is_a_duplicate(Session, engine, model_run):
    model_id, run_id = model_run
    shard = Shard()
    copy(shard, "file:///pacs/original.dcm", content="explicit VR")
    copy(shard, "file:///export/implicit.dcm", content="implicit VR")
    result = write(Session, run_id, model_id, shard)
    assert result.outcome_counts == {"predicted": 1, "skipped": 1, "failed": 0}
    assert result.conflicts == ()
    dup = outcome(engine, "file:///export/implicit.dcm")
    assert dup["outcome"] == "skipped"
    assert dup["reason"] == (
        f"duplicate: SOP Instance UID {UID} was already predicted in run {run_id} from "
        "file:///pacs/original.dcm, and this copy has the same content (pixel fingerprint); "
        "not predicted again"
    )
    assert dup["pixel_fingerprint"] == PIXELS
    assert dup["content_sha256"] == sha(f"{UID}|implicit VR")
    assert count(engine, "uid_conflicts") == 0
    assert count(engine, "image_predictions") == 1


def test_across_shards_runs_and_sources(Session, engine, model_run):
    model_id, run_id = model_run
    first, second = Shard(), Shard()
    copy(first, "file:///pacs/original.dcm", content="explicit VR")
    copy(second, "file:///export/jpegls.dcm", content="JPEG-LS lossless")
    write(Session, run_id, model_id, first)
    write(Session, run_id, model_id, second)  # a later shard of the same run
    assert (
        f"predicted in run {run_id} from file:///pacs/original.dcm"
        in (outcome(engine, "file:///export/jpegls.dcm")["reason"])
    )

    later = new_run(Session, model_id)
    archive = Shard()
    copy(archive, "zip:///old/archive.zip!/a.dcm", content="RLE")
    result = write(Session, later, model_id, archive)
    assert result.outcome_counts == {"predicted": 0, "skipped": 1, "failed": 0}
    assert result.duplicates[0]["reason"].startswith(
        f"duplicate: SOP Instance UID {UID} was already predicted in run {run_id} from "
        "file:///pacs/original.dcm"
    )
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT run_id FROM image_predictions")).scalar_one() == run_id


def test_a_lossy_copy_under_the_same_uid_stays_a_conflict(Session, engine, model_run):
    model_id, run_id = model_run
    original, lossy = Shard(), Shard()
    copy(original, "file:///pacs/original.dcm", content="explicit VR", score=0.1)
    copy(lossy, "file:///export/lossy.dcm", content="JPEG baseline", pixel=LOSSY, score=0.9)
    write(Session, run_id, model_id, original)
    result = write(Session, new_run(Session, model_id), model_id, lossy)
    assert result.outcome_counts == {"predicted": 0, "skipped": 0, "failed": 1}
    failed = outcome(engine, "file:///export/lossy.dcm")
    assert failed["outcome"] == "failed"
    assert "was already stored from file:///pacs/original.dcm" in failed["reason"]
    assert "has different content (pixel fingerprint" in failed["reason"]
    assert "recorded in uid_conflicts" in failed["reason"]
    with engine.connect() as conn:
        conflict = conn.execute(sa.text("SELECT * FROM uid_conflicts")).mappings().one()
        score = conn.execute(sa.text("SELECT score FROM image_predictions")).scalar_one()
    assert conflict["new_source_uri"] == "file:///export/lossy.dcm"
    assert score == 0.1


def test_the_same_codestream_is_the_same_content(Session, engine, model_run):
    """A file decoded at reduced resolution has a codestream fingerprint only: another file
    with that codestream (other header bytes) is a duplicate; one with only a pixel
    fingerprint cannot be compared with it and fails, without a conflict."""
    model_id, run_id = model_run
    shard = Shard()
    copy(shard, "file:///a/j2k.dcm", content="j2k", pixel=None, codestream=CODESTREAM)
    copy(shard, "file:///b/j2k-renamed.dcm", content="j2k, new header", pixel=None,
         codestream=CODESTREAM)  # fmt: skip
    copy(shard, "file:///c/uncompressed.dcm", content="native")
    result = write(Session, run_id, model_id, shard)
    assert result.outcome_counts == {"predicted": 1, "skipped": 1, "failed": 1}
    assert "(codestream fingerprint)" in outcome(engine, "file:///b/j2k-renamed.dcm")["reason"]
    failed = outcome(engine, "file:///c/uncompressed.dcm")["reason"]
    assert failed.startswith(f"SOP Instance UID {UID} was already stored from file:///a/j2k.dcm")
    assert "could not be compared with it (the stored copy has codestream fingerprint, this " in (
        failed
    )
    assert "not recorded in uid_conflicts" in failed
    assert count(engine, "uid_conflicts") == 0


def test_fingerprints_of_another_scheme_are_not_compared(Session, engine, model_run):
    model_id, run_id = model_run
    shard = Shard()
    copy(shard, "file:///a/old.dcm", content="a")
    copy(shard, "file:///b/new.dcm", content="b", pixel="px2:" + sha("pixels, new scheme"))
    result = write(Session, run_id, model_id, shard)
    assert result.outcome_counts == {"predicted": 1, "skipped": 0, "failed": 1}
    assert "could not be compared" in outcome(engine, "file:///b/new.dcm")["reason"]
    assert count(engine, "uid_conflicts") == 0


def test_a_row_from_before_fingerprints_gains_them_from_a_copy_with_the_same_bytes(
    Session, engine, model_run
):
    model_id, run_id = model_run
    legacy = Shard()
    copy(legacy, "file:///pacs/original.dcm", content="explicit VR", pixel=None)
    write(Session, run_id, model_id, legacy)

    same_bytes = Shard()
    copy(same_bytes, "file:///pacs/original.dcm", content="explicit VR")
    write(Session, new_run(Session, model_id), model_id, same_bytes)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT pixel_fingerprint FROM instances")).scalar_one()
    assert stored == PIXELS

    transcoded = Shard()
    copy(transcoded, "file:///export/implicit.dcm", content="implicit VR")
    result = write(Session, new_run(Session, model_id), model_id, transcoded)
    assert result.outcome_counts["skipped"] == 1


def test_rewriting_the_predicted_file_is_not_a_duplicate_of_itself(Session, engine, model_run):
    """--force recomputes the file that holds the prediction; a copy beside it in the same run
    is still a duplicate."""
    model_id, run_id = model_run
    first = Shard()
    copy(first, "file:///pacs/original.dcm", content="explicit VR", score=0.2)
    write(Session, run_id, model_id, first)

    again = Shard()
    copy(again, "file:///pacs/original.dcm", content="explicit VR", score=0.8)
    copy(again, "file:///export/implicit.dcm", content="implicit VR", score=0.8)
    forced = new_run(Session, model_id)
    result = write(Session, forced, model_id, again, force=True)
    assert result.outcome_counts == {"predicted": 1, "skipped": 1, "failed": 0}
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT score, run_id FROM image_predictions")).one()
    assert tuple(stored) == (0.8, forced)
    reason = outcome(engine, "file:///export/implicit.dcm")["reason"]
    assert f"predicted in run {forced} from file:///pacs/original.dcm" in reason


def test_another_model_version_predicts_the_first_copy_it_sees(Session, engine, model_run):
    model_id, run_id = model_run
    first = Shard()
    copy(first, "file:///pacs/original.dcm", content="explicit VR")
    write(Session, run_id, model_id, first)
    with Session.begin() as session:
        v2 = runs.register_model(session, model_metadata("2.0.0"), sha("checkpoint v2"))
        run2 = runs.start_run(session, kind="reprocess", model_id=v2)
    copy_only = Shard()
    copy(copy_only, "file:///export/implicit.dcm", content="implicit VR")
    result = write(Session, run2, v2, copy_only)
    assert result.outcome_counts == {"predicted": 1, "skipped": 0, "failed": 0}


def test_same_content_rules():
    base = {"content_sha256": "a" * 64, "pixel_fingerprint": None, "codestream_fingerprint": None}
    assert shards.same_content(base, dict(base)) == (True, "same content hash")
    other = {**base, "content_sha256": "b" * 64}
    assert shards.same_content(base, other) == (False, "content sha256")
    with_px = {**other, "pixel_fingerprint": PIXELS}
    assert shards.same_content(base, with_px)[0] is None
    assert shards.same_content({**base, "pixel_fingerprint": PIXELS}, with_px)[0] is True
    lossy = {**with_px, "pixel_fingerprint": LOSSY, "codestream_fingerprint": CODESTREAM}
    stored = {**base, "pixel_fingerprint": PIXELS, "codestream_fingerprint": CODESTREAM}
    assert shards.same_content(stored, lossy) == (False, "pixel fingerprint")  # pixels decide


@pytest.mark.parametrize("bad", ["short", "px1:" + "x" * 300, "px1:abc\x00def0", 12345])
def test_a_malformed_fingerprint_fails_its_file_only(Session, engine, model_run, bad):
    model_id, run_id = model_run
    shard = Shard()
    copy(shard, "file:///a/one.dcm", content="a", pixel=bad)
    file_entry(shard, 1)
    result = write(Session, run_id, model_id, shard)
    assert [r["source_uri"] for r in result.refused] == ["file:///a/one.dcm"]
    assert "instances.pixel_fingerprint" in result.refused[0]["reason"]
    assert result.outcome_counts == {"predicted": 1, "skipped": 0, "failed": 1}
