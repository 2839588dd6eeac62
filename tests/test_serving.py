"""Serving constraints of the quantization method: fused q/k/v and gate/up share a level; a kernel's bit grid.

Every profile the search, the mutation and the baselines make gives the parts of a fused module the same bits,
and the stitched compressed-tensors config puts them in one config group; with `kernel: marlin` every level is
4 or 8 bits and the budget stays exact.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import prepare_tiny_workspace
from evopress.adapter import ModelAdapter
from evopress.baselines import quantization as qbase
from evopress.compressors import quantization
from evopress.compressors.quantization import QuantizationCompressor, QuantOptions
from evopress.compressors.quantization.serving import fused_conflicts, fused_units, grid_step, kernel_levels
from evopress.errors import UserError
from evopress.models import load_model
from evopress.mutation import mutate
from evopress.profile import make_profile
from evopress.search import FitnessContext, SearchConfig, run_search

# An evenly spaced 4-level grid: per-linear units search 2,4,6,8; `kernel: marlin` keeps 4 and 8.
OPTS = {"bits": "2,4,6,8", "calib_bits": 4, "group_size": 32, "n_samples": 8, "batch_size": 4}
FUSE = {"fuse": True}
MARLIN = {"fuse": True, "kernel": "marlin"}
LINEARS = [
    f"block.{b}.{name}"
    for b in range(2)
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


# --- without a model ---------------------------------------------------------------------------------------------
def test_fused_units_group_qkv_and_gate_up_of_each_block():
    units = fused_units(LINEARS)
    assert list(units) == [
        f"block.{b}.{name}"
        for b in range(2)
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    assert units["block.1.self_attn.qkv_proj"] == [f"block.1.self_attn.{p}_proj" for p in "qkv"]
    assert units["block.0.mlp.gate_up_proj"] == ["block.0.mlp.gate_proj", "block.0.mlp.up_proj"]
    # a family without these names (GPT-NeoX's fused query_key_value) keeps its units
    neox = ["block.0.attention.query_key_value", "block.0.attention.dense", "block.0.mlp.dense_h_to_4h"]
    assert fused_units(neox) == {u: [u] for u in neox}


def test_fused_conflicts_name_the_fused_modules_whose_parts_differ():
    bits = {f"model.layers.0.{u.split('.', 2)[2]}": 4 for u in LINEARS[:7]}
    assert fused_conflicts(bits) == []
    bits["model.layers.0.self_attn.k_proj"] = 8
    assert fused_conflicts(bits) == ["model.layers.0.self_attn.qkv_proj"]


def test_grids_and_kernels_are_checked_in_one_line():
    assert grid_step((2, 3, 4)) == 1 and grid_step((4, 8)) == 4 and grid_step((3,)) == 1
    assert QuantOptions.from_dict({"bits": "4,8", "calib_bits": 4}).levels == (4, 8)
    assert kernel_levels((2, 3, 4, 5, 6, 7, 8), "marlin", 64) == (4, 8)
    cases = [
        ({"bits": "2,3,5"}, r"^bits=\[2, 3, 5\] must be ascending and evenly spaced"),
        ({"bits": "4,2", "calib_bits": 4}, r"^bits=\[4, 2\] must be ascending"),
        ({"kernel": "exllama"}, r"^unknown kernel 'exllama'; allowed: marlin"),
        ({"kernel": "marlin", "group_size": 16}, r"^group_size=16 is not run by kernel 'marlin'"),
        (
            {"kernel": "marlin", "bits": "2,3"},
            r"^kernel 'marlin' runs bits \[4, 8\], the database has bits \[2, 3\]",
        ),
        ({"fuse": "yes"}, r"fuse"),
    ]
    for options, message in cases:
        with pytest.raises(UserError, match=message) as err:
            QuantOptions.from_dict(options)
        assert "\n" not in str(err.value)


def grid_compressor(sizes: dict[str, int], target: float, bits) -> QuantizationCompressor:
    comp = object.__new__(QuantizationCompressor)
    comp.sizes, comp.opts, comp.target = sizes, QuantOptions(bits=tuple(bits), calib_bits=bits[0]), target
    return comp


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from([512, 1024, 3072]), min_size=2, max_size=8),
    st.sampled_from([(4, 8), (2, 4, 6, 8), (2, 5, 8)]),
    st.integers(0, 8),
    st.integers(0, 2**31),
)
def test_evenly_spaced_grids_keep_the_budget_exact(sizes, bits, eighths, seed):
    target = bits[0] + eighths / 8 * (bits[-1] - bits[0])
    comp = grid_compressor({f"block.{i}.lin": n for i, n in enumerate(sizes)}, target, bits)
    try:
        start = comp.initial_profile()
    except UserError as err:  # no split over the size groups in whole grid steps reaches the target
        assert "cannot be split exactly" in str(err) and "\n" not in str(err)
        return
    budget = target * sum(sizes)
    assert comp.total_cost(start) == budget and set(start.values()) <= set(bits)
    rng, profile = random.Random(seed), start
    for _ in range(5):
        try:
            profile = mutate(comp, profile, rng)
        except UserError:  # every group at a bound
            break
        assert comp.total_cost(profile) == budget and set(profile.values()) <= set(bits)


# --- on the tiny model with a level database ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_workspace(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def built(prepared):
    out = prepared / "db"
    quantization.build_database(prepared / "model", prepared / "text", out, OPTS)
    return out


def _comp(prepared, built, target, options):
    model, _ = load_model(str(prepared / "model"), dtype="float32")
    return quantization.make(ModelAdapter(model), target, db=built, options=dict(options))


def _with_ctx(prepared, built, target, options):
    """A compressor on a fresh dense model and a fitness context on that same model."""
    from evopress.data import load_tokens

    comp = _comp(prepared, built, target, options)
    return comp, FitnessContext.build(comp.adapter, load_tokens(prepared / "text", "calibration"), topk=32)


CONFIG = SearchConfig(generations=2, offspring=3, survivors=(2, 1), tokens=(64, 128), initial_tokens=64)
FUSED_PARTS = {
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
}


def _assert_fused_agree(comp, profile):
    """q/k/v (and gate/up) of every block at one bit-width, in the profile's per-linear view."""
    assert fused_conflicts(comp.linear_bits(profile)) == []
    assert len(comp.linear_bits(profile)) == len(LINEARS)


def test_fused_units_over_the_per_linear_database(prepared, built):
    comp = _comp(prepared, built, 5, FUSE)
    assert comp.units() == list(fused_units(LINEARS))
    assert comp.levels("block.0.self_attn.qkv_proj") == [2, 4, 6, 8]
    # one group per fused kind: every block's qkv has the same size, so a switch between blocks is budget-neutral
    sizes = {u: comp.sizes[u] for u in comp.units()}
    assert sizes["block.0.self_attn.qkv_proj"] == sizes["block.1.self_attn.qkv_proj"] == 64 * (64 + 32 + 32)
    assert comp.group("block.0.mlp.gate_up_proj") == comp.group("block.1.mlp.gate_up_proj")
    assert comp.total_params() == sum(
        r * c for r, c in quantization.linear_sizes(comp.adapter).values()
    )  # same budget as per-linear units
    assert comp.options == {"fuse": True}
    comp.apply("block.1.self_attn.qkv_proj", 2)
    for member in comp.members["block.1.self_attn.qkv_proj"]:
        assert comp._linear(member).weight.equal(comp.weight(member, 2))


def test_every_profile_of_mutation_search_and_baselines_keeps_fused_parts_together(prepared, built, tmp_path):
    comp, ctx = _with_ctx(prepared, built, 5, FUSE)
    profiles = [comp.initial_profile(), comp.random_profile(random.Random(0))]
    rng, profile = random.Random(1), comp.initial_profile()
    for _ in range(40):
        profile = mutate(comp, profile, rng)
        profiles.append(profile)
    profiles.append(run_search(comp, ctx, CONFIG, tmp_path / "s").profile)
    dp_comp, dp_ctx = _with_ctx(prepared, built, 5, FUSE)  # dp measures errors from the dense model
    profiles.append(qbase.dp(dp_comp, dp_ctx, seed=0, tokens=64))
    errors = dp_comp.layer_errors["block.0.self_attn.qkv_proj"]
    assert (
        len(errors) == 4 and errors[0] > errors[-1]
    )  # one error per level of the fused unit: 2 bits hurt most
    for p in profiles:
        assert comp.total_cost(p) == 5 * comp.total_params()
        _assert_fused_agree(comp, p)
    assert len({tuple(sorted(p.items())) for p in profiles}) > 3  # mutation moved
    uniform = qbase.uniform(_comp(prepared, built, 4, FUSE), ctx)
    assert set(uniform.values()) == {4}
    _assert_fused_agree(comp, uniform)


def test_stitched_config_puts_each_fused_module_in_one_group(prepared, built, tmp_path):
    comp = _comp(prepared, built, 5, FUSE)
    units = mutate(comp, comp.initial_profile(), random.Random(2), max_steps=3)
    profile = make_profile(comp, units, target=5.0, source="test")
    assert profile["options"] == {"fuse": True}
    report = quantization.stitch(prepared / "model", profile, built, tmp_path / "ct")
    assert report["fused_parts_agree"] and report["fuse"] is True
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    group_of = {t: (name, g["weights"]["num_bits"]) for name, g in groups.items() for t in g["targets"]}
    assert len(group_of) == len(LINEARS)
    assert len(set(units.values())) > 1  # a mixed profile: the check below can fail
    for b in range(2):
        for fused, parts in FUSED_PARTS.items():
            names = [f"model.layers.{b}.{p}" for p in parts]
            assert len({group_of[n] for n in names}) == 1, names  # one config group, one bit-width
            assert group_of[names[0]][1] == units[f"block.{b}.{fused}"]


def test_per_linear_profiles_say_when_vllm_would_refuse_them(prepared, built, tmp_path):
    comp = _comp(prepared, built, 4, {})
    units = {u: 4 for u in comp.units()}
    units["block.0.self_attn.q_proj"], units["block.0.self_attn.o_proj"] = 6, 2  # same size: budget kept
    profile = make_profile(comp, units, target=4.0, source="test")
    assert profile["options"] == {}  # per-linear profiles are written as before
    report = quantization.stitch(prepared / "model", profile, built, tmp_path / "ct")
    assert report["fused_parts_agree"] is False and "fuse" not in report


def test_marlin_grid_search_and_baselines_use_only_4_and_8_bits(prepared, built, tmp_path):
    comp, ctx = _with_ctx(prepared, built, 6, MARLIN)
    assert comp.levels(comp.units()[0]) == [4, 8] and comp.options == MARLIN
    start = comp.initial_profile()
    assert set(start.values()) == {4, 8} and comp.total_cost(start) == 6 * comp.total_params()
    searched = run_search(comp, ctx, CONFIG, tmp_path / "s").profile
    dp = qbase.dp(*_with_ctx(prepared, built, 6, MARLIN), seed=0, tokens=64)
    for p in (searched, dp):
        assert set(p.values()) <= {4, 8} and comp.total_cost(p) == 6 * comp.total_params()
        _assert_fused_agree(comp, p)
    with pytest.raises(UserError, match=r"^uniform needs a target among the levels \[4, 8\], got 6"):
        qbase.uniform(comp, ctx)
    assert set(qbase.uniform(_comp(prepared, built, 8, MARLIN), ctx).values()) == {8}
    # the stitched folder holds 4- and 8-bit groups only
    profile = make_profile(comp, dp, target=6.0, source="dp")
    report = quantization.stitch(prepared / "model", profile, built, tmp_path / "ct")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["num_bits"] for g in groups.values()} <= {4, 8} and report["kernel"] == "marlin"


def test_bad_serving_options_are_refused_in_one_line(prepared, built):
    with pytest.raises(UserError, match=r"outside the database's range 4..8"):
        _comp(prepared, built, 3, MARLIN)
    with pytest.raises(UserError, match="unknown quantization options"):
        _comp(prepared, built, 5, {"fused": True})
    with pytest.raises(UserError, match=r"^unknown kernel 'machete'"):
        quantization.check_settings(5, {"kernel": "machete"}, {})
    quantization.check_settings(
        6, MARLIN, {}
    )  # the database's bits unknown: the kernel's 4..8 bound the target
    with pytest.raises(UserError, match="outside"):
        quantization.check_settings(3, MARLIN, {})
