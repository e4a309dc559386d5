"""The contract views and every example query, on both databases, against one scenario.

Scenario (study number: images and scores; v1 then v2 of the model, same threshold 0.5):
  S0 (2024-01-02): 0.9, 0.2      v1 positive   v2 0.4  negative
  S1 (2024-01-02): 0.3, 0.1      v1 negative   v2 0.8  positive
  S2 (2024-01-02): 0.7 + CT      v1 positive   v2 0.75 positive   reviewed: agree (alice)
  S3 (2024-01-02): 0.6 + broken  v1 positive   v2 0.65 positive   reviewed: disagree, then agree
  S4 (2024-01-03): 0.95          v1 positive   (not reprocessed)
  plus one unreadable file.
"""

from __future__ import annotations

import datetime as dt
import re
import time

import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import Shard, file_entry, model_metadata, sha

from sql import db, predictions, reviews, runs, shards
from sql.queries import list_queries, load_query, run_query

DAY = dt.date(2024, 1, 2)
STUDY = {k: f"1.2.826.0.1.3680043.2.{k}" for k in range(5)}
V1 = {0: [0.9, 0.2], 1: [0.3, 0.1], 2: [0.7], 3: [0.6], 4: [0.95]}
V2 = {0: [0.4, 0.2], 1: [0.8, 0.1], 2: [0.75], 3: [0.65]}


def scenario_shard(scores: dict[int, list[float]]) -> Shard:
    shard = Shard()
    for study, values in scores.items():
        for j, score in enumerate(values):
            i = study * 10 + j
            date = "20240103" if study == 4 else "20240102"
            file_entry(shard, i, study=study, score=score, study_date=date)
    file_entry(shard, 21, study=2, outcome="skipped")
    file_entry(shard, 31, study=3, outcome="failed")
    file_entry(shard, 99, outcome="failed", content="unreadable")
    return shard


def run_model(Session, metadata, checkpoint, scores, kind):
    shard = scenario_shard(scores)
    with Session.begin() as session:
        model_id = runs.register_model(session, metadata, sha(checkpoint))
        run_id = runs.start_run(session, kind=kind, source="/data/in", model_id=model_id)
    with Session.begin() as session:
        result = shards.write_shard(
            session, run_id=run_id, model_id=model_id, force=False, **shard.kwargs()
        )
        predictions.upsert_study_predictions(
            session, model_id, run_id, study_uids=result.study_uids
        )
        counts = result.outcome_counts
        runs.finish_run(
            session, run_id, "completed", {"files_seen": sum(counts.values()), **counts}
        )
    return model_id, run_id


@pytest.fixture(scope="module")
def scenario(module_db_url):
    engine = db.connect(module_db_url)
    Session = db.session_factory(engine)
    v1, run1 = run_model(Session, model_metadata("1.0.0"), "v1", V1, "nightly")
    time.sleep(0.01)
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    v2, run2 = run_model(Session, model_metadata("2.0.0"), "v2", V2, "reprocess")
    t0 = dt.datetime.now(dt.UTC)
    with Session.begin() as session:
        reviews.add_review(
            session, study_instance_uid=STUDY[2], decision="agree", reviewer="alice", model_id=v2
        )
        reviews.add_review(
            session,
            study_instance_uid=STUDY[3],
            decision="disagree",
            reviewer="bob",
            created_at=t0 + dt.timedelta(seconds=1),
        )
        reviews.add_review(
            session,
            study_instance_uid=STUDY[3],
            decision="agree",
            reviewer="bob",
            created_at=t0 + dt.timedelta(seconds=2),
        )
    yield {"engine": engine, "v1": v1, "v2": v2, "run1": run1, "run2": run2, "between": between}
    engine.dispose()


def view(engine, name: str, order: str) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(sa.text(f"SELECT * FROM {name} ORDER BY {order}"))
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


# --- views ----------------------------------------------------------------------------------


def test_v_study_results(scenario):
    df = view(scenario["engine"], "v_study_results", "study_instance_uid, model_version")
    got = {
        (r.study_instance_uid, r.model_version): (r.score, bool(r.label), r.n_images)
        for r in df.itertuples()
    }
    assert got == {
        (STUDY[0], "1.0.0"): (0.9, True, 2),
        (STUDY[0], "2.0.0"): (0.4, False, 2),
        (STUDY[1], "1.0.0"): (0.3, False, 2),
        (STUDY[1], "2.0.0"): (0.8, True, 2),
        (STUDY[2], "1.0.0"): (0.7, True, 1),
        (STUDY[2], "2.0.0"): (0.75, True, 1),
        (STUDY[3], "1.0.0"): (0.6, True, 1),
        (STUDY[3], "2.0.0"): (0.65, True, 1),
        (STUDY[4], "1.0.0"): (0.95, True, 1),
    }
    first = df.iloc[0]
    assert first.accession_number == "ACC00000" and str(first.study_date) == "2024-01-02"
    assert set(df.model_name) == {"cxr-screen"} and set(df.threshold) == {0.5}
    assert first.run_id == scenario["run1"]


def test_v_instance_outcomes(scenario):
    df = view(scenario["engine"], "v_instance_outcomes", "source_uri, model_version")
    assert len(df) == 2 * 10 - 1  # v1: 10 files, v2: 9
    v2 = df[df.model_version == "2.0.0"].set_index("source_uri")
    predicted = v2.loc["file:///data/in/000010.dcm"]
    assert (predicted.outcome, predicted.score) == ("predicted", 0.8)
    assert pd.isna(predicted.reason)
    assert predicted.run_id == scenario["run2"]
    assert predicted.study_instance_uid == STUDY[1]
    skipped = v2.loc["file:///data/in/000021.dcm"]
    assert skipped.outcome == "skipped" and pd.isna(skipped.score)
    assert "'Modality' value 'CT'" in skipped.reason
    unreadable = v2.loc["file:///data/in/000099.dcm"]
    assert unreadable.outcome == "failed" and pd.isna(unreadable.sop_instance_uid)
    assert unreadable.reason == "not DICOM"


def test_v_review_queue(scenario):
    df = view(scenario["engine"], "v_review_queue", "score DESC")
    # Latest predictions: v2 for S0..S3, v1 for S4. Positive and unreviewed: S4 and S1.
    assert list(df.study_instance_uid) == [STUDY[4], STUDY[1]]
    assert list(df.model_version) == ["1.0.0", "2.0.0"]
    assert list(df.score) == [0.95, 0.8]
    # S1's thumbnail is that of its highest-scoring image under v2 (file 10, score 0.8).
    assert df.iloc[1].thumbnail_path == "thumbs/1.2.826.0.1.3680043.3.10.png"
    # Without an ORDER BY of our own the view still lists the highest score first.
    with scenario["engine"].connect() as conn:
        plain = conn.execute(sa.text("SELECT study_instance_uid FROM v_review_queue")).scalars()
        assert list(plain) == [STUDY[4], STUDY[1]]


def test_v_run_summary(scenario):
    df = view(scenario["engine"], "v_run_summary", "run_id")
    assert list(df.kind) == ["nightly", "reprocess"]
    assert list(df.status) == ["completed", "completed"]
    assert list(df.files_seen) == [10, 9]
    assert list(df.predicted) == [7, 6]
    assert list(df.skipped) == [1, 1] and list(df.failed) == [2, 2]
    assert list(df.model_version) == ["1.0.0", "2.0.0"]
    assert (df.files_seen == df.predicted + df.skipped + df.failed).all()


def test_v_skip_reasons(scenario):
    df = view(scenario["engine"], "v_skip_reasons", "model_version, outcome, reason")
    got = {(r.model_version, r.outcome, r.reason[:20], r.n_files) for r in df.itertuples()}
    assert got == {
        (version, outcome, reason, 1)
        for version in ("1.0.0", "2.0.0")
        for outcome, reason in [
            ("failed", "(0028,0100) 'Bits Al"),
            ("failed", "not DICOM"),
            ("skipped", "(0008,0060) 'Modalit"),
        ]
    }


def test_v_latest_reviews(scenario):
    df = view(scenario["engine"], "v_latest_reviews", "study_instance_uid")
    assert list(df.study_instance_uid) == [STUDY[2], STUDY[3]]
    assert list(df.decision) == ["agree", "agree"]
    assert list(df.reviewer) == ["alice", "bob"]
    assert df.iloc[0].model_version == "2.0.0" and pd.isna(df.iloc[1].model_version)


def test_v_reviews(scenario):
    df = view(scenario["engine"], "v_reviews", "review_id")
    assert [(r.study_instance_uid, r.decision, r.reviewer) for r in df.itertuples()] == [
        (STUDY[2], "agree", "alice"),
        (STUDY[3], "disagree", "bob"),
        (STUDY[3], "agree", "bob"),
    ]
    assert df.iloc[0].model_version == "2.0.0" and pd.isna(df.iloc[1].model_version)


# --- queries --------------------------------------------------------------------------------


def _epoch():
    return dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


QUERY_CASES = {
    "positives_for_date": (
        lambda s: {"day": DAY},
        lambda df, s: (
            {(r.study_instance_uid, r.model_version) for r in df.itertuples()}
            == {
                (STUDY[0], "1.0.0"),
                (STUDY[2], "1.0.0"),
                (STUDY[3], "1.0.0"),
                (STUDY[1], "2.0.0"),
                (STUDY[2], "2.0.0"),
                (STUDY[3], "2.0.0"),
            }
            and list(df.score) == sorted(df.score, reverse=True)
        ),
    ),
    "positives_predicted_between": (
        lambda s: {
            "since": s["between"],
            "until": dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        },
        lambda df, s: (
            set(df.study_instance_uid) == {STUDY[1], STUDY[2], STUDY[3]}
            and set(df.model_version) == {"2.0.0"}
        ),
    ),
    "model_disagreement": (
        lambda s: {
            "name_a": "cxr-screen",
            "version_a": "1.0.0",
            "name_b": "cxr-screen",
            "version_b": "2.0.0",
        },
        lambda df, s: (
            list(df.study_instance_uid) == [STUDY[0], STUDY[1]]
            and list(df.score_change.round(6)) == [-0.5, 0.5]
            and [bool(v) for v in df.label_a] == [True, False]
        ),
    ),
    "skip_reasons": (
        lambda s: {"since": _epoch()},
        lambda df, s: (
            len(df) == 6
            and set(df.n_files) == {1}
            and set(df.outcome)
            == {
                "skipped",
                "failed",
            }
        ),
    ),
    "reviewer_agreement": (
        lambda s: {"since": _epoch()},
        lambda df, s: (
            [
                (r.reviewer, r.n_reviews, r.n_agree, r.n_disagree, r.n_uncertain, r.agreement_rate)
                for r in df.itertuples()
            ]
            == [("alice", 1, 1, 0, 0, 1.0), ("bob", 2, 1, 1, 0, 0.5)]
        ),
    ),
    "daily_summary": (
        lambda s: {
            "first_day": dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1),
            "last_day": dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1),
        },
        lambda df, s: (
            int(df.n_runs.sum()) == 2
            and int(df.files_seen.sum()) == 19
            and int(df.predicted.sum()) == 13
            and int(df.n_studies.sum()) == 9
            and int(df.n_positive.sum()) == 7
        ),
    ),
    "run_outcomes": (
        lambda s: {"run_id": s["run1"]},
        lambda df, s: (
            dict(df.groupby("outcome").n_files.sum()) == {"predicted": 7, "skipped": 1, "failed": 2}
        ),
    ),
    "study_history": (
        lambda s: {"accession_number": "ACC00003"},
        lambda df, s: (
            list(df.model_version) == ["2.0.0", "1.0.0"]
            and list(df.latest_decision) == ["agree", "agree"]
            and list(df.latest_reviewer) == ["bob", "bob"]
        ),
    ),
}


def test_every_query_has_a_case_here():
    assert set(list_queries()) == set(QUERY_CASES)


@pytest.mark.parametrize("name", sorted(QUERY_CASES))
def test_query(scenario, name):
    params, check = QUERY_CASES[name]
    df = run_query(scenario["engine"], name, params(scenario))
    assert len(df) > 0
    assert check(df, scenario), df.to_string()


def test_queries_read_only_the_views():
    """A reviewer login may read the v_* views and no base table: so must the queries."""
    for name in list_queries():
        sources = re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][A-Za-z0-9_]*)", load_query(name).sql)
        assert sources and all(s.startswith("v_") for s in sources), (name, sources)


def test_queries_declare_what_they_use():
    for name in list_queries():
        query = load_query(name)
        assert query.description, name
        assert all(p.description for p in query.params), name


def test_run_query_refuses_unknown_names_and_parameters(scenario):
    engine = scenario["engine"]
    with pytest.raises(ValueError, match="unknown query 'nope'.*daily_summary"):
        run_query(engine, "nope", {})
    with pytest.raises(ValueError, match=r"unknown query '\.\./roles'"):
        run_query(engine, "../roles", {})
    with pytest.raises(ValueError, match=r"missing \['day'\]"):
        run_query(engine, "positives_for_date", {})
    with pytest.raises(ValueError, match=r"unknown \['limit'\]"):
        run_query(engine, "positives_for_date", {"day": DAY, "limit": 3})
    with pytest.raises(ValueError, match=r":day \(date\).*'yesterday'"):
        run_query(engine, "positives_for_date", {"day": "yesterday"})
    with pytest.raises(ValueError, match="time zone"):
        run_query(engine, "skip_reasons", {"since": dt.datetime(2024, 1, 1)})


def test_parameters_are_bound_not_formatted(scenario):
    engine = scenario["engine"]
    hostile = "ACC00003' OR '1'='1"
    assert run_query(engine, "study_history", {"accession_number": hostile}).empty
    # ISO text works for dates and aware datetimes.
    assert len(run_query(engine, "positives_for_date", {"day": "2024-01-03"})) == 1
    df = run_query(engine, "skip_reasons", {"since": "2000-01-01T00:00:00+00:00"})
    assert len(df) == 6
