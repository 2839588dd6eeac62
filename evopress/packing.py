"""Packed quantized models on disk, and a loader that gives back a working torch model.

The default stitch format is compressed-tensors' pack-quantized (evopress/ct_format.py: stock transformers loads
it). This layout is the option `format=evopress-packed`: it stores zero points at `bits` bits instead of int8, which
makes it 0.66% smaller on the default model at 3 bits; only `load_packed` below reads it:

  <folder>/config.json, tokenizer files       as save_pretrained writes them
  <folder>/dense.safetensors                   every tensor that is not a quantized linear (embeddings, norms, ...),
                                               in the base model's dtype, under its state-dict name
  <folder>/quantized.safetensors               per quantized linear <name> (its state-dict prefix, e.g.
                                               model.layers.0.self_attn.q_proj):
      <name>.qweight   uint8 bit stream of the codes, row-major, `bits` bits per code, least significant bit
                       first (code i occupies stream bits i*bits .. i*bits+bits-1), zero-padded to whole bytes
      <name>.qzeros    the zero points [rows, groups] packed the same way at the same bits
      <name>.scales    float16 [rows, groups]
  <folder>/quantization.json                   {"format": "evopress-packed", "version": 1, "group_size",
                                               "linears": {name: {"bits", "shape": [rows, cols]}}}

A weight is (code - zero) * scale in float32, group g covering columns g*group_size .. (g+1)*group_size - 1
(`evopress.compressors.quantization.gptq.dequantize`), then cast to the model's dtype: the same numbers the level database gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from evopress.adapter import attention_implementation
from evopress.errors import require

FORMAT = "evopress-packed"
VERSION = 1
QUANT_FILE = "quantized.safetensors"
DENSE_FILE = "dense.safetensors"
CONFIG_FILE = "quantization.json"


@dataclass
class Quantized:
    """One linear at one bit-width: integer codes [rows, cols] (uint8), scales and zero points [rows, groups]."""

    bits: int
    codes: torch.Tensor  # uint8, values 0..2^bits-1
    scale: torch.Tensor  # float16
    zero: torch.Tensor  # uint8, values 0..2^bits-1

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 weights (q - z) * s, the group's scale and zero repeated over its columns (the one formula used)."""
    group = codes.shape[-1] // scale.shape[-1]
    s = scale.float().repeat_interleave(group, dim=-1)
    z = zero.float().repeat_interleave(group, dim=-1)
    return (codes.float() - z) * s


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (any shape, values < 2^bits) -> a uint8 bit stream of ceil(numel * bits / 8) bytes."""
    flat = codes.reshape(-1).to(torch.int32)
    require(flat.numel() == 0 or int(flat.max()) < 2**bits, f"codes exceed {bits} bits")
    stream = ((flat.unsqueeze(1) >> torch.arange(bits)) & 1).reshape(-1)  # LSB first per code
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).view(-1, 8)
    return (stream << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 codes of `shape`."""
    n = 1
    for d in shape:
        n *= d
    stream = ((packed.to(torch.int32).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[: n * bits]
    codes = (stream.view(n, bits) << torch.arange(bits)).sum(1)
    return codes.to(torch.uint8).view(*shape)


def pack_linear(name: str, q: Quantized) -> dict[str, torch.Tensor]:
    return {
        f"{name}.qweight": pack_bits(q.codes, q.bits),
        f"{name}.qzeros": pack_bits(q.zero, q.bits),
        f"{name}.scales": q.scale.contiguous(),
    }


def unpack_linear(tensors: dict[str, torch.Tensor], name: str, bits: int, shape: list[int]) -> Quantized:
    rows, cols = shape
    scale = tensors[f"{name}.scales"]
    codes = unpack_bits(tensors[f"{name}.qweight"], bits, (rows, cols))
    zero = unpack_bits(tensors[f"{name}.qzeros"], bits, tuple(scale.shape))
    return Quantized(bits, codes, scale, zero)


def write_packed(model, tokenizer, linears: dict[str, Quantized], folder: Path, group_size: int) -> dict:
    """Write the layout above into `folder` (which must be new or empty: the caller renames it into place).

    `linears` maps state-dict prefixes of nn.Linear modules to their quantized weights.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    skip = {f"{name}.weight" for name in linears}
    state = model.state_dict()
    # tied weights (lm_head = embed_tokens) are one tensor: save it once, as save_pretrained does
    seen, dense = set(), {}
    for key, tensor in state.items():
        if key in skip or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        dense[key] = tensor.detach().contiguous()
    save_file(dense, str(folder / DENSE_FILE))
    packed = {}
    for name, q in linears.items():
        packed.update(pack_linear(name, q))
    save_file(packed, str(folder / QUANT_FILE))
    config = {
        "format": FORMAT,
        "version": VERSION,
        "group_size": group_size,
        "linears": {name: {"bits": q.bits, "shape": list(q.codes.shape)} for name, q in linears.items()},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return config


def is_packed(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).exists()


def read_quantized(folder: Path) -> dict[str, Quantized]:
    """Every quantized linear of a packed folder, unpacked to codes, scales and zero points."""
    from safetensors.torch import load_file

    folder = Path(folder)
    require(is_packed(folder), f"{str(folder)!r} is not a packed quantized model (no {CONFIG_FILE})")
    config = json.loads((folder / CONFIG_FILE).read_text())
    require(
        config.get("format") == FORMAT and config.get("version") == VERSION,
        f"{str(folder)!r} has format {config.get('format')!r} v{config.get('version')}, this reads {FORMAT} v1",
    )
    tensors = load_file(str(folder / QUANT_FILE))
    return {
        name: unpack_linear(tensors, name, spec["bits"], spec["shape"])
        for name, spec in config["linears"].items()
    }


@torch.no_grad()
def load_packed(folder: Path, dtype: torch.dtype | None = None):
    """A working transformers model from a packed folder: dense tensors loaded, linears dequantized.

    A compressed-tensors folder (the default stitch format, evopress/ct_format.py) loads too, with the same
    weights, so callers written for this format keep working."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not is_packed(folder):
        from evopress import ct_format

        if ct_format.is_compressed_tensors(folder):
            config = AutoConfig.from_pretrained(folder)
            return ct_format.load(folder, dtype, attention_implementation(config.model_type))
    quantized = read_quantized(folder)
    config = AutoConfig.from_pretrained(folder)
    dense = load_file(str(folder / DENSE_FILE))
    dtype = dtype or next(iter(dense.values())).dtype
    attention = attention_implementation(config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention).eval()
    missing, unexpected = model.load_state_dict(dense, strict=False)
    require(not unexpected, f"{str(folder)!r}: unexpected tensors {unexpected[:3]}")
    for name, q in quantized.items():
        model.get_submodule(name).weight.copy_(dequantize(q.codes, q.scale, q.zero))
    left = [k for k in missing if k.removesuffix(".weight") not in quantized]
    if model.config.tie_word_embeddings:
        model.tie_weights()
        left = [k for k in left if k != "lm_head.weight"]
    require(not left, f"{str(folder)!r} lacks tensors {left[:3]}")
    model.requires_grad_(False)
    return model


def bytes_on_disk(folder: Path) -> dict[str, int]:
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
    return {"total": sum(files.values()), "weights": sum(weights.values()), **weights}
