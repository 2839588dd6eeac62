"""Held-out evaluation: perplexity (and KL against the dense model) of the dense model or of any profile."""

from __future__ import annotations

import torch

from evopress.adapter import ModelAdapter
from evopress.fitness import DenseReference, perplexity, perplexity_and_kl


def evaluate_live(
    adapter: ModelAdapter, heldout: torch.Tensor, ref: DenseReference | None = None, batch_size: int = 8
) -> dict:
    """Metrics of the model as it is now (dense, or with a profile applied)."""
    if ref is None:
        return {"perplexity": perplexity(adapter, heldout, batch_size), "heldout_tokens": heldout.numel()}
    ppl, kl = perplexity_and_kl(adapter, heldout, ref, batch_size)
    return {"perplexity": ppl, "heldout_tokens": heldout.numel(), "kl": kl}


def evaluate_profile(
    adapter: ModelAdapter,
    compressor,
    units: dict,
    heldout: torch.Tensor,
    ref: DenseReference | None = None,
    batch_size: int = 8,
) -> dict:
    """Apply every unit of `units` to the live model, then evaluate it (the model keeps the profile)."""
    compressor.apply_profile(units)
    return evaluate_live(adapter, heldout, ref, batch_size)
