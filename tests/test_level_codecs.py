"""Compact level files: every tensor decodes to exactly what was written, in less space; old plain databases still
read, and `recode` converts between the encodings without changing a value."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evopress.database import DatabaseSpec, LevelDatabase, recode
from evopress.errors import UserError
from evopress.level_codecs import decode, encode, nbytes, pack_planes, unpack_planes


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 9), cols=st.integers(1, 17), seed=st.integers(0, 999))
def test_bit_planes_roundtrip_any_shape(bits, rows, cols, seed):
    values = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    values = values.to(torch.uint8)
    planes = pack_planes(values, bits)
    assert planes.shape == (bits, (rows * cols + 7) // 8)
    assert torch.equal(unpack_planes(planes, [rows, cols]), values)


def _quantized(bits: int, rows=48, cols=64, group=16) -> dict:
    g = torch.Generator().manual_seed(bits)
    return {
        "codes": torch.randint(0, 2**bits, (rows, cols), generator=g).to(torch.uint8),
        "scale": torch.rand(rows, cols // group, generator=g).half(),
        "zero": torch.randint(0, 2**bits, (rows, cols // group), generator=g).to(torch.uint8),
    }


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_gptq_codes_take_their_bits_not_a_byte(bits):
    tensors = _quantized(bits)
    stored = encode(tensors, "compact")
    assert set(stored) == {"codes.planes", "scale", "zero.planes"}
    # codes at bits/8 bytes per weight (plus < 1 byte of padding per plane)
    assert nbytes({"c": stored["codes.planes"]}) == bits * (48 * 64 // 8)
    back = decode(stored, {k: list(v.shape) for k, v in tensors.items()})
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


@pytest.mark.parametrize("sparsity", [0.0, 0.03, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sparse_weights_as_bitmask_only_where_smaller(sparsity, dtype):
    g = torch.Generator().manual_seed(int(sparsity * 100))
    w = torch.randn(37, 29, generator=g).to(dtype)
    w[torch.rand(37, 29, generator=g) < sparsity] = 0
    stored = encode({"weight": w}, "compact")
    assert nbytes(stored) <= nbytes({"weight": w})
    if sparsity >= 0.5:
        assert set(stored) == {"weight.bitmask", "weight.values"}
    if sparsity == 0.0:
        assert set(stored) == {"weight"}  # a dense tensor stays as it is
    back = decode(stored, {"weight": [37, 29]})["weight"]
    assert back.dtype == dtype and torch.equal(back, w)


def test_decode_names_a_file_without_the_tensor():
    with pytest.raises(UserError, match="no tensor 'weight' in any known form"):
        decode({"scale": torch.ones(2)}, {"weight": [2, 2]})


def _spec() -> DatabaseSpec:
    units = {
        f"block.{b}.mlp.down_proj": {
            "levels": [2, 3, 4],
            "shapes": {"codes": [48, 64], "scale": [48, 4], "zero": [48, 4]},
        }
        for b in range(2)
    }
    return DatabaseSpec(model_sha256="abc", method="test", params={"group_size": 16}, units=units)


def _build(db: LevelDatabase) -> None:
    for unit, level in db.todo():
        db.write(unit, level, _quantized(level))
    db.finish()


def test_new_databases_are_compact_and_read_back_exactly(tmp_path):
    compact = LevelDatabase.create(tmp_path / "compact", _spec())
    assert compact.encoding == "compact"
    _build(compact)
    plain = LevelDatabase.create(tmp_path / "plain", _spec(), encoding="plain")
    _build(plain)
    assert compact.size_on_disk() < 0.75 * plain.size_on_disk()
    for db in (LevelDatabase.open(tmp_path / "compact"), LevelDatabase.open(tmp_path / "plain")):
        for unit, level in db.pairs():
            for name, t in _quantized(level).items():
                assert torch.equal(db.load(unit, level)[name], t)


def test_database_without_encoding_entry_reads_as_plain(tmp_path):
    db = LevelDatabase.create(tmp_path / "db", _spec(), encoding="plain")
    _build(db)
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    del manifest["encoding"]  # as written before encodings existed
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    old = LevelDatabase.open(tmp_path / "db")
    assert old.encoding == "plain"
    assert torch.equal(old.load("block.1.mlp.down_proj", 3)["codes"], _quantized(3)["codes"])
    # resuming an old build keeps writing plain files
    assert LevelDatabase.create(tmp_path / "db", _spec()).encoding == "plain"


def test_recode_plain_to_compact_keeps_every_value_and_resumes(tmp_path):
    plain = LevelDatabase.create(tmp_path / "plain", _spec(), encoding="plain")
    _build(plain)
    out = recode(tmp_path / "plain", tmp_path / "compact", "compact")
    assert out.encoding == "compact" and out.manifest["complete"]
    assert out.size_on_disk() < plain.size_on_disk()
    for unit, level in plain.pairs():
        for name, t in plain.load(unit, level).items():
            assert torch.equal(out.load(unit, level)[name], t)
    # an interrupted recode (a file lost) resumes by rewriting only that file
    first = out.path(*out.pairs()[0])
    first.unlink()
    again = recode(tmp_path / "plain", tmp_path / "compact", "compact")
    assert first.exists() and again.missing() == []
    with pytest.raises(UserError, match="already holds this database as 'compact', not 'plain'"):
        recode(tmp_path / "plain", tmp_path / "compact", "plain")
    with pytest.raises(UserError, match="database encoding 'zip'; allowed: plain, compact"):
        recode(tmp_path / "plain", tmp_path / "zipped", "zip")


def test_cache_holds_compact_files(tmp_path):
    db = LevelDatabase.create(tmp_path / "db", _spec())
    _build(db)
    db = LevelDatabase.open(tmp_path / "db")
    db.load("block.0.mlp.down_proj", 3)
    stored = encode(_quantized(3), "compact")
    assert db.stats()["cached_bytes"] == nbytes(stored) < nbytes(_quantized(3))
