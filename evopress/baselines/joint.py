"""Joint baselines at the same budget (bits of the block linears, removed weights counted as 0).

  uniform             nothing removed, every linear at the target's two nearest bits spread evenly: uniform GPTQ
                      (the search's start)
  dp                  nothing removed, the quantization method's DP bits (per-linear errors, knapsack)
  depth_then_uniform  the sublayers a depth profile removes (option `depth_profile=<profile.json>`, e.g. the
                      depth search's), then the freed bits spread evenly over the kept linears
  depth_then_dp       the same removal, then DP bits over the kept linears, with errors measured on the
                      depth-pruned model (the best "prune, then quantize" a user can run in two separate steps)

The depth_then_* baselines take the depth profile from the CLI (`evopress baseline --method joint --name
depth_then_dp --option depth_profile=runs/search/depth/profile.json`) or benchmarks/joint_quality.py; the pipeline
runs `uniform` and `dp` (a depth profile is another method's output, which its joint stages do not depend on).
"""

from __future__ import annotations

import math
import random

import torch

from evopress.baselines import quantization as quantization_baselines
from evopress.baselines.quantization import dp as quantization_dp
from evopress.baselines.quantization import solve_dp
from evopress.compressors.joint import JointCompressor
from evopress.errors import UserError, require


def uniform(comp: JointCompressor, ctx=None, **_) -> dict:
    return comp.initial_profile()


def dp(comp: JointCompressor, ctx, *, seed: int, tokens: int) -> dict:
    bits = quantization_dp(comp.quant, ctx, seed=seed, tokens=tokens)
    return {u: 0 if comp.is_sublayer(u) else bits[u] for u in comp.units()}


def removed_by(comp: JointCompressor, path: str) -> dict:
    """The joint profile removing what a sublayer depth profile removes, linears at their lowest bits."""
    from evopress.profile import read_profile

    require(path, "depth_then_* baselines need --option depth_profile=<a depth profile.json>")
    depth = read_profile(path, keys=("method", "units"))
    require(depth["method"] == "depth", f"{path!r} is a {depth['method']!r} profile, not a depth profile")
    missing = sorted(set(comp.depth.units()) - set(depth["units"]))
    if missing:
        raise UserError(f"{path!r} is not a sublayer depth profile of this model (no {missing[0]!r})")
    return {u: depth["units"][u] if comp.is_sublayer(u) else comp.quant.levels(u)[0] for u in comp.units()}


def depth_then_uniform(comp: JointCompressor, ctx=None, *, seed: int = 0, **_) -> dict:
    """The depth profile's removal, then every kept linear raised one step at a time, round-robin over the depth
    (so bits differ by at most one step between linears of a size), while a step fits the budget."""
    profile = removed_by(comp, comp.opts.depth_profile)
    require(
        comp.total_cost(profile) <= comp.budget,
        "the depth profile leaves more than the budget at the lowest bits",
    )
    while True:
        raised = False
        for unit in comp.kept_linears(profile):
            up = comp.step(unit, profile[unit], +1)
            if (
                up is not None
                and comp.total_cost(profile) + comp.step_cost(profile, unit) <= comp.budget + 1e-6
            ):
                profile[unit] = up
                raised = True
        if not raised:
            return profile


@torch.no_grad()
def depth_then_dp(comp: JointCompressor, ctx, *, seed: int, tokens: int) -> dict:
    """The depth profile's removal applied to the live model, per-linear errors measured on it, and the DP over the
    kept linears at the largest cost the budget reaches exactly (then topped up where a step still fits)."""
    profile = removed_by(comp, comp.opts.depth_profile)
    for sub in comp.depth.units():
        comp.apply(sub, profile[sub])
    kept = comp.kept_linears(profile)
    rows = ctx.sample(random.Random(seed), tokens)
    errors = quantization_baselines.layer_errors(comp.quant, ctx, rows, kept)
    for sub in comp.depth.units():
        comp.apply(sub, 0)
    g = math.gcd(*(comp.quant.sizes[u] for u in kept))
    weights = [comp.quant.sizes[u] // g for u in kept]
    levels = comp.quant.levels(kept[0])
    budget = int(comp.budget // g)
    low = sum(w * levels[0] for w in weights)
    for spend in range(budget, low - 1, -1):  # the largest exactly reachable spend within the budget
        try:
            chosen = solve_dp(weights, [errors[u] for u in kept], levels, spend)
            break
        except UserError:  # unreachable exactly: one budget unit less
            continue
    profile.update(zip(kept, chosen, strict=True))
    return comp.repair(profile, random.Random(seed)) or profile


BASELINES = {
    "uniform": uniform,
    "dp": dp,
    "depth_then_uniform": depth_then_uniform,
    "depth_then_dp": depth_then_dp,
}
