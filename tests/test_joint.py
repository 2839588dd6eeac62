"""Joint depth + quantization: feasible offspring (property), costs with removals, search, baselines, stitch + load."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import prepare_tiny_workspace
from evopress.adapter import ModelAdapter
from evopress.compressors import joint, quantization
from evopress.errors import UserError
from evopress.methods import get_baseline
from evopress.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = {"bits": "2,3,4,5,6", "group_size": 32, "n_samples": 8, "batch_size": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = prepare_tiny_workspace(tmp_path_factory.mktemp("joint"))
    quantization.build_database(root / "model", root / "text", root / "db", OPTS)
    return root


def compressor(root, target=3.0, **options):
    model, _ = load_model(str(root / "model"), dtype="float32")
    return joint.make(ModelAdapter(model), target, db=root / "db", options=options)


def test_units_costs_and_the_uniform_start(workspace):
    comp = compressor(workspace, 3.0)
    assert comp.units()[:6] == [
        "block.0.attn",
        "block.0.self_attn.q_proj",
        "block.0.self_attn.k_proj",
        "block.0.self_attn.v_proj",
        "block.0.self_attn.o_proj",
        "block.0.mlp",
    ]
    start = comp.initial_profile()
    assert all(start[s] == 0 for s in comp.depth.units())
    assert comp.total_cost(start) == comp.budget == 3.0 * comp.quant.total_params()
    assert comp.budget_problem(start) is None
    # a removed sublayer's linears cost nothing, whatever their bits
    removed = {**start, "block.1.mlp": 1, "block.1.mlp.down_proj": 6}
    mlp = sum(comp.quant.sizes[u] for u in comp.linears_of["block.1.mlp"])
    assert comp.total_cost(removed) == comp.budget - 3 * mlp
    assert "could still go up a level" in comp.budget_problem(removed)
    over = {**start, "block.0.self_attn.q_proj": 6}
    assert "over the budget" in comp.budget_problem(over)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    target=st.sampled_from([2.5, 3.0, 4.0]),
    depth_moves=st.sampled_from([0.3, 1.0]),
)
def test_every_offspring_is_feasible_and_leaves_removed_linears_alone(workspace, seed, target, depth_moves):
    comp = _cached(workspace, target, depth_moves)
    rng = random.Random(seed)
    profile = comp.initial_profile()
    for _ in range(40):
        child = comp.mutation_step(profile, rng)
        assert comp.budget_problem(child) is None, comp.budget_problem(child)
        assert child != profile
        # linears of sublayers removed in both parent and child are never touched
        for sub, linears in comp.linears_of.items():
            if profile[sub] == 1 and child[sub] == 1:
                assert all(child[u] == profile[u] for u in linears)
        assert any(child[s] == 0 for s in comp.depth.units() if s.endswith(".attn"))  # one attention stays
        profile = child
    assert comp.budget_problem(comp.random_profile(rng)) is None


_COMPRESSORS: dict = {}


def _cached(root, target, depth_moves):
    key = (target, depth_moves)
    if key not in _COMPRESSORS:
        _COMPRESSORS[key] = compressor(root, target, depth_moves=depth_moves)
    return _COMPRESSORS[key]


def test_depth_moves_happen_and_repair_spends_the_freed_bits(workspace):
    comp = _cached(workspace, 3.0, 1.0)
    rng = random.Random(1)
    profile = comp.initial_profile()
    removed_once = False
    for _ in range(30):
        profile = comp.mutation_step(profile, rng)
        if any(profile[s] for s in comp.depth.units()):
            removed_once = True
            kept = comp.kept_linears(profile)
            # the freed bits went to the kept linears: their average is above the target
            assert (
                sum(profile[u] * comp.quant.sizes[u] for u in kept) / sum(comp.quant.sizes[u] for u in kept)
                > 3.0
            )
    assert removed_once


def test_search_never_ends_worse_and_baselines_are_feasible(workspace, tmp_path):
    from evopress.config import ComputeConfig, SearchConfig
    from evopress.stages import baseline, search

    compute = ComputeConfig(dtype="float32", batch_size=4, topk=0)
    config = SearchConfig(
        generations=4,
        offspring=4,
        survivors=[1],
        tokens=["all"],
        init="random",
        initially_generated=2,
        initial_tokens=256,  # every calibration row: the start's score is exact, comparable with the end's
    )
    root = workspace
    result = search(
        "joint", root / "model", root / "text", root / "db", tmp_path / "s", 2.5, {}, config, compute
    )
    assert result["initial_source"] == "random" and result["fitness"] <= result["initial_fitness"]
    profile = json.loads((tmp_path / "s" / "profile.json").read_text())
    comp = compressor(root, 2.5)
    assert comp.budget_problem({u: int(v) for u, v in profile["units"].items()}) is None
    for name in ("uniform", "dp"):
        b = baseline(
            "joint",
            name,
            root / "model",
            root / "text",
            root / "db",
            tmp_path / name,
            2.5,
            {},
            compute,
            tokens=64,
        )
        assert comp.budget_problem({u: int(v) for u, v in b["units"].items()}) is None, name

    depth = {u: 0 for u in comp.depth.units()} | {"block.1.mlp": 1}
    (tmp_path / "depth.json").write_text(json.dumps({"method": "depth", "target": 1, "units": depth}))
    for name in ("depth_then_uniform", "depth_then_dp"):
        options = {"depth_profile": str(tmp_path / "depth.json")}
        b = baseline(
            "joint",
            name,
            root / "model",
            root / "text",
            root / "db",
            tmp_path / name,
            2.5,
            options,
            compute,
            tokens=64,
        )
        units = {u: int(v) for u, v in b["units"].items()}
        assert units["block.1.mlp"] == 1 and comp.budget_problem(units) is None, name
    with pytest.raises(UserError, match="need --option depth_profile"):
        get_baseline("joint", "depth_then_uniform")(comp, None, seed=0, tokens=64)


def test_stitched_folder_is_smaller_and_loads_with_the_searched_logits(workspace, tmp_path):
    from evopress.stages import stitch

    comp = compressor(workspace, 3.0)
    profile = comp.initial_profile()
    profile.update({"block.0.mlp": 1, "block.1.attn": 1})
    profile = comp.repair(profile, random.Random(0))
    assert comp.budget_problem(profile) is None
    doc = {"method": "joint", "target": 3.0, "options": {}, "units": profile, "model_sha256": None}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    report = stitch("joint", workspace / "model", tmp_path / "p.json", workspace / "db", tmp_path / "out")
    assert report["layout"] == "decilm" and report["kept_linears"] == len(comp.kept_linears(profile))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert [b["ffn"]["no_op"] for b in config["block_configs"]] == [True, False]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(
        k.startswith("model.layers.0.mlp.") or k.startswith("model.layers.1.self_attn.") for k in keys
    )
    assert "model.layers.0.self_attn.q_proj.weight_packed" in keys

    comp.apply_profile(profile)
    ids = torch.randint(0, 257, (2, 16))
    expected = comp.adapter.forward_logits(ids)
    loaded, _ = load_model(str(tmp_path / "out"), dtype="float32")
    assert not any(
        isinstance(m, torch.nn.Linear) and "mlp" in n and n.startswith("model.layers.0.")
        for n, m in loaded.named_modules()
    )
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_joint_settings_are_one_line_errors(workspace):
    with pytest.raises(UserError, match="depth_moves=1.5 outside 0..1"):
        compressor(workspace, 3.0, depth_moves=1.5)
    with pytest.raises(UserError, match="joint does not take fuse"):
        compressor(workspace, 3.0, fuse=True)
    with pytest.raises(UserError, match="unknown joint options"):
        joint.check_settings(3.0, {"depht_moves": 0.2}, {})
