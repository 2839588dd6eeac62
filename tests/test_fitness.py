"""KL and perplexity on a tiny random Llama."""

import copy

import pytest
import torch

from evopress.adapter import ModelAdapter
from evopress.fitness import DenseReference, mean_kl, perplexity, perplexity_and_kl, row_losses


def _perturbed(model, scale=0.05, seed=3):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in other.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return other


def test_kl_is_zero_for_identical_model(llama, tokens):
    adapter = ModelAdapter(llama)
    for topk in (None, 16):
        ref = DenseReference.build(adapter, tokens, topk=topk, batch_size=3)
        assert mean_kl(adapter, tokens, ref, batch_size=5) == pytest.approx(0.0, abs=1e-6)


def test_full_kl_matches_float64_direct(llama, tokens):
    other = _perturbed(llama)
    ref = DenseReference.build(ModelAdapter(llama), tokens, topk=None)
    got = mean_kl(ModelAdapter(other), tokens, ref, batch_size=3)

    with torch.no_grad():
        p = torch.log_softmax(llama.double()(tokens).logits, -1)
        q = torch.log_softmax(other.double()(tokens).logits, -1)
    direct = (p.exp() * (p - q)).sum(-1).mean().item()
    assert direct > 1e-4  # the perturbation is visible
    assert got == pytest.approx(direct, rel=1e-4)


def test_topk_kl_approaches_full_kl_from_below(llama, tokens):
    adapter_other = ModelAdapter(_perturbed(llama))
    dense = ModelAdapter(llama)
    full = mean_kl(adapter_other, tokens, DenseReference.build(dense, tokens, topk=None))
    gaps = []
    for k in (2, 8, 32, 128):  # 128 = the whole tiny vocabulary
        approx = mean_kl(adapter_other, tokens, DenseReference.build(dense, tokens, topk=k))
        assert approx <= full + 1e-6  # coarsening never increases KL
        gaps.append(full - approx)
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] == pytest.approx(0.0, abs=1e-5)


def test_subset_rows_and_batching_agree(llama, tokens):
    other = ModelAdapter(_perturbed(llama))
    ref = DenseReference.build(ModelAdapter(llama), tokens, topk=32)
    rows = torch.tensor([1, 4, 6])
    a = mean_kl(other, tokens, ref, rows=rows, batch_size=1)
    b = mean_kl(other, tokens, ref, rows=rows, batch_size=8)
    assert a == pytest.approx(b, rel=1e-5)
    assert a != pytest.approx(mean_kl(other, tokens, ref), rel=1e-3)


def test_perplexity_matches_model_loss(llama, tokens):
    with torch.no_grad():
        loss = llama(tokens, labels=tokens).loss
    assert perplexity(ModelAdapter(llama), tokens, batch_size=3) == pytest.approx(loss.exp().item(), rel=1e-4)


@pytest.mark.parametrize("topk", [None, 16])
def test_one_pass_evaluation_equals_the_two_separate_ones(llama, tokens, topk):
    ref = DenseReference.build(ModelAdapter(llama), tokens, topk=topk)
    adapter = ModelAdapter(_perturbed(llama))
    ppl, kl = perplexity_and_kl(adapter, tokens, ref, batch_size=3)
    assert kl > 1e-6  # the perturbation is visible
    assert ppl == pytest.approx(perplexity(adapter, tokens, batch_size=3), rel=1e-6)
    assert kl == pytest.approx(mean_kl(adapter, tokens, ref, batch_size=3), rel=1e-6)


def test_row_losses_are_each_rows_own_loss(llama, tokens):
    """Per-row sums (for paired comparisons) equal each row measured alone, whatever the batching."""
    ref = DenseReference.build(ModelAdapter(llama), tokens, topk=16)
    adapter = ModelAdapter(_perturbed(llama))
    losses = row_losses(adapter, tokens, ref, batch_size=3)
    seq_len = tokens.shape[1]
    for i in range(len(tokens)):
        alone = DenseReference.build(ModelAdapter(llama), tokens[i : i + 1], topk=16)
        ppl, kl = perplexity_and_kl(adapter, tokens[i : i + 1], alone)
        assert losses.nll[i].item() == pytest.approx(
            torch.log(torch.tensor(ppl)).item() * (seq_len - 1), rel=1e-5
        )
        assert losses.kl[i].item() == pytest.approx(kl * seq_len, rel=1e-5)
    assert len({round(v, 6) for v in losses.kl.tolist()}) == len(tokens)  # rows differ: not one mean repeated


def test_token_kl_is_per_token_and_matches_the_definition():
    from evopress.fitness import token_kl_full, token_kl_topk

    g = torch.Generator().manual_seed(3)
    logits, ref_logits = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    ref_logp = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    expected = [float((ref_logp[t].exp() * (ref_logp[t] - q[t])).sum()) for t in range(5)]
    full = token_kl_full(logits, ref_logp.float())
    assert full.shape == (5,) and full.tolist() == pytest.approx(expected, rel=1e-5)
    top = ref_logp.float().topk(11, dim=-1)  # K = vocabulary: the tail bin is empty, top-K KL is the full KL
    topk = token_kl_topk(logits, top.values, top.indices.to(torch.int32))
    assert topk.shape == (5,) and topk.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
