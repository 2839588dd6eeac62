"""Stitched quantized models in compressed-tensors' pack-quantized format (the package llm-compressor writes with).

Stock `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads such a folder through the
`compressed-tensors` package, which decompresses the linears on the model's first forward pass.

  <folder>/config.json        the model config + `quantization_config`: one config group per distinct
                              (bits, group size), its `targets` the exact module names of the linears at those
                              bits (so every linear keeps its own bit-width); `ignore: [lm_head]`;
                              format pack-quantized, status compressed
  <folder>/model.safetensors  every tensor that is not a quantized linear's weight, as save_pretrained names
                              it, in the stitched model's dtype; per quantized linear <name>:
      <name>.weight_packed      int32 [rows, ceil(cols * bits / 32)]: codes shifted to the signed range
                                (code - 2^(bits-1)) and packed densely, LSB first, by the package's own
                                `pack_to_int32` (no bits wasted at 3, 5, 6 bits; rows padded to 32 codes)
      <name>.weight_zero_point  int8 [rows, groups], the zero points shifted the same way (not packed: see
                                `weight_args` for why the scheme is "block" 1 x group, not "group")
      <name>.weight_scale       float16 [rows, groups], our scales as they are (they are float16 already)
      <name>.weight_shape       int64 [2] = [rows, cols]

Exactness: the package dequantizes (q_signed - z_signed) * scale in the dtype of the loaded scale parameter, i.e.
the model's dtype. The shift cancels, so the integers are ours exactly; at float32 the scale (float16) is exact and
the product equals `evopress.packing.dequantize` bit for bit. At bfloat16/float16 the package rounds the scale and
the product to that dtype, so `load` below always loads at float32 and casts afterwards, like `load_packed`.

Groups are contiguous in the original column order (act-order is "static"), so no g_idx is needed.

Two strategies for the same numbers (stitch formats `compressed-tensors` and `compressed-tensors-group`):
- "block" (1 x group; the default format): zero points int8 [rows, groups], unpacked. Stock
  `from_pretrained` loads it (see `weight_args`).
- "group" (or "channel" for whole-row groups): zero points packed into int32 along the rows, [ceil(rows * bits /
  32), groups], which is what llm-compressor writes for its asymmetric presets (W4A16_ASYM) and what vLLM's
  compressed-tensors WNA16 scheme reads (`weight_zero_point`, packed_dim 0). transformers 5.x refuses such a
  folder (its loader expects the unpacked shape: llm-compressor issue #1618), so `load` below decompresses it
  with the package's own `PackedQuantizationCompressor.decompress` instead. vLLM runs only 4 and 8 bits, with
  q/k/v and gate/up at one scheme: make the profile with the quantization options `fuse: true, kernel: marlin`
  (compressors/quantization/serving.py). No vLLM load was tried here (no vLLM on a CPU-only machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evopress.errors import require
from evopress.io import read_config_json, unique_tensors

# For annotations only: evopress.packing imports this module (its loader reads both formats).
if TYPE_CHECKING:
    from evopress.packing import Quantized

FORMAT = "pack-quantized"
STRATEGIES = ("block", "group")  # "group" is written as "channel" where a group is the whole row
WEIGHTS_FILE = "model.safetensors"
IGNORE = ["lm_head"]  # never quantized here (the targets name block linears only); said for readers like vLLM


def signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Our unsigned codes 0..2^bits-1 -> the package's signed int8 range -2^(bits-1)..2^(bits-1)-1."""
    return (values.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def linear_tensors(name: str, q: Quantized, strategy: str = "block") -> dict[str, torch.Tensor]:
    """The four tensors the pack-quantized compressor keeps for one linear (see the module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rows, cols = q.codes.shape
    zero = signed(q.zero, q.bits).contiguous()  # int8 [rows, groups]: as is for "block"
    if strategy == "group":  # packed along the rows, as the package's compress does for group/channel
        zero = pack_to_int32(zero, q.bits, packed_dim=0).contiguous()
    return {
        f"{name}.weight_packed": pack_to_int32(signed(q.codes, q.bits), q.bits),
        f"{name}.weight_zero_point": zero,
        f"{name}.weight_scale": q.scale.to(torch.float16).contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }


def scheme_key(q: Quantized) -> tuple[int, int, int]:
    """(bits, group size, columns) of a linear; a whole-row group is a group as wide as the row (the columns
    matter only there: a channel scheme for "group", a block as wide as the row for "block")."""
    cols = q.codes.shape[1]
    return q.bits, q.group_size, cols if q.group_size == cols else 0


def weight_args(bits: int, group_size: int, cols: int = 0, strategy: str = "block") -> dict:
    """QuantizationArgs of our grid: integer, asymmetric (a zero point per group), static, blocks of 1 x group
    (or, for `strategy="group"`, groups of `group_size`, a channel when the group is the whole row of `cols`).

    Why "block" and not "group": the two dequantize alike (a [rows, cols / group] scale and zero point, each for
    `group` consecutive columns of one row), but for "group" the package packs the zero points into int32 words
    and transformers' loader (5.x with compressed-tensors 0.20) creates the unpacked [rows, groups] parameter on
    the meta device, so it refuses such a checkpoint ("size mismatch ... weight_zero_point"; the known
    llm-compressor issue #1618 for asymmetric models). For "block" zero points stay int8 [rows, groups] in the
    package's own compress, load and decompress paths, and load with stock from_pretrained.
    """
    require(
        strategy in STRATEGIES, f"compressed-tensors strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}"
    )
    if strategy == "group":
        base = {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False}
        if cols and group_size == cols:
            return {**base, "strategy": "channel"}
        return {**base, "strategy": "group", "group_size": group_size}
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "dynamic": False,
        "strategy": "block",
        "block_structure": [1, group_size],
    }


def quantization_config(linears: dict[str, Quantized], strategy: str = "block") -> dict:
    """config.json's `quantization_config`: one group per (bits, group size), targets = exact module names.

    Built and validated with the package's own pydantic classes, then dumped as llm-compressor's
    `ModelCompressor.update_config` writes it (version, quant_method, empty sparsity and transform configs).
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    by_key: dict[tuple[int, int, int], list[str]] = {}
    for name, q in linears.items():
        by_key.setdefault(scheme_key(q), []).append(name)
    # targets are exact module names, not regexes: a plain name matches only itself (the package's match_name)
    groups = {
        f"group_{i}": QuantizationScheme(
            targets=sorted(names), weights=weight_args(*key, strategy=strategy), format=FORMAT
        )
        for i, (key, names) in enumerate(sorted(by_key.items()))
    }
    config = QuantizationConfig(
        config_groups=groups, format=FORMAT, quantization_status="compressed", ignore=IGNORE
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude=["quant_method"]),
    }


def start_folder(model, tokenizer, names: list[str], folder: Path) -> Path:
    """`folder` made, config and tokenizer saved, after checking that every name is an nn.Linear of `model`:
    what every compressed-tensors writer (quantized here, sparse in sparse_format) does before its weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        require(
            isinstance(model.get_submodule(name), torch.nn.Linear), f"{name!r} is not an nn.Linear module"
        )
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def write(model, tokenizer, linears: dict[str, Quantized], folder: Path, strategy: str = "block") -> dict:
    """Write the layout above into `folder` (new or empty: the caller renames it into place); returns the
    quantization config. `linears` maps module names of nn.Linear modules to their quantized weights."""
    from safetensors.torch import save_file

    require(
        strategy in STRATEGIES, f"compressed-tensors strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}"
    )
    folder = start_folder(model, tokenizer, list(linears), folder)
    qconfig = quantization_config(linears, strategy)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": qconfig}, indent=2))
    skip = {f"{name}.weight" for name in linears}
    # tied weights (lm_head = embed_tokens) are one tensor: saved once under its first name, as save_pretrained does
    tensors = unique_tensors(model, skip)
    for name, q in linears.items():
        tensors.update(linear_tensors(name, q, strategy))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return qconfig


def is_compressed_tensors(folder: Path) -> bool:
    """A folder whose config.json declares a compressed-tensors quantization (ours or llm-compressor's)."""
    qconfig = (read_config_json(folder) or {}).get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors"


QUANT_SUFFIXES = ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape")


def tensor_bytes(path: Path, keep=lambda key: True) -> int:
    """Bytes of the tensors of a safetensors file whose names `keep` accepts (the header not counted), read from
    its header: an 8-byte little-endian length, then json giving each tensor's data_offsets."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(
        spec["data_offsets"][1] - spec["data_offsets"][0]
        for key, spec in header.items()
        if key != "__metadata__" and keep(key)
    )


def quantized_bytes(folder: Path) -> int:
    """Bytes of the quantized linears' tensors (codes, zero points, scales, shapes) in the weights file."""
    return tensor_bytes(Path(folder) / WEIGHTS_FILE, lambda key: key.rsplit(".", 1)[-1] in QUANT_SUFFIXES)


@torch.no_grad()
def dense_in_place(model) -> None:
    """A model loaded by transformers from a compressed-tensors folder -> plain nn.Linear weights.

    transformers leaves the linears compressed and decompresses on the first forward of the *whole* model (a
    pre-hook); evopress also runs blocks one by one, so decompress now, drop the package's forward wrappers and
    quantization parameters, and forget the quantization (save_pretrained then writes a dense model).
    """
    from compressed_tensors.compressors import decompress_module

    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            decompress_module(module, leave_decompressed=False)
            # the unwrapped forward stays bound on the instance: drop it, the class's forward is the same
            module.__dict__.pop("forward", None)
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is not None:
        compressor.remove_decompression_hook(model)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def saved_dtype(folder: Path) -> torch.dtype:
    """The dtype config.json records for the model (float32 when it records none)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def packs_zero_points(folder: Path) -> bool:
    """Whether a compressed-tensors folder has asymmetric group/channel schemes (zero points packed along the rows:
    llm-compressor's and our "group" layout), which transformers 5.x cannot load."""
    qconfig = (read_config_json(folder) or {}).get("quantization_config") or {}
    return any(
        (group.get("weights") or {}).get("strategy") in ("group", "channel")
        and not (group.get("weights") or {}).get("symmetric", True)
        for group in (qconfig.get("config_groups") or {}).values()
    )


def _scheme_of(module: str, groups: dict):
    """The QuantizationScheme whose targets name `module` (ours: exact names); a single group covers all
    (llm-compressor's presets target the class, e.g. "Linear")."""
    from compressed_tensors.quantization import QuantizationScheme

    named = [g for g in groups.values() if module in g.get("targets", [])]
    require(
        len(named) == 1 or (not named and len(groups) == 1),
        f"no single quantization scheme targets {module!r} ({len(named)} name it, {len(groups)} groups)",
    )
    return QuantizationScheme.model_validate((named or list(groups.values()))[0])


def split_compressed(path: Path, suffixes: tuple[str, ...]) -> tuple[dict, dict[str, dict]]:
    """A compressed-tensors weights file as (plain tensors by name, {module: {suffix: tensor}} of the compressed
    ones): what both dense readers (quantized here, sparse in sparse_format) start from."""
    from safetensors.torch import load_file

    state, fields = {}, {}
    for key, tensor in load_file(str(path)).items():
        module, _, suffix = key.rpartition(".")
        if suffix in suffixes:
            fields.setdefault(module, {})[suffix] = tensor
        else:
            state[key] = tensor
    return state, fields


def dense_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors with every quantized linear decompressed under its `.weight` name, float32 scales
    (where the package's dequantization of our float16 scales is exact), by the package's own decompress."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    groups = ((read_config_json(folder) or {}).get("quantization_config") or {}).get("config_groups") or {}
    state, fields = split_compressed(Path(folder) / WEIGHTS_FILE, QUANT_SUFFIXES)
    for module, parts in fields.items():
        parts["weight_scale"] = parts["weight_scale"].float()
        out = PackedQuantizationCompressor.decompress(parts, _scheme_of(module, groups))
        state[f"{module}.weight"] = out["weight"].float()
    return state


@torch.no_grad()
def model_from_state(folder: Path, state: dict, dtype: torch.dtype, attn_implementation: str | None = None):
    """A plain transformers model of the folder's config holding `state` (its compression already undone)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):  # undone here; transformers must not look for a quantizer
        del config.quantization_config
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with no_init_weights():  # every weight is overwritten below: random init would only cost time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    require(not unexpected, f"{str(folder)!r}: unexpected tensors {unexpected[:3]}")
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    require(not set(missing) - tied, f"{str(folder)!r}: missing tensors {sorted(set(missing) - tied)[:3]}")
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model


def load(folder: Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """A working dense model from a compressed-tensors folder, with exactly our dequantized weights.

    Loaded at float32 (where the package's dequantization is exact, see the module docstring), decompressed,
    then cast to `dtype` (default: the saved one): the same numbers as `evopress.packing.load_packed`. Folders
    with packed zero points (the "group" layout) go through `dense_state_dict`, since transformers refuses them.
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or saved_dtype(folder)
    if packs_zero_points(folder):
        model = model_from_state(folder, dense_state_dict(folder), torch.float32, attn_implementation)
        return model.to(dtype) if dtype != torch.float32 else model
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    dense_in_place(model)
    if dtype != torch.float32:
        model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model
