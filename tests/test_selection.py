"""Multi-step selection as the method states it: children alone in the early steps, the parent joins the last
step on the same rows as the children, survivors shrink per step, and an exact last step never lets the fitness
rise."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from evopress import search as search_module
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
    real = search_module.score_pool

    def recording(ctx_, live, pool, rows, parent):
        scores = real(ctx_, live, pool, rows, parent)
        calls.append({"pool": [dict(p) for p in pool], "rows": rows.tolist(), "scores": scores})
        return scores

    monkeypatch.setattr(search_module, "score_pool", recording)
    comp = make(adapter, 2, options={"granularity": "block"})
    config = SearchConfig(
        generations=3,
        offspring=6,
        survivors=(3, 2, 1),
        tokens=(32, 96, 192),
        init="uniform",
        seed=4,
        initial_tokens=64,
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
