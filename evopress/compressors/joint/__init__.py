"""Joint depth + quantization: one profile removes attention / MLP sublayers and sets every kept linear's bits,
under one budget in bits.

Units (forward order, block by block): the depth sublayers `block.<i>.attn`, `block.<i>.mlp` (level 0 kept, 1
removed) and every block linear `block.<i>.<name>` (levels: the quantization database's bits).

Cost and budget: a kept linear at b bits costs b x its parameters; a removed sublayer costs 0, and so does every
linear inside it, whatever its level (group scales are not counted, as in the quantization method). The budget is
`target` x the parameters of all block linears: the target is the average bits per block-linear weight with
removed weights counted as 0 (2.5 = the bytes of 2.5-bit weights). Because a linear's cost depends on its
sublayer's level, `total_cost` sums over the profile, not `cost(unit, level)` alone.

Feasible: cost <= budget, and no kept linear can step up one level without exceeding it (the budget is used to
within one level step). `budget_problem` says which rule a profile breaks.

Mutation (`mutation_step`; the search applies 1-3 steps as for every method). Level switches are equal-cost only
within one linear size, and removing a sublayer frees b x 0.88M (attention) or b x 2.65M (MLP) bits on the default
model, which no single linear step matches, so the joint step is a move followed by a repair:
  1. with probability 1 - `depth_moves`: the quantization method's budget-neutral switch between two *kept*
     linears of one size (no repair needed);
  2. otherwise a depth move: remove a kept sublayer, restore a removed one, or swap a removed sublayer for a kept
     one of the same kind (each equally likely among those possible); then
     repair: while the cost exceeds the budget, lower a random kept linear one step (a restored sublayer's linears
     come back at the bits they had); then, while some kept linear's step up fits in what is left, raise a random
     one of those. A move that even all kept linears at the lowest bits cannot pay for is discarded and another
     drawn.
Linears inside removed sublayers are never picked by either step: no mutation is spent on them. Every step ends on
a feasible profile (tests/test_joint.py checks it for random walks, as a property).

The level database is the quantization method's (same build, same files): `--db data/db/quantization` works.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from evopress.adapter import SUBLAYER_KINDS, ModelAdapter
from evopress.compressors.base import Compressor, Profile
from evopress.compressors.depth import DepthCompressor
from evopress.compressors.linears import split_unit
from evopress.compressors.quantization import QuantizationCompressor, open_database
from evopress.config import options_from
from evopress.errors import UserError, require
from evopress.mutation import level_switch


@dataclass(frozen=True)
class JointOptions:
    depth_moves: float = 0.3  # share of mutation steps that move a sublayer (the rest switch bits)
    depth_profile: str = ""  # the depth_then_* baselines' removal (a depth profile.json); not a search option

    @classmethod
    def from_dict(cls, options: dict | None) -> JointOptions:
        opts = options_from(cls, options, "joint", lambda k: k == "model_sha256")
        require(0 <= opts.depth_moves <= 1, f"depth_moves={opts.depth_moves} outside 0..1")
        return opts


def split_options(options: dict) -> tuple[dict, dict]:
    """(joint options, quantization options) of a joint options dict; one-line error naming unknown keys."""
    from evopress.compressors.quantization import QuantOptions

    joint_keys, quant_keys = set(JointOptions.__dataclass_fields__), set(QuantOptions.__dataclass_fields__)
    unknown = sorted(k for k in options if k not in joint_keys | quant_keys | {"model_sha256"})
    require(
        not unknown,
        f"unknown joint options {unknown}; allowed: {', '.join([*JointOptions.__dataclass_fields__, *QuantOptions.__dataclass_fields__])}",
    )
    return (
        {k: v for k, v in options.items() if k in joint_keys},
        {k: v for k, v in options.items() if k not in joint_keys},
    )


def check_settings(target: float, options: dict, database: dict) -> None:
    """The target against the database's bits, the joint options, and the quantization database options."""
    from evopress.compressors.quantization import QuantOptions
    from evopress.compressors.quantization import check_target as check_bits_target

    joint, quant_options = split_options(options)
    JointOptions.from_dict(joint)
    quant = QuantOptions.from_dict({**database, **quant_options})
    require(not quant.fuse, "joint does not take fuse: true (its units are single linears)")
    if target is not None:
        check_bits_target(target, quant.levels)


def kind_of(adapter: ModelAdapter, linear_unit: str) -> str:
    """'attn' or 'mlp': the sublayer a linear unit lives in."""
    _, name = split_unit(linear_unit)
    return "attn" if name.partition(".")[0] == adapter.spec.attn else "mlp"


class JointCompressor(Compressor):
    method = "joint"

    def __init__(
        self, adapter: ModelAdapter, target: float, quant: QuantizationCompressor, opts: JointOptions
    ):
        self.adapter = adapter
        self.target = float(target)
        self.quant = quant
        self.depth = DepthCompressor(adapter, 0, "sublayer")
        self.opts = opts
        # sublayer unit -> its linear units; linear unit -> its sublayer unit
        self.sublayer_of = {u: f"block.{split_unit(u)[0]}.{kind_of(adapter, u)}" for u in quant.units()}
        self.linears_of: dict[str, list[str]] = {s: [] for s in self.depth.units()}
        for unit, sub in self.sublayer_of.items():
            self.linears_of[sub].append(unit)
        order = []
        for sub in self.depth.units():
            order += [sub, *self.linears_of[sub]]
        self._units = order
        self.budget = self.target * quant.total_params()

    @property
    def options(self) -> dict:
        return {"depth_moves": self.opts.depth_moves, **self.quant.options}  # depth_profile: baselines only

    # --- the Compressor interface ------------------------------------------------------------------------------
    def units(self) -> list[str]:
        return list(self._units)

    def is_sublayer(self, unit: str) -> bool:
        return unit in self.linears_of

    def levels(self, unit: str) -> list[int]:
        return [0, 1] if self.is_sublayer(unit) else self.quant.levels(unit)

    def cost(self, unit: str, level: int) -> float:
        """A linear's cost while its sublayer is kept (sublayers cost 0); `total_cost` applies removals."""
        return 0.0 if self.is_sublayer(unit) else self.quant.cost(unit, level)

    def total_cost(self, profile: Profile) -> float:
        return sum(
            self.quant.cost(u, lvl)
            for u, lvl in profile.items()
            if not self.is_sublayer(u) and profile[self.sublayer_of[u]] == 0
        )

    def group(self, unit: str) -> str:
        return f"sublayer.{unit.rsplit('.', 1)[1]}" if self.is_sublayer(unit) else self.quant.group(unit)

    def block_of(self, unit: str) -> int:
        return split_unit(unit)[0] if not self.is_sublayer(unit) else int(unit.split(".")[1])

    def apply(self, unit: str, level: int) -> None:
        (self.depth if self.is_sublayer(unit) else self.quant).apply(unit, level)

    def initial_profile(self) -> Profile:
        """Nothing removed, every linear at the quantization method's start (the target's two nearest bits,
        spread evenly over the depth per size): the `uniform` baseline."""
        bits = self.quant.initial_profile()
        return {u: 0 if self.is_sublayer(u) else bits[u] for u in self._units}

    def random_profile(self, rng: random.Random) -> Profile:
        profile = self.initial_profile()
        for _ in range(2 * len(self.quant.units())):
            profile = self.mutation_step(profile, rng)
        return profile

    def budget_problem(self, profile: Profile) -> str | None:
        cost = self.total_cost(profile)
        if cost > self.budget + 1e-6:
            return f"its kept linears cost {cost:g} bits, over the budget of {self.budget:g}"
        room = [u for u in self.raisable(profile) if cost + self.step_cost(profile, u) <= self.budget + 1e-6]
        if room:
            return (
                f"{room[0]} could still go up a level within the budget ({self.budget - cost:g} bits unused)"
            )
        return None

    def size_share(self, profile: Profile) -> float:
        """Bits of the block weights over 16 bits each: kept linears at their bits, removed sublayers' weights at
        0, norms and the rest at 16."""
        rest = self.block_params() - self.quant.total_params()
        return (self.total_cost(profile) + 16 * rest) / (16 * self.block_params())

    def average_bits(self, profile: Profile) -> float:
        """Bits per block-linear weight, removed weights counted as 0: what the target constrains."""
        return self.total_cost(profile) / self.quant.total_params()

    # --- helpers ------------------------------------------------------------------------------------------------
    def kept(self, profile: Profile, unit: str) -> bool:
        """Whether a unit is in the model: a sublayer at level 0, or a linear whose sublayer is kept."""
        sub = unit if self.is_sublayer(unit) else self.sublayer_of[unit]
        return profile[sub] == 0

    def kept_linears(self, profile: Profile) -> list[str]:
        return [u for u in self.quant.units() if profile[self.sublayer_of[u]] == 0]

    def step(self, unit: str, level: int, direction: int) -> int | None:
        levels = self.quant.levels(unit)
        i = levels.index(level) + direction
        return levels[i] if 0 <= i < len(levels) else None

    def raisable(self, profile: Profile) -> list[str]:
        return [u for u in self.kept_linears(profile) if self.step(u, profile[u], +1) is not None]

    def step_cost(self, profile: Profile, unit: str) -> float:
        return self.quant.cost(unit, self.step(unit, profile[unit], +1)) - self.quant.cost(
            unit, profile[unit]
        )

    # --- mutation -----------------------------------------------------------------------------------------------
    def mutation_step(self, profile: Profile, rng: random.Random) -> Profile:
        """One feasible child of a feasible profile (see the module docstring)."""
        if rng.random() >= self.opts.depth_moves:
            child = self._bits_switch(profile, rng)
            if child is not None:
                return child
        for _ in range(100):
            child = self.repair(self._depth_move(profile, rng), rng)
            if child is not None:
                return child
        raise UserError("no feasible joint move found: the budget cannot pay for any change of the profile")

    def _bits_switch(self, profile: Profile, rng: random.Random) -> Profile | None:
        """The quantization switch between kept linears (budget-neutral), or None where none is possible."""
        kept = {u: profile[u] for u in self.kept_linears(profile)}
        try:
            switched = level_switch(self.quant, kept, rng)
        except UserError:
            return None
        return {**profile, **switched}

    def _depth_move(self, profile: Profile, rng: random.Random) -> Profile:
        removed = [s for s in self.depth.units() if profile[s] == 1]
        kept = [s for s in self.depth.units() if profile[s] == 0]
        # never the last attention (a model needs one: the KV cache's layer 0), nor the last sublayer
        attention = [s for s in kept if s.endswith(".attn")]
        removable = [s for s in kept if len(kept) > 1 and not (s.endswith(".attn") and len(attention) == 1)]
        moves = []
        if removable:
            moves.append("remove")
        if removed:
            moves.append("restore")
        kept_kinds = {s.rsplit(".", 1)[1] for s in kept}
        swappable = [r for r in removed if r.rsplit(".", 1)[1] in kept_kinds]
        if swappable:
            moves.append("swap")
        child = dict(profile)
        move = rng.choice(moves)
        if move in ("remove", "swap"):
            if move == "swap":
                out = rng.choice(swappable)
                kind = out.rsplit(".", 1)[1]
                child[out] = 0
                child[rng.choice([s for s in kept if s.endswith(f".{kind}")])] = 1
            else:
                child[rng.choice(removable)] = 1
        else:
            child[rng.choice(removed)] = 0
        return child

    def repair(self, profile: Profile, rng: random.Random) -> Profile | None:
        """Lower random kept linears until the profile fits the budget, then raise random ones while a step fits;
        None when even the lowest bits do not fit."""
        child = dict(profile)
        cost = self.total_cost(child)
        lowerable = [u for u in self.kept_linears(child) if self.step(u, child[u], -1) is not None]
        while cost > self.budget + 1e-6:
            if not lowerable:
                return None
            unit = rng.choice(lowerable)
            down = self.step(unit, child[unit], -1)
            cost -= self.quant.cost(unit, child[unit]) - self.quant.cost(unit, down)
            child[unit] = down
            if self.step(unit, down, -1) is None:
                lowerable.remove(unit)
        while True:
            fits = [u for u in self.raisable(child) if cost + self.step_cost(child, u) <= self.budget + 1e-6]
            if not fits:
                return child
            unit = rng.choice(fits)
            cost += self.step_cost(child, unit)
            child[unit] = self.step(unit, child[unit], +1)

    def removed_sublayers(self, profile: Profile) -> dict[str, list[int]]:
        return {
            kind: sorted(
                int(s.split(".")[1]) for s in self.depth.units() if profile[s] == 1 and s.endswith(kind)
            )
            for kind in SUBLAYER_KINDS
        }

    def linear_bits(self, profile: Profile) -> dict[str, int]:
        """Bits of every kept linear (what the stitch writes)."""
        return {u: profile[u] for u in self.kept_linears(profile)}


def make(adapter: ModelAdapter, target: float, *, db=None, options: dict | None = None) -> JointCompressor:
    """A joint compressor over a quantization level database (built by `build-db --method quantization` or
    `--method joint`: the same files)."""
    joint, options = split_options(dict(options or {}))
    opts = JointOptions.from_dict(joint)
    database, qopts = open_database(adapter, db, options)
    require(not qopts.fuse, "joint does not take fuse: true (its units are single linears)")
    quant = QuantizationCompressor(adapter, target, database, qopts)
    return JointCompressor(adapter, target, quant, opts)


def build_database(model_dir, data_dir, out_dir, options: dict, pool=None):
    """The quantization method's database (joint searches over its files)."""
    from evopress.compressors.quantization import build_database as build_quantization

    return build_quantization(model_dir, data_dir, out_dir, options, pool=pool)


from evopress.compressors.joint.stitching import FORMATS, stitch  # noqa: E402 (re-exported: the method's stitch)

__all__ = ["FORMATS", "JointCompressor", "JointOptions", "build_database", "check_settings", "make", "stitch"]
