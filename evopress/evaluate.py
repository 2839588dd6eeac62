"""Held-out evaluation: perplexity (and KL against the dense model) of the dense model and of any profile.

`evaluate_candidates` is the one evaluation the evaluate stage and the `evaluate` command both run: the dense
model, then each profile applied to a fresh copy of the dense model (database methods overwrite weights), with
the dense reference computed once per token set. Size comes from the profile's compressor (`size_share`), the
same rule for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.config import ComputeConfig
from evopress.errors import UserError
from evopress.fitness import DenseReference, perplexity, perplexity_and_kl
from evopress.zero_shot import LmEvalParams


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


@dataclass(frozen=True)
class Candidate:
    """What to evaluate: the dense model (no profile), or a profile file of a method (+ its stitched folder)."""

    label: str  # dense | evopress | a baseline's name | any
    method: str | None = None
    profile: Path | None = None
    db: Path | None = None
    stitched: Path | None = None  # the deliverable: loaded and measured too when given


def _measure(adapter, sets: dict, refs: dict, batch_size: int) -> dict:
    out = {}
    for name, tokens in sets.items():
        m = evaluate_live(adapter, tokens, refs.get(name), batch_size)
        out[f"{name}_perplexity"] = m["perplexity"]
        out[f"{name}_tokens"] = m["heldout_tokens"]
        if "kl" in m:
            out[f"{name}_kl"] = m["kl"]
    return out


def _checked_profile(c: Candidate, adapter, sha: str | None):
    """(method, profile file, compressor, units) of a candidate, checked against the model, its units and the
    budget of the profile's own target; one-line error naming the file."""
    from evopress.methods import database_of, make_compressor
    from evopress.profile import load_profile, read_profile

    spec = read_profile(c.profile)
    method = c.method or spec["method"]
    made_for = spec["model_sha256"]
    if made_for and sha and made_for != sha:
        raise UserError(f"profile {str(c.profile)!r} was made for model {made_for[:12]}, not {sha[:12]}")
    comp = make_compressor(
        method, adapter, spec["target"], db=database_of(method, c.db), options=spec["options"]
    )
    try:
        units = load_profile(c.profile, comp)["units"]
    except UserError as err:
        raise UserError(f"{str(c.profile)!r} (target {spec['target']}): {err}") from err
    return method, spec, comp, units


def _profile_row(
    c: Candidate, load, sets: dict, refs: dict, compute: ComputeConfig, sha: str | None, tasks
) -> dict:
    from evopress.methods import database_sha256

    adapter = load()  # a fresh dense model: profiles of database methods overwrite weights
    method, spec, comp, units = _checked_profile(c, adapter, sha)
    row = {"method": method, "profile": c.label, "source": spec["source"], "target": spec["target"]}
    row.update(budget=spec["budget"], size=comp.size_share(units))  # size before applying: dropped modules go
    comp.apply_profile(units)
    row.update(_measure(adapter, sets, refs, compute.batch_size))
    row.update(tasks(adapter))
    row["database_sha256"] = database_sha256(method, c.db)
    if c.stitched is not None and Path(c.stitched).is_dir():
        # The deliverable itself, loaded from its folder: must match the live profile's perplexity.
        first = next(iter(sets))
        stitched = load(c.stitched)
        row["stitched_perplexity"] = evaluate_live(stitched, sets[first], None, compute.batch_size)[
            "perplexity"
        ]
    return row


def _task_runner(model_dir: Path, params: LmEvalParams | None) -> Callable[[ModelAdapter], dict]:
    """adapter -> lm-eval figures of its live model; a no-op when no tasks are configured."""
    if params is None or not params.enabled:
        return lambda _adapter: {}
    from transformers import AutoTokenizer

    from evopress.zero_shot import check_tasks, run_tasks

    check_tasks(params)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda adapter: run_tasks(adapter.model, tokenizer, params)


def evaluate_candidates(
    model_dir: Path,
    text_dir: Path,
    candidates: list[Candidate],
    compute: ComputeConfig,
    sets: tuple[str, ...] = ("heldout",),
    kl: bool = True,
    log: Callable[[str], None] = print,
    lm_eval: LmEvalParams | None = None,
) -> dict[str, dict]:
    """label -> metrics row ({set}_perplexity, {set}_kl, size, target, lm_eval.<task>.<metric>, ...) of every
    candidate; lm-eval's tasks run on the same live model as the perplexity when `lm_eval` names tasks."""
    from evopress.data import load_tokens
    from evopress.device import describe
    from evopress.models import load_adapter
    from evopress.profile import model_sha256

    compute = compute.validate()
    tokens = {name: load_tokens(text_dir, name) for name in sets}
    sha = model_sha256(model_dir)

    def load(folder: Path | None = None) -> ModelAdapter:
        return load_adapter(Path(folder or model_dir), compute.dtype)

    tasks = _task_runner(model_dir, lm_eval)  # unknown task names fail here, before any forward pass
    dense = load()
    for c in candidates:  # every profile is checked before the first (long) forward pass
        if c.profile is not None:
            _checked_profile(c, dense, sha)
    refs = {}
    if kl and any(c.profile is not None for c in candidates):
        topk = compute.topk or None
        refs = {n: DenseReference.build(dense, t, topk, compute.batch_size) for n, t in tokens.items()}
    facts = {"model_sha256": sha, "compute": describe(compute.dtype)}
    rows = {}
    for c in candidates:
        if c.profile is None:
            row = {"method": "dense", "profile": c.label, "budget": 0.0, "size": 1.0}
            row.update(_measure(dense, tokens, {}, compute.batch_size))
            row.update(tasks(dense))
        else:
            row = _profile_row(c, load, tokens, refs, compute, sha, tasks)
        key = c.label if c.profile is None else f"{row['method']}/{c.label}"
        rows[key] = {**row, **facts}
        log(f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return rows
