"""Baselines checked against their published definitions, computed independently here (issue 18).

Each expected answer is computed from the Hugging Face model itself (hidden states, `labels=` loss, layers taken
out of the ModuleList, forward hooks on the linears), never through the adapter or the scoring code, on the same
calibration rows the baseline reads (`FitnessContext.sample(random.Random(seed), tokens)`: distinct random rows,
sorted). Every test also asserts that the plausible wrong answer (most instead of least influential, the window
one block off, one-shot instead of greedy, ...) differs, so the test can fail for that bug.
"""

import math
import random

import pytest
import torch

from conftest import tiny_llama
from evopress.adapter import ModelAdapter
from evopress.baselines import depth as depth_baselines
from evopress.baselines import sparsity as owl_baselines
from evopress.compressors import depth, sparsity
from evopress.errors import UserError
from evopress.scoring import FitnessContext

TOKENS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
SEED, N_TOKENS = 3, 128  # 4 of the 8 rows: a baseline reading other rows can give another answer
MARGIN = 1e-4  # expected answers must win by more than float noise, or the test would be a coin toss


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(seed: int = SEED, n_tokens: int = N_TOKENS) -> torch.Tensor:
    n, seq_len = TOKENS.shape
    return torch.tensor(sorted(random.Random(seed).sample(range(n), min(n, math.ceil(n_tokens / seq_len)))))


def _planted(num_layers: int, scales: dict[int, float], seed: int = 0):
    """A tiny Llama whose blocks in `scales` write `scale` times their output into the residual (near-identity
    blocks when small), and whose final norm has random weights (so a normed final hidden state, HF's last
    `hidden_states` entry, no longer has the direction of the last block's output)."""
    model = tiny_llama(num_layers=num_layers, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for i, c in scales.items():
            model.model.layers[i].self_attn.o_proj.weight.mul_(c)
            model.model.layers[i].mlp.down_proj.weight.mul_(c)
        model.model.norm.weight.copy_(0.2 + 2.8 * torch.rand(model.model.norm.weight.shape, generator=g))
    return model


@torch.no_grad()
def _block_states(model, rows) -> tuple[list[torch.Tensor], torch.Tensor]:
    """h[0..n]: h[i] enters block i, h[i+1] leaves it (HF `output_hidden_states`; the last block's output comes
    from a hook, because HF applies the final norm to its last entry). Also returns that normed last entry."""
    captured = {}

    def hook(_module, _args, out):
        captured["out"] = out[0] if isinstance(out, tuple) else out

    handle = model.model.layers[-1].register_forward_hook(hook)
    try:
        hs = model(input_ids=TOKENS[rows], output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()
    return [*hs[:-1], captured["out"]], hs[-1]


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@torch.no_grad()
def _without(model, removed, fn):
    """fn() with the blocks in `removed` taken out of the model's ModuleList (a really shallower model)."""
    full = model.model.layers
    model.model.layers = torch.nn.ModuleList([b for i, b in enumerate(full) if i not in set(removed)])
    try:
        return fn()
    finally:
        model.model.layers = full


def _nll(model, removed, rows) -> float:
    """Mean next-token NLL (log perplexity) of the model without `removed` on the rows: HF's own loss."""
    ids = TOKENS[rows]
    return _without(model, removed, lambda: float(model(input_ids=ids, labels=ids, use_cache=False).loss))


def _lowest(scores: dict[int, float], k: int) -> list[int]:
    order = sorted(scores, key=scores.get)
    assert scores[order[k]] - scores[order[k - 1]] > MARGIN, "test model has a near tie: pick another seed"
    return sorted(order[:k])


def _comp(model, k: int, granularity: str):
    adapter = ModelAdapter(model)
    comp = depth.make(adapter, k, options={"granularity": granularity})
    return comp, FitnessContext.build(adapter, TOKENS, topk=None)


def _removed(comp, profile) -> list[int]:
    """The removed blocks; at sublayer granularity both kinds must lose the same blocks."""
    blocks = comp.removed_blocks(profile)
    assert all(b == blocks[comp.groups()[0]] for b in blocks.values()), blocks
    return blocks[comp.groups()[0]]


def _assert_dense(comp, dense_logits):
    assert torch.equal(comp.adapter.forward_logits(TOKENS[:2]), dense_logits), (
        "baseline left the model pruned"
    )


# --- ShortGPT: block influence ---------------------------------------------------------------------------------
# Blocks 1 and 7 are near-identity (BI ~ 0), 3 and 4 write little; block 7 is last, where HF's hidden_states
# carry the final norm.
SHORTGPT_SCALES = {1: 0.05, 7: 0.05, 3: 0.3, 4: 0.3}


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("k", [2, 3])
def test_shortgpt_removes_the_least_influential_blocks(k, granularity):
    model = _planted(8, SHORTGPT_SCALES)
    rows = _rows()
    h, normed_last = _block_states(model, rows)
    bi = {i: 1 - _mean_cos(h[i], h[i + 1]) for i in range(8)}  # ShortGPT: BI_i = 1 - E[cos(x_i, x_i+1)]
    expected = _lowest(bi, k)

    comp, ctx = _comp(model, k, granularity)
    dense = comp.adapter.forward_logits(TOKENS[:2])
    got = _removed(comp, depth_baselines.shortgpt(comp, ctx, seed=SEED, tokens=N_TOKENS))
    assert got == expected
    _assert_dense(comp, dense)
    # Teeth: argsort reversed (dropping the *most* influential blocks) gives another answer ...
    assert expected != sorted(sorted(bi, key=bi.get)[-k:])
    # ... and so does measuring the last block against HF's normed final hidden state.
    bi_normed = {**bi, 7: 1 - _mean_cos(h[7], normed_last)}
    assert expected != sorted(sorted(bi_normed, key=bi_normed.get)[:k])


def test_block_influence_and_window_similarity_are_token_means_over_every_row():
    """The scores themselves, not only the blocks they pick: means over every token of the rows (rows split into
    batches of 2, so a score kept from the last batch only, or a mean of per-batch means, is caught), cosine taken
    over the hidden dimension."""
    model = _planted(8, SHORTGPT_SCALES)
    rows = _rows(SEED, 6 * TOKENS.shape[1])
    h, _ = _block_states(model, rows)
    adapter = ModelAdapter(model)
    ctx = FitnessContext.build(adapter, TOKENS, topk=None, batch_size=4)  # 6 rows: batches of 4 and 2
    bi = torch.tensor([1 - _mean_cos(h[i], h[i + 1]) for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(depth_baselines.block_influence(ctx, rows), bi, rtol=0, atol=1e-6)
    for k in (2, 3):
        sim = torch.tensor([_mean_cos(h[s], h[s + k]) for s in range(8 - k + 1)], dtype=torch.float64)
        torch.testing.assert_close(depth_baselines.window_similarity(ctx, rows, k), sim, rtol=0, atol=1e-6)


# --- sliding window: the k contiguous blocks whose input and output are most alike -----------------------------
@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("k", [2, 3])
def test_window_removes_the_most_similar_contiguous_window(k, granularity):
    model = _planted(8, SHORTGPT_SCALES)
    h, _ = _block_states(model, _rows())
    neg_sim = {s: -_mean_cos(h[s], h[s + k]) for s in range(8 - k + 1)}  # window s..s+k-1: h[s] vs h[s+k]
    (start,) = _lowest(neg_sim, 1)
    expected = list(range(start, start + k))

    comp, ctx = _comp(model, k, granularity)
    dense = comp.adapter.forward_logits(TOKENS[:2])
    got = _removed(comp, depth_baselines.window(comp, ctx, seed=SEED, tokens=N_TOKENS))
    assert got == expected
    _assert_dense(comp, dense)
    # Teeth: the least similar window is another answer, and so is an off-by-one comparison of h[s] with
    # h[s+k-1] (a window of k-1 blocks). Reporting s+1..s+k for the right s fails the equality above.
    assert max(neg_sim, key=neg_sim.get) != start
    off_by_one = {s: -_mean_cos(h[s], h[s + k - 1]) for s in range(8 - k + 2)}
    assert min(off_by_one, key=off_by_one.get) != start


# --- Shortened-LLaMA (PPL) and SLEB: brute force on a 6-block model ---------------------------------------------
# Seed 0, 6 blocks, these rows: the one-shot order starts 2, 1 while greedy removal goes 2, 5 (asserted below),
# so the two criteria, which are easy to swap, give different answers at k=2.
PPL_LAYERS = 6


def _one_shot(model, rows) -> dict[int, float]:
    return {j: _nll(model, [j], rows) for j in range(PPL_LAYERS)}


def _greedy(model, rows, k) -> list[int]:
    removed: list[int] = []
    for _ in range(k):
        losses = {j: _nll(model, [*removed, j], rows) for j in range(PPL_LAYERS) if j not in removed}
        (best,) = _lowest(losses, 1)
        removed.append(best)
    return removed


@pytest.mark.parametrize(("k", "granularity"), [(1, "block"), (2, "block"), (2, "sublayer")])
def test_shortened_ppl_removes_the_blocks_least_harmful_alone(k, granularity):
    model = tiny_llama(num_layers=PPL_LAYERS, seed=0)
    rows = _rows()
    single = _one_shot(model, rows)
    expected = _lowest(single, k)

    comp, ctx = _comp(model, k, granularity)
    dense = comp.adapter.forward_logits(TOKENS[:2])
    got = _removed(comp, depth_baselines.shortened_ppl(comp, ctx, seed=SEED, tokens=N_TOKENS))
    assert got == expected
    _assert_dense(comp, dense)
    assert expected != sorted(sorted(single, key=single.get)[-k:])  # teeth: the most harmful blocks
    if k == 2:  # teeth: a greedy (SLEB) implementation would answer otherwise here
        assert expected != sorted(_greedy(model, rows, k))


@pytest.mark.parametrize(("k", "granularity"), [(2, "block"), (3, "block"), (2, "sublayer")])
def test_sleb_removes_greedily_by_calibration_perplexity(k, granularity):
    model = tiny_llama(num_layers=PPL_LAYERS, seed=0)
    rows = _rows()
    order = _greedy(model, rows, k)

    comp, ctx = _comp(model, k, granularity)
    dense = comp.adapter.forward_logits(TOKENS[:2])
    assert depth_baselines.sleb_order(comp, ctx, k, seed=SEED, tokens=N_TOKENS) == order
    got = _removed(comp, depth_baselines.sleb(comp, ctx, seed=SEED, tokens=N_TOKENS))
    assert got == sorted(order)
    _assert_dense(comp, dense)
    # Teeth: the one-shot ranking (Shortened-LLaMA) differs here, as does the greedy *worst* removal.
    single = _one_shot(model, rows)
    assert sorted(order) != sorted(sorted(single, key=single.get)[:k])
    assert order[0] != max(single, key=single.get)
    # Continuing an earlier, shorter order (the benchmark's resume) adds only the missing removals.
    assert depth_baselines.sleb_order(comp, ctx, k, seed=SEED, tokens=N_TOKENS, start=order[:1]) == order


# --- the best of N random profiles, by KL(dense || pruned) ------------------------------------------------------
def test_random_best_returns_the_lowest_kl_candidate():
    model = tiny_llama(num_layers=PPL_LAYERS, seed=0)
    comp, ctx = _comp(model, 2, "block")
    seed, n_tokens, n = 2, 96, 8
    rng = random.Random(seed)  # the baseline's draws: its rows first, then the pool
    rows = torch.tensor(sorted(rng.sample(range(len(TOKENS)), math.ceil(n_tokens / TOKENS.shape[1]))))
    pool = [comp.random_profile(rng) for _ in range(n)]
    ids = TOKENS[rows]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), -1)

    def kl(profile) -> float:
        removed = comp.removed_blocks(profile)["block"]
        logits = _without(model, removed, lambda: model(input_ids=ids, use_cache=False).logits)
        logq = torch.log_softmax(logits.double(), -1)
        return float((logp.exp() * (logp - logq)).sum(-1).mean())

    kls = {i: kl(p) for i, p in enumerate(pool)}
    best, runner_up = sorted(kls, key=kls.get)[:2]
    assert kls[runner_up] - kls[best] > MARGIN or pool[runner_up] == pool[best], "near tie: pick another seed"
    got = depth_baselines.random_best(comp, ctx, seed=seed, tokens=n_tokens, n=n)
    assert got == pool[best]
    assert pool[max(kls, key=kls.get)] != pool[best]  # teeth: the highest-KL candidate is another profile


def test_random_best_scores_the_rows_it_sampled():
    # Seed 0, 64 tokens: the pool's best on its 2 sampled rows is not the best on all 8 (the teeth).
    comp, ctx = _comp(tiny_llama(num_layers=PPL_LAYERS, seed=0), 2, "block")
    rng = random.Random(0)
    rows = ctx.sample(rng, 64)
    pool = [comp.random_profile(rng) for _ in range(8)]

    def best_on(rows_) -> dict:
        scores = []
        for profile in pool:
            comp.apply_profile(profile)
            scores.append(ctx.kl(rows_))
        return pool[min(range(len(pool)), key=lambda i: (scores[i], i))]

    expected = best_on(rows)
    assert expected != best_on(ctx.all_rows())
    assert depth_baselines.random_best(comp, ctx, seed=0, tokens=64, n=8) == expected


@pytest.mark.parametrize(("k", "spread"), [(2, [2, 6]), (3, [1, 4, 6]), (4, [1, 3, 5, 7])])
def test_uniform_spreads_the_removed_blocks_evenly(k, spread):
    # Catches "the first k" / "the last k" blocks: the spread is the centre of each of k equal slices of depth.
    comp, ctx = _comp(tiny_llama(num_layers=8), k, "block")
    assert _removed(comp, depth_baselines.uniform(comp, ctx, seed=0, tokens=N_TOKENS)) == spread


# --- OWL ----------------------------------------------------------------------------------------------------------
def _sparsity_comp(num_layers: int = 3):
    adapter = ModelAdapter(tiny_llama(num_layers=num_layers))
    comp = sparsity.make(adapter, 0.5, options={"weights": "magnitude"})  # no database needed
    return comp, FitnessContext.build(adapter, TOKENS, topk=None)


@torch.no_grad()
def _hf_input_norms(model, rows) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token, per input feature of every linear, from hooks on the HF model."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):

                def hook(_m, args, unit=f"block.{i}.{name}"):
                    x = args[0].double().reshape(-1, args[0].shape[-1])
                    sq[unit] = sq.get(unit, 0) + (x**2).sum(0)

                handles.append(module.register_forward_pre_hook(hook))
    try:
        model(input_ids=TOKENS[rows], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {u: s.sqrt() for u, s in sq.items()}


def test_input_norms_are_per_feature_l2_norms_over_the_rows():
    comp, ctx = _sparsity_comp()
    rows = torch.tensor([1, 4, 6])
    expected = _hf_input_norms(comp.adapter.model, rows)
    got = owl_baselines.input_norms(comp, ctx, rows)
    assert set(got) == set(expected) == set(comp.units())
    for unit, norm in expected.items():
        # Catches a mean over tokens instead of the norm (off by sqrt(T)), a missing sqrt, other rows.
        torch.testing.assert_close(got[unit].double(), norm, rtol=1e-5, atol=1e-6)
    other = _hf_input_norms(comp.adapter.model, torch.tensor([0, 2, 3]))
    assert not torch.allclose(other["block.0.mlp.down_proj"], expected["block.0.mlp.down_proj"])


def _heavy_norms(comp, boost: dict[str, float]) -> dict[str, torch.Tensor]:
    """Log-normal per-feature norms (outlier features), times `boost[unit]` for some linears."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for unit in comp.units():
        cols = comp._linear(unit).weight.shape[1]
        out[unit] = torch.exp(1.2 * torch.randn(cols, generator=g)) * boost.get(unit, 1.0)
    return out


def _scores(comp, norms, unit) -> torch.Tensor:
    return comp._linear(unit).weight.detach().abs().double() * norms[unit].double().view(1, -1)


def _owl_reference_ratios(comp, norms, m) -> torch.Tensor:
    """OWL's layerwise outlier distribution (Yin et al. 2024; EVOPRESS.md): all scores |W_ij| * ||X_j|| of a
    block's linears pooled, the share above m x the mean of that pool (the authors' code concatenates every
    linear's flattened metric before `check_outlier_mean`)."""
    out = []
    for b in range(comp.adapter.num_blocks):
        pool = torch.cat([_scores(comp, norms, u).flatten() for u in comp.units() if comp.block_of(u) == b])
        out.append(float((pool > m * pool.mean()).double().mean()))
    return torch.tensor(out, dtype=torch.float64)


def test_outlier_ratios_pool_the_block_scores_like_owl():
    comp, _ = _sparsity_comp()
    # Block 1's down_proj sees 20x larger inputs: pooled, its scores dominate the block's outliers;
    # per linear, scaling one linear's inputs changes nothing.
    norms = _heavy_norms(comp, {"block.1.mlp.down_proj": 20.0})
    expected = _owl_reference_ratios(comp, norms, 5.0)
    assert int(expected.argmax()) == 1
    # Catches a per-linear threshold (blind to block 1's down_proj), m ignored, ||X||^2, blocks out of order.
    torch.testing.assert_close(owl_baselines.outlier_ratios(comp, norms, 5.0), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        owl_baselines.outlier_ratios(comp, norms, 3.0),
        _owl_reference_ratios(comp, norms, 3.0),
        rtol=1e-6,
        atol=1e-9,
    )


def _owl_reference_sparsity(ratios: torch.Tensor, s: float, lam: float) -> torch.Tensor:
    """The OWL authors' code: density = (r - min) / (max - min) * 2 lambda, minus its mean, plus (1 - s);
    sparsity = 1 - density. Not clipped: only the width 2 lambda and the mean s are guaranteed."""
    r = ratios.double()
    density = (r - r.min()) / (r.max() - r.min()) * 2 * lam
    return 1 - (density - density.mean() + (1 - s))


@pytest.mark.parametrize(
    "ratios",
    [
        torch.rand(12, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.05,
        # Skewed: one block far above the rest lands at s - 1.5 lambda, outside "s +- lambda".
        torch.tensor([0.01, 0.01, 0.01, 0.09], dtype=torch.float64),
    ],
    ids=["random", "skewed"],
)
@pytest.mark.parametrize(("s", "lam"), [(0.6, 0.08), (0.5, 0.2)])
def test_owl_block_sparsity_matches_the_reference_formula(ratios, s, lam):
    got = owl_baselines.owl_block_sparsity(ratios, s, lam)
    torch.testing.assert_close(got, _owl_reference_sparsity(ratios, s, lam), rtol=0, atol=1e-12)
    # Teeth, each independent of the reference: more outliers -> less pruned (catches the sign), the
    # average stays s (catches a missing "+ mean"), the spread is exactly 2 lambda (catches lambda not doubled).
    assert int(got.argmin()) == int(ratios.argmax()) and int(got.argmax()) == int(ratios.argmin())
    assert abs(float(got.mean()) - s) < 1e-12
    assert abs(float(got.max() - got.min()) - 2 * lam) < 1e-12


def test_owl_block_sparsity_of_equal_ratios_is_uniform():
    got = owl_baselines.owl_block_sparsity(torch.full((4,), 0.03, dtype=torch.float64), 0.6, 0.1)
    assert torch.equal(got, torch.full((4,), 0.6, dtype=torch.float64))  # catches a 0/0 (NaN) spread


def test_profile_for_block_sparsity_puts_each_linear_near_its_blocks_sparsity():
    comp, _ = _sparsity_comp()
    target = torch.tensor([0.42, 0.58, 0.5], dtype=torch.float64)
    profile = owl_baselines.profile_for_block_sparsity(comp, target)
    assert comp.total_cost(profile) == comp.total_cost(comp.initial_profile())  # budget exact
    for unit, level in profile.items():
        size = comp.grid.sizes[unit]
        realized = comp.grid.pruned(unit, level) / size
        # Nearest grid level, plus at most one step for the budget repair. Catches a unit mapped to another
        # block's sparsity and levels with the wrong sign (block 0 would be pruned 58%).
        assert abs(realized - float(target[comp.block_of(unit)])) <= 1.5 * comp.grid.step / size, unit
    per_block = [
        sum(comp.grid.pruned(u, lvl) for u, lvl in profile.items() if comp.block_of(u) == b)
        / sum(comp.grid.sizes[u] for u in profile if comp.block_of(u) == b)
        for b in range(3)
    ]
    assert per_block[0] < per_block[2] < per_block[1]


def test_owl_reads_its_rows_and_applies_lambda_and_m():
    comp, ctx = _sparsity_comp()
    seed, n_tokens, lam, m = 2, 64, 0.1, 3.0
    norms = _hf_input_norms(comp.adapter.model, _rows(seed, n_tokens))
    ratios = owl_baselines.outlier_ratios(comp, norms, m)
    assert float(ratios.max() - ratios.min()) > 1e-3  # blocks differ, so the profile is not uniform
    expected = owl_baselines.profile_for_block_sparsity(comp, _owl_reference_sparsity(ratios, 0.5, lam))
    assert expected != comp.initial_profile()
    got = owl_baselines.owl(comp, ctx, seed=seed, tokens=n_tokens, lam=lam, m=m)
    assert got == expected
    # Teeth: lambda and M swapped, or M ignored (default 5), give other profiles.
    swapped = owl_baselines.outlier_ratios(comp, norms, 5.0)
    assert owl_baselines.profile_for_block_sparsity(comp, _owl_reference_sparsity(swapped, 0.5, lam)) != got


# --- OWL's placement on the level grid, and its options --------------------------------------------------------
class _GridComp:
    """The part of a sparsity compressor profile_for_block_sparsity reads, one unit per block, with size 1, base
    0 and step 1: a unit's ideal level is then its block's value itself."""

    def __init__(self, bounds: list[tuple[int, int]]):
        from types import SimpleNamespace

        self._units = [f"block.{i}.mlp.down_proj" for i in range(len(bounds))]
        self._levels = {u: list(range(lo, hi + 1)) for u, (lo, hi) in zip(self._units, bounds, strict=True)}
        self.grid = SimpleNamespace(
            sizes=dict.fromkeys(self._units, 1), base=dict.fromkeys(self._units, 0), step=1
        )

    def units(self):
        return self._units

    def levels(self, unit):
        return self._levels[unit]

    def block_of(self, unit):
        return int(unit.split(".")[1])


@pytest.mark.parametrize("seed", range(8))
def test_profile_for_block_sparsity_is_the_nearest_on_budget_profile(seed):
    """Greedy rounding repair is exact for a separable convex cost: the result is the brute-force minimum of
    sum (level - ideal)^2 over every profile within the bounds whose levels sum to 0 (the exact budget)."""
    import itertools

    g = random.Random(seed)
    bounds = [(-g.randint(0, 2), g.randint(0, 2)) for _ in range(5)]
    comp = _GridComp(bounds)
    ideal = torch.tensor([g.uniform(lo - 1.5, hi + 1.5) for lo, hi in bounds], dtype=torch.float64)
    feasible = [c for c in itertools.product(*(range(lo, hi + 1) for lo, hi in bounds)) if sum(c) == 0]
    if not feasible:
        with pytest.raises(
            UserError, match="^cannot place the OWL sparsities on the level grid within the budget$"
        ):
            owl_baselines.profile_for_block_sparsity(comp, ideal)
        return
    best = min(feasible, key=lambda c: sum((lvl - float(x)) ** 2 for lvl, x in zip(c, ideal, strict=True)))
    got = owl_baselines.profile_for_block_sparsity(comp, ideal)
    assert tuple(got[u] for u in comp.units()) == best


def test_owl_reads_lambda_m_and_grid_from_its_options():
    comp, ctx = _sparsity_comp()
    plain = owl_baselines.owl(comp, ctx, seed=2, tokens=64)  # defaults: lambda 0.08, M 5
    assert plain == owl_baselines.owl(comp, ctx, seed=2, tokens=64, lam=0.08, m=5.0)
    assert plain != owl_baselines.owl(comp, ctx, seed=2, tokens=64, lam=0.12, m=5.0)
    comp.baseline_options = {"lambda": 0.12, "m": 3.0}
    assert owl_baselines.owl(comp, ctx, seed=2, tokens=64) == owl_baselines.owl(
        comp, ctx, seed=2, tokens=64, lam=0.12, m=3.0
    )
    grid_comp, grid_ctx = _sparsity_comp()  # the grid leaves the model at its last candidate: a fresh one
    grid_comp.baseline_options = {"grid": "true"}
    picked = owl_baselines.owl(grid_comp, grid_ctx, seed=2, tokens=64, lambdas=(0.02, 0.2), ms=(3.0, 7.0))
    chosen = grid_comp.chosen
    assert (chosen["lambda"], chosen["m"]) in [(0.02, 3.0), (0.02, 7.0), (0.2, 3.0), (0.2, 7.0)]
    comp, ctx = _sparsity_comp()
    assert picked == owl_baselines.owl(comp, ctx, seed=2, tokens=64, lam=chosen["lambda"], m=chosen["m"])


def test_owl_lambda_zero_is_uniform_and_the_bound_is_refused():
    comp, ctx = _sparsity_comp()
    assert owl_baselines.owl(comp, ctx, seed=0, tokens=64, lam=0.0) == comp.initial_profile()
    with pytest.raises(UserError, match=r"^OWL lambda=0.5 outside \[0, min\(s, 1-s\)\)$"):
        owl_baselines.owl(comp, ctx, seed=0, tokens=64, lam=0.5)
    with pytest.raises(UserError, match=r"^OWL M=0.0 must be > 0$"):
        owl_baselines.owl(comp, ctx, seed=0, tokens=64, m=0.0)
