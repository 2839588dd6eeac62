"""Quantization baselines, each a profile over the same database as the search (stitch/evaluate treat them alike).

  uniform  every unit at the target bit-width (targets on the level grid only): uniform GPTQ
  dp       dynamic programming over per-unit errors measured one unit at a time: e(u, b) is the calibration
           KL of the model with only unit u at b bits (all others dense). Assuming the errors add up (what
           EvoPress drops), the profile minimizing sum_u e(u, b_u) with sum_u b_u * n_u = target * N exactly is
           found by a knapsack DP over budget units of gcd(n_u) weights, so any fractional target the sizes
           allow is met exactly (bits can move between linears of different sizes, unlike the search's swaps).

Signature, as for every method: fn(compressor, ctx: FitnessContext, *, seed, tokens, **options) -> Profile.
Both start from the dense live model; `dp` leaves it dense. Both respect the compressor's serving options: a
unit is a fused q/k/v or gate/up under `fuse` (one level for its linears), and levels are the kernel's bits.
"""

from __future__ import annotations

import math
import random

import torch

from evopress.compressors.quantization import QuantizationCompressor
from evopress.errors import require


def uniform(comp: QuantizationCompressor, ctx=None, **_) -> dict:
    """Reads no calibration data: `seed` and `tokens` are accepted and unused."""
    bits = comp.target
    require(float(bits).is_integer(), f"uniform needs an integer target, got {bits} average bits (use dp)")
    levels = comp.levels(comp.units()[0])
    require(int(bits) in levels, f"uniform needs a target among the levels {levels}, got {bits} (use dp)")
    return {u: int(bits) for u in comp.units()}


def solve_dp(weights: list[int], errors: list[list[float]], levels: list[int], budget: int) -> list[int]:
    """Levels (one per item) minimizing sum errors[i][level index] subject to sum weights[i] * level = budget.

    Exact 0/1-choice knapsack over the budget axis: best[s] = least error of the items so far spending s.
    """
    top = sum(weights) * max(levels)
    require(0 <= budget <= top, f"DP budget {budget} outside 0..{top}")
    inf = float("inf")
    best = torch.full((top + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros(len(weights), top + 1, dtype=torch.int8)
    for i, (w, errs) in enumerate(zip(weights, errors, strict=True)):
        new = torch.full_like(best, inf)
        for k, (level, e) in enumerate(zip(levels, errs, strict=True)):
            shift = w * level
            cand = torch.full_like(best, inf)
            cand[shift:] = best[: top + 1 - shift] + e
            better = cand < new
            new = torch.where(better, cand, new)
            choice[i][better] = k
        best = new
    require(math.isfinite(float(best[budget])), f"no profile spends exactly {budget} budget units")
    out, s = [], budget
    for i in reversed(range(len(weights))):
        k = int(choice[i, s])
        out.append(levels[k])
        s -= weights[i] * levels[k]
    assert s == 0
    return out[::-1]


@torch.no_grad()
def layer_errors(
    comp: QuantizationCompressor, ctx, rows: torch.Tensor, units: list[str] | None = None
) -> dict[str, list[float]]:
    """e(u, b): calibration KL with only unit u at b bits, every other unit as the live model holds it (dense,
    or with sublayers removed for the joint method's depth_then_dp); for `units` (default: all)."""
    prefix = ctx.prefix(rows)  # dense hidden states entering every block, computed once
    errors = {}
    for unit in comp.units() if units is None else units:
        linears = comp._linears(unit)  # one linear, or the fused members
        dense = [linear.weight.detach().clone() for linear in linears]
        errs = []
        for bits in comp.levels(unit):
            comp.apply(unit, bits)
            errs.append(ctx.kl_from(prefix, comp.block_of(unit)))
        for linear, weight in zip(linears, dense, strict=True):
            linear.weight.copy_(weight)
        errors[unit] = errs
    return errors


def budget_units(comp: QuantizationCompressor) -> tuple[list[int], int]:
    """Unit weights (sizes / gcd) and the exact budget in those units; one-line error if not integral."""
    units = comp.units()
    g = math.gcd(*(comp.sizes[u] for u in units))
    exact = comp.target * comp.total_params() / g
    require(
        abs(exact - round(exact)) < 1e-6,
        f"target {comp.target} average bits is not reachable exactly in steps of {g} weights",
    )
    return [comp.sizes[u] // g for u in units], round(exact)


def dp_from_errors(comp: QuantizationCompressor, errors: dict[str, list[float]]) -> dict:
    """The additive-error optimum at the compressor's target, from per-layer errors e(u, b)."""
    units = comp.units()
    weights, budget = budget_units(comp)
    chosen = solve_dp(weights, [errors[u] for u in units], comp.levels(units[0]), budget)
    return dict(zip(units, chosen, strict=True))


def dp(comp: QuantizationCompressor, ctx, *, seed: int, tokens: int) -> dict:
    budget_units(comp)  # refuse an unreachable target before the expensive part
    rows = ctx.sample(random.Random(seed), tokens)
    comp.layer_errors = layer_errors(comp, ctx, rows)  # kept for reports
    return dp_from_errors(comp, comp.layer_errors)


BASELINES = {"uniform": uniform, "dp": dp}
