"""Budget properties of the real sparsity and quantization compressors, for any layer sizes, targets and grids.

The compressors are built without a model (only their budget state: the level grid, the linear sizes), so
hypothesis can draw hundreds of shapes: every level-switch mutation keeps the budget exact, the uniform start
sits exactly on the target, and a target no profile can reach is refused in one line.
"""

from __future__ import annotations

import random

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from evopress.compressors.quantization import QuantizationCompressor, QuantOptions
from evopress.compressors.sparsity import SparsityCompressor, SparsityOptions, level_grid
from evopress.errors import UserError
from evopress.mutation import mutate

SHAPES = st.lists(
    st.tuples(st.sampled_from([16, 32, 48, 64]), st.sampled_from([16, 32, 64])), min_size=2, max_size=8
)


def sparsity_compressor(shapes, target: float, num_levels: int) -> SparsityCompressor:
    comp = object.__new__(SparsityCompressor)
    sizes = {f"block.{i}.lin": r * c for i, (r, c) in enumerate(shapes)}
    comp.target, comp.opts = target, SparsityOptions(num_levels=num_levels)
    comp.grid = level_grid(sizes, 32, target, comp.opts)
    return comp


def quant_compressor(shapes, target: float, bits) -> QuantizationCompressor:
    comp = object.__new__(QuantizationCompressor)
    comp.sizes = {f"block.{i}.lin": r * c for i, (r, c) in enumerate(shapes)}
    comp.opts, comp.target = QuantOptions(bits=tuple(bits)), target
    return comp


@settings(max_examples=150, deadline=None)
@given(SHAPES, st.floats(0.05, 0.95), st.integers(1, 8), st.integers(0, 2**31))
def test_sparsity_mutations_keep_the_pruned_count_exact(shapes, target, num_levels, seed):
    comp = sparsity_compressor(shapes, target, num_levels)
    start = comp.initial_profile()
    budget = comp.total_cost(start)
    assert budget == sum(round(target * n) for n in comp.grid.sizes.values())
    for u in comp.units():  # every step costs the same count of weights, inside 0..max_sparsity of the layer
        levels = comp.levels(u)
        assert 0 in levels
        assert all(
            comp.cost(u, b) - comp.cost(u, a) == comp.grid.step
            for a, b in zip(levels, levels[1:], strict=False)
        )
        assert all(0 <= comp.cost(u, lvl) <= comp.opts.max_sparsity * comp.grid.sizes[u] for lvl in levels)
    rng, profile = random.Random(seed), start
    for _ in range(5):
        try:
            profile = mutate(comp, profile, rng)
        except UserError:  # no switch possible (every unit at a bound)
            break
        assert comp.total_cost(profile) == budget


@settings(max_examples=150, deadline=None)
@given(SHAPES, st.integers(1, 6), st.integers(1, 4), st.integers(0, 8), st.integers(0, 2**31))
def test_quantization_start_is_on_target_and_mutations_keep_it(shapes, low, width, eighths, seed):
    bits = list(range(low, min(low + width, 8) + 1))
    target = bits[0] + eighths / 8 * (bits[-1] - bits[0])
    comp = quant_compressor(shapes, target, bits)
    try:
        start = comp.initial_profile()
    except UserError as err:  # refused: then no split over the size groups reaches the target exactly
        assert "cannot be split exactly" in str(err) or "outside" in str(err)
        assert "\n" not in str(err)
        return
    total = sum(comp.sizes.values())
    assert comp.total_cost(start) == target * total  # exact, not approximately
    assert all(start[u] in bits for u in comp.units())
    rng, profile = random.Random(seed), start
    for _ in range(5):
        try:
            profile = mutate(comp, profile, rng)
        except UserError:
            break
        assert comp.total_cost(profile) == target * total
        assert all(profile[u] in bits for u in comp.units())


@given(SHAPES, st.sampled_from([2, 3, 4]))
def test_quantization_refuses_targets_outside_the_grid(shapes, low):
    bits = [low, low + 1]
    for target in (low - 0.5, low + 1.5):
        assume(target > 0)
        try:
            quant_compressor(shapes, target, bits).initial_profile()
        except UserError as err:
            assert "\n" not in str(err)
        else:
            raise AssertionError(f"target {target} outside {bits} was accepted")
