"""Scoring candidates: the calibration context, the live model, a pool's KL, and selection.

The search and the baselines score profiles the same way, through this module:
- `FitnessContext`: calibration tokens, the dense reference on them (computed once, with the model dense), and the
  mean KL of the live model on any subset of rows;
- `LiveModel`: one model moved between profiles by applying only the units that differ;
- `score_pool`: KL of every profile of a pool on the same rows (optionally starting each child at the first block
  it changes, from the parent's cached hidden states: prefix reuse);
- `select`: the indices of the best scores, ties to the earlier entry.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from evopress.adapter import ModelAdapter
from evopress.compressors.base import Compressor, Profile
from evopress.fitness import DenseReference, kl_of_hidden, mean_kl


@dataclass
class FitnessContext:
    """Calibration tokens, the dense reference on them, and KL of the live model on a subset of rows."""

    adapter: ModelAdapter
    tokens: torch.Tensor  # [n, seq_len]
    ref: DenseReference
    batch_size: int = 8

    @classmethod
    def build(cls, adapter, tokens, topk: int | None = 512, batch_size: int = 8) -> FitnessContext:
        """Call with the model dense: the reference is the current model's distribution."""
        return cls(adapter, tokens, DenseReference.build(adapter, tokens, topk, batch_size), batch_size)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def total_tokens(self) -> int:
        return self.tokens.numel()

    def sample(self, rng: random.Random, n_tokens: int) -> torch.Tensor:
        """Distinct random rows holding at least `n_tokens` tokens (whole sequences)."""
        n_rows = min(len(self.tokens), math.ceil(n_tokens / self.seq_len))
        return torch.tensor(sorted(rng.sample(range(len(self.tokens)), n_rows)))

    def all_rows(self) -> torch.Tensor:
        return torch.arange(len(self.tokens))

    def kl(self, rows: torch.Tensor) -> float:
        return mean_kl(self.adapter, self.tokens, self.ref, rows, self.batch_size)

    @torch.no_grad()
    def prefix(self, rows: torch.Tensor) -> list:
        """Per batch: (rows, block kwargs, hidden states entering block 0..n) of the live model."""
        out = []
        for batch in rows.split(self.batch_size):
            hidden, kwargs = self.adapter.block_inputs(self.tokens[batch])
            bounds = [hidden]
            for i in range(self.adapter.num_blocks):
                bounds.append(self.adapter.run_blocks(bounds[-1], kwargs, i, i + 1))
            out.append((batch, kwargs, bounds))
        return out

    @torch.no_grad()
    def kl_from(self, prefix: list, start: int) -> float:
        """KL of the live model when blocks before `start` equal those the prefix was computed with."""
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for batch, kwargs, bounds in prefix:
            hidden = self.adapter.run_blocks(bounds[start], kwargs, start)
            total += kl_of_hidden(self.adapter, hidden, self.ref.rows(batch))
            count += len(batch) * self.seq_len
        return float(total / count)


class LiveModel:
    """Tracks which profile the live model holds, so moving to another applies only the differing units."""

    def __init__(self, comp: Compressor):
        self.comp, self.current = comp, None

    def set(self, profile: Profile) -> None:
        self.current = self.comp.apply_profile(profile, self.current)


def first_changed_block(comp: Compressor, a: Profile, b: Profile, num_blocks: int) -> int:
    changed = [comp.block_of(u) for u in a if a[u] != b[u]]
    return min(changed) if changed else num_blocks


def score_pool(ctx, live: LiveModel, pool: list, rows, parent: Profile | None) -> list[float]:
    """KL of every profile in `pool` on `rows`; with `parent`, children start at the parent's prefix."""
    if parent is None:
        scores = []
        for p in pool:
            live.set(p)
            scores.append(ctx.kl(rows))
        return scores
    live.set(parent)
    prefix = ctx.prefix(rows)
    scores = []
    for p in pool:
        live.set(p)
        start = first_changed_block(live.comp, parent, p, ctx.adapter.num_blocks)
        scores.append(ctx.kl_from(prefix, start))
    return scores


def select(pool: list, scores: list[float], keep: int) -> list[int]:
    """Indices of the `keep` lowest scores; ties go to the earlier entry (children come before the parent)."""
    return sorted(range(len(pool)), key=lambda i: (scores[i], i))[:keep]
