"""Depth-pruned Llama models whose removed sublayers are absent: the DeciLM (Nemotron-NAS) `block_configs` layout.

A sublayer profile removes attention and MLP sublayers at independent positions. Blocks that lose both are deleted
outright (a plain, shorter Llama); the rest keep a block whose removed part stores nothing and computes nothing.
The folder says which part is gone the way NVIDIA's Nemotron-NAS checkpoints do (vLLM's `DeciLMForCausalLM`):

  <folder>/config.json   the Llama config, with model_type "nemotron-nas", architectures ["DeciLMForCausalLM"] and
                         one `block_configs` entry per block:
                           {"attention": {"no_op": bool, "replace_with_linear": false, "n_heads_in_group": h / kv},
                            "ffn": {"no_op": bool, "replace_with_linear": false, "intermediate_size": I}}
                         plus `auto_map` -> configuration_decilm.DeciLMConfig (below)
  <folder>/model.safetensors  the Llama tensors minus those of removed sublayers and of their norms (a removed
                         sublayer's norm only fed it), so bytes on disk fall by exactly their share
  <folder>/configuration_decilm.py  a 30-line config class (ours) that turns `block_configs` into objects with
                         attributes, which is how vLLM's DeciLM code reads them (`block.attention.no_op`)

Who loads it: `evopress.load_model(folder)` (no remote code: a `LlamaForCausalLM` whose removed modules are
replaced by parameter-free no-ops before the weights load, strict on keys). vLLM's native `DeciLMForCausalLM` reads
this layout; its config class comes from the folder, so vLLM needs `trust_remote_code=True` (as for NVIDIA's own
checkpoints; not tested here: vLLM is not installed). Stock transformers 5 has no DeciLM / Nemotron-NAS class (the
hub's `modeling_decilm.py` is remote code, not shipped here), so `AutoModelForCausalLM` refuses the folder loudly
(unknown model type) instead of loading a Llama with random sublayers. Only the Llama family is written this way:
vLLM's DeciLM is Llama's attention and MLP; other families keep the zeroed-output layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from evopress.errors import require
from evopress.io import read_config_json, unique_tensors

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
WEIGHTS_FILE = "model.safetensors"
CONFIG_MODULE = "configuration_decilm"
FAMILIES = ("llama",)
# The norm in front of each sublayer kind in a Llama block: it goes with the sublayer.
NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}
ATTRS = {"attn": "self_attn", "mlp": "mlp"}

# Written beside the weights; runs only where a user passes trust_remote_code=True (vLLM). Kept tiny on purpose.
CONFIG_SOURCE = '''"""Config of a depth-pruned Llama in the DeciLM (Nemotron-NAS) layout, written by evopress.

`block_configs` become objects with attributes (block.attention.no_op, block.ffn.intermediate_size), as vLLM's
DeciLMForCausalLM reads them. Loaded only with trust_remote_code=True; evopress.load_model does not run this file.
"""

from types import SimpleNamespace

from transformers import LlamaConfig


def _block(block):
    if isinstance(block, SimpleNamespace):
        return block
    return SimpleNamespace(**{part: SimpleNamespace(**fields) for part, fields in block.items()})


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_block(b) for b in block_configs or []]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [{k: dict(vars(v)) for k, v in vars(b).items()} for b in self.block_configs]
        return out
'''


class NoOpSublayer(nn.Module):
    """A removed attention or MLP sublayer: no parameters, no compute. It returns a 0-dim zero, which the block's
    residual add broadcasts (no zeros tensor is built); attention modules return (output, weights)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        zero = hidden.new_zeros(())
        return (zero, None) if self.kind == "attn" else zero


def supports(model_type: str) -> bool:
    return model_type in FAMILIES


def remove_sublayers(blocks: nn.ModuleList, no_ops: list[dict[str, bool]]) -> None:
    """Replace the removed sublayers (and their norms) of each block by parameter-free no-ops, in place, and
    number the kept attentions 0.. in order: the KV cache then holds kept layers only, and its layer 0 (which
    transformers asks for the cached length) is always a real attention."""
    require(len(no_ops) == len(blocks), f"{len(no_ops)} block configs for {len(blocks)} blocks")
    kept_attention = 0
    for block, gone in zip(blocks, no_ops, strict=True):
        for kind in ("attn", "mlp"):
            if gone[kind]:
                setattr(block, ATTRS[kind], NoOpSublayer(kind))
                setattr(block, NORMS[kind], nn.Identity())
        if not gone["attn"]:
            block.self_attn.layer_idx = kept_attention
            kept_attention += 1
    require(kept_attention > 0, "every attention sublayer is removed: nothing for a KV cache to hold")


def block_configs(config, no_ops: list[dict[str, bool]]) -> list[dict]:
    """config.json's `block_configs`: one entry per (kept) block, in the DeciLM field names."""
    group = config.num_attention_heads // config.num_key_value_heads
    return [
        {
            "attention": {"no_op": gone["attn"], "replace_with_linear": False, "n_heads_in_group": group},
            "ffn": {
                "no_op": gone["mlp"],
                "replace_with_linear": False,
                "intermediate_size": config.intermediate_size,
            },
        }
        for gone in no_ops
    ]


def no_ops_of(blocks: list[dict]) -> list[dict[str, bool]]:
    """block_configs -> [{"attn": removed?, "mlp": removed?}] (only what evopress writes: no replace_with_linear)."""
    out = []
    for i, block in enumerate(blocks):
        attention, ffn = block.get("attention", {}), block.get("ffn", {})
        require(
            not attention.get("replace_with_linear") and not ffn.get("replace_with_linear"),
            f"block {i}: replace_with_linear blocks are not supported (evopress writes no_op blocks only)",
        )
        out.append({"attn": bool(attention.get("no_op")), "mlp": bool(ffn.get("no_op"))})
    return out


def write(model, tokenizer, no_ops: list[dict[str, bool]], folder: Path) -> dict:
    """Write `model` (a Llama whose removed sublayers are already `NoOpSublayer`s) into `folder` in the layout
    above; returns the config.json written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    require(supports(model.config.model_type), f"{model.config.model_type!r} has no DeciLM layout")
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    config = mark_decilm(folder, model.config, no_ops)
    # tied weights (lm_head = embed_tokens) are one tensor: saved once under its first name, as save_pretrained does
    tensors = unique_tensors(model)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return config


def mark_decilm(folder: Path, model_config, no_ops: list[dict[str, bool]]) -> dict:
    """Turn the Llama config.json already in `folder` into the DeciLM layout (keeping whatever else it holds,
    e.g. a joint stitch's `quantization_config`) and write the config module beside it; returns the config."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(
        model_type=MODEL_TYPE,
        architectures=[ARCHITECTURE],
        block_configs=block_configs(model_config, no_ops),
        auto_map={"AutoConfig": f"{CONFIG_MODULE}.DeciLMConfig"},
    )
    path.write_text(json.dumps(config, indent=2))
    (Path(folder) / f"{CONFIG_MODULE}.py").write_text(CONFIG_SOURCE)
    return config


def is_decilm(folder: Path) -> bool:
    """A folder whose config.json is in the DeciLM (Nemotron-NAS) layout."""
    config = read_config_json(folder) or {}
    return config.get("model_type") == MODEL_TYPE and "block_configs" in config


def llama_config(folder: Path):
    """The folder's config as a `LlamaConfig` carrying `block_configs` (plain dicts) for `PrunedLlama`."""
    from transformers import LlamaConfig

    raw = json.loads((Path(folder) / "config.json").read_text())
    blocks = raw["block_configs"]
    require(
        len(blocks) == raw.get("num_hidden_layers"),
        f"{folder}: {len(blocks)} block_configs for num_hidden_layers={raw.get('num_hidden_layers')}",
    )
    for i, block in enumerate(blocks):
        size = block.get("ffn", {}).get("intermediate_size", raw.get("intermediate_size"))
        require(
            block.get("ffn", {}).get("no_op") or size == raw.get("intermediate_size"),
            f"{folder}: block {i} has its own FFN size {size}; only uniform sizes are supported",
        )
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
    config = LlamaConfig.from_dict(fields)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _pruned_class():
    from transformers import LlamaForCausalLM

    class PrunedLlamaForCausalLM(LlamaForCausalLM):
        """A Llama built without the sublayers `config.block_configs` marks no_op, so from_pretrained expects
        exactly the tensors the folder has (nothing missing, nothing randomly initialized)."""

        def __init__(self, config):
            super().__init__(config)
            remove_sublayers(self.model.layers, no_ops_of(config.block_configs))

    return PrunedLlamaForCausalLM


def load(folder: Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa"):
    """A transformers Llama model without the removed modules, from a folder in the layout above."""
    from evopress import ct_format

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    quantized = ct_format.is_compressed_tensors(folder)  # a joint stitch: DeciLM blocks + packed linears
    load_dtype = (
        torch.float32 if quantized else dtype
    )  # the package dequantizes exactly at float32 (ct_format)
    model = _pruned_class().from_pretrained(folder, config=llama_config(folder), dtype=load_dtype, **kwargs)
    if quantized:
        ct_format.dense_in_place(model)
        model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model
