"""SparseGPT (Frantar & Alistarh, 2023), written from the paper: one-shot pruning with OBS weight updates.

For a linear y = x W^T with calibration inputs X, the layer-wise problem is min ||X W^T - X W'^T||^2 over W'
with a given number of zeros. H = X^T X (its scale does not matter) is damped by a fraction of its mean
diagonal, inverted once, and the upper Cholesky factor U of H^-1 drives a left-to-right sweep over columns:
pruning (or keeping) column j and spreading its error onto the columns to its right with U[j, j:] / U[j, j].

- Masks are chosen per block of `blocksize` columns from w^2 / U[j, j]^2 (the OBS saliency), using the weights
  as updated by the blocks before, so later columns can compensate for earlier ones.
- Lazy batch updates: inside a block the updates touch only the block; the block's accumulated error is applied
  to all later columns with one matrix product.
- Exact counts: the level database needs a linear to have *exactly* `count` zeros, so the count is split over
  the column blocks in proportion to their widths (largest remainders first) instead of a per-block fraction.
- Several counts share one Hessian inverse, and their sweeps run together as one batch [levels, rows, cols],
  which is where the cost is on a CPU (the python loop runs once per column, not once per column and level).
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """X^T X of a linear's inputs, accumulated over batches (float64 sums: many tokens, no drift)."""

    def __init__(self, columns: int):
        self.xtx = torch.zeros(columns, columns, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx += (x.T @ x).double()
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return (2.0 * self.xtx / max(self.tokens, 1)).float()


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs (zero diagonal) get diagonal 1."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True).float()


def split_count(count: int, rows: int, widths: list[int]) -> list[int]:
    """Split `count` zeros over column blocks in proportion to their sizes (largest remainders get the rest)."""
    total = rows * sum(widths)
    exact = [count * rows * w / total for w in widths]
    parts = [int(e) for e in exact]
    order = sorted(range(len(widths)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: count - sum(parts)]:
        parts[i] += 1
    return parts


@torch.no_grad()
def prune_counts(
    weight: torch.Tensor, u: torch.Tensor, counts: list[int], blocksize: int = 128
) -> torch.Tensor:
    """SparseGPT-prune `weight` [rows, cols] to each number of zeros in `counts`: returns [len(counts), rows, cols].

    `u` is `inverse_cholesky(H)`. Every result has exactly its count of pruned entries (set to 0.0).
    """
    rows, cols = weight.shape
    for c in counts:
        assert 0 <= c <= rows * cols, f"count {c} outside 0..{rows * cols}"
    w = weight.float().unsqueeze(0).repeat(len(counts), 1, 1)  # [L, rows, cols]
    starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in starts]
    per_block = [split_count(c, rows, widths) for c in counts]  # [L][blocks]
    for b, (i1, width) in enumerate(zip(starts, widths, strict=True)):
        i2 = i1 + width
        w1 = w[:, :, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        mask1 = _block_mask(w1, torch.diagonal(u1), [k[b] for k in per_block])
        for j in range(width):
            col = w1[:, :, j]
            d = u1[j, j]
            q = col.masked_fill(mask1[:, :, j], 0.0)
            err = (col - q) / d  # [L, rows]
            w1[:, :, j:] -= err.unsqueeze(-1) * u1[j, j:].view(1, 1, -1)
            w1[:, :, j] = q
            err1[:, :, j] = err
        w[:, :, i1:i2] = w1
        if i2 < cols:
            w[:, :, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def _block_mask(w1: torch.Tensor, d: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per level, mark the `counts[l]` entries of the block with the smallest w^2 / d^2."""
    score = (w1**2 / d.view(1, 1, -1) ** 2).flatten(1)  # [L, rows * width]
    mask = torch.zeros_like(score, dtype=torch.bool)
    for level, k in enumerate(counts):
        if k > 0:
            mask[level, score[level].topk(k, largest=False).indices] = True
    return mask.view(w1.shape)


def magnitude_prune(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` smallest-magnitude weights of the linear set to zero (the floor baseline)."""
    out = weight.clone()
    if count > 0:
        flat = out.view(-1)
        flat[flat.abs().float().topk(count, largest=False).indices] = 0
    return out


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error ||X (W - W')^T||^2 / tokens = trace(D H D^T) / 2 with D = W - W'."""
    delta = (weight - pruned).double()
    return float(((delta @ hessian.double()) * delta).sum() / 2)
