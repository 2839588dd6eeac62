"""The level-switch mutation and the scoring helpers, checked against their stated definitions: the step-count
law min(U{1..m}, U{1..m}), one switch = exactly one unit up and one of the same group down, and the block where
prefix reuse restarts a child."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from conftest import tiny_llama
from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make
from evopress.errors import UserError
from evopress.mutation import level_switch, mutate, mutation_steps
from evopress.scoring import FitnessContext, first_changed_block


@pytest.fixture(scope="module")
def depth_comp():
    return make(ModelAdapter(tiny_llama(num_layers=6)), 2, options={"granularity": "sublayer"})


@pytest.mark.parametrize("max_steps", [1, 2, 3, 4])
def test_step_count_follows_the_min_of_two_uniforms(max_steps):
    # P(min = k) = ((m - k + 1)^2 - (m - k)^2) / m^2: for m=3 that is 5/9, 3/9, 1/9 (the authors' law).
    rng, n = random.Random(0), 40_000
    counts = Counter(mutation_steps(rng, max_steps) for _ in range(n))
    assert set(counts) == set(range(1, max_steps + 1))
    for k in range(1, max_steps + 1):
        expected = ((max_steps - k + 1) ** 2 - (max_steps - k) ** 2) / max_steps**2
        assert counts[k] / n == pytest.approx(expected, abs=0.01)


def test_default_step_law_is_the_authors_three():
    rng, n = random.Random(1), 40_000
    counts = Counter(mutation_steps(rng) for _ in range(n))
    assert sorted(counts) == [1, 2, 3]
    assert counts[1] / n == pytest.approx(5 / 9, abs=0.01)


def test_one_switch_moves_one_unit_up_and_one_of_its_group_down(depth_comp):
    rng = random.Random(3)
    parent = depth_comp.initial_profile()
    for _ in range(200):
        child = level_switch(depth_comp, parent, rng)
        diff = {u: child[u] - parent[u] for u in parent if child[u] != parent[u]}
        assert sorted(diff.values()) == [-1, 1]
        up, down = sorted(diff, key=diff.get, reverse=True)
        assert depth_comp.group(up) == depth_comp.group(down)
        parent = child


def test_mutate_with_one_step_is_exactly_one_switch(depth_comp):
    rng = random.Random(5)
    parent = depth_comp.initial_profile()
    for _ in range(100):
        child = mutate(depth_comp, parent, rng, max_steps=1)
        assert sum(abs(child[u] - parent[u]) for u in parent) == 2


def test_mutate_with_more_steps_moves_more_units(depth_comp):
    rng = random.Random(6)
    parent = depth_comp.initial_profile()
    moved = [
        sum(abs(c - parent[u]) for u, c in mutate(depth_comp, parent, rng, 3).items()) for _ in range(300)
    ]
    assert max(moved) > 2


def test_no_possible_switch_is_a_user_error():
    # One block: each group (attention, MLP) holds a single unit, so nothing can move down within a group.
    comp = make(ModelAdapter(tiny_llama(num_layers=1)), 1, options={"granularity": "sublayer"})
    with pytest.raises(UserError, match="^no level switch is possible: every group has a single unit"):
        level_switch(comp, comp.initial_profile(), random.Random(0))


def test_first_changed_block_is_the_lowest_block_that_differs(depth_comp):
    parent = depth_comp.initial_profile()
    units = depth_comp.units()
    for unit in units:
        child = dict(parent)
        child[unit] = 1 - child[unit]
        assert first_changed_block(depth_comp, parent, child, 6) == depth_comp.block_of(unit)
    late = [u for u in units if depth_comp.block_of(u) == 4]
    early = [u for u in units if depth_comp.block_of(u) == 2]
    child = dict(parent)
    child[late[0]] = 1 - child[late[0]]
    child[early[0]] = 1 - child[early[0]]
    assert first_changed_block(depth_comp, parent, child, 6) == 2
    assert first_changed_block(depth_comp, parent, dict(parent), 6) == 6


def test_fitness_context_keeps_the_top_k_it_was_given():
    adapter = ModelAdapter(tiny_llama(num_layers=2))
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    ctx = FitnessContext.build(adapter, tokens, topk=8)
    assert ctx.ref.topk == 8 and ctx.ref.logp.shape == (3, 16, 8) and ctx.ref.index.shape == (3, 16, 8)
    default = FitnessContext.build(adapter, tokens)
    assert default.ref.topk == 512 and default.batch_size == 8


def test_mutate_defaults_to_at_most_three_switches(depth_comp):
    rng = random.Random(8)
    parent = depth_comp.initial_profile()
    moved = [sum(abs(c - parent[u]) for u, c in mutate(depth_comp, parent, rng).items()) for _ in range(2000)]
    assert max(moved) == 6  # three switches touch at most 6 units (4 would reach 8 in 2000 draws)
