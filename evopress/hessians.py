"""Second-order statistics of a linear's inputs, shared by the database builders (SparseGPT and GPTQ).

H = X^T X over the calibration inputs of each linear of a block, and the upper Cholesky factor of the damped
inverse that both one-shot methods sweep with.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """X^T X of a linear's inputs: one float32 product per calibration sequence, summed in float64 in sequence order.

    Why per sequence: one product per batch makes the float32 rounding depend on how rows are batched, and GPTQ's
    and SparseGPT's column sweeps amplify a 1e-7 relative change of H into flipped codes and mask entries
    (benchmarks/build_determinism.py: 2.8% of 3-bit codes at hidden 256 for batch_size 8 vs 2). Per sequence, no
    arithmetic depends on the batch split, so a database is the same whatever batch_size built or resumed it.
    """

    def __init__(self, columns: int):
        self.xtx = torch.zeros(columns, columns, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        seqs = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.unsqueeze(0)
        for xtx in torch.bmm(seqs.transpose(1, 2), seqs):
            self.xtx += xtx
        self.tokens += seqs.shape[0] * seqs.shape[1]

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
