"""Depth pruning: remove whole transformer blocks, or attention and MLP sublayers at independent positions.

Units and levels: level 0 = kept, level 1 = removed (only the residual path remains; the sublayer's norm goes with
it because its output is never used). Budget = number of removed units of each kind:
  granularity "sublayer" (the authors' default): units block.<i>.attn / block.<i>.mlp, groups attn and mlp; target
      k removes k attention and k MLP sublayers (the parameter count of k blocks, wherever they sit);
  granularity "block": units block.<i>, one group; target k removes k blocks.
A level switch trades one removed unit for one kept unit of the same kind, so the budget stays exact.

`stitch` writes a really smaller model: removed blocks are deleted (a plain folder stock transformers loads), removed
sublayers of a Llama are absent from the files and the compute (DeciLM `block_configs`, loaded by
`evopress.load_model`); see stitching.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from evopress.adapter import SUBLAYER_KINDS, ModelAdapter
from evopress.compressors.base import Compressor, Profile
from evopress.config import options_from
from evopress.errors import require

GRANULARITIES = ("sublayer", "block")


@dataclass(frozen=True)
class DepthOptions:
    granularity: str = "sublayer"

    @classmethod
    def from_dict(cls, options: dict | None) -> DepthOptions:
        opts = options_from(cls, options, "depth")
        require(
            opts.granularity in GRANULARITIES,
            f"unknown granularity {opts.granularity!r}; allowed: {', '.join(GRANULARITIES)}",
        )
        return opts


def parse_target(target: float, num_blocks: int) -> int:
    require(float(target) == int(target), f"depth target {target} must be a whole number of blocks to remove")
    k = int(target)
    require(
        0 <= k <= num_blocks, f"cannot remove {k} of {num_blocks} blocks; allowed targets: 0..{num_blocks}"
    )
    return k


def check_settings(target: float, options: dict, database: dict) -> None:
    """What can be checked without the model: the options, and a whole, non-negative target (depth has no
    database: params.check refuses one, and build-db needs none)."""
    DepthOptions.from_dict(options)
    require(
        target is None or (float(target) == int(target) and target >= 0),
        f"depth target {target} must be a whole number >= 0 (blocks, or sublayers of each kind, to remove)",
    )


def make(adapter: ModelAdapter, target: float, *, db=None, options: dict | None = None) -> DepthCompressor:
    opts = DepthOptions.from_dict(options)
    return DepthCompressor(adapter, parse_target(target, adapter.num_blocks), opts.granularity)


def block_index(unit: str) -> int:
    return int(unit.split(".")[1])


class DepthCompressor(Compressor):
    method = "depth"

    def __init__(self, adapter: ModelAdapter, k: int, granularity: str = "sublayer"):
        self.adapter = adapter
        self.k = k
        self.granularity = granularity
        n = adapter.num_blocks
        if granularity == "block":
            self._units = [f"block.{i}" for i in range(n)]
        else:
            self._units = [f"block.{i}.{kind}" for i in range(n) for kind in SUBLAYER_KINDS]
        self._set = set(self._units)

    @property
    def options(self) -> dict:
        return {"granularity": self.granularity}

    def units(self) -> list[str]:
        return list(self._units)

    def levels(self, unit: str) -> list[int]:
        return [0, 1]

    def cost(self, unit: str, level: int) -> float:
        return float(level)

    def group(self, unit: str) -> str:
        return "block" if self.granularity == "block" else unit.rsplit(".", 1)[1]

    def groups(self) -> list[str]:
        return ["block"] if self.granularity == "block" else list(SUBLAYER_KINDS)

    def block_of(self, unit: str) -> int:
        return block_index(unit)

    def apply(self, unit: str, level: int) -> None:
        require(unit in self._set, f"unknown depth unit {unit!r}")
        block = block_index(unit)
        kinds = SUBLAYER_KINDS if self.granularity == "block" else (unit.rsplit(".", 1)[1],)
        for kind in kinds:
            (self.adapter.drop if level == 1 else self.adapter.restore)(block, kind)

    def budget(self) -> float:
        """The total cost every profile has: k removed units of each group."""
        return float(self.k * len(self.groups()))

    def unit_params(self, unit: str) -> int:
        """A removed block takes all its parameters (norms too); a removed sublayer its own module's."""
        block = block_index(unit)
        if self.granularity == "block":
            module = self.adapter.blocks[block]
        else:
            module = self.adapter.sublayer(block, unit.rsplit(".", 1)[1])
        return sum(p.numel() for p in module.parameters())

    def size_share(self, profile: Profile) -> float:
        """Kept share of the block parameters (call with the model dense: dropped modules leave the blocks)."""
        removed = sum(self.unit_params(u) for u, lvl in profile.items() if lvl)
        return 1.0 - removed / self.block_params()

    def profile_from_blocks(self, removed: dict[str, list[int]] | list[int]) -> Profile:
        """Profile removing the given block indices (a list: the same blocks for every group)."""
        if not isinstance(removed, dict):
            removed = {g: list(removed) for g in self.groups()}
        profile = dict.fromkeys(self._units, 0)
        for group, blocks in removed.items():
            require(
                len(set(blocks)) == self.k, f"{group}: {len(set(blocks))} removed, the target is {self.k}"
            )
            for b in blocks:
                profile[f"block.{b}" if self.granularity == "block" else f"block.{b}.{group}"] = 1
        return profile

    def initial_profile(self) -> Profile:
        """The k removed units spread evenly over the depth (a feasible start; depth has no 'uniform')."""
        n = self.adapter.num_blocks
        spread = [int((j + 0.5) * n / self.k) for j in range(self.k)] if self.k else []
        return self.profile_from_blocks(spread)

    def random_profile(self, rng: random.Random) -> Profile:
        n = self.adapter.num_blocks
        return self.profile_from_blocks({g: rng.sample(range(n), self.k) for g in self.groups()})

    def budget_problem(self, profile: Profile) -> str | None:
        """Depth removes exactly k units of every group (k attention and k MLP sublayers), not k*groups in any mix."""
        for group, blocks in self.removed_blocks(profile).items():
            if len(blocks) != self.k:
                return f"it removes {len(blocks)} {group} unit(s), the target {self.k} removes exactly {self.k} of each kind"
        return None

    def removed_blocks(self, profile: Profile) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {g: [] for g in self.groups()}
        for unit, level in profile.items():
            if level == 1:
                out[self.group(unit)].append(block_index(unit))
        return {g: sorted(b) for g, b in out.items()}


def stitch(model_dir: Path, profile: dict, db, out_dir: Path) -> dict:
    """Write the depth-pruned model of `profile` (a profile json dict) into `out_dir`, with the profile beside it.

    Removed parts are gone from the files and the compute (see stitching.py for the layout each case gets)."""
    from evopress.compressors.depth.stitching import prune, weights_bytes, writer_for
    from evopress.models import load_model, save_plain, write_model_folder
    from evopress.profile import validate_units

    model, tokenizer = load_model(str(model_dir))
    adapter = ModelAdapter(model)
    comp = make(adapter, profile["target"], options=profile.get("options"))
    validate_units(profile["units"], comp)
    removed = comp.removed_blocks(profile["units"])
    layout, no_ops = prune(adapter, comp.granularity, removed)
    report = {
        "granularity": comp.granularity,
        "removed": json.dumps(removed),
        "layout": layout,  # dense (plain folder) | decilm (block_configs, evopress.load_model) | zeroed
        "num_hidden_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    stitch_json = {"profile.json": profile, "stitch.json": report}

    def write(folder: Path) -> None:
        custom = writer_for(layout, model, tokenizer, no_ops)
        (custom or (lambda out: save_plain(model, tokenizer, out)))(folder)
        report["bytes_weights"] = weights_bytes(folder)

    write_model_folder(
        model, tokenizer, Path(out_dir), f"{model_dir} + depth profile", stitch_json, writer=write
    )
    return report
