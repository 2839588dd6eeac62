"""Writing a depth profile as a model folder whose removed parts are gone from the files and from the compute.

block profiles, and blocks that lose both sublayers: the blocks are deleted (layer_idx renumbered); the folder
    is a plain, shorter model of the same family, which stock transformers loads.
other removed sublayers, Llama family: DeciLM (Nemotron-NAS) `block_configs` with no_op sublayers
    (evopress/depth_format.py); `evopress.load_model` loads it.
other removed sublayers, other families (Gemma's sandwich norms, GPT-NeoX's parallel residual do not fit the
    DeciLM block): the output projection is zeroed, output-exact and loadable by stock transformers, but as large
    and as slow as dense.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evopress.adapter import ModelAdapter


def delete_blocks(adapter: ModelAdapter, removed: set[int]) -> None:
    """Delete whole blocks from the model, renumbering layer_idx and config.layer_types / num_hidden_layers."""
    model = adapter.model
    keep = [blk for i, blk in enumerate(adapter.blocks) if i not in removed]
    for new_idx, blk in enumerate(keep):
        attn = getattr(blk, adapter.spec.attn)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    parent_path, _, attr = adapter.spec.layers.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, torch.nn.ModuleList(keep))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in removed]
    model.config.num_hidden_layers = len(keep)


@torch.no_grad()
def zero_sublayers(adapter: ModelAdapter, removed: dict[str, list[int]]) -> None:
    """Zero each removed sublayer's output projection: its contribution becomes exactly zero (the fallback)."""
    for kind, blocks in removed.items():
        for b in blocks:
            last = "o_proj" if kind == "attn" else "down_proj"
            lin = adapter.sublayer(b, kind).get_submodule(last)
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


def split_removed(removed: dict[str, list[int]], num_blocks: int) -> tuple[set[int], list[dict[str, bool]]]:
    """Sublayer removals -> (blocks losing both sublayers, to delete; per kept block, which sublayer is gone)."""
    attn, mlp = set(removed.get("attn", [])), set(removed.get("mlp", []))
    whole = attn & mlp
    no_ops = [{"attn": i in attn, "mlp": i in mlp} for i in range(num_blocks) if i not in whole]
    return whole, no_ops


def prune(adapter: ModelAdapter, granularity: str, removed: dict[str, list[int]]) -> tuple[str, list | None]:
    """Remove the profile's parts from the live model, in place; returns (layout, no_ops): layout is "dense"
    (a plain folder), "decilm" (no_ops lists each kept block's removed sublayers) or "zeroed"."""
    from evopress import depth_format

    if granularity == "block":
        delete_blocks(adapter, set(removed["block"]))
        return "dense", None
    if not depth_format.supports(adapter.model.config.model_type):
        zero_sublayers(adapter, removed)
        return "zeroed", None
    whole, no_ops = split_removed(removed, adapter.num_blocks)
    delete_blocks(adapter, whole)
    if not any(gone["attn"] or gone["mlp"] for gone in no_ops):
        return "dense", None
    depth_format.remove_sublayers(adapter.model.model.layers, no_ops)
    return "decilm", no_ops


def writer_for(layout: str, model, tokenizer, no_ops):
    """write_model_folder's `writer` for a layout (None: save_pretrained)."""
    from evopress import depth_format

    if layout != "decilm":
        return None

    def write(folder: Path) -> None:
        depth_format.write(model, tokenizer, no_ops, folder)

    return write


def weights_bytes(folder: Path) -> int:
    """Bytes of the folder's safetensors files (header included)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
