"""What the per-linear methods (sparsity, quantization) share: unit names, sizes, the build loop, the stitch start.

A unit is one nn.Linear of one block, named `block.<i>.<module path>` (e.g. block.3.self_attn.q_proj).
Both level databases are built the same way, block by block over calibration inputs: the block's Hessians
(X^T X per linear) are collected, the method writes every missing level file of the block, and the next block
sees this one's outputs (dense, or with the block compressed at a fixed level: `upstream`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
WriteBlock = Callable[[int, dict[str, torch.Tensor], set], None]


def _run_block(adapter, block, hidden, kwargs, batch_size):
    return torch.cat([adapter.run_blocks(h, kwargs, block, block + 1) for h in hidden.split(batch_size)])


@torch.no_grad()
def build_by_block(
    adapter: ModelAdapter,
    db: LevelDatabase,
    tokens: torch.Tensor,
    batch_size: int,
    write_block: WriteBlock,
    upstream: Callable[[str], torch.Tensor] | None = None,
    desc: str = "build-db",
) -> None:
    """Write every missing (unit, level) file of `db`, block by block; resumable; marks the database complete.

    `write_block(block, hessians, todo)` writes the block's files listed in `todo` (pairs of that block).
    `upstream(unit)`, when given, is the weight a linear takes before the next block's inputs are computed
    (e.g. the block quantized at calib_bits); without it later blocks see the dense model's activations.
    """
    todo = set(db.todo())
    started = time.perf_counter()
    _, kwargs = adapter.block_inputs(tokens[:1])  # the same for any batch size (SDPA, no padding)
    hidden = torch.cat([adapter.block_inputs(t)[0] for t in tokens.split(batch_size)])
    # Blocks after the last one with missing files need no forward pass: a complete database costs no compute.
    last = max((split_unit(p[0])[0] for p in todo), default=-1)
    for block in progress(range(last + 1), last + 1, desc):
        block_todo = {p for p in todo if split_unit(p[0])[0] == block}
        out = None
        if block_todo:
            hessians, out = collect_block_hessians(adapter, block, hidden, kwargs, batch_size)
            write_block(block, hessians, block_todo)
            db.flush()
        if upstream is not None:  # the next block sees this one compressed
            for name, lin in adapter.linears(block).items():
                lin.weight.copy_(upstream(f"block.{block}.{name}"))
            out = None
        hidden = out if out is not None else _run_block(adapter, block, hidden, kwargs, batch_size)
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
