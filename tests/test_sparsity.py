"""Unstructured sparsity: SparseGPT vs magnitude, exact zero counts, resumable builds, budget-exact mutation."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import prepare_tiny_workspace
from evopress.adapter import ModelAdapter
from evopress.compressors import sparsity
from evopress.compressors.sparsity.sparsegpt import magnitude_prune, prune_counts, reconstruction_error
from evopress.database import LevelDatabase
from evopress.errors import UserError
from evopress.hessians import HessianAccumulator, inverse_cholesky
from evopress.models import load_model
from evopress.mutation import mutate

OPTS = {"num_levels": 2, "n_samples": 8, "batch_size": 4, "blocksize": 32}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_workspace(tmp_path_factory.mktemp("sparsity"))


@pytest.fixture(scope="module")
def built(prepared):
    out = prepared / "db"
    sparsity.build_database(prepared / "model", prepared / "text", out, {"target": 0.5, **OPTS})
    return out


def test_sparsegpt_beats_magnitude_on_layer_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 96, generator=g) @ torch.randn(96, 96, generator=g) + torch.randn(96, generator=g)
    w = torch.randn(48, 96, generator=g)
    acc = HessianAccumulator(96)
    acc.add(x)
    counts = [w.numel() // 2, int(0.7 * w.numel())]
    for count, pruned in zip(counts, prune_counts(w, inverse_cholesky(acc.hessian), counts, 32), strict=True):
        assert int((pruned == 0).sum()) == count
        mag = magnitude_prune(w, count)
        assert reconstruction_error(w, pruned, acc.hessian) < 0.8 * reconstruction_error(w, mag, acc.hessian)


@pytest.mark.parametrize(
    "count, rows, widths, parts",
    [
        (10, 1, [4, 3], [6, 4]),  # remainders .71 and .29: the extra zero goes to the first block
        (10, 1, [5, 2], [7, 3]),  # remainders .14 and .86: to the second, though its share is smaller
        (12, 2, [2, 2, 2], [4, 4, 4]),
        (7, 3, [1, 1, 1], [3, 2, 2]),  # equal remainders: the earliest blocks first
    ],
)
def test_split_count_gives_the_largest_remainders_the_rest(count, rows, widths, parts):
    from evopress.compressors.sparsity.sparsegpt import split_count

    assert split_count(count, rows, widths) == parts and sum(parts) == count


def test_reconstruction_error_is_the_mean_squared_output_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64)
    w = torch.randn(8, 24, generator=g)
    acc = HessianAccumulator(24)
    acc.add(x.float())
    pruned = magnitude_prune(w, 100)
    direct = float(((x @ (w - pruned).double().T) ** 2).sum() / len(x))  # ||X (W - W')^T||^2 / tokens
    assert reconstruction_error(w, pruned, acc.hessian) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("count", [0, 1, 37])
def test_magnitude_prune_zeroes_exactly_the_smallest(count):
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(count))
    out = magnitude_prune(w, count)
    zeroed = (out == 0) & (w != 0)
    assert int(zeroed.sum()) == count and torch.equal(out[~zeroed], w[~zeroed])
    if count:
        assert w[zeroed].abs().max() <= w[~zeroed].abs().min()


def test_each_level_file_has_exact_zero_count(built):
    db = LevelDatabase.open(built)
    assert db.manifest["complete"]
    opts = sparsity.SparsityOptions.from_dict(OPTS)
    sizes = {u: s["weight"][0] * s["weight"][1] for u in db.units() for s in [db.shapes(u)]}
    grid = sparsity.level_grid(sizes, 64, 0.5, opts)
    assert len(db.units()) == 2 * 7
    for unit, level in db.pairs():
        w = db.load(unit, level)["weight"]
        assert w.dtype == torch.float16
        assert int((w == 0).sum()) == grid.pruned(unit, level), (unit, level)


def test_interrupted_build_resumes_to_identical_files(prepared, built, monkeypatch):
    out = prepared / "db_interrupted"
    real = sparsity.prune_counts
    calls = {"n": 0}

    def dies_in_second_block(*args):  # one call per linear (all its levels): 7 linears per block
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sparsity, "prune_counts", dies_in_second_block)
    with pytest.raises(KeyboardInterrupt):
        sparsity.build_database(prepared / "model", prepared / "text", out, {"target": 0.5, **OPTS})
    monkeypatch.setattr(sparsity, "prune_counts", real)
    assert LevelDatabase.open(out).missing()
    sparsity.build_database(prepared / "model", prepared / "text", out, {"target": 0.5, **OPTS})
    full, resumed = LevelDatabase.open(built), LevelDatabase.open(out)
    assert resumed.missing() == []
    assert full.manifest["files"] == resumed.manifest["files"]  # same sha256 for every file


def test_corrupted_file_is_rebuilt(prepared, built, tmp_path):
    import shutil

    out = tmp_path / "db"
    shutil.copytree(built, out)
    db = LevelDatabase.open(out)
    unit, level = db.pairs()[5]
    path = db.path(unit, level)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(UserError, match="truncated"):
        LevelDatabase.open(out).load(unit, level)
    sparsity.build_database(prepared / "model", prepared / "text", out, {"target": 0.5, **OPTS})
    assert path.read_bytes() == original


def test_mutation_keeps_parameter_weighted_budget(prepared, built):
    model, _ = load_model(str(prepared / "model"))
    comp = sparsity.make(ModelAdapter(model), 0.5, db=built)
    profile = comp.initial_profile()
    budget = comp.total_cost(profile)
    rng = random.Random(0)
    for _ in range(200):
        profile = mutate(comp, profile, rng)
        assert comp.total_cost(profile) == budget
        assert all(profile[u] in comp.levels(u) for u in profile)
    assert abs(comp.sparsity(profile) - 0.5) < 1e-3
    assert len({lvl for lvl in profile.values()}) > 1


def test_apply_swaps_weights_and_stitch_measures_budget(prepared, built, tmp_path):
    model, _ = load_model(str(prepared / "model"))
    comp = sparsity.make(ModelAdapter(model), 0.5, db=built)
    profile = comp.random_profile(random.Random(1))
    comp.apply_profile(profile)
    unit = comp.units()[3]
    assert int((comp._linear(unit).weight == 0).sum()) == comp.cost(unit, profile[unit])
    doc = {"method": "sparsity", "target": 0.5, "options": {}, "source": "test", "units": profile}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    from evopress.stages import stitch

    report = stitch("sparsity", prepared / "model", tmp_path / "p.json", built, tmp_path / "out")
    assert report["measured_sparsity"] == report["budget_sparsity"]
    import evopress

    loaded = evopress.load_model(tmp_path / "out")  # dense zeros, the default format
    w = ModelAdapter(loaded).linear(*sparsity.split_unit(unit)).weight
    assert torch.equal(w, comp._linear(unit).weight)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5])
def test_target_outside_unit_interval_is_refused(prepared, built, target):
    model, _ = load_model(str(prepared / "model"))
    with pytest.raises(UserError, match="outside"):
        sparsity.make(ModelAdapter(model), target, db=built)


def test_database_for_other_target_or_levels_is_refused(prepared, built):
    model, _ = load_model(str(prepared / "model"))
    adapter = ModelAdapter(model)
    with pytest.raises(UserError, match="target"):
        sparsity.make(adapter, 0.6, db=built)
    with pytest.raises(UserError, match="num_levels"):
        sparsity.make(adapter, 0.5, db=built, options={"num_levels": 3})
    with pytest.raises(UserError, match="model_sha256"):
        sparsity.make(adapter, 0.5, db=built, options={"model_sha256": "0" * 64})


def _ctx(prepared):
    from evopress.scoring import FitnessContext

    model, _ = load_model(str(prepared / "model"))
    adapter = ModelAdapter(model)
    tokens = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(5))
    return adapter, FitnessContext.build(adapter, tokens, topk=16)


@pytest.mark.parametrize("grid", [False, True])
def test_owl_profile_is_on_budget_and_follows_outliers(prepared, built, grid):
    from evopress.baselines.sparsity import BASELINES, owl_block_sparsity

    adapter, ctx = _ctx(prepared)
    comp = sparsity.make(adapter, 0.5, db=built)
    profile = BASELINES["owl"](comp, ctx, seed=0, tokens=64, lam=0.1, m=3, grid=grid)
    assert comp.total_cost(profile) == comp.total_cost(comp.initial_profile())
    s = owl_block_sparsity(torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64), 0.5, 0.1)
    assert torch.allclose(s, torch.tensor([0.6, 0.4, 0.5], dtype=torch.float64))
    assert abs(float(s.mean()) - 0.5) < 1e-12


def test_owl_needs_the_dense_model(prepared, built):
    from evopress.baselines.sparsity import BASELINES

    adapter, ctx = _ctx(prepared)
    comp = sparsity.make(adapter, 0.5, db=built)
    comp.apply_profile(comp.initial_profile())
    with pytest.raises(UserError, match="dense"):
        BASELINES["owl"](comp, ctx, seed=0, tokens=64)


def test_magnitude_baseline_prunes_smallest_weights(prepared, built):
    from evopress.baselines.sparsity import BASELINES

    adapter, ctx = _ctx(prepared)
    comp = sparsity.make(adapter, 0.5, db=built)
    unit = comp.units()[0]
    dense = comp._linear(unit).weight.clone()
    profile = BASELINES["magnitude"](comp, ctx, seed=0, tokens=64)
    assert comp.options == {"weights": "magnitude"}
    comp.apply_profile(profile)
    w = comp._linear(unit).weight
    kept = dense[w != 0].abs().min()
    assert int((w == 0).sum()) == comp.cost(unit, 0)
    assert float(dense[w == 0].abs().max()) <= float(kept)


def test_cli_build_db_and_stitch(prepared, built, tmp_path):
    from typer.testing import CliRunner

    import evopress.cli_database  # noqa: F401  (registers the commands)
    from evopress.cli import app

    runner = CliRunner()
    args = ["build-db", "--method", "sparsity", "--model", str(prepared / "model"), "--data"]
    args += [str(prepared / "text"), "--out", str(built)] + [f"--option={k}={v}" for k, v in OPTS.items()]
    ok = runner.invoke(app, [*args, "--option", "target=0.5"], standalone_mode=False)
    assert ok.exit_code == 0, ok.output
    assert "complete=True" in ok.output
    bad = runner.invoke(app, [*args, "--option", "target=0.6"], standalone_mode=False)
    assert isinstance(bad.exception, UserError) and "built for something else" in str(bad.exception)
    bad = runner.invoke(app, [*args, "--option", "target=1.2"], standalone_mode=False)
    assert isinstance(bad.exception, UserError) and "outside (0, 1)" in str(bad.exception)


def test_cli_search_baselines_evaluate_stitch(prepared, built, tmp_path):
    from typer.testing import CliRunner

    import evopress.cli_compress  # noqa: F401
    import evopress.cli_database  # noqa: F401
    from evopress.cli import app

    runner = CliRunner()
    common = ["--method", "sparsity", "--model", str(prepared / "model"), "--data", str(prepared / "text")]
    common += ["--db", str(built), "--dtype", "float32"]

    def ok(*args):
        res = runner.invoke(app, list(args), standalone_mode=False)
        assert res.exit_code == 0 and res.exception is None, (res.output, res.exception)
        return res

    search = ["search", *common, "--target", "0.5", "--generations", "2", "--offspring", "4"]
    ok(
        *search,
        "--survivors",
        "2,1",
        "--tokens",
        "64,128",
        "--initial-tokens",
        "64",
        "--out",
        str(tmp_path / "s"),
    )
    for name in ("owl", "magnitude"):
        ok(
            "baseline",
            *common,
            "--target",
            "0.5",
            "--name",
            name,
            "--tokens",
            "64",
            "--out",
            str(tmp_path / name),
        )
        ok(
            "evaluate",
            *common,
            "--profile",
            str(tmp_path / name / "profile.json"),
            "--out",
            str(tmp_path / "m.json"),
        )
    magnitude = json.loads((tmp_path / "magnitude" / "profile.json").read_text())
    assert magnitude["options"] == {"weights": "magnitude"}
    res = ok(
        "stitch",
        "--method",
        "sparsity",
        "--model",
        str(prepared / "model"),
        "--db",
        str(built),
        "--profile",
        str(tmp_path / "s" / "profile.json"),
        "--out",
        str(tmp_path / "stitched"),
    )
    report = json.loads((tmp_path / "stitched" / "stitch.json").read_text())
    assert report["measured_sparsity"] == report["budget_sparsity"], res.output
    ok(
        "evaluate",
        "--model",
        str(tmp_path / "stitched"),
        "--data",
        str(prepared / "text"),
        "--out",
        str(tmp_path / "e.json"),
    )


def test_uniform_inputs_change_only_later_blocks(prepared, built, tmp_path):
    out = tmp_path / "db_uniform"
    sparsity.build_database(
        prepared / "model", prepared / "text", out, {"target": 0.5, **OPTS, "inputs": "uniform"}
    )
    dense, uniform = LevelDatabase.open(built), LevelDatabase.open(out)
    for unit, level in dense.pairs():
        same = torch.equal(dense.load(unit, level)["weight"], uniform.load(unit, level)["weight"])
        pruned = int((dense.load(unit, level)["weight"] == 0).sum())
        assert same == (unit.startswith("block.0.") or pruned == 0), (unit, level)  # 0 pruned: dense weights
