"""GPTQ and packing: beats round-to-nearest on the layer objective, exact grids, lossless bit packing."""

from __future__ import annotations

import pytest
import torch

from evopress.compressors.quantization.gptq import check_group_size, dequantize, gptq, rtn
from evopress.compressors.sparsity.sparsegpt import reconstruction_error
from evopress.errors import UserError
from evopress.hessians import HessianAccumulator
from evopress.packing import pack_bits, pack_linear, unpack_bits, unpack_linear


def _layer(seed=0, rows=48, cols=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    x = x + torch.randn(cols, generator=g)  # correlated inputs with a mean: where error feedback pays off
    acc = HessianAccumulator(cols)
    acc.add(x)
    return torch.randn(rows, cols, generator=g) * 0.1, acc.hessian


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 0])
def test_gptq_error_below_round_to_nearest(act_order, group_size):
    w, h = _layer()
    for q in gptq(w, h, [2, 3, 4], group_size=group_size, act_order=act_order):
        r = rtn(w, q.bits, group_size)
        assert reconstruction_error(w, q.dequantize(), h) < 0.9 * reconstruction_error(w, r.dequantize(), h)


def test_codes_scales_and_zeros_are_on_the_grid():
    w, h = _layer(1)
    for q in gptq(w, h, [2, 3, 5], group_size=32):
        assert q.codes.dtype == torch.uint8 and q.zero.dtype == torch.uint8 and q.scale.dtype == torch.float16
        assert int(q.codes.max()) <= 2**q.bits - 1 and int(q.zero.max()) <= 2**q.bits - 1
        assert q.scale.shape == (48, 4) and q.group_size == 32
        deq = q.dequantize()
        # every weight of a group is an integer multiple of its scale away from the zero level
        steps = deq / q.scale.float().repeat_interleave(32, 1) + q.zero.float().repeat_interleave(32, 1)
        assert torch.equal(steps, q.codes.float())
        # rounding error of the first column is at most half a step (no earlier error has been fed to it)
        assert float((deq[:, 0] - w[:, 0]).abs().max()) <= float(q.scale[:, 0].float().max()) / 2 + 1e-6


def test_more_bits_less_error():
    w, h = _layer(2)
    errs = [reconstruction_error(w, q.dequantize(), h) for q in gptq(w, h, [2, 3, 4, 5, 6], group_size=32)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("bits", [0, 9])
def test_bit_widths_outside_1_to_8_are_refused(bits):
    w, h = _layer()
    with pytest.raises(UserError, match="outside 1..8"):
        gptq(w, h, [bits], group_size=32)


def test_group_size_must_divide_the_width():
    with pytest.raises(UserError, match="does not divide the layer width 576"):
        check_group_size(128, 576)
    assert check_group_size(64, 576) == 64 and check_group_size(0, 576) == 576
    with pytest.raises(UserError, match=r"^group_size=-8 must be >= 0 \(0 = one group per row\)$"):
        check_group_size(-8, 576)


@pytest.mark.parametrize("bits", [1, 8])
def test_bit_widths_1_and_8_are_the_allowed_ends(bits):
    w, h = _layer()
    (q,) = gptq(w, h, [bits], group_size=32)
    assert q.bits == bits and int(q.codes.max()) <= 2**bits - 1


def test_the_grid_always_holds_zero():
    # An all-positive group: the range is stretched down to 0, so 0 is a code (the zero point) and w = 0 is exact.
    from evopress.compressors.quantization.gptq import grid_params

    w = torch.tensor([[0.5, 1.0, 2.0, 4.0]])
    scale, zero = grid_params(w, torch.tensor(15.0))
    assert float(zero[0]) == 0.0 and float(scale[0]) == pytest.approx(4.0 / 15, rel=1e-3)
    scale, zero = grid_params(-w, torch.tensor(15.0))  # all negative: the top of the range is 0
    assert float(zero[0]) == 15.0


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_is_lossless(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (13, 40), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (13 * 40 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, (13, 40)), codes)


def test_packed_linear_dequantizes_to_the_same_weights():
    w, h = _layer(3)
    for q in gptq(w, h, [3, 6], group_size=32):
        back = unpack_linear(pack_linear("x", q), "x", q.bits, [48, 128])
        assert torch.equal(dequantize(back.codes, back.scale, back.zero), q.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_rtn_stores_its_bit_width_and_the_packed_dtypes(bits):
    q = rtn(torch.randn(4, 16, generator=torch.Generator().manual_seed(bits)), bits, 8)
    assert q.bits == bits
    assert q.codes.dtype == torch.uint8 and q.zero.dtype == torch.uint8 and q.scale.dtype == torch.float16
    assert int(q.codes.max()) <= 2**bits - 1
