"""Commands shared by every compression method: `search`, `baseline`, `evaluate`.

A method plugs in through evopress/methods.py (`make` and `BASELINES`); nothing here is method-specific.
Method options go through a repeatable `--option key=value`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import typer

from evopress.cli import app
from evopress.errors import UserError, require

# Factories called by `search` with the run's parameters; each returns an on_generation callback or None.
# Tracking (MLflow) registers itself here, so the search engine and this module stay free of it.
GENERATION_HOOKS: list[Callable[[dict], Callable | None]] = []


def build_on_generation(params: dict) -> Callable | None:
    callbacks = [cb for cb in (hook(params) for hook in GENERATION_HOOKS) if cb is not None]
    if not callbacks:
        return None

    def on_generation(info) -> None:
        for cb in callbacks:
            cb(info)

    return on_generation


def parse_options(items: list[str] | None) -> dict:
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        require(bool(sep) and bool(key), f"bad --option {item!r}; expected key=value")
        options[key.strip()] = value.strip()
    return options


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        require(False, f"bad {name} {text!r}; expected comma-separated integers like 4,1")
    return values


def _load(model: Path, dtype: str):
    from evopress.adapter import ModelAdapter
    from evopress.models import load_model, read_manifest

    read_manifest(model)
    net, _ = load_model(str(model), dtype=dtype)
    return ModelAdapter(net)


MODEL = typer.Option(Path("data/model"), help="prepared model folder")
DATA = typer.Option(Path("data/text"), help="prepared token sets (calibration / heldout)")
DB = typer.Option(None, help="level database folder (sparsity, quantization)")
OPTION = typer.Option(None, "--option", help="method option key=value (repeatable), e.g. granularity=block")
DTYPE = typer.Option(
    "auto",
    help="auto | float32 | bfloat16 | float16 for the forward passes (auto: bfloat16 where native, else float32)",
)


@app.command("search")
def search_cmd(
    method: str = typer.Option("depth", help="depth | sparsity | quantization"),
    model: Path = MODEL,
    data: Path = DATA,
    db: Path = DB,
    target: float = typer.Option(..., help="depth: blocks removed; sparsity: average sparsity; quant: bits"),
    option: list[str] = OPTION,
    generations: int = typer.Option(50, help="generations of the (1 + lambda) EA"),
    offspring: int = typer.Option(16, help="children per generation (lambda)"),
    survivors: str = typer.Option("4,1", help="candidates kept after each selection step"),
    tokens: str = typer.Option("1024,8192", help="calibration tokens scored in each selection step"),
    seed: int = typer.Option(0, help="seed of every random choice (mutations, samples)"),
    init: str = typer.Option(None, help="uniform | random (default: random for depth, else uniform)"),
    initially_generated: int = typer.Option(16, help="random profiles tried for --init random"),
    initial_tokens: int = typer.Option(2048, help="tokens scoring the initial random profiles"),
    seed_baselines: str = typer.Option(
        "", help="comma-separated baselines whose profiles compete for the start (e.g. shortgpt,window)"
    ),
    topk: int = typer.Option(512, help="dense top-K kept for the KL (0 = full vocabulary)"),
    batch_size: int = typer.Option(8, help="sequences per forward"),
    dtype: str = DTYPE,
    prefix_reuse: bool = typer.Option(True, help="start children at the first block they change"),
    out: Path = typer.Option(
        Path("runs/search"), help="folder for profile.json, history.csv, checkpoint.json"
    ),
) -> None:
    """Search a profile at the target budget; re-running with the same --out resumes."""
    from evopress.data import load_tokens
    from evopress.methods import get_baseline, make_compressor
    from evopress.profile import make_profile, model_sha256, save_profile
    from evopress.search import FitnessContext, SearchConfig, run_search

    options = parse_options(option)
    config = SearchConfig(
        generations=generations,
        offspring=offspring,
        survivors=parse_ints(survivors, "--survivors"),
        tokens=parse_ints(tokens, "--tokens"),
        seed=seed,
        init=init or ("random" if method == "depth" else "uniform"),
        initially_generated=initially_generated,
        initial_tokens=initial_tokens,
        seed_baselines=tuple(n.strip() for n in seed_baselines.split(",") if n.strip()),
        prefix_reuse=prefix_reuse,
    )
    for name in config.seed_baselines:
        get_baseline(method, name)  # an unknown name fails before the model loads
    calibration = load_tokens(data, "calibration")
    config.validate(calibration.numel())
    adapter = _load(model, dtype)
    comp = make_compressor(method, adapter, target, db=db, options=options)
    ctx = FitnessContext.build(adapter, calibration, topk=topk or None, batch_size=batch_size)
    params = {"method": method, "target": target, "options": options, "out": str(out), **config.__dict__}

    def seeds() -> dict:  # on the dense model; the search then applies every unit of its first candidate
        return {
            n: get_baseline(method, n)(comp, ctx, seed=seed, tokens=initial_tokens)
            for n in config.seed_baselines
        }

    result = run_search(comp, ctx, config, out, on_generation=build_on_generation(params), seeds=seeds)
    if result.initial_source != "uniform":
        typer.echo(f"search started from: {result.initial_source} (initial KL {result.initial_fitness})")
    profile = make_profile(
        comp, result.profile, target=target, source="search", fitness=result.fitness, sha=model_sha256(model)
    )
    save_profile(out / "profile.json", profile)
    typer.echo(f"profile -> {out / 'profile.json'} (fitness KL {result.fitness}, budget {profile['budget']})")


@app.command("baseline")
def baseline_cmd(
    method: str = typer.Option("depth", help="depth | sparsity | quantization"),
    name: str = typer.Option(
        ..., help="baseline name (depth: shortgpt, window, shortened_ppl, sleb, random, uniform)"
    ),
    model: Path = MODEL,
    data: Path = DATA,
    db: Path = DB,
    target: float = typer.Option(..., help="the same budget as `search --target`"),
    option: list[str] = OPTION,
    seed: int = typer.Option(0, help="seed of the calibration sample (and random profiles)"),
    tokens: int = typer.Option(2048, help="calibration tokens the baseline scores with"),
    topk: int = typer.Option(512, help="dense top-K kept for KL-based baselines"),
    batch_size: int = typer.Option(8, help="sequences per forward"),
    dtype: str = DTYPE,
    out: Path = typer.Option(Path("runs/baseline"), help="folder for profile.json"),
) -> None:
    """Make a baseline profile at the target budget, in the same format as a searched one."""
    from evopress.data import load_tokens
    from evopress.methods import get_baseline, make_compressor
    from evopress.profile import make_profile, model_sha256, save_profile
    from evopress.search import FitnessContext

    options = parse_options(option)
    baseline = get_baseline(method, name)
    calibration = load_tokens(data, "calibration")
    require(
        1 <= tokens <= calibration.numel(),
        f"--tokens {tokens} is outside 1..{calibration.numel()} (the calibration set's size)",
    )
    adapter = _load(model, dtype)
    comp = make_compressor(method, adapter, target, db=db, options=options)
    # Only the rows the baseline scores need a dense reference.
    rows = calibration[: math.ceil(tokens / calibration.shape[1])]
    ctx = FitnessContext.build(adapter, rows, topk=topk or None, batch_size=batch_size)
    units = baseline(comp, ctx, seed=seed, tokens=tokens)
    profile = make_profile(comp, units, target=target, source=f"baseline:{name}", sha=model_sha256(model))
    save_profile(out / "profile.json", profile)
    typer.echo(f"profile -> {out / 'profile.json'} ({name}, budget {profile['budget']})")


@app.command("evaluate")
def evaluate_cmd(
    model: Path = MODEL,
    data: Path = DATA,
    method: str = typer.Option(None, help="method of --profile (default: the profile's own)"),
    profile: Path = typer.Option(None, help="profile json; without it the dense model is evaluated"),
    db: Path = DB,
    kl: bool = typer.Option(True, help="also report held-out KL against the dense model"),
    batch_size: int = typer.Option(8, help="sequences per forward"),
    dtype: str = DTYPE,
    out: Path = typer.Option(Path("runs/metrics.json"), help="metrics json to write"),
) -> None:
    """Held-out perplexity (and KL to dense) of the dense model or of a profile applied to it."""
    from evopress.data import load_tokens
    from evopress.evaluate import evaluate_live, evaluate_profile
    from evopress.fitness import DenseReference
    from evopress.io import atomic_write_json
    from evopress.methods import make_compressor
    from evopress.profile import load_profile, model_sha256, read_profile

    heldout = load_tokens(data, "heldout")
    sha = model_sha256(model)
    spec = read_profile(profile) if profile else None
    if spec:
        method = method or spec["method"]
        made_for = spec["model_sha256"]
        if made_for and sha and made_for != sha:
            raise UserError(f"profile {str(profile)!r} was made for model {made_for[:12]}, not {sha[:12]}")
    adapter = _load(model, dtype)
    ref = DenseReference.build(adapter, heldout, batch_size=batch_size) if kl and spec else None
    metrics = {"method": method or "dense", "model_sha256": sha, "dtype": dtype}
    if spec:
        comp = make_compressor(method, adapter, spec["target"], db=db, options=spec["options"])
        units = load_profile(profile, comp)["units"]
        metrics.update(profile=str(profile), source=spec["source"], target=spec["target"])
        metrics.update(evaluate_profile(adapter, comp, units, heldout, ref, batch_size))
    else:
        metrics.update(evaluate_live(adapter, heldout, None, batch_size))
    atomic_write_json(out, metrics)
    typer.echo(
        f"perplexity {metrics['perplexity']:.3f}" + (f", KL {metrics['kl']:.4f}" if "kl" in metrics else "")
    )
