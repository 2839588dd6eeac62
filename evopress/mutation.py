"""Level-switch mutation: one unit one level up, another unit of the same group one level down.

Within a group every level step costs the same budget (the compressors are built that way), so the total
cost of a profile never changes: the search stays exactly on the budget without any repair step.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from evopress.errors import UserError

if TYPE_CHECKING:  # base.Compressor.random_profile calls level_switch: no runtime import back
    from evopress.compressors.base import Compressor, Profile


def _can_raise(comp: Compressor, unit: str, level: int) -> bool:
    return level + 1 in comp.levels(unit)


def _can_lower(comp: Compressor, unit: str, level: int) -> bool:
    return level - 1 in comp.levels(unit)


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
            child[up] += 1
            child[down] -= 1
            return child
    raise UserError("no level switch is possible: every group has a single unit or all units at their bounds")


def mutation_steps(rng: random.Random, max_steps: int = 3) -> int:
    """min(U{1..max}, U{1..max}): 1, 2 or 3 steps with probability 5/9, 3/9, 1/9 (the authors' choice)."""
    return min(rng.randint(1, max_steps), rng.randint(1, max_steps))


def mutate(comp: Compressor, profile: Profile, rng: random.Random, max_steps: int = 3) -> Profile:
    child = profile
    for _ in range(mutation_steps(rng, max_steps)):
        child = level_switch(comp, child, rng)
    return child
