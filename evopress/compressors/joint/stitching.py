"""A joint profile as one model folder: removed sublayers absent (the depth stitch's layout), kept linears packed
(the quantization stitch's compressed-tensors layout).

Layout (Llama family): the depth stitch's DeciLM `block_configs` (blocks losing both sublayers deleted, other
removed sublayers no_op, evopress/depth_format.py) and, in the same config.json, the compressed-tensors
`quantization_config` naming the kept linears by their module names *after* pruning; model.safetensors holds the
packed linears and the dense rest. `evopress.load_model` builds the pruned Llama, lets transformers' compressed-
tensors quantizer load the packed linears, and decompresses them at float32 (exact), as for a quantized folder.
A profile that removes nothing, or only whole blocks, is a plain (shorter) quantized Llama that stock transformers
loads. Other families have no DeciLM layout (their removed sublayers would stay in the files, zeroed), so joint
stitching refuses them in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evopress.errors import require

FORMATS = ("compressed-tensors",)


@torch.no_grad()
def stitch(
    model_dir: Path, profile: dict, db: Path | None, out_dir: Path, format: str = "compressed-tensors"
) -> dict:
    from evopress import ct_format, depth_format
    from evopress.compressors.depth.stitching import prune
    from evopress.compressors.joint import make
    from evopress.compressors.linears import open_for_stitch
    from evopress.models import write_model_folder

    require(format in FORMATS, f"stitch format {format!r} for method 'joint'; allowed: {', '.join(FORMATS)}")
    model, tokenizer, comp, units = open_for_stitch(make, model_dir, profile, db)
    require(
        depth_format.supports(model.config.model_type),
        f"joint stitching needs the DeciLM layout, which {model.config.model_type!r} models do not have "
        f"(supported: {', '.join(depth_format.FAMILIES)})",
    )
    adapter = comp.adapter
    # the module objects survive pruning (only their names change): key the quantized weights by object
    quantized = {
        id(comp.quant._linear(u)): comp.quant.quantized(u, b) for u, b in comp.linear_bits(units).items()
    }
    removed = comp.removed_sublayers(units)
    layout, no_ops = prune(adapter, "sublayer", removed)
    linears = {name: quantized[id(m)] for name, m in model.named_modules() if id(m) in quantized}
    require(len(linears) == len(quantized), "a kept linear was lost while pruning (a bug)")
    report = {
        "method": "joint",
        "target": comp.target,
        "average_bits": comp.average_bits(units),
        "removed": removed,
        "layout": layout,  # dense (a plain, shorter quantized Llama) | decilm
        "format": format,
        "kept_linears": len(linears),
        **comp.options,
    }
    stitch_json = {}

    def write(folder: Path) -> None:
        ct_format.write(model, tokenizer, linears, folder)
        if layout == "decilm":
            depth_format.mark_decilm(folder, model.config, no_ops)
        report["bytes_quantized"] = ct_format.quantized_bytes(folder)
        report["bytes_total"] = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
        stitch_json.update(report, profile=profile)

    source = f"stitch:joint:{profile.get('source', 'profile')}@{comp.target}"
    write_model_folder(model, tokenizer, Path(out_dir), source, {"stitch.json": stitch_json}, writer=write)
    return report
