"""Level-switch mutation: one unit one level up, another unit of the same group one level down.

A level step moves a unit to its neighbouring level (level +- 1 for contiguous levels; the next grid point for
an evenly spaced grid such as 4, 8 bits). Within a group every level step costs the same budget (the
compressors are built that way), so the total cost of a profile never changes: the search stays exactly on
the budget without any repair step.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from evopress.errors import UserError

if TYPE_CHECKING:  # base.Compressor.random_profile calls level_switch: no runtime import back
    from evopress.compressors.base import Compressor, Profile


def _neighbour(comp: Compressor, unit: str, level: int, direction: int) -> int | None:
    """The level one step up (direction +1) or down (-1) from `level`, None at a bound."""
    levels = comp.levels(unit)
    i = levels.index(level) + direction
    return levels[i] if 0 <= i < len(levels) else None


def _can_raise(comp: Compressor, unit: str, level: int) -> bool:
    return _neighbour(comp, unit, level, +1) is not None


def _can_lower(comp: Compressor, unit: str, level: int) -> bool:
    return _neighbour(comp, unit, level, -1) is not None


def level_switch(comp: Compressor, profile: Profile, rng: random.Random) -> Profile:
    """Return a new profile with one level switch applied; `profile` is not modified."""
    units = list(profile)
    raisable = [u for u in units if _can_raise(comp, u, profile[u])]
    rng.shuffle(raisable)
    for up in raisable:
        group = comp.group(up)
        partners = [
            u for u in units if u != up and comp.group(u) == group and _can_lower(comp, u, profile[u])
        ]
        if partners:
            down = rng.choice(partners)
            child = dict(profile)
            child[up] = _neighbour(comp, up, profile[up], +1)
            child[down] = _neighbour(comp, down, profile[down], -1)
            return child
    raise UserError("no level switch is possible: every group has a single unit or all units at their bounds")


def mutation_steps(rng: random.Random, max_steps: int = 3) -> int:
    """min(U{1..max}, U{1..max}): 1, 2 or 3 steps with probability 5/9, 3/9, 1/9 (the authors' choice)."""
    return min(rng.randint(1, max_steps), rng.randint(1, max_steps))


def mutate(comp: Compressor, profile: Profile, rng: random.Random, max_steps: int = 3) -> Profile:
    child = profile
    for _ in range(mutation_steps(rng, max_steps)):
        child = comp.mutation_step(child, rng)
    return child
