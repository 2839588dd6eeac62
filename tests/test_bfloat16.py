"""The bfloat16 compute path (`compute.dtype: auto` on GPUs and CPUs with native bfloat16): fitness and a search.

The KL is accumulated in float32/float64 whatever the model's dtype, so a bfloat16 model scores candidates like
the float32 one up to bfloat16's rounding of the logits; a search in bfloat16 stays on budget and ends no worse
than its start on the rows its last step scores.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama
from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make
from evopress.config import SearchConfig
from evopress.fitness import DenseReference, mean_kl, perplexity
from evopress.scoring import FitnessContext
from evopress.search import run_search


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(11))


def _models():
    f32 = tiny_llama(num_layers=4)
    return f32, copy.deepcopy(f32).to(torch.bfloat16)


def test_kl_of_a_dropped_block_agrees_between_float32_and_bfloat16(tokens):
    scores = {}
    for model in _models():
        adapter = ModelAdapter(model)
        ref = DenseReference.build(adapter, tokens, topk=None)
        assert mean_kl(adapter, tokens, ref) == pytest.approx(0.0, abs=1e-6)  # dense vs itself
        comp = make(adapter, 1, options={"granularity": "block"})
        comp.apply("block.2", 1)
        scores[model.dtype] = mean_kl(adapter, tokens, ref)
        assert torch.isfinite(torch.tensor(perplexity(adapter, tokens)))
    assert scores[torch.bfloat16] > 0
    assert scores[torch.bfloat16] == pytest.approx(scores[torch.float32], rel=0.1)


def test_one_search_generation_in_bfloat16(tokens, tmp_path):
    _, bf16 = _models()
    adapter = ModelAdapter(bf16)
    ctx = FitnessContext.build(adapter, tokens, topk=32)
    comp = make(adapter, 1, options={"granularity": "sublayer"})
    all_rows = tokens.numel()
    config = SearchConfig(
        generations=1, offspring=4, survivors=(2, 1), tokens=(64, all_rows), initial_tokens=64, init="uniform"
    )
    result = run_search(comp, ctx, config, tmp_path)
    assert comp.total_cost(result.profile) == comp.budget()
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.fitness))
    # The last step scores every row, so the winner is no worse than the start on them.
    comp.apply_profile(comp.initial_profile())
    start = ctx.kl(torch.arange(len(tokens)))
    assert result.fitness <= start + 1e-9
