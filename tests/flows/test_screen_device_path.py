"""The real ``screen`` flow with ``CXR_SCREEN_PIXEL_PATH=device`` (the device path's code, on
this CPU) stores what the CPU path stores: the same outcomes and reasons, instance rows, facts
(plus ``pixel_path``) and scores, for a corpus with several syntaxes, sizes, broken and
unselected files and archive members."""

from __future__ import annotations

import json
import os

import pytest
import sqlalchemy as sa
from support import make_model

from tasks.dicom import synth

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-corpus")
    tree = root / "tree"
    synth.write_corpus(
        tree / "studies",
        8,
        seed=5,
        size_range=(192, 400),
        syntaxes=["explicit_le", "rle", "j2k_lossless", "jpeg_ls", "jpeg_baseline", "explicit_be"],
        lateral_fraction=0.3,
    )
    (tree / "studies" / "labels.csv").unlink()
    synth.write_broken(tree / "broken")
    synth.write_unselected(tree / "unselected")
    models = root / "models"
    models.mkdir()
    return tree, make_model(models / "a.pt", "a-1", 0, name="device")


def screen_with(path: str, tree, model, db: str, monkeypatch, tmp_path) -> dict:
    from flows.parameters import ScreenParameters
    from flows.screen import screen

    monkeypatch.setenv("CXR_SCREEN_PIXEL_PATH", path)
    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", db)
    monkeypatch.setenv("CXR_SCREEN_HOME", str(tmp_path / f"home-{path}"))
    return screen([str(tree)], model=str(model), params=ScreenParameters(shard_size=9, workers=0))


def stored(db: str) -> dict:
    engine = sa.create_engine(db)
    with engine.connect() as c:
        outcomes = {}
        for r in c.execute(
            sa.text("SELECT source_uri, outcome, reason, content_sha256, facts FROM file_outcomes")
        ):
            facts = json.loads(r.facts) if isinstance(r.facts, str) else (r.facts or {})
            path = facts.pop("pixel_path", None)
            outcomes[os.path.basename(r.source_uri)] = (
                r.outcome,
                r.reason,
                r.content_sha256,
                facts,
            )
            outcomes[os.path.basename(r.source_uri) + ":path"] = path
        instances = [
            tuple(r)
            for r in c.execute(
                sa.text(
                    "SELECT sop_instance_uid, content_sha256, pixel_fingerprint, "
                    "codestream_fingerprint, rows, columns FROM instances ORDER BY 1"
                )
            )
        ]
        scores = dict(
            c.execute(sa.text("SELECT sop_instance_uid, score FROM image_predictions")).all()
        )
    engine.dispose()
    return {"outcomes": outcomes, "instances": instances, "scores": scores}


def test_the_device_path_stores_what_the_cpu_path_stores(corpus, monkeypatch, tmp_path):
    tree, model = corpus
    dbs = {p: f"sqlite:///{tmp_path / f'{p}.db'}" for p in ("cpu", "device")}
    summaries = {p: screen_with(p, tree, model, dbs[p], monkeypatch, tmp_path) for p in dbs}
    cpu, dev = stored(dbs["cpu"]), stored(dbs["device"])
    assert summaries["cpu"]["predicted"] == summaries["device"]["predicted"] >= 8
    assert summaries["cpu"]["failed"] == summaries["device"]["failed"] > 0  # broken files
    paths = {v for k, v in dev["outcomes"].items() if k.endswith(":path")}
    assert paths == {"device", None}  # predicted files say so; failed and skipped ones have none
    assert {v for k, v in cpu["outcomes"].items() if k.endswith(":path")} == {None}
    assert dev["outcomes"].keys() == cpu["outcomes"].keys()
    for name, expected in cpu["outcomes"].items():
        if not name.endswith(":path"):
            assert dev["outcomes"][name] == expected, name
    assert dev["instances"] == cpu["instances"]
    assert dev["scores"].keys() == cpu["scores"].keys()
    for uid, score in cpu["scores"].items():
        assert abs(dev["scores"][uid] - score) < 1e-6, uid  # same inputs; batches may differ
