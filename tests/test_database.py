"""Level database: atomic files, manifest checks, resume, corruption detection, bounded cache."""

from __future__ import annotations

import json

import pytest
import torch

from evopress.database import DatabaseSpec, LevelDatabase
from evopress.errors import UserError


def _spec(levels=(-1, 0, 1), sha="abc", params=None) -> DatabaseSpec:
    units = {
        "block.0.self_attn.q_proj": {"levels": list(levels), "shapes": {"weight": [4, 6]}},
        "block.1.mlp.down_proj": {"levels": list(levels), "shapes": {"weight": [3, 5]}},
    }
    return DatabaseSpec(
        model_sha256=sha, method="test", params={"damp": 0.01} if params is None else params, units=units
    )


def _tensors(unit: str, level: int) -> dict:
    shape = [4, 6] if "q_proj" in unit else [3, 5]
    g = torch.Generator().manual_seed(hash((unit, level)) % 1000)
    return {"weight": torch.randn(shape, generator=g).half()}


def _build(db: LevelDatabase) -> None:
    for unit, level in db.todo():
        db.write(unit, level, _tensors(unit, level))
    db.finish()


def test_roundtrip_and_complete(tmp_path):
    db = LevelDatabase.create(tmp_path / "db", _spec())
    assert len(db.todo()) == 6
    _build(db)
    again = LevelDatabase.open(tmp_path / "db")
    again.require_matches(_spec())
    assert again.manifest["complete"]
    for unit, level in again.pairs():
        assert torch.equal(again.load(unit, level)["weight"], _tensors(unit, level)["weight"])


def test_resume_writes_only_missing(tmp_path):
    db = LevelDatabase.create(tmp_path / "db", _spec())
    first = db.todo()[:4]
    for unit, level in first:
        db.write(unit, level, _tensors(unit, level))
    # a file written but never recorded in the manifest (crash before the flush) is redone, not trusted
    unit, level = db.todo()[0]
    db.path(unit, level).parent.mkdir(parents=True, exist_ok=True)
    db.path(unit, level).write_bytes(b"partial")
    resumed = LevelDatabase.create(tmp_path / "db", _spec())
    assert resumed.todo() == [p for p in resumed.pairs() if p not in first]
    _build(resumed)
    assert resumed.missing() == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_detected_and_rebuilt(tmp_path, damage):
    db = LevelDatabase.create(tmp_path / "db", _spec())
    _build(db)
    unit, level = "block.1.mlp.down_proj", 1
    path = db.path(unit, level)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        path.unlink()
    fresh = LevelDatabase.open(tmp_path / "db")
    with pytest.raises(UserError, match="truncated|corrupt|missing") as err:
        fresh.load(unit, level)
    assert "\n" not in str(err.value)
    assert fresh.todo() == [(unit, level)]
    _build(fresh)
    assert torch.equal(fresh.load(unit, level)["weight"], _tensors(unit, level)["weight"])


def test_incomplete_database_refused_for_search(tmp_path):
    db = LevelDatabase.create(tmp_path / "db", _spec())
    unit, level = db.todo()[0]
    db.write(unit, level, _tensors(unit, level))
    with pytest.raises(UserError, match="incomplete"):
        LevelDatabase.open(tmp_path / "db").require_matches(_spec())


@pytest.mark.parametrize(
    "other",
    [_spec(sha="other"), _spec(levels=(-2, -1, 0, 1, 2)), _spec(params={"damp": 0.1}), _spec(params={})],
)
def test_manifest_mismatch_is_one_line_error(tmp_path, other):
    _build(LevelDatabase.create(tmp_path / "db", _spec()))
    with pytest.raises(UserError) as err:
        LevelDatabase.create(tmp_path / "db", other)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not match"):
        LevelDatabase.open(tmp_path / "db").require_matches(other)


def test_refuses_foreign_folder_and_missing_db(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something").write_text("hi")
    with pytest.raises(UserError, match="not empty"):
        LevelDatabase.create(tmp_path / "x", _spec())
    with pytest.raises(UserError, match="no level database"):
        LevelDatabase.open(tmp_path / "nothing")


def test_unknown_level_and_bad_shapes(tmp_path):
    db = LevelDatabase.create(tmp_path / "db", _spec())
    with pytest.raises(UserError, match="level 5"):
        db.write("block.0.self_attn.q_proj", 5, _tensors("block.0.self_attn.q_proj", 0))
    with pytest.raises(UserError, match="shape"):
        db.write("block.0.self_attn.q_proj", 0, {"weight": torch.zeros(2, 2)})
    assert json.loads((tmp_path / "db" / "manifest.json").read_text())["files"] == {}


def test_cache_is_bounded(tmp_path):
    db = LevelDatabase.create(tmp_path / "db", _spec())
    _build(db)
    one = 4 * 6 * 2  # bytes of one q_proj level in float16
    small = LevelDatabase.open(tmp_path / "db", cache_bytes=2 * one)
    for level in (-1, 0, 1, 0):
        small.load("block.0.self_attn.q_proj", level)
    assert small.stats()["cached_bytes"] <= 2 * one
    assert small.hits == 1 and small.loads == 3
