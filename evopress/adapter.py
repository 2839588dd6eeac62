"""Model adapter: the one place that knows how a model family names its parts.

The search, the compressors and the fitness never touch module names; they ask the adapter for
block i's attention / MLP sublayer, its linear layers, or to run blocks [start, end) on hidden states.

Block-by-block forward: the inputs the model passes to its first block (hidden states, rotary position
embeddings, mask, position ids) are captured with a pre-hook that stops the forward, so every family's own
preamble (embedding scale, rotary type, mask construction) is used as is. With SDPA attention and no padding
the mask is None and the captured keyword arguments do not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evopress.errors import require

SUBLAYER_KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class FamilySpec:
    layers: str  # dotted path from the CausalLM to the ModuleList of blocks
    final_norm: str  # dotted path to the norm applied before the LM head
    attn: str = "self_attn"  # attribute of a block
    mlp: str = "mlp"


# Llama, Mistral, Qwen2/3 and Phi-3 share module names (Phi-3 fuses qkv and gate/up, which only changes the
# linear names, found generically). GPT-NeoX names everything differently and may use a parallel residual.
FAMILIES = {
    "llama": FamilySpec("model.layers", "model.norm"),
    "mistral": FamilySpec("model.layers", "model.norm"),
    "qwen2": FamilySpec("model.layers", "model.norm"),
    "qwen3": FamilySpec("model.layers", "model.norm"),
    "phi3": FamilySpec("model.layers", "model.norm"),
    "gpt_neox": FamilySpec("gpt_neox.layers", "gpt_neox.final_layer_norm", attn="attention", mlp="mlp"),
}


class DroppedSublayer(nn.Module):
    """Stands in for a removed attention or MLP sublayer: outputs zeros, so only the residual path remains.

    The norm in front of the sublayer still runs on the input but its output is discarded; the norm after
    (Gemma-style post-norms) maps zeros to zeros. Attention modules return (output, weights), MLPs a tensor.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        zeros = torch.zeros_like(hidden)
        return (zeros, None) if self.kind == "attn" else zeros


class _StopForward(Exception):
    pass


def _get(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class ModelAdapter:
    """Uniform view of a causal LM: blocks, sublayers, linears, block-by-block forward."""

    def __init__(self, model: nn.Module):
        model_type = model.config.model_type
        require(
            model_type in FAMILIES, f"unsupported model type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
        self.model = model
        self.spec = FAMILIES[model_type]
        self.blocks: nn.ModuleList = _get(model, self.spec.layers)
        self.final_norm: nn.Module = _get(model, self.spec.final_norm)
        self.head: nn.Module = model.get_output_embeddings()
        self._stash: dict[tuple[int, str], nn.Module] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    # --- sublayers -------------------------------------------------------------------------------------------
    def _attr(self, kind: str) -> str:
        require(
            kind in SUBLAYER_KINDS, f"unknown sublayer kind {kind!r}; allowed: {', '.join(SUBLAYER_KINDS)}"
        )
        return self.spec.attn if kind == "attn" else self.spec.mlp

    def sublayer(self, block: int, kind: str) -> nn.Module:
        """The live sublayer module (the original even while dropped)."""
        return self._stash.get((block, kind)) or getattr(self.blocks[block], self._attr(kind))

    def is_dropped(self, block: int, kind: str) -> bool:
        return (block, kind) in self._stash

    def drop(self, block: int, kind: str) -> None:
        """Remove a sublayer in place (idempotent); `restore` puts the same module back."""
        if self.is_dropped(block, kind):
            return
        attr = self._attr(kind)
        self._stash[(block, kind)] = getattr(self.blocks[block], attr)
        setattr(self.blocks[block], attr, DroppedSublayer(kind))

    def restore(self, block: int, kind: str) -> None:
        module = self._stash.pop((block, kind), None)
        if module is not None:
            setattr(self.blocks[block], self._attr(kind), module)

    def restore_all(self) -> None:
        for block, kind in list(self._stash):
            self.restore(block, kind)

    # --- linears ---------------------------------------------------------------------------------------------
    def linears(self, block: int) -> dict[str, nn.Linear]:
        """Linear layers of a block, keyed by their name inside the block (e.g. 'self_attn.q_proj')."""
        found = {}
        for kind in SUBLAYER_KINDS:
            prefix = self._attr(kind)
            for name, module in self.sublayer(block, kind).named_modules():
                if isinstance(module, nn.Linear):
                    found[f"{prefix}.{name}"] = module
        return found

    def linear(self, block: int, name: str) -> nn.Linear:
        attr, _, rest = name.partition(".")
        kind = "attn" if attr == self.spec.attn else "mlp"
        return self.sublayer(block, kind).get_submodule(rest)

    def linear_names(self) -> list[str]:
        """Every linear as 'block.<i>.<name>', in forward order."""
        return [f"block.{i}.{name}" for i in range(self.num_blocks) for name in self.linears(i)]

    # --- block-by-block forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def block_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Hidden states entering block 0 and the keyword arguments every block receives."""
        captured = {}

        def hook(_module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["kwargs"]

    @torch.no_grad()
    def run_blocks(
        self, hidden: torch.Tensor, kwargs: dict, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        end = self.num_blocks if end is None else end
        for i in range(start, end):
            out = self.blocks[i](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(hidden))

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, kwargs = self.block_inputs(input_ids)
        return self.logits(self.run_blocks(hidden, kwargs))
