"""Quantization method: GPTQ database, budget-exact search, uniform/DP baselines, packed stitching, bad input."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import prepare_tiny_workspace
from evopress.adapter import ModelAdapter
from evopress.baselines import quantization as qbase
from evopress.compressors import quantization
from evopress.compressors.quantization.gptq import rtn
from evopress.compressors.sparsity.sparsegpt import reconstruction_error
from evopress.database import LevelDatabase
from evopress.errors import UserError
from evopress.hessians import collect_block_hessians
from evopress.models import load_model, read_manifest
from evopress.mutation import mutate
from evopress.packing import bytes_on_disk, load_packed, read_quantized
from evopress.search import FitnessContext, SearchConfig, run_search

OPTS = {"bits": "2,3,4", "group_size": 32, "n_samples": 8, "batch_size": 4}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_workspace(tmp_path_factory.mktemp("quant"))


@pytest.fixture(scope="module")
def built(prepared):
    out = prepared / "db"
    quantization.build_database(prepared / "model", prepared / "text", out, OPTS)
    return out


def _comp(prepared, built, target, dtype="float32"):
    model, _ = load_model(str(prepared / "model"), dtype=dtype)
    return quantization.make(ModelAdapter(model), target, db=built)


def test_database_holds_every_linear_at_every_bit_width(built):
    db = LevelDatabase.open(built)
    assert db.manifest["complete"] and len(db.units()) == 2 * 7
    assert db.params["bits"] == [2, 3, 4] and db.params["calib_bits"] == 3
    for unit, bits in db.pairs():
        t = db.load(unit, bits)
        assert int(t["codes"].max()) < 2**bits and t["scale"].shape[1] * 32 == t["codes"].shape[1]


def test_database_gptq_beats_round_to_nearest_on_block_0(prepared, built):
    """Layer error on block 0's real inputs (dense there: nothing is quantized upstream)."""
    comp = _comp(prepared, built, 3)
    from evopress.data import load_tokens

    ids = load_tokens(prepared / "text", "calibration")
    hidden, kwargs = comp.adapter.block_inputs(ids)
    hessians, _ = collect_block_hessians(comp.adapter, 0, hidden, kwargs, 4)
    for name, lin in comp.adapter.linears(0).items():
        for bits in (2, 3, 4):
            w = lin.weight.detach()
            ours = reconstruction_error(w, comp.weight(f"block.0.{name}", bits), hessians[name])
            floor = reconstruction_error(w, rtn(w, bits, 32).dequantize(), hessians[name])
            assert ours < floor, (name, bits)


@pytest.mark.parametrize("target", [2.5, 3.0, 3.5])
def test_search_profile_average_bits_equal_target(prepared, built, tmp_path, target):
    comp = _comp(prepared, built, target)
    assert comp.average_bits(comp.initial_profile()) == target
    rng = random.Random(0)
    profile = comp.initial_profile()
    for _ in range(50):
        profile = mutate(comp, profile, rng)
        assert comp.total_cost(profile) == target * comp.total_params()
    from evopress.data import load_tokens

    ctx = FitnessContext.build(comp.adapter, load_tokens(prepared / "text", "calibration"), topk=32)
    config = SearchConfig(
        generations=3, offspring=4, survivors=(2, 1), tokens=(64, 128), seed=0, initial_tokens=64
    )
    result = run_search(comp, ctx, config, tmp_path / "s")
    assert comp.average_bits(result.profile) == target
    assert set(result.profile.values()) <= {2, 3, 4}


def test_apply_is_the_dequantized_database_weight(prepared, built):
    comp = _comp(prepared, built, 3)
    unit = "block.1.mlp.down_proj"
    comp.apply(unit, 2)
    assert torch.equal(comp._linear(unit).weight, comp.weight(unit, 2))
    assert len(set(comp._linear(unit).weight[0, :32].tolist())) <= 4  # 2 bits: at most 4 values per group


def test_dp_is_optimal_for_its_additive_objective():
    rng = random.Random(0)
    weights, levels = [1, 3, 1, 2, 3], [2, 3, 4]
    for _ in range(20):
        errors = [[rng.random() * (5 - lvl) for lvl in levels] for _ in weights]
        budget = rng.randint(2 * sum(weights), 4 * sum(weights))
        feasible = [
            c
            for c in itertools.product(levels, repeat=len(weights))
            if sum(w * b for w, b in zip(weights, c, strict=True)) == budget
        ]
        if not feasible:
            with pytest.raises(UserError, match=f"^no profile spends exactly {budget} budget units$"):
                qbase.solve_dp(weights, errors, levels, budget)
            continue
        best = min(sum(errors[i][levels.index(b)] for i, b in enumerate(c)) for c in feasible)
        got = qbase.solve_dp(weights, errors, levels, budget)
        assert sum(w * b for w, b in zip(weights, got, strict=True)) == budget
        assert sum(errors[i][levels.index(b)] for i, b in enumerate(got)) == pytest.approx(best, abs=1e-12)


def test_dp_budget_outside_the_grid_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^DP budget 31 outside 0\.\.30$"):
        qbase.solve_dp([1, 2, 3], [[0.0, 0.0]] * 3, [4, 5], 31)


def test_dp_budget_zero_is_in_range_but_unreachable():
    with pytest.raises(UserError, match="^no profile spends exactly 0 budget units$"):
        qbase.solve_dp([1, 2], [[0.0, 0.0]] * 2, [2, 3], 0)


def test_dp_separates_errors_float32_cannot():
    # levels (1, 2) cost 2 - 2e-9 against (2, 1)'s 2 + 1e-9: below float32's resolution (a tie there, which
    # goes to (2, 1)), exact in float64.
    errors = [[1.0, 1.0 + 1e-9], [1.0, 1.0 - 2e-9]]
    assert qbase.solve_dp([1, 1], errors, [1, 2], 3) == [1, 2]


def test_dp_ties_go_to_the_first_listed_level_of_the_later_items():
    assert qbase.solve_dp([1, 1], [[0.0, 0.0], [0.0, 0.0]], [1, 2], 3) == [2, 1]


def test_a_target_off_the_weight_grid_is_a_one_line_error(prepared, built):
    comp = _comp(prepared, built, 3)
    comp.target = 3 + 1 / (7 * comp.total_params())  # a fraction of one weight's bit: no profile spends it
    with pytest.raises(UserError, match="^target 3.0.* average bits is not reachable exactly in steps of"):
        qbase.budget_units(comp)


def test_dp_and_uniform_baselines_on_budget(prepared, built):
    from evopress.data import load_tokens

    comp = _comp(prepared, built, 2.75)
    ctx = FitnessContext.build(comp.adapter, load_tokens(prepared / "text", "calibration"), topk=32)
    dense = {u: comp._linear(u).weight.clone() for u in comp.units()}
    profile = qbase.dp(comp, ctx, seed=0, tokens=64)
    assert comp.total_cost(profile) == 2.75 * comp.total_params()
    assert all(torch.equal(comp._linear(u).weight, w) for u, w in dense.items())  # left dense
    errs = comp.layer_errors["block.0.self_attn.q_proj"]
    assert errs[0] > errs[-1]  # 2 bits hurts more than 4
    # the errors come from the rows its seed draws (64 of the 8 x 32 tokens), and the profile is their DP optimum
    rows = ctx.sample(random.Random(0), 64)
    assert comp.layer_errors == qbase.layer_errors(comp, ctx, rows)
    assert profile == qbase.dp_from_errors(comp, comp.layer_errors)
    assert comp.layer_errors != qbase.layer_errors(comp, ctx, ctx.sample(random.Random(1), 64))
    with pytest.raises(UserError, match="integer target"):
        qbase.uniform(comp, ctx)
    assert set(qbase.uniform(_comp(prepared, built, 3), ctx).values()) == {3}


def test_stitch_packs_exactly_the_database_weights(prepared, built, tmp_path):
    comp = _comp(prepared, built, 3)
    rng = random.Random(1)
    units = mutate(comp, mutate(comp, comp.initial_profile(), rng), rng)
    profile = {"method": "quantization", "target": 3.0, "options": {}, "units": units, "model_sha256": None}
    report = quantization.stitch(prepared / "model", profile, built, tmp_path / "packed", "evopress-packed")
    assert report["average_bits"] == 3.0
    quantized = read_quantized(tmp_path / "packed")
    for unit, bits in units.items():
        q = quantized[quantization.linear_prefix(comp.adapter, unit)]
        assert q.bits == bits and torch.equal(q.dequantize(), comp.weight(unit, bits))
    model = load_packed(tmp_path / "packed")
    comp.apply_profile(units)
    ids = torch.randint(0, 257, (2, 16))
    assert torch.equal(model(input_ids=ids).logits, comp.adapter.model(input_ids=ids).logits)
    # The generic loader (what `evopress evaluate --model` and the pipeline's report use) knows the format.
    loaded, _ = load_model(str(tmp_path / "packed"), dtype="float32")
    assert read_manifest(tmp_path / "packed")["files"][
        "quantized.safetensors"
    ]  # hashed like every stitched folder
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    sizes = bytes_on_disk(tmp_path / "packed")
    # 3 bits per weight + a float16 scale and a 3-bit zero per 32 weights, to within the byte padding
    assert sizes["quantized.safetensors"] < (3 + (16 + 3) / 32) / 8 * comp.total_params() + 14 * 3 * 200


def test_bad_input_is_refused_in_one_line(prepared, built):
    with pytest.raises(UserError, match=r"outside the database's range 2..4"):
        _comp(prepared, built, 4.5)
    with pytest.raises(UserError, match="bit-width 9 outside 1..8"):
        quantization.QuantOptions.from_dict({"bits": "7,8,9"})
    # 2,4 is an evenly spaced grid (tests/test_serving.py); 2,3,5 is not
    with pytest.raises(UserError, match="evenly spaced"):
        quantization.QuantOptions.from_dict({"bits": "2,3,5"})
    with pytest.raises(UserError, match="does not divide the layer width 64"):
        quantization.build_database(
            prepared / "model", prepared / "text", prepared / "db_bad", {"group_size": 48}
        )
    model, _ = load_model(str(prepared / "model"), dtype="float32")
    with pytest.raises(UserError, match="model_sha256"):
        quantization.make(ModelAdapter(model), 3, db=built, options={"model_sha256": "0" * 64})
    with pytest.raises(UserError, match="no level database") as err:
        quantization.make(ModelAdapter(model), 3, db=prepared / "missing")
    assert "\n" not in str(err.value)


def test_interrupted_build_resumes(prepared, built, monkeypatch):
    out = prepared / "db_resume"
    real = quantization.gptq
    calls = {"n": 0}

    def dies_late(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quantization, "gptq", dies_late)
    with pytest.raises(KeyboardInterrupt):
        quantization.build_database(prepared / "model", prepared / "text", out, OPTS)
    monkeypatch.setattr(quantization, "gptq", real)
    db = quantization.build_database(prepared / "model", prepared / "text", out, OPTS)
    ref = LevelDatabase.open(built)
    assert db.manifest["complete"]
    for unit, bits in ref.pairs():
        assert all(
            torch.equal(db.load(unit, bits)[k], ref.load(unit, bits)[k]) for k in ("codes", "scale", "zero")
        )


def test_cli_build_search_baselines_stitch(prepared, built, tmp_path):
    from typer.testing import CliRunner

    import evopress.cli_compress  # noqa: F401
    import evopress.cli_database  # noqa: F401
    from evopress.cli import app

    runner = CliRunner()

    def ok(*args):
        res = runner.invoke(app, list(args), standalone_mode=False)
        assert res.exit_code == 0 and res.exception is None, (res.output, res.exception)
        return res

    model, text = str(prepared / "model"), str(prepared / "text")
    opts = [f"--option={k}={v}" for k, v in OPTS.items()]
    res = ok(
        "build-db", "--method", "quantization", "--model", model, "--data", text, "--out", str(built), *opts
    )
    assert "complete=True" in res.output
    common = [
        "--method",
        "quantization",
        "--model",
        model,
        "--data",
        text,
        "--db",
        str(built),
        "--dtype",
        "float32",
    ]
    ok(
        "search",
        *common,
        "--target",
        "3.5",
        "--generations",
        "2",
        "--offspring",
        "4",
        "--survivors",
        "2,1",
        "--tokens",
        "64,128",
        "--initial-tokens",
        "64",
        "--out",
        str(tmp_path / "s"),
    )
    searched = json.loads((tmp_path / "s" / "profile.json").read_text())
    assert searched["budget"] == 3.5 * sum(
        r * c for r, c in quantization.linear_sizes(_comp(prepared, built, 3).adapter).values()
    )
    for name, target in (("uniform", "3"), ("dp", "2.5")):
        ok(
            "baseline",
            *common,
            "--target",
            target,
            "--name",
            name,
            "--tokens",
            "64",
            "--out",
            str(tmp_path / name),
        )
    ok(
        "stitch",
        "--method",
        "quantization",
        "--model",
        model,
        "--db",
        str(built),
        "--profile",
        str(tmp_path / "dp" / "profile.json"),
        "--out",
        str(tmp_path / "packed"),
    )
    report = json.loads((tmp_path / "packed" / "stitch.json").read_text())
    assert report["average_bits"] == 2.5
