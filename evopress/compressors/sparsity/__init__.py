"""Unstructured sparsity: every linear of every block is a unit; its levels are SparseGPT prunings from a database.

Level grid (the authors'): level l of a linear with n weights prunes `base + l * step` weights, base =
round(target * n), and `step` is one count of weights for *every* linear, so any level switch (one linear up,
another down) keeps the number of pruned weights, hence the parameter-weighted average sparsity, exact.
step = round(0.5 * min(s, 1 - s) / num_levels * hidden^2); levels -num_levels..num_levels, minus those a linear
cannot hold (below 0 or above `max_sparsity` of its weights). Budget = pruned weights of the block linears;
the average sparsity is that over their parameter count (embeddings and head stay dense).

`build_database` prunes block by block: Hessians come from the block's inputs in the dense model (the
authors' choice: a database holds many levels per linear, so there is no single pruned upstream model) or,
with `inputs=uniform`, from the model pruned uniformly at the target so far (SparseGPT's sequential mode).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.compressors.base import Compressor, Profile
from evopress.compressors.linears import (
    Upstream,
    build_by_block,
    hidden_size,
    linear_of,
    linear_sizes,
    model_sha256_of,
    open_build,
    open_for_stitch,
    split_unit,
)
from evopress.compressors.sparsity.sparsegpt import magnitude_prune, prune_counts
from evopress.config import options_from
from evopress.database import DatabaseSpec, LevelDatabase
from evopress.errors import require
from evopress.hessians import inverse_cholesky

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INPUTS = ("dense", "uniform")
WEIGHTS = ("sparsegpt", "magnitude")


@dataclass(frozen=True)
class SparsityOptions:
    num_levels: int = 8  # levels -num_levels..num_levels (authors: 8)
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    blocksize: int = 128  # columns per mask block
    n_samples: int = 128  # calibration sequences for the Hessians
    inputs: str = "dense"  # dense | uniform
    max_sparsity: float = 0.99
    storage: str = "float16"  # dtype of the level files (float16: half the disk, ~1e-3 relative rounding)
    batch_size: int = 8
    weights: str = "sparsegpt"  # sparsegpt (from the database) | magnitude (computed from the dense weights)

    @classmethod
    def from_dict(cls, options: dict | None) -> SparsityOptions:
        # target and model_sha256 travel with the options; owl_* are the OWL baseline's (see baselines/sparsity.py)
        opts = options_from(
            cls, options, "sparsity", lambda k: k in ("model_sha256", "target") or k.startswith("owl_")
        )
        opts.validate()
        return opts

    def validate(self) -> None:
        require(0 <= self.num_levels <= 64, f"num_levels={self.num_levels} outside 0..64")
        require(0 < self.damp < 1, f"damp={self.damp} outside (0, 1)")
        require(self.blocksize >= 1, f"blocksize={self.blocksize} must be >= 1")
        require(self.n_samples >= 1, f"n_samples={self.n_samples} must be >= 1")
        require(self.inputs in INPUTS, f"inputs={self.inputs!r}; allowed: {', '.join(INPUTS)}")
        require(0 < self.max_sparsity < 1, f"max_sparsity={self.max_sparsity} outside (0, 1)")
        require(
            self.storage in STORAGE_DTYPES, f"storage={self.storage!r}; allowed: {', '.join(STORAGE_DTYPES)}"
        )
        require(self.weights in WEIGHTS, f"weights={self.weights!r}; allowed: {', '.join(WEIGHTS)}")

    def build_params(self, target: float) -> dict:
        """What a database depends on (checked when it is reused); `weights` and `batch_size` are not."""
        params = asdict(self)
        del params["weights"], params["batch_size"]
        return {"target": target, **params}


def check_target(target: float) -> float:
    require(
        isinstance(target, int | float) and 0 < float(target) < 1,
        f"sparsity target {target!r} outside (0, 1) (average fraction of pruned weights)",
    )
    return float(target)


def check_settings(target: float, options: dict, database: dict) -> None:
    """What can be checked without the model: the target and the (database and search) options."""
    if target is not None:
        check_target(target)
    SparsityOptions.from_dict({**database, **options})


# --- the level grid ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelGrid:
    step: int
    base: dict[str, int]  # unit -> pruned weights at level 0
    levels: dict[str, list[int]]
    sizes: dict[str, int]

    def pruned(self, unit: str, level: int) -> int:
        return self.base[unit] + level * self.step


def level_grid(sizes: dict[str, int], hidden: int, target: float, opts: SparsityOptions) -> LevelGrid:
    step = max(1, round(0.5 * min(target, 1 - target) / max(opts.num_levels, 1) * hidden**2))
    base = {u: round(target * n) for u, n in sizes.items()}
    levels = {
        u: [
            lvl
            for lvl in range(-opts.num_levels, opts.num_levels + 1)
            if 0 <= base[u] + lvl * step <= opts.max_sparsity * n
        ]
        for u, n in sizes.items()
    }
    return LevelGrid(step=step, base=base, levels=levels, sizes=dict(sizes))


def database_spec(
    adapter: ModelAdapter, model_sha256: str, target: float, opts: SparsityOptions
) -> DatabaseSpec:
    shapes = linear_sizes(adapter)
    grid = level_grid({u: r * c for u, (r, c) in shapes.items()}, hidden_size(adapter), target, opts)
    units = {u: {"levels": grid.levels[u], "shapes": {"weight": list(shapes[u])}} for u in shapes}
    return DatabaseSpec(model_sha256, "sparsity", opts.build_params(target), units)


# --- the compressor ------------------------------------------------------------------------------------------
class SparsityCompressor(Compressor):
    method = "sparsity"

    def __init__(self, adapter: ModelAdapter, target: float, db: LevelDatabase | None, opts: SparsityOptions):
        self.adapter = adapter
        self.target = target
        self.db = db
        self.opts = opts
        self.baseline_options: dict = {}  # owl_lambda, owl_m, owl_grid given as --option to `baseline`
        shapes = linear_sizes(adapter)
        self.grid = level_grid({u: r * c for u, (r, c) in shapes.items()}, hidden_size(adapter), target, opts)
        self._dense: dict[str, torch.Tensor] = {}
        self._applied = False
        if opts.weights == "magnitude":
            self.use_magnitude()

    @property
    def options(self) -> dict:
        """What a profile must carry to be reproduced (the rest is in the database's manifest)."""
        return {"weights": self.opts.weights}

    def use_magnitude(self) -> None:
        """Switch to magnitude pruning of the dense weights (the floor baseline); the model must still be dense."""
        require(not self._applied, "magnitude pruning needs the dense weights: switch before applying levels")
        self._dense = {u: self._linear(u).weight.detach().clone() for u in self.units()}
        self.opts = SparsityOptions(**{**asdict(self.opts), "weights": "magnitude"})

    def _linear(self, unit: str) -> torch.nn.Linear:
        return linear_of(self.adapter, unit)

    def units(self) -> list[str]:
        return list(self.grid.levels)

    def levels(self, unit: str) -> list[int]:
        return self.grid.levels[unit]

    def cost(self, unit: str, level: int) -> float:
        return float(self.grid.pruned(unit, level))

    def group(self, unit: str) -> str:
        return "linears"

    def block_of(self, unit: str) -> int:
        return split_unit(unit)[0]

    def initial_profile(self) -> Profile:
        return {u: 0 for u in self.units()}

    def total_params(self) -> int:
        return sum(self.grid.sizes.values())

    def size_share(self, profile: Profile) -> float:
        """Non-zero share of the block weights (sparse index overhead not counted)."""
        return 1.0 - self.total_cost(profile) / self.block_params()

    def sparsity(self, profile: Profile) -> float:
        """Parameter-weighted average sparsity of the block linears under `profile`."""
        return self.total_cost(profile) / self.total_params()

    def weight(self, unit: str, level: int) -> torch.Tensor:
        require(level in self.levels(unit), f"level {level} of {unit!r} outside {self.levels(unit)}")
        if self.opts.weights == "magnitude":
            return magnitude_prune(self._dense[unit], self.grid.pruned(unit, level))
        return self.db.load(unit, level)["weight"]

    @torch.no_grad()
    def apply(self, unit: str, level: int) -> None:
        self._applied = True
        self._linear(unit).weight.copy_(self.weight(unit, level))


def make(adapter: ModelAdapter, target: float, *, db=None, options: dict | None = None) -> SparsityCompressor:
    """A compressor over a built database; the database must match this model, target and level options."""
    target = check_target(target)
    options = dict(options or {})
    opts = SparsityOptions.from_dict(options)
    owl = {k.removeprefix("owl_"): v for k, v in options.items() if k.startswith("owl_")}
    if opts.weights == "magnitude":  # the floor baseline needs no database
        return SparsityCompressor(adapter, target, None, opts)
    require(db is not None, "sparsity needs a level database (--db); build it with `evopress build-db`")
    database = db if isinstance(db, LevelDatabase) else LevelDatabase.open(Path(db))
    # options not given explicitly are taken from the database, so `--db` alone is enough
    stored = {k: v for k, v in database.params.items() if k != "target"}
    merged = SparsityOptions.from_dict({**stored, **{k: v for k, v in options.items() if k in stored}})
    merged = SparsityOptions(**{**asdict(merged), "weights": opts.weights, "batch_size": opts.batch_size})
    spec = database_spec(adapter, model_sha256_of(adapter, options), target, merged)
    database.require_matches(spec)
    comp = SparsityCompressor(adapter, target, database, merged)
    comp.baseline_options = owl
    return comp


# --- building the database -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseGptLevels:
    """The level files of some linears: SparseGPT of each dense weight with its Hessian at each wanted level."""

    grid: LevelGrid
    opts: SparsityOptions

    @torch.no_grad()
    def __call__(self, weights, hessians, wanted: dict[str, list[int]]) -> dict:
        storage = STORAGE_DTYPES[self.opts.storage]
        files = {}
        for unit, levels in wanted.items():
            u = inverse_cholesky(hessians[unit], self.opts.damp)
            counts = [self.grid.pruned(unit, lvl) for lvl in levels]
            pruned = prune_counts(weights[unit], u, counts, self.opts.blocksize)
            for lvl, count, w in zip(levels, counts, pruned, strict=True):
                w = w.to(storage)
                assert int((w == 0).sum()) >= count
                files[(unit, lvl)] = {"weight": w}
        return files


@torch.no_grad()
def build_database(model_dir: Path, data_dir: Path, out_dir: Path, options: dict, pool=None) -> LevelDatabase:
    """Prune every linear of the prepared model to every level of the grid; resumable; returns the database.

    `pool` (evopress/build_pool.py) computes the levels (all but level 0 with inputs=uniform); default: here."""
    options = dict(options)
    require("target" in options, "build-db --method sparsity needs --option target=<sparsity in (0, 1)>")
    target = check_target(float(options.pop("target")))
    opts = SparsityOptions.from_dict(options)
    adapter, db, tokens = open_build(
        model_dir, data_dir, out_dir, lambda a, sha: database_spec(a, sha, target, opts), opts.n_samples
    )
    shapes = {u: s["shapes"]["weight"] for u, s in db.manifest["units"].items()}
    grid = level_grid({u: r * c for u, (r, c) in shapes.items()}, hidden_size(adapter), target, opts)
    # inputs=uniform: the next block sees this block pruned at the target (level 0)
    upstream = Upstream(0, lambda tensors: tensors["weight"]) if opts.inputs == "uniform" else None
    levels_of = SparseGptLevels(grid, opts)
    build_by_block(adapter, db, tokens, opts.batch_size, levels_of, upstream, "build-db sparsity", pool)
    return db


# --- stitching -----------------------------------------------------------------------------------------------
# Formats of a stitched folder. dense (default): the pruned weights as zeros in a plain folder, as large as dense,
# which every tool loads. sparse-bitmask: compressed-tensors' bitmask layout, bytes fall with sparsity, loaded by
# evopress.load_model only. Not the default because stock transformers with compressed-tensors >= 0.15 (the
# dropped sparse decompressors, evopress/sparse_format.py) opens such a folder with the linears randomly
# initialised after a MISSING warning: a default artifact must not load as silent garbage anywhere.
FORMATS = ("dense", "sparse-bitmask")


@torch.no_grad()
def stitch(model_dir: Path, profile: dict, db: Path | None, out_dir: Path, format: str = "dense") -> dict:
    """Apply a profile's levels from the database to the dense model and save it in `format` (FORMATS)."""
    from evopress import sparse_format
    from evopress.models import write_model_folder
    from evopress.packing import bytes_on_disk

    require(format in FORMATS, f"stitch format {format!r} is not one of {', '.join(FORMATS)}")
    model, tokenizer, comp, units = open_for_stitch(make, model_dir, profile, db)
    comp.apply_profile(units)
    zeros = sum(int((comp._linear(u).weight == 0).sum()) for u in units)
    report = {
        "method": "sparsity",
        "target": comp.target,
        "budget_sparsity": comp.sparsity(units),
        "measured_sparsity": zeros / comp.total_params(),
        "pruned_weights": zeros,
        "linear_params": comp.total_params(),
        "weights": comp.opts.weights,
        "format": format,
    }
    stitch_json = {}  # written by write_model_folder after `write`, so it can hold the sizes

    def write(folder: Path) -> None:
        if format == "dense":
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        else:
            by_id = {id(m): n for n, m in model.named_modules()}
            names = [by_id[id(comp._linear(u))] for u in units]
            sparse_format.write(model, tokenizer, names, folder, report["measured_sparsity"])
            report["bytes_sparse"] = sparse_format.sparse_bytes(folder)
        report["bytes_total"] = bytes_on_disk(folder)["total"]
        stitch_json.update(report, profile=profile)

    source = f"stitch:sparsity:{profile.get('source', 'profile')}@{comp.target}"
    write_model_folder(model, tokenizer, Path(out_dir), source, {"stitch.json": stitch_json}, writer=write)
    return report
