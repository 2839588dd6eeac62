"""The interface every compression method implements, in the project's vocabulary.

unit     a piece of the model compressed as one (a sublayer, a block, a linear layer), named by a string
level    an integer setting of a unit (0 = the method's reference level; e.g. kept / target sparsity / bits)
profile  unit name -> level, for every unit (`Profile`); the *profile file* is the JSON around it (profile.py)
target   the user's knob: sublayers (or blocks) removed, average sparsity, average bits
cost     what a unit spends at a level (a removed unit, pruned weights, bits x weights)
budget   the total cost every feasible profile has at the target (sum of its units' costs)
group    units of one group trade level steps at equal cost, so a level-switch mutation (one unit one step
         up, another unit of the same group one step down) keeps the budget exactly

A compressor is bound to one live model (through its `ModelAdapter`): `apply` switches a unit to a level in
place and is reversible, so the search moves one model between candidates by changing only the units that
differ.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

Profile = dict[str, int]


class Compressor(ABC):
    method: str = ""

    @abstractmethod
    def units(self) -> list[str]:
        """Every unit, in forward order."""

    @abstractmethod
    def levels(self, unit: str) -> list[int]:
        """The levels this unit can take, ascending (a level step moves to a neighbour in this list)."""

    @abstractmethod
    def cost(self, unit: str, level: int) -> float:
        """Budget spent by `unit` at `level` (e.g. removed units, pruned weights, bits x parameters)."""

    @abstractmethod
    def group(self, unit: str) -> str:
        """Units of one group trade one level step for one level step at equal cost."""

    @abstractmethod
    def apply(self, unit: str, level: int) -> None:
        """Put `unit` at `level` in the live model (in place, reversible)."""

    @abstractmethod
    def block_of(self, unit: str) -> int:
        """Index of the first transformer block the unit lives in (for reusing the parent's prefix)."""

    @abstractmethod
    def initial_profile(self) -> Profile:
        """A feasible profile at the budget this compressor was configured for (e.g. uniform)."""

    def mutation_step(self, profile: Profile, rng: random.Random) -> Profile:
        """One mutation step (the search applies 1-3): a level switch, which keeps the budget exactly. A method
        whose level steps differ in cost (joint) overrides it with a move and a repair."""
        from evopress.mutation import level_switch

        return level_switch(self, profile, rng)

    def random_profile(self, rng: random.Random) -> Profile:
        """A random feasible profile; the default walks randomly from `initial_profile` by level switches."""
        from evopress.mutation import level_switch

        profile = self.initial_profile()
        for _ in range(4 * len(profile)):
            profile = level_switch(self, profile, rng)
        return profile

    def size_share(self, profile: Profile) -> float:
        """Share (0..1) of the dense transformer-block weights' bits the profile keeps, counted at 16 bits.

        The one size rule of the results table; each method says what its levels keep.
        """
        raise NotImplementedError(f"{type(self).__name__} has no size rule")

    def block_params(self) -> int:
        """Parameters of every transformer block (what the size share is a share of)."""
        return sum(p.numel() for b in self.adapter.blocks for p in b.parameters())

    def total_cost(self, profile: Profile) -> float:
        return sum(self.cost(u, lvl) for u, lvl in profile.items())

    def budget_problem(self, profile: Profile) -> str | None:
        """Why `profile` is off this compressor's budget, in a few words (None: it is on it).

        Every feasible profile costs exactly what `initial_profile` costs at the target; a profile read from a
        file (hand-written, or made for another target) must too, or the results would report the wrong target."""
        want, have = self.total_cost(self.initial_profile()), self.total_cost(profile)
        if abs(have - want) <= 1e-9 * max(1.0, abs(want)):
            return None
        return f"its units cost {have:g} in total, the target's budget is exactly {want:g}"

    def apply_profile(self, profile: Profile, current: Profile | None = None) -> Profile:
        """Apply every unit whose level differs from `current` (all units when `current` is None)."""
        for unit, level in profile.items():
            if current is None or current.get(unit) != level:
                self.apply(unit, level)
        return dict(profile)
