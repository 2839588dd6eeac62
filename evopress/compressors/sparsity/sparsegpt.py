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
    weight: torch.Tensor, u: torch.Tensor, counts: list[int], blocksize: int = 128, update_block: int = 32
) -> torch.Tensor:
    """SparseGPT-prune `weight` [rows, cols] to each number of zeros in `counts`: returns [len(counts), rows, cols].

    `u` is `inverse_cholesky(H)`. Every result has exactly its count of pruned entries (set to 0.0).
    Masks are chosen per `blocksize` columns; the lazy updates run on sub-blocks of `update_block` columns
    (the same arithmetic in another order, with less memory traffic per column on a CPU). Works on the
    transpose [levels, cols, rows] so that a column is one contiguous row.
    """
    rows, cols = weight.shape
    for c in counts:
        assert 0 <= c <= rows * cols, f"count {c} outside 0..{rows * cols}"
    update_block = min(update_block, blocksize)
    wt = weight.float().T.contiguous().unsqueeze(0).repeat(len(counts), 1, 1)  # [L, cols, rows]
    starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in starts]
    per_block = [split_count(c, rows, widths) for c in counts]  # [L][blocks]
    mask = torch.zeros_like(wt, dtype=torch.bool)
    for b, (m1, width) in enumerate(zip(starts, widths, strict=True)):
        d = torch.diagonal(u)[m1 : m1 + width]
        mask[:, m1 : m1 + width] = _block_mask(wt[:, m1 : m1 + width], d, [k[b] for k in per_block])
        for i1 in range(m1, m1 + width, update_block):
            i2 = min(i1 + update_block, m1 + width)
            _sweep(wt, mask, u, i1, i2)
    return wt.transpose(1, 2).contiguous()


def _sweep(wt: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, i1: int, i2: int) -> None:
    """Prune columns i1..i2 one by one (OBS updates inside), then push their error onto all later columns."""
    w1 = wt[:, i1:i2].clone()  # [L, width, rows]
    u1 = u[i1:i2, i1:i2]
    err1 = torch.empty_like(w1)
    for j in range(i2 - i1):
        col = w1[:, j]  # [L, rows]
        q = col.masked_fill(mask[:, i1 + j], 0.0)
        err = (col - q) / u1[j, j]
        w1[:, j + 1 :] -= u1[j, j + 1 :].unsqueeze(1) * err.unsqueeze(1)  # empty for the last column
        w1[:, j] = q
        err1[:, j] = err
    wt[:, i1:i2] = w1
    # lazy batch update of every later column at once (none after the last block)
    wt[:, i2:] -= u[i1:i2, i2:].T @ err1


def _block_mask(w1: torch.Tensor, d: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per level, mark the `counts[l]` entries of the block [L, width, rows] with the smallest w^2 / d^2."""
    score = (w1**2 / d.unsqueeze(1) ** 2).flatten(1)  # [L, width * rows]
    # One sort for all levels (topk with large k is slow on CPU); stable, so tied scores prune the earlier entry.
    order = score.argsort(stable=True)
    rank_below = torch.arange(score.shape[1]).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, rank_below)
    return mask.view(w1.shape)


def magnitude_prune(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` smallest-magnitude weights of the linear set to zero (the floor baseline)."""
    out = weight.clone()
    flat = out.view(-1)
    flat[flat.abs().float().topk(count, largest=False).indices] = 0  # count 0: no index, nothing changes
    return out


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error ||X (W - W')^T||^2 / tokens = trace(D H D^T) / 2 with D = W - W'."""
    delta = (weight - pruned).double()
    return float(((delta @ hessian.double()) * delta).sum() / 2)
