"""Held-out evaluation of what is delivered: every profile's stitched folder, loaded as a user loads it.

`evaluate_candidates` is the one evaluation the evaluate stage and the `evaluate` command both run. The dense model
is measured first and its reference (for the KL) computed once per token set. Each profile (searched or a
baseline) is then
  1. applied live to a fresh dense model (what the search scored): its perplexity on the first token set is the
     check figure, `<set>_perplexity_live`;
  2. stitched into its artifact (the candidate's folder when it names one, e.g. models/<method>; else a temporary
     folder stitched here by the stitch stage's code and removed after the row);
  3. loaded from that folder through `evopress.load_model` and measured: `<set>_perplexity` and `<set>_kl` are the
     delivered model's, as are lm-eval's task figures; bytes on disk of the folder, its format and loader (read
     from its files), and its forward tokens/s against the dense model's, timed side by side in the same run.
The delivered and live perplexities must agree within `DELIVERED_TOLERANCE`; otherwise the row is refused (the
artifact is not what was searched). `size` stays the profile's compressor's `size_share` (its budget rule);
`size_on_disk` is the folder's bytes over the dense folder's.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.config import ComputeConfig
from evopress.errors import UserError, require
from evopress.fitness import DenseReference, perplexity, perplexity_and_kl
from evopress.zero_shot import LmEvalParams

DELIVERED_TOLERANCE = 0.005  # relative gap allowed between the delivered and the live perplexity
SPEED_TOKENS = 512  # tokens of the one batch the speed is timed on (whole held-out rows, at least one)
SPEED_ROUNDS = 3  # timed rounds per model (after one warm-up each); the median counts


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
    stitched: Path | None = None  # the deliverable (must exist); None: stitched into a temporary folder here
    stitch: dict = field(default_factory=dict)  # stitch options (the format) when stitched here


# --- speed: forward tokens/s, side by side -------------------------------------------------------------------------
def speed_batch(tokens: torch.Tensor, want: int = SPEED_TOKENS) -> torch.Tensor:
    """The first whole rows of `tokens` holding at least `want` tokens (all rows when fewer)."""
    return tokens[: max(1, math.ceil(want / tokens.shape[1]))]


@torch.no_grad()
def _forward_seconds(model, ids: torch.Tensor) -> float:
    """One no-cache forward as a user runs it (the logits really produced)."""
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False).logits.sum()
    return time.perf_counter() - start


def timed_forwards(models: dict, ids: torch.Tensor, rounds: int = SPEED_ROUNDS) -> dict[str, list[float]]:
    """name -> seconds of each round's forward; each round times every model once, so a busy machine slows all
    of them alike (one warm-up forward each first)."""
    for model in models.values():
        _forward_seconds(model, ids)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            seconds[name].append(_forward_seconds(model, ids))
    return seconds


def speed_facts(dense, delivered, ids: torch.Tensor, rounds: int = SPEED_ROUNDS) -> dict[str, float]:
    """Forward tokens/s of `delivered` and of `dense` (median over rounds), and the median per-round ratio."""
    s = timed_forwards({"dense": dense, "delivered": delivered}, ids, rounds)
    return {
        "tokens_per_second": ids.numel() / statistics.median(s["delivered"]),
        "dense_tokens_per_second": ids.numel() / statistics.median(s["dense"]),
        "speed_vs_dense": statistics.median(d / c for d, c in zip(s["dense"], s["delivered"], strict=True)),
    }


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


def check_delivered(key: str, folder: Path, delivered: float, live: float, tolerance: float) -> float:
    """The relative gap delivered/live - 1 of two perplexities; a one-line refusal when it exceeds `tolerance`."""
    gap = delivered / live - 1
    require(
        abs(gap) <= tolerance,
        f"{key}: the stitched folder {str(folder)!r} scores perplexity {delivered:.4f}, the profile applied live "
        f"{live:.4f} ({gap:+.2%}, over the {tolerance:.1%} tolerance): the artifact is not what was searched",
    )
    return gap


@contextlib.contextmanager
def _artifact(c: Candidate, method: str, model_dir: Path, scratch: Path | None) -> Iterator[Path]:
    """The candidate's stitched folder: its own (checked to exist), or one stitched now into a temporary folder
    under `scratch` (removed afterwards)."""
    if c.stitched is not None:
        require(
            Path(c.stitched).is_dir(),
            f"stitched model {str(c.stitched)!r} of {method}/{c.label} is missing; run the stitch stage",
        )
        yield Path(c.stitched)
        return
    from evopress.stages import stitch

    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".evaluate-{method}-{c.label}-", dir=scratch) as tmp:
        folder = Path(tmp) / "model"
        stitch(method, model_dir, Path(c.profile), c.db, folder, c.stitch)
        yield folder


def _folder_facts(folder: Path, dense_bytes: int | None) -> dict:
    from evopress.artifact import bytes_on_disk, model_format

    fmt, loader = model_format(folder)
    size = bytes_on_disk(folder)
    share = {"size_on_disk": size / dense_bytes} if dense_bytes else {}
    return {"format": fmt, "loader": loader, "bytes_on_disk": size, **share}


def _profile_row(
    c: Candidate,
    env: dict,
    sets: dict,
    refs: dict,
    compute: ComputeConfig,
    tasks,
    tolerance: float,
) -> dict:
    """One profile's row: the live check, then every figure from its stitched folder (module docstring)."""
    import evopress
    from evopress.methods import database_sha256

    first = next(iter(sets))
    live = env["load"]()  # a fresh dense model: profiles of database methods overwrite weights
    method, spec, comp, units = _checked_profile(c, live, env["sha"])
    key = f"{method}/{c.label}"
    row = {"method": method, "profile": c.label, "source": spec["source"], "target": spec["target"]}
    row.update(budget=spec["budget"], size=comp.size_share(units))  # size before applying: dropped modules go
    comp.apply_profile(units)
    # The check figure: the profile as searched, on the check rows (all rows unless env says fewer: the check is
    # about the artifact's fidelity, which a few rows show, and the pipeline's time budget counts every pass).
    check = sets[first] if env["check_rows"] is None else sets[first][: env["check_rows"]]
    live_ppl = perplexity(live, check, compute.batch_size)
    del live, comp
    with _artifact(c, method, env["model_dir"], env["scratch"]) as folder:
        row.update(_folder_facts(folder, env["dense_bytes"]))
        delivered = ModelAdapter(evopress.load_model(folder, dtype=compute.dtype))
        row.update(_measure(delivered, sets, refs, compute.batch_size))
        whole = len(check) == len(sets[first])
        delivered_check = (
            row[f"{first}_perplexity"] if whole else perplexity(delivered, check, compute.batch_size)
        )
        row[f"{first}_perplexity_live"] = live_ppl  # on the check rows, beside the delivered model's there
        row[f"{first}_perplexity_check"] = delivered_check
        row[f"{first}_check_rows"] = len(check)
        row[f"{first}_live_gap"] = check_delivered(key, folder, delivered_check, live_ppl, tolerance)
        row.update(speed_facts(env["dense"].model, delivered.model, env["speed_ids"]))
        row.update(tasks(delivered))
    row["database_sha256"] = database_sha256(method, c.db)
    return row


def _task_runner(model_dir: Path, params: LmEvalParams | None) -> Callable[[ModelAdapter], dict]:
    """adapter -> lm-eval figures of its model (the delivered one); a no-op when no tasks are configured."""
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
    scratch: Path | None = None,
    tolerance: float = DELIVERED_TOLERANCE,
    check_rows: int | None = None,
) -> dict[str, dict]:
    """label -> metrics row of every candidate, each profile measured from its stitched folder (module docstring):
    {set}_perplexity, {set}_kl, {first set}_perplexity_live, size, size_on_disk, bytes_on_disk, format, loader,
    tokens_per_second, speed_vs_dense, target, lm_eval.<task>.<metric>, ...

    `scratch`: where profiles without a folder of their own are stitched for the row (default: the system's
    temporary folder). Raises UserError when a delivered perplexity is off its live one by more than `tolerance`,
    compared on the first `check_rows` rows of the first set (None: all of them; then `<set>_perplexity_live` is
    the profile-as-searched figure of the whole set)."""
    from evopress.data import load_tokens
    from evopress.device import describe, resolve_device
    from evopress.models import load_adapter
    from evopress.profile import model_sha256

    compute = compute.validate()
    tokens = {name: load_tokens(text_dir, name) for name in sets}
    sha = model_sha256(model_dir)

    def load(folder: Path | None = None) -> ModelAdapter:
        return load_adapter(Path(folder or model_dir), compute.dtype, resolve_device(compute.device))

    tasks = _task_runner(model_dir, lm_eval)  # unknown task names fail here, before any forward pass
    dense = load()
    for c in candidates:  # every profile is checked before the first (long) forward pass
        if c.profile is not None:
            _checked_profile(c, dense, sha)
    refs = {}
    if kl and any(c.profile is not None for c in candidates):
        topk = compute.topk or None
        refs = {n: DenseReference.build(dense, t, topk, compute.batch_size) for n, t in tokens.items()}
    facts = {"model_sha256": sha, "compute": describe(compute.dtype, compute.device)}
    dense_facts = _folder_facts(model_dir, None)
    env = {
        "load": load,
        "dense": dense,
        "sha": sha,
        "model_dir": Path(model_dir),
        "scratch": scratch,
        "dense_bytes": dense_facts["bytes_on_disk"],
        "speed_ids": speed_batch(next(iter(tokens.values()))),
        "check_rows": check_rows,
    }
    rows = {}
    for c in candidates:
        if c.profile is None:
            row = {"method": "dense", "profile": c.label, "budget": 0.0, "size": 1.0}
            row.update(_measure(dense, tokens, {}, compute.batch_size))
            row.update(dense_facts, size_on_disk=1.0)
            (seconds,) = timed_forwards({"dense": dense.model}, env["speed_ids"]).values()
            speed = env["speed_ids"].numel() / statistics.median(seconds)
            row.update(tokens_per_second=speed, dense_tokens_per_second=speed, speed_vs_dense=1.0)
            row.update(tasks(dense))
            key = c.label
        else:
            row = _profile_row(c, env, tokens, refs, compute, tasks, tolerance)
            key = f"{row['method']}/{c.label}"
        rows[key] = {**row, **facts}
        log(f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return rows
