"""Quantization: every linear of every block is a unit; its level is its bit-width, from a GPTQ level database.

Levels are *bits* (2, 3, 4, 5, 6 by default; any evenly spaced grid inside 1..8, e.g. 4,8), so a level step is
one grid step. cost = bits x parameters of the unit; budget = average bits per parameter over the block linears
(group scales and zero points are not counted, as in the paper; the packed model's bytes on disk count them).
group = the unit's number of weights: a level switch raises one unit a step and lowers another unit *of the
same size* a step, so the average stays exact (the default model has three sizes: q/o, k/v, MLP).

Serving options (serving.py; search-time options, the database does not depend on them): `fuse: true` makes
q/k/v of a block one unit and gate/up one unit (vLLM fuses them and needs one scheme per fused module);
`kernel: marlin` keeps only the bits that kernel runs (4, 8). Both default off: per-linear units as in the paper.

Group size of the grid: 64 by default. The default model's linears have input widths 576 and 1536: the
authors' 128 does not divide 576, 64 is the largest power of two dividing both (192 would too, at 3x coarser
groups), and a float16 scale + a zero point per 64 weights costs (16 + bits) / 64 = 0.28..0.34 bits per weight.

`build_database` runs block by block: Hessians from the block's inputs, GPTQ at every bit-width, then the block
is put at `calib_bits` (3, the authors' choice) and run to produce the next block's inputs, so later layers
are calibrated on a quantized upstream model. The database stores codes (uint8), float16 scales and uint8 zero
points per (linear, bits); a level's weight is their dequantization (evopress.compressors.quantization.gptq.dequantize), exactly.
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
    linear_of,
    linear_sizes,
    model_sha256_of,
    open_build,
    open_for_stitch,
    split_unit,
)
from evopress.compressors.quantization.gptq import Quantized, check_bits, check_group_size, dequantize, gptq
from evopress.compressors.quantization.serving import (
    KERNELS,
    fused_conflicts,
    fused_units,
    grid_step,
    kernel_levels,
)
from evopress.config import options_from
from evopress.database import DatabaseSpec, LevelDatabase
from evopress.errors import require


def parse_bits(value) -> tuple[int, ...]:
    """'2,3,4' | [2, 3, 4] | '4,8' | 4 -> (2, 3, 4) ...; ascending, evenly spaced, inside 1..8 (a level step is
    one grid step, the same number of bits everywhere)."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            require(False, f"bits={value!r}; expected comma-separated integers in 1..8 like 2,3,4,5,6")
    bits = tuple(int(v) for v in (value if isinstance(value, list | tuple) else [value]))
    require(bits, "bits is empty; expected bit-widths in 1..8 like 2,3,4,5,6")
    for b in bits:
        require(1 <= b <= 8, f"bit-width {b} outside 1..8")
    grid_step(bits)
    return bits


@dataclass(frozen=True)
class QuantOptions:
    bits: tuple[int, ...] = (2, 3, 4, 5, 6)
    group_size: int = 64  # input columns per scale/zero point (0 = whole row); must divide every width
    # Act-order with static groups (llm-compressor's default "static"; no index needed at inference): columns
    # in decreasing Hessian-diagonal order, group grids from the original weights.
    act_order: bool = True
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    calib_bits: int = 3  # the upstream model's bit-width while later blocks are calibrated
    n_samples: int = 128  # calibration sequences for the Hessians
    blocksize: int = 8  # columns per lazy-update block (small blocks are several times faster on a CPU)
    batch_size: int = 8
    # Serving constraints (search-time; not build parameters, see serving.py)
    fuse: bool = False  # q/k/v of a block one unit, gate/up one unit (vLLM's fused qkv_proj / gate_up_proj)
    kernel: str = ""  # "" = any bits of the database; "marlin" = only the bits (and group sizes) Marlin runs

    @classmethod
    def from_dict(cls, options: dict | None) -> QuantOptions:
        options = dict(options or {})
        if "bits" in options:  # also written 2,3,4 on the command line
            options["bits"] = parse_bits(options["bits"])
        opts = options_from(cls, options, "quantization", lambda k: k == "model_sha256")
        opts.validate()
        return opts

    def validate(self) -> None:
        parse_bits(list(self.bits))
        check_bits(self.calib_bits)
        require(
            self.calib_bits in self.bits, f"calib_bits={self.calib_bits} is not one of bits={list(self.bits)}"
        )
        require(self.group_size >= 0, f"group_size={self.group_size} must be >= 0 (0 = one group per row)")
        require(0 < self.damp < 1, f"damp={self.damp} outside (0, 1)")
        require(self.n_samples >= 1, f"n_samples={self.n_samples} must be >= 1")
        require(self.blocksize >= 1, f"blocksize={self.blocksize} must be >= 1")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        kernel_levels(self.bits, self.kernel, self.group_size)

    @property
    def levels(self) -> tuple[int, ...]:
        """The bits the search uses: the database's, less those the kernel does not run."""
        return kernel_levels(self.bits, self.kernel, self.group_size)

    def build_params(self) -> dict:
        """What a database depends on (checked when it is reused); batch_size and the serving options are not."""
        params = asdict(self)
        for name in ("batch_size", *SEARCH_OPTIONS):
            del params[name]
        params["bits"] = list(self.bits)
        return params

    def search_options(self) -> dict:
        """The serving options that differ from the defaults: recorded in profiles, so stitch and evaluate rebuild
        the same units (a profile without them is per-linear, as before these options existed)."""
        defaults = QuantOptions()
        return {k: getattr(self, k) for k in SEARCH_OPTIONS if getattr(self, k) != getattr(defaults, k)}


SEARCH_OPTIONS = ("fuse", "kernel")


def check_target(target: float, bits: tuple[int, ...]) -> float:
    require(
        isinstance(target, int | float) and bits[0] <= float(target) <= bits[-1],
        f"quantization target {target!r} outside the database's range {bits[0]}..{bits[-1]} (average bits)",
    )
    return float(target)


def check_settings(target: float, options: dict, database: dict) -> None:
    """What can be checked without the model: the (database and search) options and the target's range."""
    opts = QuantOptions.from_dict({**database, **options})
    if target is not None:
        # Without the database's bits (a search given only --db) the kernel's own grid bounds the target.
        known = "bits" in database or "bits" in options or not opts.kernel
        check_target(target, opts.levels if known else KERNELS[opts.kernel].bits)


def unit_shapes(rows: int, cols: int, group_size: int) -> dict[str, list[int]]:
    groups = cols // check_group_size(group_size, cols)
    return {"codes": [rows, cols], "scale": [rows, groups], "zero": [rows, groups]}


def database_spec(adapter: ModelAdapter, model_sha256: str, opts: QuantOptions) -> DatabaseSpec:
    units = {
        u: {"levels": list(opts.bits), "shapes": unit_shapes(r, c, opts.group_size)}
        for u, (r, c) in linear_sizes(adapter).items()
    }
    return DatabaseSpec(model_sha256, "quantization", opts.build_params(), units)


def exact_group_totals(sizes: dict[str, int], target: float, bits: tuple[int, ...]) -> dict[int, int]:
    """Per size group, the sum of bits over its units so that the parameter-weighted average is `target` exactly.

    Every group gets the sum nearest target * count that its units can take (bits[0] * count plus whole grid
    steps); if that misses the exact total, the target is not reachable with swaps inside groups from this
    split and is refused (the one-line error names the nearest average).
    """
    step = grid_step(bits)
    counts: dict[int, int] = {}
    for n in sizes.values():
        counts[n] = counts.get(n, 0) + 1
    total = sum(sizes.values())
    # sums the units can take are bits[0] * c + k * step, i.e. congruent to `off` modulo step (off = 0 for
    # one-bit steps: exactly round(target * c), as before grids existed)
    off = {c: bits[0] * c % step for c in counts.values()}
    totals = {n: off[c] + step * round((target * c - off[c]) / step) for n, c in counts.items()}
    reached = sum(n * s for n, s in totals.items())
    require(
        abs(reached - target * total) <= 1e-6 * total,
        f"target {target} average bits cannot be split exactly over the size groups "
        f"{dict(sorted(counts.items()))} (weights: units) in steps of {step} bits; "
        f"nearest reachable {reached / total:.6f}",
    )
    for n, s in totals.items():
        require(bits[0] * counts[n] <= s <= bits[-1] * counts[n], f"target {target} outside {bits}")
    return totals


# --- the compressor ------------------------------------------------------------------------------------------
class QuantizationCompressor(Compressor):
    method = "quantization"

    def __init__(self, adapter: ModelAdapter, target: float, db: LevelDatabase, opts: QuantOptions):
        self.adapter = adapter
        self.db = db
        self.opts = opts
        self.target = check_target(target, opts.levels)
        shapes = linear_sizes(adapter)
        # unit -> its linears (database units): itself, or q/k/v and gate/up of a block together (fuse)
        self.members = fused_units(list(shapes)) if opts.fuse else {u: [u] for u in shapes}
        self.sizes = {u: sum(shapes[m][0] * shapes[m][1] for m in ms) for u, ms in self.members.items()}

    @property
    def options(self) -> dict:
        return self.opts.search_options()  # everything else is in the database's manifest

    def _linear(self, unit: str) -> torch.nn.Linear:
        return linear_of(self.adapter, unit)

    def _linears(self, unit: str) -> list[torch.nn.Linear]:
        """The nn.Linear modules of a unit (one, or the fused members)."""
        return [linear_of(self.adapter, m) for m in self.members[unit]]

    def units(self) -> list[str]:
        return list(self.sizes)

    def levels(self, unit: str) -> list[int]:
        return list(self.opts.levels)

    def cost(self, unit: str, level: int) -> float:
        return float(level * self.sizes[unit])

    def group(self, unit: str) -> str:
        return str(self.sizes[unit])

    def block_of(self, unit: str) -> int:
        return split_unit(unit)[0]

    def total_params(self) -> int:
        return sum(self.sizes.values())

    def size_share(self, profile: Profile) -> float:
        """Bits of the block weights over 16 bits each: linears at their bits, norms and the rest at 16."""
        total = self.block_params()
        bits = self.total_cost(profile) + 16 * (total - self.total_params())
        return bits / (16 * total)

    def average_bits(self, profile: Profile) -> float:
        return self.total_cost(profile) / self.total_params()

    def initial_profile(self) -> Profile:
        """Uniform at a target on the grid; else, per size group, the two nearest levels spread evenly."""
        profile, levels = {}, self.opts.levels
        step = grid_step(levels)
        for n, total in exact_group_totals(self.sizes, self.target, levels).items():
            units = [u for u in self.units() if self.sizes[u] == n]
            low, extra = divmod((total - levels[0] * len(units)) // step, len(units))
            # unit i gets the extra step when the running share crosses an integer: evenly spread over depth
            for i, u in enumerate(units):
                up = (i + 1) * extra // len(units) - i * extra // len(units)
                profile[u] = levels[0] + step * (low + up)
        return {u: profile[u] for u in self.units()}

    def quantized(self, unit: str, bits: int) -> Quantized:
        require(bits in self.opts.bits, f"bit-width {bits} of {unit!r} outside {list(self.opts.bits)}")
        t = self.db.load(unit, bits)
        return Quantized(bits, t["codes"], t["scale"], t["zero"])

    def weight(self, unit: str, bits: int) -> torch.Tensor:
        q = self.quantized(unit, bits)
        return dequantize(q.codes, q.scale, q.zero)

    @torch.no_grad()
    def apply(self, unit: str, level: int) -> None:
        for member in self.members[unit]:
            linear_of(self.adapter, member).weight.copy_(self.weight(member, level))

    def linear_bits(self, profile: Profile) -> dict[str, int]:
        """Per-linear bits of a profile (fused units spread over their members): what the stitch writes."""
        return {m: level for unit, level in profile.items() for m in self.members[unit]}


def open_database(adapter: ModelAdapter, db, options: dict) -> tuple[LevelDatabase, QuantOptions]:
    """The database, checked against this model; options not given are taken from it (so --db is enough)."""
    require(db is not None, "quantization needs a level database (--db); build it with `evopress build-db`")
    database = db if isinstance(db, LevelDatabase) else LevelDatabase.open(Path(db))
    require(
        database.method == "quantization",
        f"database {str(database.root)!r} is a {database.method!r} database, not quantization",
    )
    given = {k: v for k, v in options.items() if k != "model_sha256"}
    opts = QuantOptions.from_dict({**database.params, **given})
    spec = database_spec(adapter, model_sha256_of(adapter, options), opts)
    database.require_matches(spec)
    return database, opts


def make(
    adapter: ModelAdapter, target: float, *, db=None, options: dict | None = None
) -> QuantizationCompressor:
    """A compressor over a built database; the database must match this model."""
    options = dict(options or {})
    database, opts = open_database(adapter, db, options)
    return QuantizationCompressor(adapter, target, database, opts)


# --- building the database -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GptqLevels:
    """The level files of some linears: GPTQ of each dense weight with its Hessian at each wanted bit-width."""

    opts: QuantOptions

    @torch.no_grad()
    def __call__(self, weights, hessians, wanted: dict[str, list[int]]) -> dict:
        o = self.opts
        files = {}
        for unit, bits in wanted.items():
            for q in gptq(weights[unit], hessians[unit], bits, o.group_size, o.damp, o.act_order):
                files[(unit, q.bits)] = {"codes": q.codes, "scale": q.scale, "zero": q.zero}
        return files


def _dequantized(tensors: dict) -> torch.Tensor:
    return dequantize(tensors["codes"], tensors["scale"], tensors["zero"])


@torch.no_grad()
def build_database(model_dir: Path, data_dir: Path, out_dir: Path, options: dict, pool=None) -> LevelDatabase:
    """GPTQ every linear of the prepared model at every bit-width; resumable; returns the database.

    `pool` (evopress/build_pool.py) computes the bit-widths other than calib_bits; default: this process."""
    opts = QuantOptions.from_dict({k: v for k, v in dict(options).items() if k != "target"})
    adapter, db, tokens = open_build(
        model_dir, data_dir, out_dir, lambda a, sha: database_spec(a, sha, opts), opts.n_samples
    )
    # the next block is calibrated on this one at calib_bits
    upstream = Upstream(opts.calib_bits, _dequantized)
    build_by_block(
        adapter, db, tokens, opts.batch_size, GptqLevels(opts), upstream, "build-db quantization", pool
    )
    return db


# --- stitching -----------------------------------------------------------------------------------------------
def linear_prefix(adapter: ModelAdapter, unit: str) -> str:
    """The state-dict prefix of a unit's nn.Linear (e.g. model.layers.3.self_attn.q_proj)."""
    target = adapter.linear(*split_unit(unit))
    for name, module in adapter.model.named_modules():
        if module is target:
            return name
    raise AssertionError(f"{unit} not found in the model")


# Formats of a stitched folder. compressed-tensors (default): llm-compressor's pack-quantized layout, which stock
# transformers loads (evopress/ct_format.py). evopress-packed: our own bit stream (evopress/packing.py), which
# only evopress loads; kept as an option for its slightly smaller files (no per-linear shape tensors, a shorter
# safetensors header, and zero points at `bits` bits instead of int8). compressed-tensors-group: the same
# numbers with zero points packed along the rows, the layout llm-compressor writes for asymmetric schemes and vLLM's
# WNA16 reads; transformers 5.x refuses it, `evopress.load_model` loads it (ct_format's docstring).
FORMATS = ("compressed-tensors", "compressed-tensors-group", "evopress-packed")


def write_stitched(model, tokenizer, linears: dict, folder: Path, group_size: int, format: str) -> dict:
    """Write the stitched folder in `format`; returns its bytes: total (every file), quantized (the linears'
    tensors: codes, scales, zero points, shapes) and rest (the other tensors and the safetensors headers)."""
    from evopress import ct_format
    from evopress.packing import QUANT_FILE, bytes_on_disk, write_packed

    if format == "evopress-packed":
        write_packed(model, tokenizer, linears, folder, group_size)
        quantized = ct_format.tensor_bytes(Path(folder) / QUANT_FILE)
    else:
        strategy = "group" if format == "compressed-tensors-group" else "block"
        ct_format.write(model, tokenizer, linears, folder, strategy)
        quantized = ct_format.quantized_bytes(folder)
    sizes = bytes_on_disk(folder)
    return {"total": sizes["total"], "quantized": quantized, "rest": sizes["weights"] - quantized}


@torch.no_grad()
def stitch(
    model_dir: Path, profile: dict, db: Path | None, out_dir: Path, format: str = "compressed-tensors"
) -> dict:
    """A profile's bit-widths from the database -> a quantized model folder in `format` (FORMATS); a report."""
    from evopress.models import write_model_folder

    require(format in FORMATS, f"stitch format {format!r} is not one of {', '.join(FORMATS)}")
    model, tokenizer, comp, units = open_for_stitch(make, model_dir, profile, db)
    adapter = comp.adapter
    linears = {linear_prefix(adapter, u): comp.quantized(u, b) for u, b in comp.linear_bits(units).items()}
    # vLLM loads q/k/v and gate/up as one module with one scheme: say whether this folder can be (fuse makes it so)
    conflicts = fused_conflicts({name: q.bits for name, q in linears.items()})
    require(not (comp.opts.fuse and conflicts), f"fused parts differ in bits in {conflicts[:3]} (a bug)")
    report = {
        "method": "quantization",
        "target": comp.target,
        "average_bits": comp.average_bits(units),
        "format": format,
        **comp.options,
        "fused_parts_agree": not conflicts,
    }
    stitch_json = {}  # written by write_model_folder after `write`, so it can hold the sizes

    def write(folder: Path) -> None:
        sizes = write_stitched(model, tokenizer, linears, folder, comp.opts.group_size, format)
        report.update(
            linear_params=comp.total_params(),
            group_size=comp.opts.group_size,
            bytes_total=sizes["total"],
            bytes_quantized=sizes["quantized"],  # codes, scales, zero points (and shapes) of the linears
            bytes_dense_rest=sizes["rest"],
            bits_per_weight_on_disk=8 * sizes["quantized"] / comp.total_params(),
        )
        stitch_json.update(report, profile=profile)

    source = f"stitch:quantization:{profile.get('source', 'profile')}@{comp.target}"
    write_model_folder(model, tokenizer, Path(out_dir), source, {"stitch.json": stitch_json}, writer=write)
    return report
