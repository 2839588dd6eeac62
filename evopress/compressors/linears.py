"""What the per-linear methods (sparsity, quantization) share: unit names, sizes, the build loop, the stitch start.

A unit is one nn.Linear of one block, named `block.<i>.<module path>` (e.g. block.3.self_attn.q_proj).
Both level databases are built the same way, block by block over calibration inputs: the block's Hessians
(X^T X per linear) are collected, the method computes every missing level file of the block (here or on
workers: evopress/build_pool.py), and the next block sees this one's outputs (dense, or with the block compressed
at a fixed level: `upstream`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.database import DatabaseSpec, LevelDatabase
from evopress.errors import require
from evopress.hessians import collect_block_hessians
from evopress.progress import progress


def split_unit(unit: str) -> tuple[int, str]:
    _, block, name = unit.split(".", 2)
    return int(block), name


def linear_sizes(adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    """unit -> weight shape (out, in) of every linear of every block, in forward order."""
    return {
        f"block.{i}.{name}": tuple(lin.weight.shape)
        for i in range(adapter.num_blocks)
        for name, lin in adapter.linears(i).items()
    }


def hidden_size(adapter: ModelAdapter) -> int:
    return int(adapter.model.config.hidden_size)


def model_sha256_of(adapter: ModelAdapter, options: dict) -> str:
    """The prepared model's checksum: from options, else from the manifest of the folder it was loaded from."""
    if options.get("model_sha256"):
        return str(options["model_sha256"])
    from evopress.models import read_manifest

    return read_manifest(Path(adapter.model.config._name_or_path))["sha256"]


def linear_of(adapter: ModelAdapter, unit: str) -> torch.nn.Linear:
    block, name = split_unit(unit)
    return adapter.linear(block, name)


# --- building a level database --------------------------------------------------------------------------------
Tensors = dict[str, torch.Tensor]
# levels_of(weights, hessians, wanted) -> {(unit, level): tensors}: the files of `wanted` = {unit: [levels]}, from
# each unit's dense weight and input Hessian alone. A picklable object (a dataclass with __call__), so a Ray task
# can run it where the model is not: evopress/build_pool.py.
LevelsOf = Callable[[Tensors, Tensors, dict[str, list[int]]], dict[tuple[str, int], Tensors]]


@dataclass(frozen=True)
class Upstream:
    """The level a block takes before the next block's inputs are computed, and the weight a level file holds."""

    level: int
    weight: Callable[[Tensors], torch.Tensor]


def _run_block(adapter, block, hidden, kwargs, batch_size):
    return torch.cat([adapter.run_blocks(h, kwargs, block, block + 1) for h in hidden.split(batch_size)])


def _wanted(todo: set, block: int) -> dict[str, list[int]]:
    """{unit: sorted levels} of the block's pairs in `todo`."""
    wanted: dict[str, list[int]] = {}
    for unit, level in sorted(todo):
        if split_unit(unit)[0] == block:
            wanted.setdefault(unit, []).append(level)
    return wanted


def _split(wanted: dict[str, list[int]], level: int | None) -> tuple[dict, dict]:
    """(the upstream level of each unit that lacks it, every other wanted level)."""
    now = {u: [level] for u, levels in wanted.items() if level in levels}
    later = {u: [lv for lv in levels if lv != level] for u, levels in wanted.items()}
    return now, {u: levels for u, levels in later.items() if levels}


def _write(db: LevelDatabase, files: dict[tuple[str, int], Tensors]) -> None:
    for (unit, level), tensors in files.items():
        db.write(unit, level, tensors, flush=False)
    if files:
        db.flush()


@torch.no_grad()
def build_by_block(
    adapter: ModelAdapter,
    db: LevelDatabase,
    tokens: torch.Tensor,
    batch_size: int,
    levels_of: LevelsOf,
    upstream: Upstream | None = None,
    desc: str = "build-db",
    pool=None,
) -> None:
    """Write every missing (unit, level) file of `db`, block by block; resumable; marks the database complete.

    This process runs the model: block by block it collects the Hessians, and, when `upstream` is given, computes
    the block's upstream level (e.g. quantized at calib_bits) that the next block's inputs are computed with;
    without it later blocks see the dense model's activations. Every other level only needs a weight and its
    Hessian, so `pool` (evopress/build_pool.py: in this process by default, or Ray tasks on `compute.workers`)
    computes them while this process moves on; their files are written here as they arrive, so the manifest has
    one writer and an interrupted build resumes from whatever was recorded. Which process computes a file does
    not change a bit of it (each level is computed independently of the others).
    """
    from evopress.build_pool import InProcessPool

    pool = pool or InProcessPool()
    todo = set(db.todo())
    started = time.perf_counter()
    _, kwargs = adapter.block_inputs(tokens[:1])  # the same for any batch size (SDPA, no padding)
    hidden = torch.cat([adapter.block_inputs(t)[0] for t in tokens.split(batch_size)])
    # Blocks after the last one with missing files need no forward pass: a complete database costs no compute.
    last = max((split_unit(p[0])[0] for p in todo), default=-1)
    for block in progress(range(last + 1), last + 1, desc):
        wanted = _wanted(todo, block)
        out = None
        if wanted:
            names, out = collect_block_hessians(adapter, block, hidden, kwargs, batch_size)
            hessians = {f"block.{block}.{n}": h for n, h in names.items() if f"block.{block}.{n}" in wanted}
            weights = {u: linear_of(adapter, u).weight.detach().clone() for u in hessians}
            now, later = _split(wanted, upstream.level if upstream else None)
            _write(db, levels_of(weights, hessians, now))  # the next block needs these: computed here, now
            if later:
                pool.submit(levels_of, weights, hessians, later)
            _write(db, pool.ready())
        if upstream is not None:  # the next block sees this one compressed
            for name, lin in adapter.linears(block).items():
                lin.weight.copy_(upstream.weight(db.load(f"block.{block}.{name}", upstream.level)))
            out = None
        hidden = out if out is not None else _run_block(adapter, block, hidden, kwargs, batch_size)
    _write(db, pool.drain())
    # wall time over every (resumed) run that had work to do, for the benchmark's build-time figure
    if todo:
        db.manifest["build_seconds"] = db.manifest.get("build_seconds", 0.0) + time.perf_counter() - started
    db.finish()


def open_build(model_dir: Path, data_dir: Path, out_dir: Path, spec_for, n_samples: int):
    """(adapter of the float32 model, database opened for building, calibration rows) of a database build."""
    from evopress.data import load_tokens
    from evopress.models import load_model, read_manifest

    model, _ = load_model(str(model_dir), dtype="float32")
    adapter = ModelAdapter(model)
    spec: DatabaseSpec = spec_for(adapter, read_manifest(model_dir)["sha256"])
    db = LevelDatabase.create(Path(out_dir), spec)
    tokens = load_tokens(Path(data_dir), "calibration")[:n_samples]
    return adapter, db, tokens


# --- stitching --------------------------------------------------------------------------------------------------
def open_for_stitch(make, model_dir: Path, profile: dict, db: Path | None):
    """(model, tokenizer, compressor, units) to stitch a profile file's levels into the dense float32 model."""
    from evopress.models import load_model
    from evopress.profile import validate_units

    model, tokenizer = load_model(str(model_dir), dtype="float32")
    options = {**profile.get("options", {}), "model_sha256": profile.get("model_sha256") or ""}
    options = {k: v for k, v in options.items() if v != ""}
    comp = make(ModelAdapter(model), profile["target"], db=db, options=options)
    units = {u: int(lvl) for u, lvl in profile["units"].items()}
    require(
        set(units) == set(comp.units()),
        f"profile has {len(units)} units, the model has {len(comp.units())} linears; wrong model or method?",
    )
    validate_units(units, comp)
    return model, tokenizer, comp, units
