"""What a model folder is, read from its files alone: its storage format, who loads it, its bytes on disk.

The checks run in the order `evopress.load_model` (models.load_model) tries the formats, with the same detectors,
so the format a row reports is the one the loader read. No weights are loaded.
"""

from __future__ import annotations

from pathlib import Path

from evopress import ct_format, depth_format, sparse_format
from evopress.io import read_config_json
from evopress.packing import is_packed

OURS = "evopress.load_model"
STOCK = "transformers AutoModelForCausalLM"


def model_format(folder: Path) -> tuple[str, str]:
    """(storage format, who loads it) of a model folder."""
    folder = Path(folder)
    config = read_config_json(folder) or {}
    if depth_format.is_decilm(folder):
        return "DeciLM block_configs", OURS  # removed sublayers absent; vLLM serves DeciLM too
    if sparse_format.is_sparse_bitmask(folder):
        return "compressed-tensors sparse-bitmask", OURS  # stock transformers would load random weights
    if is_packed(folder):
        return "evopress-packed", OURS
    if ct_format.is_compressed_tensors(folder):
        fmt = (config.get("quantization_config") or {}).get("format", "")
        if ct_format.packs_zero_points(
            folder
        ):  # transformers 5.x refuses packed zero points; vLLM reads them
            return (
                f"compressed-tensors {fmt} (zero points packed)".strip(),
                f"{OURS} (vLLM's layout; not tried)",
            )
        return f"compressed-tensors {fmt}".strip(), f"{STOCK} or {OURS}"
    arch = (config.get("architectures") or ["?"])[0]
    return f"safetensors {arch}", f"{STOCK} or {OURS}"


def bytes_on_disk(folder: Path) -> int:
    """Every file of the folder (weights, config, tokenizer, manifest): what a user copies."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
