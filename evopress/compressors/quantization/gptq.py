"""GPTQ (Frantar et al., 2023), written from the paper: one-shot weight quantization with OBS updates.

For a linear y = x W^T with calibration inputs X, each column of W is rounded to a grid in turn and its rounding
error is spread onto the columns not yet quantized with U[j, j:] / U[j, j], where U is the upper Cholesky factor
of (H + damping)^-1 and H = X^T X. This is SparseGPT's sweep with "round" in place of "prune"; the Hessian
helpers are shared with evopress/sparsegpt.py.

Grid: asymmetric min-max per group of `group_size` consecutive input columns of a row (0 = the whole row).
The range always contains 0 (so the zero point is an integer code in 0..2^bits-1); the scale is rounded to
float16 *before* quantizing, so (codes, scales, zero points) as stored reproduce the dequantized weights bit
for bit: w = (q - z) * s, computed in float32 by `dequantize`.

- Group parameters come from the weights as updated so far, when the sweep reaches the group's first column
  (lazy-update blocks are aligned to groups so the whole group has received every earlier update).
- Act-order (optional): columns are visited by decreasing H diagonal; the group parameters are then computed
  once from the original weights ("static groups"), so groups stay contiguous in the stored layout.
- Several bit-widths share one Hessian inverse and run as one batch [levels, cols, rows] (the python loop
  runs once per column, not once per column and bit-width).
"""

from __future__ import annotations

import torch

from evopress.errors import require
from evopress.hessians import inverse_cholesky
from evopress.packing import Quantized, dequantize  # noqa: F401 (re-exported: the format GPTQ writes)

FP16_TINY = torch.finfo(torch.float16).tiny


def check_bits(bits: int) -> int:
    require(isinstance(bits, int) and 1 <= bits <= 8, f"bit-width {bits!r} outside 1..8")
    return bits


def check_group_size(group_size: int, cols: int) -> int:
    """Groups must tile the row exactly (0 = one group per row); remainders are refused, not padded."""
    require(group_size >= 0, f"group_size={group_size} must be >= 0 (0 = one group per row)")
    group = group_size or cols
    require(
        cols % group == 0,
        f"group_size={group_size} does not divide the layer width {cols}; pick a divisor (or 0 = whole row)",
    )
    return group


def grid_params(w: torch.Tensor, maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of the last dim of w [..., n]; maxq broadcasts over the leading dims. Returns (s, z) float32."""
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / maxq).half().float().clamp(min=FP16_TINY)  # float16-exact, never 0
    zero = torch.clamp(torch.round(-lo / scale), torch.zeros_like(maxq), maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor):
    return torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(maxq), maxq)


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """Round-to-nearest on the same grid (no error feedback): the floor GPTQ must beat."""
    rows, cols = weight.shape
    group = check_group_size(group_size, cols)
    maxq = torch.tensor(float(2 ** check_bits(bits) - 1))
    w = weight.float().view(rows, cols // group, group)
    scale, zero = grid_params(w, maxq)
    codes = quantize_codes(w, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq).view(rows, cols)
    return Quantized(bits, codes.to(torch.uint8), scale.half(), zero.to(torch.uint8))


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: list[int],
    group_size: int = 64,
    damp: float = 0.01,
    act_order: bool = False,
    blocksize: int = 8,
) -> list[Quantized]:
    """Quantize `weight` [rows, cols] at every bit-width in `bits` with GPTQ; one `Quantized` per bit-width."""
    rows, cols = weight.shape
    group = check_group_size(group_size, cols)
    for b in bits:
        check_bits(b)
    n_levels = len(bits)
    maxq = torch.tensor([2.0**b - 1 for b in bits]).view(-1, 1)  # [L, 1] broadcasts over rows
    perm = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(cols)
    u = inverse_cholesky(hessian[perm][:, perm], damp)
    wt = weight.float().T[perm].contiguous().unsqueeze(0).repeat(n_levels, 1, 1)  # [L, cols, rows]
    scale = torch.zeros(n_levels, cols // group, rows)
    zero = torch.zeros(n_levels, cols // group, rows)
    if act_order:  # static groups from the original weights, indexed by original column
        g = weight.float().T.reshape(cols // group, group, rows).transpose(1, 2)  # [G, rows, group]
        for i, m in enumerate(maxq):
            scale[i], zero[i] = grid_params(g, m)
    # a group's params must see every update from the columns before it: the part of the group inside the
    # current block is in w1 (in-block updates), the rest in wt (lazy updates of every finished block); that
    # holds when groups start at block starts or blocks hold whole groups, else blocks are made one group wide
    block = blocksize if group % blocksize == 0 or blocksize % group == 0 else group
    codes = torch.zeros(n_levels, cols, rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = wt[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        for j in range(i2 - i1):
            col = perm[i1 + j].item()
            gi = col // group
            if not act_order and col % group == 0:
                cur = torch.cat([w1[:, j : j + group], wt[:, i2 : i1 + j + group]], dim=1)
                s, z = grid_params(cur.transpose(1, 2), maxq)  # [L, rows]
                scale[:, gi], zero[:, gi] = s, z
            s, z = scale[:, gi], zero[:, gi]
            q = quantize_codes(w1[:, j], s, z, maxq)
            codes[:, i1 + j] = q
            err = (w1[:, j] - (q - z) * s) / u[i1 + j, i1 + j]
            if j + 1 < i2 - i1:
                w1[:, j + 1 :] -= u[i1 + j, i1 + j + 1 : i2].view(1, -1, 1) * err.unsqueeze(1)
            err1[:, j] = err
        if i2 < cols:
            wt[:, i2:] -= u[i1:i2, i2:].T @ err1
    inverse = torch.argsort(perm)
    out = []
    for i, b in enumerate(bits):
        out.append(
            Quantized(
                b,
                codes[i][inverse].T.contiguous().to(torch.uint8),
                scale[i].T.contiguous().half(),
                zero[i].T.contiguous().to(torch.uint8),
            )
        )
    return out
