"""Multi-step selection as the method states it: children alone in the early steps, the parent joins the last
step on the same rows as the children, survivors shrink per step, and an exact last step never lets the fitness
rise."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import tiny_llama
from evopress import search as search_module
from evopress import workers as workers_module
from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make
from evopress.config import SearchConfig
from evopress.scoring import FitnessContext

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    adapter = ModelAdapter(tiny_llama(num_layers=6))
    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(7))
    return adapter, FitnessContext.build(adapter, tokens, topk=None)


def test_parent_joins_only_the_last_step_on_the_childrens_rows(setup, monkeypatch):
    adapter, ctx = setup
    calls = []
    real = workers_module.score_pool  # the search scores through LocalScorer (evopress/workers.py)

    def recording(ctx_, live, pool, rows, parent):
        scores = real(ctx_, live, pool, rows, parent)
        calls.append({"pool": [dict(p) for p in pool], "rows": rows.tolist(), "scores": scores})
        return scores

    monkeypatch.setattr(workers_module, "score_pool", recording)
    comp = make(adapter, 2, options={"granularity": "block"})
    config = SearchConfig(
        generations=3,
        offspring=6,
        survivors=(3, 2, 1),
        tokens=(32, 96, 192),
        init="uniform",
        seed=4,
        initial_tokens=64,
        screen_with_parent=False,  # the authors' selection; screening is tested below
    )
    parents = [comp.initial_profile()]
    result = search_module.run_search(comp, ctx, config)
    for row in result.history:
        assert row["generation"] >= 1
    gens = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(gens) == 3
    for gen, steps in enumerate(gens):
        parent = parents[-1]
        first, middle, last = steps
        # rows per step: whole sequences holding at least the step's tokens, distinct
        for step, n_tok in zip(steps, config.tokens, strict=True):
            assert len(step["rows"]) == math.ceil(n_tok / ctx.seq_len) == len(set(step["rows"]))
        assert len(first["pool"]) == 6 and parent not in first["pool"]
        assert len(middle["pool"]) == 3 and parent not in middle["pool"]  # survivors of step 1
        assert len(last["pool"]) == 2 + 1 and last["pool"][-1] == parent  # survivors of step 2 + the parent
        # the survivors of each step are its best-scored candidates
        best = sorted(range(6), key=lambda i: first["scores"][i])[:3]
        assert [first["pool"][i] for i in best] == middle["pool"]
        # the winner of the last step becomes the parent (ties to the child, listed first)
        winner = min(range(3), key=lambda i: (last["scores"][i], i))
        parents.append(last["pool"][winner])
        assert result.history[gen]["fitness"] == pytest.approx(last["scores"][winner])
    assert result.profile == parents[-1]


def test_exact_last_step_never_lets_the_fitness_rise(setup):
    adapter, ctx = setup
    comp = make(adapter, 2, options={"granularity": "sublayer"})
    config = SearchConfig(
        generations=6, offspring=4, survivors=(2, 1), tokens=(64, ctx.total_tokens), init="random",
        initially_generated=3, initial_tokens=ctx.total_tokens, seed=1,
    )  # fmt: skip
    result = search_module.run_search(comp, ctx, config)
    fitness = [result.initial_fitness] + [row["fitness"] for row in result.history]
    assert all(b <= a + 1e-12 for a, b in zip(fitness, fitness[1:], strict=False)), fitness


def test_last_step_all_scores_every_row_and_the_parent_once(setup, monkeypatch):
    """`all` in the last step: children meet the parent on every calibration row; the parent keeps the exact
    score it won with instead of being scored again; each generation's fitness is the parent's exact KL."""
    adapter, ctx = setup
    calls = []
    real = workers_module.score_pool  # the search scores through LocalScorer (evopress/workers.py)

    def recording(ctx_, live, pool, rows, parent):
        calls.append({"pool": [dict(p) for p in pool], "rows": rows.tolist()})
        return real(ctx_, live, pool, rows, parent)

    monkeypatch.setattr(workers_module, "score_pool", recording)
    comp = make(adapter, 2, options={"granularity": "sublayer"})
    config = SearchConfig(
        generations=5,
        offspring=4,
        survivors=(2, 1),
        tokens=(64, "all"),
        init="uniform",
        seed=2,
        initial_tokens=64,
        screen_with_parent=False,
    )
    result = search_module.run_search(comp, ctx, config)
    last_steps = calls[1::2]
    assert all(step["rows"] == list(range(len(ctx.tokens))) for step in last_steps)
    assert (
        len(last_steps[0]["pool"]) == 3
    )  # generation 1: the parent's start score was on a sample, so it joins
    assert all(len(step["pool"]) == 2 for step in last_steps[1:])  # later: its exact score is known
    fitness = [row["fitness"] for row in result.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:], strict=False)), fitness
    comp.apply_profile(result.profile)
    assert result.fitness == pytest.approx(ctx.kl(ctx.all_rows()), rel=1e-12)


def start_at_the_optimum(comp, ctx, monkeypatch) -> tuple[dict, tuple]:
    """KL on every row of each way to remove comp's k blocks, and the best of them made comp's initial profile."""
    kl = {}
    for removed in itertools.combinations(range(ctx.adapter.num_blocks), comp.k):
        comp.apply_profile(comp.profile_from_blocks(list(removed)))
        kl[removed] = ctx.kl(ctx.all_rows())
    start = min(kl, key=kl.get)
    monkeypatch.setattr(comp, "initial_profile", lambda: comp.profile_from_blocks(list(start)))
    return kl, start


def test_a_search_started_at_an_optimum_never_leaves_it(monkeypatch):
    """Start at the brute-force optimum (a local optimum for every move): with an exact last step the search
    cannot walk away from it, whatever its small first-step samples say. The control, the same searches with a
    32-token last step, does walk away: the rows decide, not the code path."""
    adapter = ModelAdapter(tiny_llama(num_layers=8, seed=3))
    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(11))
    ctx = FitnessContext.build(adapter, tokens, topk=None)
    comp = make(adapter, 3, options={"granularity": "block"})
    kl, start = start_at_the_optimum(comp, ctx, monkeypatch)

    def ends(last_step, seed, screen=True):
        config = SearchConfig(
            generations=6, offspring=6, survivors=(3, 1), tokens=(32, last_step), init="uniform", seed=seed,
            initial_tokens=32, screen_with_parent=screen,
        )  # fmt: skip
        result = search_module.run_search(comp, ctx, config)
        return tuple(comp.removed_blocks(result.profile)["block"]), result.fitness

    for seed in range(3):
        removed, fitness = ends("all", seed)
        assert removed == start and fitness == pytest.approx(kl[start], rel=1e-9)
    assert any(ends(32, seed, screen=False)[0] != start for seed in range(3))


def test_screening_ends_a_generation_whose_children_all_lose_to_the_parent(setup, monkeypatch):
    """screen_with_parent: the parent is scored with its children on the first step's rows; a generation where no
    child beats it there makes no further step. Started at the best profile of a first step that covers every
    row, no child can beat it, so each generation is one scoring call, and the search ends where it started."""
    adapter, ctx = setup
    comp = make(adapter, 2, options={"granularity": "block"})
    kl, start = start_at_the_optimum(comp, ctx, monkeypatch)
    calls = []
    real = workers_module.score_pool

    def recording(ctx_, live, pool, rows, parent):
        calls.append({"pool": [dict(p) for p in pool], "rows": rows.tolist()})
        return real(ctx_, live, pool, rows, parent)

    monkeypatch.setattr(workers_module, "score_pool", recording)

    def run(first_step):
        calls.clear()
        config = SearchConfig(
            generations=5, offspring=4, survivors=(2, 1), tokens=(first_step, "all"), init="uniform",
            initial_tokens=ctx.total_tokens, seed=0,
        )  # fmt: skip
        result = search_module.run_search(comp, ctx, config)
        return result, list(calls)

    result, steps = run(ctx.total_tokens)
    # generation 1 scores the unscored start in its last step (2 calls); generations 2-5 stop after the first
    assert [len(c["pool"]) for c in steps] == [4, 2 + 1] + [4 + 1] * 4
    assert all(c["pool"][-1] == result.profile for c in steps[1:])
    assert tuple(comp.removed_blocks(result.profile)["block"]) == start
    assert [h["fitness"] for h in result.history] == [pytest.approx(kl[start], rel=1e-9)] * 5
    # a 32-token first step lets some child past the parent on its sample: that generation goes on to the
    # exact step, which the parent still wins
    result, steps = run(32)
    assert len(steps) > 2 + 4
    assert tuple(comp.removed_blocks(result.profile)["block"]) == start
    # a start scored on the initial sample only (here a seed on 32 tokens) gets its exact score in generation 1
    # before any screen can keep it: the fitness the search reports is the exact KL
    config = SearchConfig(
        generations=3, offspring=4, survivors=(2, 1), tokens=(ctx.total_tokens, "all"), init="random",
        initially_generated=1, initial_tokens=32, seed_baselines=("best",), seed=0,
    )  # fmt: skip
    result = search_module.run_search(
        comp, ctx, config, seeds={"best": comp.profile_from_blocks(list(start))}
    )
    assert [h["fitness"] for h in result.history] == [pytest.approx(kl[start], rel=1e-9)] * 3


def test_the_start_is_scored_on_every_row_and_the_end_is_no_worse(setup, monkeypatch, tmp_path):
    """With initial candidates scored on a sample, the checkpoint (and search.json) still records the start's KL on
    every calibration row (`initial_exact_fitness`): the figure the end is held to."""
    adapter, ctx = setup
    starts = []
    real = search_module.initial_parent

    def recording(*args):
        start = real(*args)
        starts.append(dict(start[0]))
        return start

    monkeypatch.setattr(search_module, "initial_parent", recording)
    comp = make(adapter, 2, options={"granularity": "sublayer"})
    config = SearchConfig(
        generations=4, offspring=4, survivors=(2, 1), tokens=(64, "all"), init="random",
        initially_generated=4, initial_tokens=64, seed=3,
    )  # fmt: skip
    result = search_module.run_search(comp, ctx, config, tmp_path)
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    comp.apply_profile(starts[0])
    start_exact = ctx.kl(ctx.all_rows())
    assert state["initial_exact_fitness"] == pytest.approx(start_exact, rel=1e-12)
    assert state["initial_fitness"] != pytest.approx(start_exact, rel=1e-9)  # the sample's figure differs
    assert result.fitness <= start_exact + 1e-12
