"""The search engine: budget-exact mutation, selection, resume, brute-force optimum, prefix reuse."""

import itertools
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from evopress.adapter import ModelAdapter
from evopress.compressors.base import Compressor
from evopress.compressors.depth import make
from evopress.errors import UserError
from evopress.mutation import mutate
from evopress.search import FitnessContext, SearchConfig, make_offspring, run_search, select

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeCompressor(Compressor):
    """Units in groups; every level step of a group costs that group's step (like the real databases)."""

    method = "fake"

    def __init__(self, sizes, steps, bounds):
        self._units = [f"u{i}" for i in range(len(sizes))]
        self.sizes, self.steps, self.bounds = sizes, steps, bounds

    def units(self):
        return list(self._units)

    def levels(self, unit):
        lo, hi = self.bounds[int(unit[1:])]
        return list(range(lo, hi + 1))

    def cost(self, unit, level):
        return float(level * self.steps[self.group(unit)])

    def group(self, unit):
        return f"g{self.sizes[int(unit[1:])]}"

    def apply(self, unit, level):
        pass

    def block_of(self, unit):
        return int(unit[1:])

    def initial_profile(self):
        return dict.fromkeys(self._units, 0)


@st.composite
def compressor_and_profile(draw):
    n = draw(st.integers(2, 12))
    sizes = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    steps = {f"g{s}": draw(st.integers(1, 5)) for s in set(sizes)}
    bounds = [(-draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(n)]
    comp = FakeCompressor(sizes, steps, bounds)
    profile = {u: draw(st.sampled_from(comp.levels(u))) for u in comp.units()}
    return comp, profile, draw(st.integers(0, 2**31))


@settings(max_examples=200, deadline=None)
@given(compressor_and_profile())
def test_mutation_never_breaks_the_budget(case):
    comp, profile, seed = case
    rng = random.Random(seed)
    try:
        child = mutate(comp, profile, rng)
    except UserError:  # no switch possible (single-unit groups or all at bounds)
        return
    assert comp.total_cost(child) == comp.total_cost(profile)
    assert all(child[u] in comp.levels(u) for u in child)
    # 1-3 switches, each one unit +1 and one -1 (a later switch may undo an earlier one)
    assert sum(abs(child[u] - profile[u]) for u in child) in (0, 2, 4, 6)


ADAPTER8 = ModelAdapter(tiny_llama(num_layers=8, hidden=16))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 7), st.sampled_from(["block", "sublayer"]), st.integers(0, 2**31))
def test_depth_mutation_keeps_each_kind(k, granularity, seed):
    comp = make(ADAPTER8, k, options={"granularity": granularity})
    rng = random.Random(seed)
    parent = comp.random_profile(rng)
    for child in make_offspring(comp, parent, 8, rng, 3):
        assert comp.removed_blocks(child).keys() == comp.removed_blocks(parent).keys()
        assert all(len(v) == k for v in comp.removed_blocks(child).values())
        assert child != parent


def test_select_keeps_the_best_and_children_win_ties():
    assert select(["a", "b", "c", "d"], [0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    assert select(["child", "parent"], [0.5, 0.5], 1) == [0]


@pytest.fixture(scope="module")
def setup8():
    adapter = ModelAdapter(tiny_llama(num_layers=8))
    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(5))
    return adapter, FitnessContext.build(adapter, tokens, topk=None)


def small_config(**kw):
    base = dict(
        generations=8, offspring=6, survivors=(2, 1), tokens=(32, 96), init="random", initially_generated=4
    )
    return SearchConfig(**{**base, "initial_tokens": 64, **kw})


@pytest.fixture(scope="module")
def full_run(setup8, tmp_path_factory):
    adapter, ctx = setup8
    comp = make(adapter, 3, options={"granularity": "block"})
    return run_search(comp, ctx, small_config(), tmp_path_factory.mktemp("full"))


@pytest.mark.parametrize("stop_at", [1, 4, 7])  # after the first, a middle and the last-but-one generation
def test_resume_after_interruption_gives_the_same_profile(setup8, full_run, tmp_path, stop_at):
    adapter, ctx = setup8
    comp = make(adapter, 3, options={"granularity": "block"})
    full = full_run

    def interrupt(info):
        if info.generation == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(comp, ctx, small_config(), tmp_path / "cut", on_generation=interrupt)
    resumed = run_search(comp, ctx, small_config(), tmp_path / "cut")
    assert resumed.profile == full.profile and resumed.fitness == full.fitness
    assert [h["fitness"] for h in resumed.history] == [h["fitness"] for h in full.history]
    assert (tmp_path / "cut" / "history.csv").read_text().count("\n") == 9


def test_resume_refuses_other_settings(setup8, tmp_path):
    adapter, ctx = setup8
    comp = make(adapter, 3, options={"granularity": "block"})
    run_search(comp, ctx, small_config(generations=1), tmp_path)
    with pytest.raises(UserError, match="other search settings"):
        run_search(comp, ctx, small_config(generations=2, seed=1), tmp_path)


def test_prefix_reuse_changes_time_not_results(setup8):
    adapter, ctx = setup8
    comp = make(adapter, 3)
    on = run_search(comp, ctx, small_config(generations=4, prefix_reuse=True))
    off = run_search(comp, ctx, small_config(generations=4, prefix_reuse=False))
    assert [h["fitness"] for h in on.history] == [h["fitness"] for h in off.history]
    assert on.profile == off.profile


def brute_force_kl(comp, ctx) -> dict:
    """KL on the whole calibration set of every way to remove 3 of the 8 blocks (56 profiles)."""
    kl = {}
    for removed in itertools.combinations(range(8), 3):
        comp.apply_profile(comp.profile_from_blocks(list(removed)))
        kl[removed] = ctx.kl(torch.arange(8))
    return kl


def test_search_finds_the_brute_force_optimum(setup8):
    """8 blocks, remove 3: 56 profiles. With every step scoring the whole calibration set the fitness is
    deterministic, so the search must end at the brute-force minimum of that same fitness."""
    adapter, ctx = setup8
    comp = make(adapter, 3, options={"granularity": "block"})
    everything = ctx.total_tokens
    kl = brute_force_kl(comp, ctx)
    best = min(kl, key=kl.get)
    config = small_config(generations=12, offspring=12, survivors=(4, 1), tokens=(everything, everything))
    infos = []
    result = run_search(comp, ctx, config, on_generation=infos.append)
    assert tuple(comp.removed_blocks(result.profile)["block"]) == best
    assert result.fitness == pytest.approx(kl[best], rel=1e-9)
    assert len(infos) == 12 and infos[-1].tokens > infos[0].tokens > 0


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"survivors": (8, 1)}, "exceed offspring"),
        ({"tokens": (32, 10**6)}, "calibration set"),
        ({"init": "best"}, "search.init .best.; allowed: uniform, random"),
        ({"survivors": (1, 2)}, "non-increasing"),
        ({"survivors": (2,)}, "one entry per selection step"),
        ({"tokens": ("all", 32)}, "'all' in the last step only"),
    ],
)
def test_bad_settings_are_one_line_errors(setup8, kw, message):
    adapter, ctx = setup8
    with pytest.raises(UserError, match=message) as err:
        run_search(make(adapter, 2), ctx, small_config(**kw))
    assert "\n" not in str(err.value)


def test_nothing_to_search_is_a_user_error(setup8):
    adapter, ctx = setup8
    with pytest.raises(UserError):
        run_search(make(adapter, 8, options={"granularity": "block"}), ctx, small_config(init="uniform"))


def test_a_seed_profile_fitter_than_every_random_start_becomes_the_parent(setup8, tmp_path):
    adapter, ctx = setup8
    comp = make(adapter, 3, options={"granularity": "block"})
    everything = ctx.total_tokens
    kl = brute_force_kl(comp, ctx)
    best = comp.profile_from_blocks(list(min(kl, key=kl.get)))
    worst = comp.profile_from_blocks(list(max(kl, key=kl.get)))
    config = small_config(generations=0, initial_tokens=everything, seed_baselines=("best", "worst"))
    calls = []

    def seeds():
        calls.append(1)
        return {"best": best, "worst": worst}

    result = run_search(comp, ctx, config, tmp_path, seeds=seeds)
    assert result.initial_source == "best" and result.profile == best
    assert result.initial_fitness == pytest.approx(min(kl.values()), rel=1e-9)
    # A resumed search neither recomputes the seeds nor forgets where it started.
    again = run_search(comp, ctx, replace(config, generations=1), tmp_path, seeds=seeds)
    assert calls == [1] and again.initial_source == "best"


def test_a_seed_off_budget_or_missing_is_a_user_error(setup8):
    adapter, ctx = setup8
    comp = make(adapter, 3, options={"granularity": "block"})
    config = small_config(generations=0, seed_baselines=("other",))
    with pytest.raises(UserError, match="off budget|removed"):
        run_search(comp, ctx, config, seeds={"other": comp.profile_from_blocks([0, 1])})
    with pytest.raises(UserError, match="no profile was given"):
        run_search(comp, ctx, config, seeds={})
    on_budget = comp.profile_from_blocks([0, 1, 2])
    with pytest.raises(UserError, match="does not have"):
        run_search(comp, ctx, config, seeds={"other": {**on_budget, "block.99": 0}})
    with pytest.raises(UserError, match="cannot take"):
        run_search(comp, ctx, config, seeds={"other": {**on_budget, next(iter(on_budget)): 7}})


def test_command_line_token_steps_accept_all_last():
    from evopress.config import parse_token_steps

    assert parse_token_steps("512, all") == (512, "all")
    assert parse_token_steps("512,2048") == (512, 2048)
    with pytest.raises(UserError, match="bad --tokens '512,most'; expected comma-separated integers"):
        parse_token_steps("512,most")
