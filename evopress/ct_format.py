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

vLLM: its compressed-tensors support serves integer weights in "group"/"channel" schemes at 4 or 8 bits (with zero
points), with the fused q/k/v and gate/up linears at one scheme. The quantization options `fuse: true` and
`kernel: marlin` (compressors/quantization/serving.py) make a profile meet the bits and fusion rules (each fused
module's parts then sit in one config group here); the "block" strategy below is still not one vLLM's WNA16
path matches, so this layout is chosen for what loads with stock transformers.
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
WEIGHTS_FILE = "model.safetensors"
IGNORE = ["lm_head"]  # never quantized here (the targets name block linears only); said for readers like vLLM


def signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Our unsigned codes 0..2^bits-1 -> the package's signed int8 range -2^(bits-1)..2^(bits-1)-1."""
    return (values.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def linear_tensors(name: str, q: Quantized) -> dict[str, torch.Tensor]:
    """The four tensors the pack-quantized compressor keeps for one linear (see the module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rows, cols = q.codes.shape
    return {
        f"{name}.weight_packed": pack_to_int32(signed(q.codes, q.bits), q.bits),
        f"{name}.weight_zero_point": signed(q.zero, q.bits).contiguous(),  # int8, unpacked (block strategy)
        f"{name}.weight_scale": q.scale.to(torch.float16).contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }


def scheme_key(q: Quantized) -> tuple[int, int]:
    """(bits, group size) of a linear; a whole-row group is a group as wide as the row."""
    return q.bits, q.group_size


def weight_args(bits: int, group_size: int) -> dict:
    """QuantizationArgs of our grid: integer, asymmetric (a zero point per group), static, blocks of 1 x group.

    Why "block" and not "group": the two dequantize alike (a [rows, cols / group] scale and zero point, each for
    `group` consecutive columns of one row), but for "group" the package packs the zero points into int32 words
    and transformers' loader (5.x with compressed-tensors 0.20) creates the unpacked [rows, groups] parameter on
    the meta device, so it refuses such a checkpoint ("size mismatch ... weight_zero_point"; the known
    llm-compressor issue #1618 for asymmetric models). For "block" zero points stay int8 [rows, groups] in the
    package's own compress, load and decompress paths, and load with stock from_pretrained.
    """
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "dynamic": False,
        "strategy": "block",
        "block_structure": [1, group_size],
    }


def quantization_config(linears: dict[str, Quantized]) -> dict:
    """config.json's `quantization_config`: one group per (bits, group size), targets = exact module names.

    Built and validated with the package's own pydantic classes, then dumped as llm-compressor's
    `ModelCompressor.update_config` writes it (version, quant_method, empty sparsity and transform configs).
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    by_key: dict[tuple[int, int], list[str]] = {}
    for name, q in linears.items():
        by_key.setdefault(scheme_key(q), []).append(name)
    # targets are exact module names, not regexes: a plain name matches only itself (the package's match_name)
    groups = {
        f"group_{i}": QuantizationScheme(targets=sorted(names), weights=weight_args(*key), format=FORMAT)
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


def write(model, tokenizer, linears: dict[str, Quantized], folder: Path) -> dict:
    """Write the layout above into `folder` (new or empty: the caller renames it into place); returns the
    quantization config. `linears` maps module names of nn.Linear modules to their quantized weights."""
    from safetensors.torch import save_file

    folder = start_folder(model, tokenizer, list(linears), folder)
    qconfig = quantization_config(linears)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": qconfig}, indent=2))
    skip = {f"{name}.weight" for name in linears}
    # tied weights (lm_head = embed_tokens) are one tensor: saved once under its first name, as save_pretrained does
    tensors = unique_tensors(model, skip)
    for name, q in linears.items():
        tensors.update(linear_tensors(name, q))
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


def load(folder: Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """A working dense model from a compressed-tensors folder, with exactly our dequantized weights.

    Loaded at float32 (where the package's dequantization is exact, see the module docstring), decompressed,
    then cast to `dtype` (default: the saved one): the same numbers as `evopress.packing.load_packed`.
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or saved_dtype(folder)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    dense_in_place(model)
    if dtype != torch.float32:
        model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model
