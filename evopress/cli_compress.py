"""Commands shared by every compression method: `search`, `baseline`, `evaluate`: thin calls into evopress.stages.

A method plugs in through evopress/methods.py; nothing here is method-specific. Method options go through a
repeatable `--option key=value` (values read as json when they parse: numbers, true, lists).
"""

from __future__ import annotations

from pathlib import Path

import typer

from evopress.cli_app import RAY_ADDRESS, THREADS, WORKERS, app
from evopress.config import ComputeConfig, SearchConfig, parse_int_list, parse_option_pairs, parse_token_steps
from evopress.fitness_rows import check_fitness_rows
from evopress.layout import METRICS
from evopress.layout import MODEL as MODEL_DIR
from evopress.layout import TEXT as TEXT_DIR


def parse_fitness_rows(text: str) -> int | str:
    """--fitness-rows: all | unseen | a number of rows (checked against the data by the stage)."""
    text = text.strip()
    value = int(text) if text.isdigit() else text
    check_fitness_rows(value)
    return value


def progress_line(total: int):
    """One line per generation on stdout: under DVC and Prefect there is no terminal for a progress bar."""

    def on_generation(info) -> None:
        typer.echo(f"generation {info.generation}/{total}: KL {info.fitness:.5f} ({info.seconds:.1f} s)")

    return on_generation


# Defaults come from the config types, so the command line and params.yaml cannot drift apart.
S, C = SearchConfig(), ComputeConfig()


def _csv(values) -> str:
    return ",".join(map(str, values))


MODEL = typer.Option(Path(MODEL_DIR), help="prepared model folder")
DATA = typer.Option(Path(TEXT_DIR), help="prepared token sets (calibration / heldout)")
DB = typer.Option(None, help="level database folder (sparsity, quantization)")
OPTION = typer.Option(None, "--option", help="method option key=value (repeatable), e.g. granularity=block")
FITNESS_ROWS = typer.Option(
    "all",
    help="calibration rows scored: all | unseen (after the database's n_samples: rows it was not fitted on) | N "
    "(the first N)",
)
DTYPE = typer.Option(
    C.dtype,
    help="auto | float32 | bfloat16 | float16 for the forward passes (auto: bfloat16 where native, else float32)",
)


@app.command("search")
def search_cmd(
    method: str = typer.Option("depth", help="depth | sparsity | quantization | joint"),
    model: Path = MODEL,
    data: Path = DATA,
    db: Path = DB,
    target: float = typer.Option(..., help="depth: blocks removed; sparsity: average sparsity; quant: bits"),
    option: list[str] = OPTION,
    generations: int = typer.Option(S.generations, help="generations of the (1 + lambda) EA"),
    offspring: int = typer.Option(S.offspring, help="children per generation (lambda)"),
    survivors: str = typer.Option(_csv(S.survivors), help="candidates kept after each selection step"),
    tokens: str = typer.Option(
        _csv(S.tokens),
        help="calibration tokens scored in each selection step; the last may be all (every row, exact)",
    ),
    seed: int = typer.Option(S.seed, help="seed of every random choice (mutations, samples)"),
    init: str = typer.Option(None, help="uniform | random (default: random for depth, else uniform)"),
    initially_generated: int = typer.Option(
        S.initially_generated, help="random profiles tried for --init random"
    ),
    initial_tokens: int = typer.Option(S.initial_tokens, help="tokens scoring the initial random profiles"),
    seed_baselines: str = typer.Option(
        "", help="comma-separated baselines whose profiles compete for the start (e.g. shortgpt,window)"
    ),
    topk: int = typer.Option(C.topk, help="dense top-K kept for the KL (0 = full vocabulary)"),
    batch_size: int = typer.Option(C.batch_size, help="sequences per forward"),
    dtype: str = DTYPE,
    prefix_reuse: bool = typer.Option(S.prefix_reuse, help="start children at the first block they change"),
    screen_with_parent: bool = typer.Option(
        S.screen_with_parent, help="the parent joins the first selection step; children must beat it there"
    ),
    fitness_rows: str = FITNESS_ROWS,
    out: Path = typer.Option(
        Path("runs/search"), help="folder for profile.json, history.csv, checkpoint.json"
    ),
    workers: int = WORKERS,
    threads: int = THREADS,
    ray_address: str = RAY_ADDRESS,
) -> None:
    """Search a profile at the target budget; re-running with the same --out resumes."""
    from evopress.stages import search

    config = SearchConfig(
        generations=generations,
        offspring=offspring,
        survivors=parse_int_list(survivors, "--survivors"),
        tokens=parse_token_steps(tokens, "--tokens"),
        seed=seed,
        init=init or "",
        initially_generated=initially_generated,
        initial_tokens=initial_tokens,
        seed_baselines=tuple(n.strip() for n in seed_baselines.split(",") if n.strip()),
        prefix_reuse=prefix_reuse,
        screen_with_parent=screen_with_parent,
    ).validate("search")
    compute = ComputeConfig(
        dtype=dtype,
        batch_size=batch_size,
        topk=topk,
        workers=workers,
        threads=threads,
        ray_address=ray_address,
    ).validate("compute")
    options = parse_option_pairs(option)
    summary = search(
        method,
        model,
        data,
        db,
        out,
        target,
        options,
        config,
        compute,
        on_generation=progress_line(generations),
        fitness_rows=parse_fitness_rows(fitness_rows),
    )
    if summary["initial_source"] != "uniform":
        typer.echo(
            f"search started from: {summary['initial_source']} (initial KL {summary['initial_fitness']})"
        )
    typer.echo(
        f"profile -> {out / 'profile.json'} (fitness KL {summary['fitness']}, budget {summary['budget']})"
    )


@app.command("baseline")
def baseline_cmd(
    method: str = typer.Option("depth", help="depth | sparsity | quantization | joint"),
    name: str = typer.Option(
        ..., help="baseline name (depth: shortgpt, window, shortened_ppl, sleb, random, uniform)"
    ),
    model: Path = MODEL,
    data: Path = DATA,
    db: Path = DB,
    target: float = typer.Option(..., help="the same budget as `search --target`"),
    option: list[str] = OPTION,
    seed: int = typer.Option(0, help="seed of the calibration sample (and random profiles)"),
    tokens: int = typer.Option(
        2048, help="calibration tokens the baseline scores with (fewer than a row: the first row's prefix)"
    ),
    topk: int = typer.Option(C.topk, help="dense top-K kept for KL-based baselines"),
    batch_size: int = typer.Option(C.batch_size, help="sequences per forward"),
    dtype: str = DTYPE,
    fitness_rows: str = FITNESS_ROWS,
    out: Path = typer.Option(Path("runs/baseline"), help="folder for profile.json"),
) -> None:
    """Make a baseline profile at the target budget, in the same format as a searched one."""
    from evopress.stages import baseline

    compute = ComputeConfig(dtype=dtype, batch_size=batch_size, topk=topk).validate("compute")
    options = parse_option_pairs(option)
    profile = baseline(
        method, name, model, data, db, out, target, options, compute, seed=seed, tokens=tokens,
        fitness_rows=parse_fitness_rows(fitness_rows),
    )  # fmt: skip
    typer.echo(f"profile -> {out / 'profile.json'} ({name}, budget {profile['budget']})")


@app.command("evaluate")
def evaluate_cmd(
    model: Path = MODEL,
    data: Path = DATA,
    method: str = typer.Option(None, help="method of --profile (default: the profile's own)"),
    profile: Path = typer.Option(None, help="profile json; without it the dense model is evaluated"),
    db: Path = DB,
    kl: bool = typer.Option(True, help="also report held-out KL against the dense model"),
    topk: int = typer.Option(C.topk, help="dense top-K kept for the KL (0 = full vocabulary)"),
    batch_size: int = typer.Option(C.batch_size, help="sequences per forward"),
    dtype: str = DTYPE,
    out: Path = typer.Option(Path(METRICS), help="metrics json to write"),
) -> None:
    """Held-out perplexity (and KL to dense) of the dense model, or of a profile stitched and loaded from its folder."""
    from evopress.evaluate import Candidate, evaluate_candidates
    from evopress.io import atomic_write_json, require_apart

    compute = ComputeConfig(dtype=dtype, batch_size=batch_size, topk=topk).validate("compute")
    require_apart(out, folders={"model": model, "data": data, "database": db}, files={"profile": profile})
    candidate = Candidate("profile", method, profile, db) if profile else Candidate("dense")
    (row,) = evaluate_candidates(
        model, data, [candidate], compute, ("heldout",), kl, log=lambda _line: None
    ).values()
    metrics = {**row, "perplexity": row["heldout_perplexity"], "heldout_tokens": row["heldout_tokens"]}
    metrics.update({"kl": row["heldout_kl"]} if "heldout_kl" in row else {})
    metrics.update({"profile": str(profile)} if profile else {})
    metrics["dtype"] = row["compute"]["dtype"]
    atomic_write_json(out, metrics)
    typer.echo(
        f"perplexity {metrics['perplexity']:.3f}" + (f", KL {metrics['kl']:.4f}" if "kl" in metrics else "")
    )
