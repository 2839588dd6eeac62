"""Sparsity baselines, each a profile on the same level grid as the search (so stitch/evaluate treat them alike).

  uniform    every linear at the target (level 0): uniform SparseGPT
  owl        OWL (Yin et al., 2024): a block's outlier ratio is the share of its scores |W_ij| * ||X_j|| above
             M times their mean (all the block's linears pooled, as the authors' code does); blocks with more
             outliers are pruned less: s_b = s - (r_b - mean r), r normalized to [0, 2 lambda]: the block
             sparsities average s and span 2 lambda (not clipped to s +- lambda, like the authors' code).
             Block sparsities are mapped onto the nearest grid levels of every linear, then rounded so the
             budget is exact. With `grid=true`, lambda and M are picked from the authors' grid by calibration KL.
             From the CLI: `evopress baseline --method sparsity --name owl --option owl_lambda=0.08
             --option owl_m=5 [--option owl_grid=true]`.
  magnitude  every linear at the target by weight magnitude (no SparseGPT update): the floor

Baselines start from the dense live model; after `owl grid=true` the model holds the last candidate tried.

Signature, as for every method: fn(compressor, ctx: FitnessContext, *, seed, tokens, **options) -> Profile.
"""

from __future__ import annotations

import random

import torch

from evopress.compressors.linears import split_unit
from evopress.compressors.sparsity import SparsityCompressor
from evopress.errors import require

OWL_LAMBDAS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2)
OWL_MS = (3, 5, 7, 10)


def uniform(comp: SparsityCompressor, ctx=None, **_) -> dict:
    """Reads no calibration data: `seed` and `tokens` are accepted and unused."""
    return comp.initial_profile()


def magnitude(comp: SparsityCompressor, ctx=None, **_) -> dict:
    """Reads no calibration data: `seed` and `tokens` are accepted and unused."""
    comp.use_magnitude()
    return comp.initial_profile()


@torch.no_grad()
def input_norms(comp: SparsityCompressor, ctx, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j||_2 over the calibration tokens of every input feature j of every linear (live model, dense)."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for unit in comp.units():
        block, name = split_unit(unit)

        def hook(_module, args, unit=unit):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sq[unit] = sq.get(unit, 0) + (x**2).sum(0)

        handles.append(comp.adapter.linear(block, name).register_forward_pre_hook(hook))
    try:
        ctx.prefix(rows)
    finally:
        for h in handles:
            h.remove()
    return {u: s.sqrt() for u, s in sq.items()}


def outlier_ratios(comp: SparsityCompressor, norms: dict[str, torch.Tensor], m: float) -> torch.Tensor:
    """Per block, OWL's outlier ratio: the share of the block's |W| * ||X|| scores (all its linears pooled) above
    m times their pooled mean. Pooled, a linear with larger inputs (typically down_proj) weighs in as OWL intends."""
    per_block: dict[int, list[torch.Tensor]] = {}
    for unit, norm in norms.items():
        score = comp._linear(unit).weight.abs().float() * norm  # [out, in] * [in]: per input feature
        per_block.setdefault(comp.block_of(unit), []).append(score.flatten())
    ratios = []
    for _, scores in sorted(per_block.items()):
        pooled = torch.cat(scores)
        ratios.append(float((pooled > m * pooled.mean()).double().mean()))
    return torch.tensor(ratios, dtype=torch.float64)


def owl_block_sparsity(ratios: torch.Tensor, target: float, lam: float) -> torch.Tensor:
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratios)
    return target - (scaled - scaled.mean())


def profile_for_block_sparsity(comp: SparsityCompressor, block_sparsity: torch.Tensor) -> dict:
    """Nearest grid level of every linear to its block's sparsity, then rounded so the budget is exact.

    Every level step costs the same weights, so the budget is exact iff the levels sum to 0: the units whose
    rounding went furthest up (down) are moved one step down (up) until they do.
    """
    ideal = {
        u: (float(block_sparsity[comp.block_of(u)]) * comp.grid.sizes[u] - comp.grid.base[u]) / comp.grid.step
        for u in comp.units()
    }
    profile = {u: min(max(round(x), comp.levels(u)[0]), comp.levels(u)[-1]) for u, x in ideal.items()}
    while (total := sum(profile.values())) != 0:
        move = -1 if total > 0 else 1
        movable = [u for u in profile if profile[u] + move in comp.levels(u)]
        require(movable, "cannot place the OWL sparsities on the level grid within the budget")
        unit = max(movable, key=lambda u: (profile[u] - ideal[u]) * -move)
        profile[unit] += move
    return profile


def owl(
    comp: SparsityCompressor,
    ctx,
    *,
    seed: int,
    tokens: int,
    lam: float | None = None,
    m: float | None = None,
    grid: bool | None = None,
    lambdas: tuple[float, ...] = OWL_LAMBDAS,
    ms: tuple[float, ...] = OWL_MS,
) -> dict:
    given = comp.baseline_options  # `baseline --option owl_lambda=.. owl_m=.. owl_grid=true`
    lam = float(given.get("lambda", 0.08) if lam is None else lam)
    m = float(given.get("m", 5.0) if m is None else m)
    grid = given.get("grid", False) if grid is None else grid
    require(0 <= lam < min(comp.target, 1 - comp.target), f"OWL lambda={lam} outside [0, min(s, 1-s))")
    require(m > 0, f"OWL M={m} must be > 0")
    require(not comp._applied, "OWL needs the dense model: run it before any level is applied")
    rng = random.Random(seed)
    norms = input_norms(comp, ctx, ctx.sample(rng, tokens))  # activations and weights of the dense model
    candidates = [(lam, m)]
    if str(grid).lower() in ("1", "true", "yes"):
        candidates = [(la, mm) for la in lambdas for mm in ms if la < min(comp.target, 1 - comp.target)]
    ratios = {mm: outlier_ratios(comp, norms, mm) for mm in {mm for _, mm in candidates}}
    profiles = [
        profile_for_block_sparsity(comp, owl_block_sparsity(ratios[mm], comp.target, la))
        for la, mm in candidates
    ]
    if len(profiles) == 1:
        return profiles[0]
    rows = ctx.sample(rng, tokens)  # pick lambda and M on calibration KL (never on held-out data)
    kls = []
    for profile in profiles:
        comp.apply_profile(profile)
        kls.append(ctx.kl(rows))
    best = min(range(len(profiles)), key=lambda i: kls[i])
    comp.chosen = {"lambda": candidates[best][0], "m": candidates[best][1], "kl": kls[best]}
    return profiles[best]


BASELINES = {"uniform": uniform, "owl": owl, "magnitude": magnitude}
