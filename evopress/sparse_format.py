"""Stitched sparse models stored sparse: compressed-tensors' `sparse-bitmask` layout (what llm-compressor wrote).

  <folder>/config.json   the model config + `quantization_config` = {quant_method: compressed-tensors, version,
                         sparsity_config: {format: sparse-bitmask, global_sparsity, sparsity_structure: unstructured,
                         targets: [the pruned linears' module names], ignore: [lm_head]}} (the package's own
                         `BitmaskConfig`, dumped as llm-compressor's `ModelCompressor.update_config` did)
  <folder>/model.safetensors  every tensor that is not a pruned linear's weight, as save_pretrained names it; per
                         pruned linear <name> the package's `BitmaskTensor` fields:
      <name>.compressed   the non-zero weights, row-major, 1-D, in the weight's dtype
      <name>.bitmask      uint8 [rows, ceil(cols / 8)]: bit j of a row set where the weight is non-zero, packed
                          little-endian by the package's own `pack_bitmasks`
      <name>.row_offsets  int64 [rows]: where each row's values start in `compressed`
      <name>.shape        int64 [2] = [rows, cols]
  Bytes per weight: (1 - sparsity) x dtype bytes + 1/8 (+ 8 bytes per row): at float32 and 50% sparsity 2.125
  instead of 4.

Who loads it: `evopress.load_model(folder)` (decompressed here, exactly the stitched weights). Stock transformers
does not any more: compressed-tensors removed its sparse compressors after 0.14 (vllm-project/compressed-tensors#610,
"remove sparsity"; the installed 0.20 keeps `BitmaskConfig` and `pack_bitmasks` but no decompressor) and
transformers followed (huggingface/transformers#46342 / #46387; transformers 5.24 asks for compressed-tensors
>= 0.15). Older stacks (compressed-tensors <= 0.14) read this layout: checked once by hand, compressed-tensors 0.14's
`ModelCompressor.from_compression_config` on our config picks its `BitmaskCompressor`, whose `decompress(folder)`
gives exactly the dense stitched tensors (not a test: it needs that second package version). The dense-with-zeros
layout (`format=dense`) is what stock transformers loads today.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evopress.errors import require
from evopress.io import read_config_json, unique_tensors

FORMAT = "sparse-bitmask"
WEIGHTS_FILE = "model.safetensors"
SUFFIXES = ("compressed", "bitmask", "row_offsets", "shape")


def compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four `BitmaskTensor` fields of one weight (the package's bitmask_compress, with its pack_bitmasks)."""
    from compressed_tensors.utils import pack_bitmasks

    weight = weight.detach().cpu()
    mask = weight != 0
    counts = mask.sum(dim=-1)
    return {
        "compressed": weight[mask].contiguous(),
        "bitmask": pack_bitmasks(mask).contiguous(),
        "row_offsets": torch.cumsum(counts, 0) - counts,
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }


def decompress(fields: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from its fields (zeros where the bitmask is clear)."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(s) for s in fields["shape"]]
    mask = unpack_bitmasks(fields["bitmask"], shape)
    values = fields["compressed"]
    require(
        int(mask.sum()) == values.numel(), f"bitmask sets {int(mask.sum())} weights, {values.numel()} stored"
    )
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def quantization_config(names: list[str], global_sparsity: float) -> dict:
    """config.json's `quantization_config`: sparsity only (no quantization groups)."""
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig

    sparsity = BitmaskConfig(
        global_sparsity=global_sparsity,
        sparsity_structure="unstructured",
        targets=sorted(names),
        ignore=["lm_head"],
    )
    # nothing else: a reader takes any other field for a quantization config (compressed-tensors 0.14 does)
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity.model_dump(),
    }


def write(model, tokenizer, names: list[str], folder: Path, global_sparsity: float) -> dict:
    """Write `model` into `folder` (new or empty) with the weights of the linears `names` (module names) stored
    sparse; returns the quantization config."""
    from safetensors.torch import save_file

    from evopress.ct_format import start_folder

    folder = start_folder(model, tokenizer, names, folder)
    qconfig = quantization_config(names, global_sparsity)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": qconfig}, indent=2))
    skip = {f"{name}.weight" for name in names}
    # tied weights (lm_head = embed_tokens) are one tensor: saved once under its first name, as save_pretrained does
    tensors = unique_tensors(model, skip)
    for name in names:
        fields = compress(model.get_submodule(name).weight)
        tensors.update({f"{name}.{k}": v for k, v in fields.items()})
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return qconfig


def is_sparse_bitmask(folder: Path) -> bool:
    """A folder whose config.json declares compressed-tensors' sparse-bitmask sparsity."""
    qconfig = (read_config_json(folder) or {}).get("quantization_config")
    sparsity = qconfig.get("sparsity_config") if isinstance(qconfig, dict) else None
    return isinstance(sparsity, dict) and sparsity.get("format") == FORMAT


def sparse_bytes(folder: Path) -> int:
    """Bytes of the pruned linears' tensors (values, bitmasks, row offsets, shapes) in the weights file."""
    from evopress.ct_format import tensor_bytes

    return tensor_bytes(Path(folder) / WEIGHTS_FILE, lambda key: key.rsplit(".", 1)[-1] in SUFFIXES)


def dense_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors with every sparse weight decompressed under its `.weight` name."""
    from evopress.ct_format import split_compressed

    state, fields = split_compressed(Path(folder) / WEIGHTS_FILE, SUFFIXES)
    for module, parts in fields.items():
        require(set(parts) == set(SUFFIXES), f"{folder}: {module} lacks {sorted(set(SUFFIXES) - set(parts))}")
        state[f"{module}.weight"] = decompress(parts)
    return state


def load(folder: Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """A plain transformers model (dense weights with the zeros back) from a sparse-bitmask folder."""
    from evopress.ct_format import model_from_state

    state = dense_state_dict(folder)
    return model_from_state(folder, state, dtype or next(iter(state.values())).dtype, attn_implementation)
