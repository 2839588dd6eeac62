"""Depth-pruning baselines: each scores blocks one way and removes k of them, returning a profile.

  shortgpt       ShortGPT block influence: 1 - cos(block input, block output), averaged over tokens; drop the k lowest
  window         sliding-window cosine: drop the k contiguous blocks whose input and output are most alike
  shortened_ppl  Shortened-LLaMA's perplexity criterion: remove each block alone, drop the k least harmful
  sleb           SLEB: greedily remove the block whose removal hurts calibration perplexity least, k times
  random         the best (lowest KL) of N random feasible profiles at the compressor's own granularity
  uniform        the k removed units spread evenly over the depth (the compressor's initial profile)
Block scores give whole blocks; for the sublayer granularity the same blocks lose both sublayers (equal cost).

Every baseline has the signature fn(compressor, ctx: FitnessContext, *, seed, tokens, **options) -> Profile and
leaves the live model dense.
"""

from __future__ import annotations

import random

import torch

from evopress.compressors.depth import DepthCompressor
from evopress.scoring import FitnessContext, LiveModel, score_pool, select


def _dense(comp: DepthCompressor) -> None:
    comp.apply_profile(dict.fromkeys(comp.units(), 0))


def _rows(ctx: FitnessContext, seed: int, tokens: int) -> torch.Tensor:
    return ctx.sample(random.Random(seed), tokens)


@torch.no_grad()
def _mean_cosines(ctx: FitnessContext, rows: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """For each (i, j): cos(h_i, h_j) averaged over every token of `rows` (h_i enters block i), float64."""
    total, count = torch.zeros(len(pairs), dtype=torch.float64), 0
    for _, _, bounds in ctx.prefix(rows):
        cos = [
            torch.nn.functional.cosine_similarity(bounds[i].double(), bounds[j].double(), dim=-1)
            for i, j in pairs
        ]
        total += torch.stack([c.sum() for c in cos]).cpu()
        count += bounds[0].shape[0] * bounds[0].shape[1]
    return total / count


def block_influence(ctx: FitnessContext, rows: torch.Tensor) -> torch.Tensor:
    """ShortGPT's BI_i = 1 - E[cos(x_i, x_(i+1))] of every block i, with the model as it is (call it dense)."""
    n = ctx.adapter.num_blocks
    return 1 - _mean_cosines(ctx, rows, [(i, i + 1) for i in range(n)])


def window_similarity(ctx: FitnessContext, rows: torch.Tensor, k: int) -> torch.Tensor:
    """E[cos(x_s, x_(s+k))] of every window of k contiguous blocks starting at s."""
    n = ctx.adapter.num_blocks
    return _mean_cosines(ctx, rows, [(s, s + k) for s in range(n - k + 1)])


def shortgpt(comp: DepthCompressor, ctx: FitnessContext, *, seed: int, tokens: int) -> dict:
    _dense(comp)
    influence = block_influence(ctx, _rows(ctx, seed, tokens))
    return comp.profile_from_blocks(influence.argsort()[: comp.k].tolist())


def window(comp: DepthCompressor, ctx: FitnessContext, *, seed: int, tokens: int) -> dict:
    _dense(comp)
    start = int(window_similarity(ctx, _rows(ctx, seed, tokens), comp.k).argmax())
    return comp.profile_from_blocks(list(range(start, start + comp.k)))


@torch.no_grad()
def _nll_from(ctx: FitnessContext, prefix: list, start: int) -> float:
    """Mean next-token NLL of the live model, starting at block `start` from the cached prefix."""
    total, count = 0.0, 0
    for batch, kwargs, bounds in prefix:
        hidden = ctx.adapter.run_blocks(bounds[start], kwargs, start)[:, :-1]
        logits = ctx.adapter.logits(hidden).float()
        targets = ctx.tokens[batch][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        )
        count += targets.numel()
    return total / count


def _removal_losses(comp: DepthCompressor, ctx: FitnessContext, rows, removed: list[int]) -> dict[int, float]:
    """Calibration NLL after additionally removing each remaining block, with `removed` already gone."""
    block = DepthCompressor(ctx.adapter, len(removed), "block")
    base = block.profile_from_blocks(removed)  # no removal yet: the dense profile
    _dense(comp)
    block.apply_profile(base)
    prefix = ctx.prefix(rows)  # blocks before j are unchanged when j is removed: start there
    losses = {}
    for j in range(ctx.adapter.num_blocks):
        if j in removed:
            continue
        block.apply(f"block.{j}", 1)
        losses[j] = _nll_from(ctx, prefix, j)
        block.apply(f"block.{j}", 0)
    _dense(comp)
    return losses


def shortened_order(comp: DepthCompressor, ctx: FitnessContext, *, seed: int, tokens: int) -> list:
    """Blocks from least to most harmful to remove alone (the answer for any k is the first k)."""
    losses = _removal_losses(comp, ctx, _rows(ctx, seed, tokens), [])
    return sorted(losses, key=losses.get)


def shortened_ppl(comp: DepthCompressor, ctx: FitnessContext, *, seed: int, tokens: int) -> dict:
    return comp.profile_from_blocks(shortened_order(comp, ctx, seed=seed, tokens=tokens)[: comp.k])


def sleb_order(
    comp: DepthCompressor, ctx: FitnessContext, k: int, *, seed: int, tokens: int, start=()
) -> list:
    """SLEB's removals in order; greedy, so the first j of them are SLEB's answer for any j <= k.
    `start`: removals already made (an earlier, shorter order with the same seed and tokens) to continue from."""
    rows, removed = _rows(ctx, seed, tokens), list(start)
    for _ in range(k - len(removed)):
        losses = _removal_losses(comp, ctx, rows, removed)
        removed.append(min(losses, key=losses.get))
    return removed


def sleb(comp: DepthCompressor, ctx: FitnessContext, *, seed: int, tokens: int) -> dict:
    return comp.profile_from_blocks(sleb_order(comp, ctx, comp.k, seed=seed, tokens=tokens))


def random_best(comp: DepthCompressor, ctx: FitnessContext, *, seed: int, tokens: int, n: int = 16) -> dict:
    rng = random.Random(seed)
    rows = ctx.sample(rng, tokens)
    pool = [comp.random_profile(rng) for _ in range(n)]
    live = LiveModel(comp)
    scores = score_pool(ctx, live, pool, rows, None)
    _dense(comp)
    return pool[select(pool, scores, 1)[0]]


def uniform(comp: DepthCompressor, ctx: FitnessContext, **_) -> dict:
    """Reads no calibration data: `seed` and `tokens` are accepted and unused."""
    return comp.initial_profile()


BASELINES = {
    "shortgpt": shortgpt,
    "window": window,
    "shortened_ppl": shortened_ppl,
    "sleb": sleb,
    "random": random_best,
    "uniform": uniform,
}
