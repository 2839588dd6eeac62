"""Second-order statistics of a linear's inputs, shared by the database builders (SparseGPT and GPTQ).

H = X^T X over the calibration inputs of each linear of a block, and the upper Cholesky factor of the damped
inverse that both one-shot methods sweep with.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """X^T X of a linear's inputs, accumulated over batches (float64 sums: many tokens, no drift)."""

    def __init__(self, columns: int):
        self.xtx = torch.zeros(columns, columns, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx += (x.T @ x).double()
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return (2.0 * self.xtx / max(self.tokens, 1)).float()


def collect_block_hessians(adapter, block, hidden, kwargs, batch_size):
    """Run one block on `hidden` with hooks: X^T X per linear (linears fed the same tensor share one) + outputs."""
    linears = adapter.linears(block)
    accs: dict[str, HessianAccumulator] = {}
    alias: dict[str, str] = {}
    last = {"x": None, "name": None}

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            if last["x"] is x:  # q/k/v (gate/up) see the same tensor: one Hessian for all of them
                alias[name] = last["name"]
                return
            last["x"], last["name"] = x, name
            accs.setdefault(name, HessianAccumulator(x.shape[-1])).add(x)

        return hook

    handles = [lin.register_forward_pre_hook(hook_for(name)) for name, lin in linears.items()]
    try:
        outs = [adapter.run_blocks(h, kwargs, block, block + 1) for h in hidden.split(batch_size)]
    finally:
        for h in handles:
            h.remove()
    return {name: accs[alias.get(name, name)].hessian for name in linears}, torch.cat(outs)


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs (zero diagonal) get diagonal 1."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True).float()
