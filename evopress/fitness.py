"""Fitness: KL(dense || candidate) of next-token distributions, and perplexity.

The dense model's distributions are computed once (`DenseReference.build`) and kept either in full
([tokens, vocab] log-probs; exact, memory-hungry) or as the top-K entries per token plus their tail mass.

Top-K KL here is the KL between the two distributions coarsened to K+1 bins (the dense top-K tokens and
"everything else"): sum_k p_k log(p_k / q_k) + p_tail log(p_tail / q_tail). By the data-processing
inequality it never exceeds the full KL and it converges to it as K grows; with K=512 on a 49K vocabulary
it is within a fraction of a percent (tests/test_fitness.py checks the convergence).

Logits are formed from the final hidden states in chunks of tokens, so the [tokens, vocab] float32 tensor
never exists for more than `chunk_tokens` rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evopress.adapter import ModelAdapter

CHUNK_TOKENS = 1024


@dataclass
class DenseReference:
    """Dense next-token log-probs for every position of `tokens` ([n, seq_len])."""

    topk: int | None  # None: full vocabulary
    logp: torch.Tensor  # [n, seq_len, K or vocab] float32
    index: torch.Tensor | None  # [n, seq_len, K] int32 vocabulary ids (top-K only)

    @classmethod
    @torch.no_grad()
    def build(cls, adapter: ModelAdapter, tokens: torch.Tensor, topk: int | None = 512, batch_size: int = 8):
        logps, idxs = [], []
        for rows in torch.arange(len(tokens)).split(batch_size):
            hidden = final_hidden(adapter, tokens[rows])
            for chunk in _token_chunks(hidden):
                logp = torch.log_softmax(adapter.logits(chunk).float(), dim=-1)
                if topk is None:  # the reference stays in host memory, whatever device the model is on
                    logps.append(logp.cpu())
                else:
                    top = logp.topk(min(topk, logp.shape[-1]), dim=-1)
                    logps.append(top.values.cpu())
                    idxs.append(top.indices.to(torch.int32).cpu())
        n, seq_len = tokens.shape
        logp = torch.cat(logps).view(n, seq_len, -1)
        index = torch.cat(idxs).view(n, seq_len, -1) if idxs else None
        return cls(topk=topk, logp=logp, index=index)

    def rows(self, rows: torch.Tensor) -> DenseReference:
        return DenseReference(self.topk, self.logp[rows], None if self.index is None else self.index[rows])


def _token_chunks(hidden: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS):
    """Split [batch, seq, d] hidden states into [<=chunk_tokens, d] pieces, in row-major token order."""
    return hidden.reshape(-1, hidden.shape[-1]).split(chunk_tokens)


@torch.no_grad()
def final_hidden(adapter: ModelAdapter, input_ids: torch.Tensor) -> torch.Tensor:
    hidden, kwargs = adapter.block_inputs(input_ids)
    return adapter.run_blocks(hidden, kwargs)


def token_kl_full(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || q) with p = exp(ref_logp), q = softmax(logits); both [T, V]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1)


def token_kl_topk(logits: torch.Tensor, ref_logp: torch.Tensor, ref_index: torch.Tensor) -> torch.Tensor:
    """Per-token KL over the dense top-K tokens plus one tail bin; logits [T, V], ref [T, K]."""
    logits = logits.float()
    logq = logits.gather(-1, ref_index.long()) - torch.logsumexp(logits, dim=-1, keepdim=True)
    p = ref_logp.exp()
    head = (p * (ref_logp - logq)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
    return head + p_tail * (p_tail.log() - q_tail.log())


def _chunk_kl(logits, logp, index, start: int, end: int) -> torch.Tensor:
    """Per-token KL of a chunk of logits against reference rows start:end (flattened [tokens, K or V])."""
    device = logits.device  # the reference rows are in host memory: each chunk's go where the logits are
    if index is None:
        return token_kl_full(logits, logp[start:end].to(device))
    return token_kl_topk(logits, logp[start:end].to(device), index[start:end].to(device))


@torch.no_grad()
def kl_of_hidden(adapter: ModelAdapter, hidden: torch.Tensor, ref: DenseReference) -> torch.Tensor:
    """Sum of per-token KL for final hidden states [b, s, d] against the matching reference rows."""
    # summed where the logits are, moved to host memory once: no device sync per chunk in the search's hot loop
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    logp = ref.logp.reshape(-1, ref.logp.shape[-1])
    index = None if ref.index is None else ref.index.reshape(-1, ref.index.shape[-1])
    start = 0
    for chunk in _token_chunks(hidden):
        end = start + len(chunk)
        total += _chunk_kl(adapter.logits(chunk), logp, index, start, end).double().sum()
        start = end
    return total.cpu()


@torch.no_grad()
def mean_kl(
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    ref: DenseReference,
    rows: torch.Tensor | None = None,
    batch_size: int = 8,
) -> float:
    """Mean per-token KL(dense || current model) over `tokens[rows]` (all rows by default)."""
    rows = torch.arange(len(tokens)) if rows is None else torch.as_tensor(rows)
    total = torch.zeros((), dtype=torch.float64)
    for batch in rows.split(batch_size):
        total += kl_of_hidden(adapter, final_hidden(adapter, tokens[batch]), ref.rows(batch))
    return float(total / (len(rows) * tokens.shape[1]))


@torch.no_grad()
def perplexity(adapter: ModelAdapter, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over all positions but the last of each sequence."""
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in tokens.split(batch_size):
        hidden = final_hidden(adapter, batch)[:, :-1]
        targets = batch[:, 1:].reshape(-1).to(hidden.device)
        start = 0
        for chunk in _token_chunks(hidden):
            end = start + len(chunk)
            logits = adapter.logits(chunk).float()
            nll += (
                torch.nn.functional.cross_entropy(logits, targets[start:end], reduction="sum").double().cpu()
            )
            start = end
        count += targets.numel()
    return float(torch.exp(nll / count))


@dataclass
class RowLosses:
    """Per held-out row: next-token NLL summed over its seq_len - 1 predicted positions and KL to dense summed
    over all seq_len positions. Kept per row so two models measured on the same rows can be compared pairwise:
    the spread of the row differences says whether a gap between them is larger than the sample's noise."""

    nll: torch.Tensor  # [rows] float64
    kl: torch.Tensor  # [rows] float64
    seq_len: int

    def perplexity(self) -> float:
        return float(torch.exp(self.nll.sum() / (len(self.nll) * (self.seq_len - 1))))

    def mean_kl(self) -> float:
        return float(self.kl.sum() / (len(self.kl) * self.seq_len))


@torch.no_grad()
def row_losses(
    adapter: ModelAdapter, tokens: torch.Tensor, ref: DenseReference, batch_size: int = 8
) -> RowLosses:
    """NLL and KL of every row of `tokens` from one forward pass."""
    nll_rows, kl_rows = [], []
    for rows in torch.arange(len(tokens)).split(batch_size):
        batch = tokens[rows]
        hidden = final_hidden(adapter, batch)
        # Row-major flattening: the last position of each row has no next token to predict (its loss is 0).
        targets = torch.nn.functional.pad(batch[:, 1:], (0, 1), value=-100).reshape(-1).to(hidden.device)
        r = ref.rows(rows)
        logp = r.logp.reshape(-1, r.logp.shape[-1])
        index = None if r.index is None else r.index.reshape(-1, r.index.shape[-1])
        nll, kl, start = [], [], 0
        for chunk in _token_chunks(hidden):
            end = start + len(chunk)
            logits = adapter.logits(chunk).float()
            loss = torch.nn.functional.cross_entropy(
                logits, targets[start:end], ignore_index=-100, reduction="none"
            )
            nll.append(loss.double())
            kl.append(_chunk_kl(logits, logp, index, start, end).double())
            start = end
        # summed per row where the logits are, moved to host memory once per batch
        nll_rows.append(torch.cat(nll).reshape(batch.shape).sum(1).cpu())
        kl_rows.append(torch.cat(kl).reshape(batch.shape).sum(1).cpu())
    return RowLosses(torch.cat(nll_rows), torch.cat(kl_rows), tokens.shape[1])


def perplexity_and_kl(
    adapter: ModelAdapter, tokens: torch.Tensor, ref: DenseReference, batch_size: int = 8
) -> tuple[float, float]:
    """`perplexity` and `mean_kl` of `tokens` from one forward pass (half the cost of calling both)."""
    losses = row_losses(adapter, tokens, ref, batch_size)
    return losses.perplexity(), losses.mean_kl()
