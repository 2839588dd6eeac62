"""Reference implementations of GPTQ and SparseGPT, written out column by column, that ours must match exactly.

The other tests only check that GPTQ beats round-to-nearest and that SparseGPT beats magnitude pruning; an
algorithm with a wrong update (half of the error fed forward, stale group parameters, a saliency without the
OBS denominator) still passes those. Here the plain textbook sweep (no lazy blocks, no batching over levels) is
written in the test, with the same float32 arithmetic, and ours must give the same codes / masks. Each
reference also has "mutants" (the bugs above) that must *not* match ours, so these tests have teeth.
"""

from __future__ import annotations

import pytest
import torch

from evopress.compressors.quantization.gptq import gptq, rtn
from evopress.compressors.sparsity.sparsegpt import magnitude_prune, prune_counts, split_count
from evopress.hessians import inverse_cholesky

ROWS, COLS = 16, 64
FP16_TINY = torch.finfo(torch.float16).tiny


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small weight and a random SPD Hessian X^T X of correlated inputs (where error feedback matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, COLS, generator=g) @ torch.randn(COLS, COLS, generator=g) / COLS**0.5
    x = x + torch.randn(COLS, generator=g)
    return torch.randn(ROWS, COLS, generator=g) * 0.1, x.T @ x


# ---------------------------------------------------------------------------------------------------- GPTQ


def _grid(w: torch.Tensor, maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid over the columns of w [rows, n]; the range contains 0, scale is float16-exact."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / maxq).half().float().clamp(min=FP16_TINY)
    zero = torch.clamp(torch.round(-lo / scale), torch.zeros_like(maxq), maxq)
    return scale, zero


def ref_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    act_order: bool = False,
    err_factor: float = 1.0,
    stale_groups: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column-by-column GPTQ. Returns (codes, scale, zero) in the original column order.

    Mutants: `err_factor` scales the error fed to later columns (0.5 = "half the error"); `stale_groups`
    computes the group parameters from the original weights instead of the weights updated so far.
    """
    rows, cols = weight.shape
    group = group_size or cols
    maxq = torch.tensor([2.0**bits - 1])  # a 1-element tensor, as ours uses (not a python scalar)
    perm = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(cols)
    u = inverse_cholesky(hessian[perm][:, perm], damp)
    w = weight.float()[:, perm].clone()  # columns in visiting order
    codes = torch.zeros(rows, cols)
    scale = torch.zeros(rows, cols // group)
    zero = torch.zeros(rows, cols // group)
    if (
        act_order or stale_groups
    ):  # static groups: from the original weights, contiguous in the original order
        for gi in range(cols // group):
            scale[:, gi], zero[:, gi] = _grid(weight.float()[:, gi * group : (gi + 1) * group], maxq)
    for j in range(cols):
        col = int(perm[j])
        gi = col // group
        if not act_order and not stale_groups and col % group == 0:
            # the group's first column: params from the group as updated by every earlier column
            scale[:, gi], zero[:, gi] = _grid(w[:, j : j + group], maxq)
        s, z = scale[:, gi], zero[:, gi]
        q = torch.clamp(torch.round(w[:, j] / s) + z, torch.zeros_like(maxq), maxq)
        codes[:, col] = q
        err = (w[:, j] - (q - z) * s) / u[j, j]
        if err_factor != 1.0:
            err = err * err_factor
        w[:, j + 1 :] -= u[j, j + 1 :].view(1, -1) * err.view(-1, 1)
    return codes.to(torch.uint8), scale.half(), zero.to(torch.uint8)


@pytest.fixture(scope="module")
def layer():
    return _case(0)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("blocksize", [1, 8, 24, 128])
def test_gptq_matches_column_by_column_reference(layer, group_size, act_order, blocksize):
    """Catches any wrong update (error fraction, sign, U row), stale/misplaced group params, bad act-order perm.

    blocksize 1 is the reference's order of float operations exactly; 8 and 128 exercise the lazy block updates
    (groups aligned with blocks / blocks holding whole groups); 24 is neither and must fall back to one group
    per block. In every case the codes must be identical: the lazy updates only reorder float sums, which on
    this case moves no weight across a rounding boundary.
    """
    w, h = layer
    ours = gptq(w, h, [2, 3, 4], group_size=group_size, act_order=act_order, blocksize=blocksize)
    for q in ours:
        codes, scale, zero = ref_gptq(w, h, q.bits, group_size, act_order=act_order)
        assert torch.equal(q.codes, codes), f"{q.bits} bits: {(q.codes != codes).sum()} codes differ"
        assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)


def test_gptq_codes_do_not_depend_on_the_lazy_block_size(layer):
    """Catches a lazy update that drops or double-counts the error of a finished block."""
    w, h = layer
    for group_size in (0, 16):
        runs = [gptq(w, h, [2, 3, 4], group_size=group_size, blocksize=b) for b in (1, 8, 128)]
        for other in runs[1:]:
            for a, b in zip(runs[0], other, strict=True):
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
def test_gptq_with_identity_hessian_is_round_to_nearest(layer, group_size, act_order):
    """With H = c*I, U is diagonal: no error reaches other columns, so GPTQ is exactly RTN on the same grid.

    Catches a grid (scale/zero/rounding) that differs between GPTQ and RTN, and updates that leak without
    a correlation to drive them.
    """
    w, _ = layer
    for q in gptq(w, 3.0 * torch.eye(COLS), [2, 3, 4], group_size=group_size, act_order=act_order):
        r = rtn(w, q.bits, group_size)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)


@pytest.mark.parametrize(
    "mutant",
    [
        pytest.param({"err_factor": 0.5}, id="half-error"),
        pytest.param({"err_factor": 0.0}, id="no-error-feedback"),
        pytest.param({"stale_groups": True}, id="groups-from-original-weights"),
    ],
)
def test_gptq_reference_mutants_differ_from_ours(layer, mutant):
    """The comparison has teeth: a GPTQ with one of these bugs would give other codes on this very case."""
    w, h = layer
    group_size = 16
    for q in gptq(w, h, [2, 3, 4], group_size=group_size):
        codes, _, _ = ref_gptq(w, h, q.bits, group_size, **mutant)
        assert not torch.equal(q.codes, codes), f"{q.bits} bits: mutant {mutant} not told apart"


def test_inverse_cholesky_is_the_damped_inverse_factor(layer):
    """U upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1 (a wrong damping would pass the rest)."""
    _, h = layer
    for damp in (0.01, 0.1):
        u = inverse_cholesky(h, damp).double()
        assert torch.equal(u, u.triu())
        damped = h.double() + damp * torch.diagonal(h.double()).mean() * torch.eye(COLS, dtype=torch.float64)
        expected = torch.linalg.inv(damped)
        assert torch.allclose(u.T @ u, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


# ----------------------------------------------------------------------------------------------- SparseGPT


def ref_sparsegpt(
    weight: torch.Tensor,
    u: torch.Tensor,
    count: int,
    blocksize: int,
    err_factor: float = 1.0,
    obs_saliency: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column SparseGPT. Returns (pruned weights, mask of pruned entries).

    Per block of `blocksize` columns (count split by `split_count`): the mask is the block's `k` entries with the
    smallest w^2 / U[j, j]^2 of the weights as updated so far, ties broken by the column-major order of the block
    (ours flattens [cols, rows]); then each column j of the block is pruned and its error
    (w_j - p_j) / U[j, j] fed to every later column through U[j, j+1:].
    Mutants: `err_factor` (0.5 = half the error), `obs_saliency=False` (plain w^2, no OBS denominator).
    """
    rows, cols = weight.shape
    w = weight.float().clone()
    starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in starts]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for m1, width, k in zip(starts, widths, split_count(count, rows, widths), strict=True):
        d = torch.diagonal(u)[m1 : m1 + width]
        score = w[:, m1 : m1 + width] ** 2
        if obs_saliency:
            score = score / d.view(1, -1) ** 2
        order = score.T.flatten().argsort(stable=True)  # column-major over the block
        block = torch.zeros(width * rows, dtype=torch.bool)
        block[order[:k]] = True
        mask[:, m1 : m1 + width] = block.view(width, rows).T
        for j in range(m1, m1 + width):
            p = w[:, j].masked_fill(mask[:, j], 0.0)
            err = (w[:, j] - p) / u[j, j]
            if err_factor != 1.0:
                err = err * err_factor
            w[:, j + 1 :] -= u[j, j + 1 :].view(1, -1) * err.view(-1, 1)
            w[:, j] = p
    return w, mask


COUNTS = [0, 1, 300, 512, 900, ROWS * COLS]


@pytest.mark.parametrize("blocksize", [16, 24, 64, 128])
def test_sparsegpt_matches_column_by_column_reference(layer, blocksize):
    """Catches a wrong OBS update or saliency, masks chosen from stale weights, a wrong count split.

    With update_block=1 ours does the reference's float operations in the same order: weights identical.
    With the default lazy sub-blocks (32 columns) the error of a sub-block reaches later columns through one
    matrix product, which sums in another order: the masks are still identical, the weights agree to float32
    rounding (relative 1e-5 of the largest weight).
    """
    w, h = layer
    u = inverse_cholesky(h)
    exact = prune_counts(w, u, COUNTS, blocksize, update_block=1)
    lazy = prune_counts(w, u, COUNTS, blocksize)
    for i, count in enumerate(COUNTS):
        ref_w, ref_mask = ref_sparsegpt(w, u, count, blocksize)
        assert int(ref_mask.sum()) == count
        assert torch.equal(exact[i] == 0, ref_mask) and torch.equal(exact[i], ref_w)
        assert torch.equal(lazy[i] == 0, ref_mask)
        assert torch.allclose(lazy[i], ref_w, rtol=0, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize(
    "mutant",
    [
        pytest.param({"err_factor": 0.5}, id="half-error"),
        pytest.param({"obs_saliency": False}, id="saliency-without-U-diagonal"),
    ],
)
def test_sparsegpt_reference_mutants_differ_from_ours(layer, mutant):
    """The comparison has teeth: these bugs give other masks (or weights far beyond rounding) on this case."""
    w, h = layer
    u = inverse_cholesky(h)
    counts = [300, 512, 900]
    for count, ours in zip(counts, prune_counts(w, u, counts, 16), strict=True):
        ref_w, ref_mask = ref_sparsegpt(w, u, count, 16, **mutant)
        assert not torch.equal(ours == 0, ref_mask) or not torch.allclose(ours, ref_w, rtol=0, atol=1e-3)


@pytest.mark.parametrize("count", [0, 1, 300, 512, 900, ROWS * COLS])
def test_sparsegpt_with_identity_hessian_and_one_block_is_magnitude_pruning(layer, count):
    """H = c*I: U is diagonal with equal entries, so saliency ranks by |w| and no update moves a kept weight.

    With one mask block (blocksize >= cols) the count is not split: exactly magnitude pruning of the same count.
    Catches a saliency that is not monotone in |w| and updates that leak into kept weights.
    """
    w, _ = layer
    u = inverse_cholesky(2.0 * torch.eye(COLS))
    for blocksize in (COLS, 128):
        (ours,) = prune_counts(w, u, [count], blocksize)
        assert torch.equal(ours, magnitude_prune(w, count))


def test_sparsegpt_with_identity_hessian_and_blocks_is_per_block_magnitude_pruning(layer):
    """With several mask blocks the count is split by block width, so it is magnitude pruning *per block*
    (which in general is not global magnitude pruning of the same count)."""
    w, _ = layer
    u = inverse_cholesky(2.0 * torch.eye(COLS))
    blocksize = 24  # blocks of 24, 24, 16 columns: an uneven split
    widths = [24, 24, 16]
    counts = [1, 300, 512, 900]
    for count, ours in zip(counts, prune_counts(w, u, counts, blocksize), strict=True):
        expected = torch.cat(
            [
                magnitude_prune(w[:, s : s + width].contiguous(), k)
                for s, width, k in zip((0, 24, 48), widths, split_count(count, ROWS, widths), strict=True)
            ],
            dim=1,
        )
        assert torch.equal(ours, expected)
