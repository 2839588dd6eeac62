"""Model adapter: the one place that knows how a model family names its parts.

The search, the compressors and the fitness never touch module names; they ask the adapter for
block i's attention / MLP sublayer, its linear layers, or to run blocks [start, end) on hidden states.

Block-by-block forward: the inputs the model passes to its blocks (hidden states, rotary position
embeddings, mask, position ids) are captured with pre-hooks that stop the forward, so every family's own
preamble (embedding scale, rotary type, mask construction) is used as is. Families with per-layer
`config.layer_types` (Gemma 2/3, Qwen with sliding layers) give sliding-window and full-attention blocks different
masks, and Gemma 3 different rotary embeddings: the keyword arguments of the first block of each type are
captured and every block gets those of its type. With SDPA attention, full attention and no padding the mask is
None; a materialized mask (sliding window, or eager attention) captured from one row broadcasts to any batch.
"""

from __future__ import annotations

from contextlib import contextmanager
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
    attn_implementation: str = "sdpa"  # what transformers loads the family with


# Llama, Mistral, Qwen2/3 and Phi-3 share module names (Phi-3 fuses qkv and gate/up, which only changes the
# linear names, found generically). GPT-NeoX names everything differently and may use a parallel residual.
# Gemma 2/3 (text) add sandwich norms, tied embeddings and per-layer sliding / full attention; Gemma 2 soft-caps
# attention logits, which SDPA cannot do (transformers refuses it), so it runs eager attention.
FAMILIES = {
    "llama": FamilySpec("model.layers", "model.norm"),
    "mistral": FamilySpec("model.layers", "model.norm"),
    "qwen2": FamilySpec("model.layers", "model.norm"),
    "qwen3": FamilySpec("model.layers", "model.norm"),
    "phi3": FamilySpec("model.layers", "model.norm"),
    "gpt_neox": FamilySpec("gpt_neox.layers", "gpt_neox.final_layer_norm", attn="attention", mlp="mlp"),
    "gemma2": FamilySpec("model.layers", "model.norm", attn_implementation="eager"),
    "gemma3_text": FamilySpec("model.layers", "model.norm"),
}


def require_supported(model_type: str) -> FamilySpec:
    """The family's spec, or the one-line error every entry point gives for a model type we cannot adapt."""
    require(
        model_type in FAMILIES, f"unsupported model type {model_type!r}; supported: {', '.join(FAMILIES)}"
    )
    return FAMILIES[model_type]


def attention_implementation(model_type: str) -> str:
    """What to load a model type with: SDPA (no padding: the causal mask stays implicit) unless the family can't."""
    spec = FAMILIES.get(model_type)
    return spec.attn_implementation if spec else "sdpa"


def first_block_of_each_type(block_types: tuple[str, ...]) -> dict[str, int]:
    """{attention type: index of its first block}, in block order."""
    first: dict[str, int] = {}
    for i, kind in enumerate(block_types):
        first.setdefault(kind, i)
    return first


@dataclass(frozen=True)
class TypedBlockKwargs:
    """Block keyword arguments of a model whose blocks differ by attention type: one dict per type."""

    by_type: dict[str, dict]
    block_types: tuple[str, ...]  # the type of each block, as config.layer_types

    def of_block(self, block: int) -> dict:
        return self.by_type[self.block_types[block]]


def kwargs_of_block(kwargs: dict | TypedBlockKwargs, block: int) -> dict:
    """A plain dict is what every block receives (one attention type); typed kwargs are chosen per block."""
    return kwargs.of_block(block) if isinstance(kwargs, TypedBlockKwargs) else kwargs


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping, cap * tanh(logits / cap), as the model's own forward applies it."""
    return logits if not cap else torch.tanh(logits / cap) * cap


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


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _skipped(modules: list[nn.Module]):
    """Make blocks return their input unchanged for a while: capturing a later block's keyword arguments (computed
    once, before the first block) needs none of the earlier blocks' compute. An instance-level `forward` (accelerate
    hooks set one) is put back as it was."""
    saved = [m.__dict__.get("forward") for m in modules]
    for m in modules:
        m.forward = _pass_through
    try:
        yield
    finally:
        for m, forward in zip(modules, saved, strict=True):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def _get(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class ModelAdapter:
    """Uniform view of a causal LM: blocks, sublayers, linears, block-by-block forward."""

    def __init__(self, model: nn.Module):
        self.spec = require_supported(model.config.model_type)
        self.model = model
        self.blocks: nn.ModuleList = _get(model, self.spec.layers)
        self.final_norm: nn.Module = _get(model, self.spec.final_norm)
        self.head: nn.Module = model.get_output_embeddings()
        self.logit_cap: float | None = getattr(model.config, "final_logit_softcapping", None)
        self._stash: dict[tuple[int, str], nn.Module] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        """Where the model runs (token ids are moved there; results come back where the caller keeps them)."""
        return self.head.weight.device

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
    def block_types(self) -> tuple[str, ...]:
        """The attention type of each block (config.layer_types); one shared type for families without them."""
        types = getattr(self.model.config, "layer_types", None)
        if not types:
            return ("all",) * self.num_blocks
        require(
            len(types) == self.num_blocks,
            f"config.layer_types lists {len(types)} blocks, the model has {self.num_blocks}",
        )
        return tuple(types)

    @torch.no_grad()
    def block_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict | TypedBlockKwargs]:
        """Hidden states entering block 0 and the keyword arguments the blocks receive: a dict every block
        receives, or, where blocks differ by attention type, a `TypedBlockKwargs`. Both go to `run_blocks`."""
        block_types = self.block_types()
        firsts = first_block_of_each_type(block_types)
        hidden, captured = self._capture(input_ids.to(self.device), sorted(firsts.values()))
        if len(firsts) == 1:
            return hidden, captured[0]
        return hidden, TypedBlockKwargs({t: captured[i] for t, i in firsts.items()}, block_types)

    def _capture(self, input_ids: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, dict[int, dict]]:
        """One forward that records what `blocks` receive; blocks before the last one are skipped, not run."""
        last = blocks[-1]
        hidden: list[torch.Tensor] = []
        captured: dict[int, dict] = {}

        def recorder(block: int):
            def hook(_module, args, kwargs):
                if block == 0:
                    hidden.append(args[0] if args else kwargs["hidden_states"])
                captured[block] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if block == last:
                    raise _StopForward

            return hook

        handles = [self.blocks[i].register_forward_pre_hook(recorder(i), with_kwargs=True) for i in blocks]
        try:
            with _skipped(list(self.blocks[:last])):
                self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return hidden[0], captured

    @torch.no_grad()
    def run_blocks(
        self, hidden: torch.Tensor, kwargs: dict | TypedBlockKwargs, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        end = self.num_blocks if end is None else end
        for i in range(start, end):
            out = self.blocks[i](hidden, **kwargs_of_block(kwargs, i))
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.head(self.final_norm(hidden)), self.logit_cap)

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, kwargs = self.block_inputs(input_ids)
        return self.logits(self.run_blocks(hidden, kwargs))
