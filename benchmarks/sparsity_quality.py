"""Unstructured sparsity on the default model: held-out perplexity and KL to dense of EvoPress, OWL, uniform
SparseGPT, magnitude and dense at 50/60/70% average sparsity (parameter-weighted over the block linears); database
build time and size; seconds per generation and seconds per level swap from the database.

    .venv/bin/python benchmarks/sparsity_quality.py [--targets 0.5,0.6,0.7] [--generations 40]

Calibrates on the pydoc + stdlib-docstrings mix by default (--calibration); evaluates every row on 32 x 512 held-out
tokens of the calibration domain (first table) and of Shakespeare's plays (second table; benchmarks/corpora.py,
benchmarks/quality_common.py). Each row names its level database: `inputs=dense` (Hessians of every block from the
dense model's activations: one database serves every profile) or `inputs=uniform` (from the model pruned
uniformly at the target, as SparseGPT's sequential mode).

Writes benchmarks/results/sparsity_quality.json and sparsity_quality.md. Resumable: databases resume (under
data/benchmarks/db/<calibration>/), searches checkpoint every generation (data/benchmarks/search/<calibration>/),
finished cells are kept in the json and skipped. Settings are scaled for a shared 2-core CPU (see --help and the
json's "settings"): 5 levels per linear (num_levels=2, the authors' span 0.5*min(s,1-s)*hidden^2 on each side),
Hessians from 32 x 512 calibration tokens, 8 offspring, selection on 256 tokens then on every calibration row
(exact), 30 generations, dtype auto (bfloat16 where native). The databases are fitted on calibration rows 0..31;
the searches and the baselines score rows 32..63 (--fitness-rows unseen).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from quality_common import (
    Row,
    add_data_arguments,
    add_fitness_rows_argument,
    adopt_data,
    build_references,
    calibration_data,
    calibration_line,
    checkpoint_folder,
    describe,
    drop_cells_scored_elsewhere,
    fitness_span,
    heldout_sets,
    made_on,
    made_on_lines,
    measure,
    missing,
    quality_tables,
    rows_needed,
    screens,
    search_tokens,
)

from evopress.adapter import ModelAdapter
from evopress.baselines.sparsity import BASELINES
from evopress.compressors.sparsity import build_database, make
from evopress.data import load_tokens
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model
from evopress.search import FitnessContext, SearchConfig, run_search

RESULTS = Path("benchmarks/results")
OUT_JSON = RESULTS / "sparsity_quality.json"
OUT_MD = RESULTS / "sparsity_quality.md"
# *_seq / *_seqdb: SparseGPT Hessians from sequentially pruned inputs (inputs=uniform) instead of the dense model's
ROWS = (
    Row("evopress", "evopress", "inputs=dense"),
    Row("evopress_seqdb", "evopress_seqdb", "inputs=uniform"),
    Row("owl", "owl", "inputs=dense"),
    Row("uniform", "uniform", "inputs=dense"),
    Row("uniform_seq", "uniform_seq", "inputs=uniform (target level only)"),
    Row("magnitude", "magnitude", "none (data-free)"),
)
EMPTY = {"cells": {}, "databases": {}}
DB_OPTIONS = {"num_levels": 2, "n_samples": 32}


def db_root(bench_data: str | Path, data) -> Path:
    """Databases per calibration set: a database does not record the text its Hessians came from."""
    return Path(bench_data) / "db" / data.tag


def open_database(model: Path, data_folder: Path, root: Path, target: float, options: dict, suffix: str = ""):
    """(folder, database) of the level database at `target`, built or resumed first (minutes when new)."""
    folder = Path(root) / f"sparsity-{target}{suffix}"
    return folder, build_database(Path(model), Path(data_folder), folder, {"target": target, **options})


def load_results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else json.loads(json.dumps(EMPTY))


def save(results: dict) -> None:
    atomic_write_json(OUT_JSON, results)
    atomic_write_text(OUT_MD, markdown(results))


def _set_out(path: str) -> None:
    global OUT_JSON, OUT_MD
    OUT_JSON, OUT_MD = Path(path), Path(path).with_suffix(".md")


def markdown(results: dict) -> str:
    cells, targets = results["cells"], results.get("targets", [])
    lines = quality_tables(results, [(str(t), f"{int(round(t * 100))}%") for t in targets], list(ROWS))
    lines += ["| target | db build s | db size MB | median s/generation | generations | s/swap (load) |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for t in targets:
        db, evo = results["databases"].get(str(t), {}), cells.get(f"evopress/{t}", {})
        lines.append(
            f"| {t} | {db.get('build_seconds', float('nan')):.0f} | {db.get('bytes', 0) / 1e6:.0f} | "
            f"{evo.get('median_seconds_per_generation', float('nan')):.2f} | {evo.get('generations', '-')} | "
            f"{evo.get('db', {}).get('seconds_per_load', float('nan')):.4f} |"
        )
    searched = sorted((k, c) for k, c in cells.items() if k.startswith("evopress"))
    lines += [
        "",
        "| search | started from | start KL | final KL | generations | offspring | tokens per step | parent screens |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, c in searched:
        cfg = c.get("config", {})
        start = c.get("initial_fitness")
        lines.append(
            f"| {key} | {c.get('initial_source', 'uniform')} | {'-' if start is None else f'{start:.4f}'} | "
            f"{c['fitness']:.4f} | {c['generations']} | {cfg.get('offspring', '-')} | "
            f"{','.join(map(str, cfg.get('tokens', ['-'])))} | {screens(cfg)} |"
        )
    owl = {t: cells.get(f"owl/{t}", {}).get("choice") for t in targets}
    lines += ["", f"OWL lambda/M picked on calibration KL: {json.dumps(owl)}"]
    settings = results.get("settings") or {}
    lines += ["", calibration_line(results, settings.get("calibration_rows"), settings.get("fitness_rows"))]
    lines += made_on_lines(results)
    lines += ["", f"settings: {json.dumps(settings)}", ""]
    return "\n".join(lines)


def record(results, key, metrics, started):
    results["cells"][key] = {**metrics, "seconds": time.perf_counter() - started}
    save(results)
    print(f"{key}: {describe(metrics)}", flush=True)


def run_target(args, results, adapter, ctx, sets, dense_weights, target: float) -> None:
    cells = results["cells"]
    if args.db_inputs == "uniform":
        return search_on_sequential_database(args, results, adapter, ctx, sets, dense_weights, target)
    t = time.perf_counter()
    db_dir, db = open_database(args.model, args.data, args.db_root, target, args.db_options)
    results["databases"][str(target)] = {
        "build_seconds": db.manifest.get("build_seconds", time.perf_counter() - t),
        "bytes": db.size_on_disk(),
        "files": len(db.pairs()),
        "options": db.params,
    }
    save(results)

    def fresh(options=None):
        _restore(adapter, dense_weights)
        return make(adapter, target, db=db_dir, options=options or {})

    for name in ("uniform", "owl", "magnitude"):
        key = f"{name}/{target}"
        if not missing(cells.get(key), sets):
            continue
        started = time.perf_counter()
        comp = fresh()
        extra = {"grid": True, "lambdas": args.owl_lambdas, "ms": args.owl_ms} if name == "owl" else {}
        profile = BASELINES[name](comp, ctx, seed=0, tokens=args.baseline_tokens, **extra)
        comp.apply_profile(profile)
        metrics = measure(adapter, sets)
        metrics["sparsity"] = comp.sparsity(profile)
        if name == "owl":
            metrics["choice"] = getattr(comp, "chosen", None)
            metrics["profile"] = profile  # seeds the search below without recomputing the grid
        record(results, key, metrics, started)
    if target in args.compare_inputs and missing(cells.get(f"uniform_seq/{target}"), sets):
        # The database's Hessians come from dense inputs (one database serves every level). SparseGPT's own
        # sequential mode feeds each block the already-pruned model's outputs: compare at the uniform profile.
        started = time.perf_counter()
        options = {**args.db_options, "num_levels": 0, "inputs": "uniform"}
        seq_dir, _ = open_database(args.model, args.data, args.db_root, target, options, "-seq")
        _restore(adapter, dense_weights)
        comp = make(adapter, target, db=seq_dir)
        comp.apply_profile(comp.initial_profile())
        metrics = measure(adapter, sets)
        record(
            results,
            f"uniform_seq/{target}",
            {**metrics, "sparsity": comp.sparsity(comp.initial_profile())},
            started,
        )
    key = f"evopress/{target}"
    if missing(cells.get(key), sets):
        started = time.perf_counter()
        comp = fresh()
        out = checkpoint_folder(args.runs, f"sparsity-{target}", args.config, args.fitness_span)
        metrics, res = seeded_search(args, cells, comp, ctx, sets, target, out)
        atomic_write_json(out / "profile.json", res.profile)
        record(results, key, metrics, started)


def seeded_search(args, cells, comp, ctx, sets, target, out) -> tuple[dict, object]:
    """The search (seeded from the baselines' stored profiles) and its held-out metrics."""
    config = args.config
    seeds = {n: cells[f"{n}/{target}"]["profile"] for n in config.seed_baselines}
    res = run_search(comp, ctx, config, out, on_generation=_log, seeds=seeds)
    comp.apply_profile(res.profile)
    metrics = measure(comp.adapter, sets)
    metrics.update(
        sparsity=comp.sparsity(res.profile),
        config={k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
        initial_source=res.initial_source,
        initial_fitness=res.initial_fitness,
        fitness=res.fitness,
        generations=len(res.history),
        median_seconds_per_generation=statistics.median(h["seconds"] for h in res.history),
        db=comp.db.stats(),
        levels_used=sorted(set(res.profile.values())),
    )
    return metrics, res


def search_on_sequential_database(args, results, adapter, ctx, sets, dense_weights, target):
    """EvoPress over a database whose Hessians come from the model pruned uniformly at the target (inputs=uniform):
    the same levels, other weights. Seeded like the main row (OWL's profile, which names levels, not weights)."""
    cells, key = results["cells"], f"evopress_seqdb/{target}"
    if not missing(cells.get(key), sets):
        return
    started = time.perf_counter()
    options = {**args.db_options, "inputs": "uniform"}
    db_dir, db = open_database(args.model, args.data, args.db_root, target, options, "-seqdb")
    results["databases"][f"{target}-seqdb"] = {
        "build_seconds": db.manifest.get("build_seconds"),
        "bytes": db.size_on_disk(),
    }
    _restore(adapter, dense_weights)
    comp = make(adapter, target, db=db_dir)
    out = checkpoint_folder(args.runs, f"sparsity-{target}-seqdb", args.config, args.fitness_span)
    metrics, _ = seeded_search(args, cells, comp, ctx, sets, target, out)
    record(results, key, metrics, started)


def _log(info) -> None:
    if info.generation % 5 == 0:
        print(f"  generation {info.generation}: KL {info.fitness:.4f} ({info.seconds:.1f}s)", flush=True)


def _restore(adapter, dense_weights) -> None:
    with torch.no_grad():
        for (block, name), w in dense_weights.items():
            adapter.linear(block, name).weight.copy_(w)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap, tokens="256,all")
    ap.add_argument("--db-root", default="", help="level databases ('' = <bench-data>/db/<calibration>)")
    ap.add_argument("--runs", default="", help="search checkpoints ('' = <bench-data>/search/<calibration>)")
    ap.add_argument("--targets", default="0.5,0.6,0.7")
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--survivors", default="2,1")
    ap.add_argument("--baseline-tokens", type=int, default=1024)
    ap.add_argument(
        "--seed-baselines",
        default="owl",
        help="profiles competing with the uniform start ('' = uniform start only, as the paper)",
    )
    ap.add_argument("--num-levels", type=int, default=DB_OPTIONS["num_levels"])
    ap.add_argument("--n-samples", type=int, default=DB_OPTIONS["n_samples"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--calibration-rows", type=int, default=32, help="calibration sequences the search samples"
    )
    ap.add_argument("--out", default=str(OUT_JSON))
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the json and stop")
    ap.add_argument(
        "--compare-inputs",
        default="all",
        help="targets at which uniform SparseGPT also runs on pruned inputs (the uniform_seq row; 'all' = every "
        "target, '' = none)",
    )
    ap.add_argument(
        "--db-inputs",
        default="dense",
        choices=["dense", "uniform"],
        help="uniform: only the EvoPress row, on a database built from uniformly pruned inputs",
    )
    add_fitness_rows_argument(ap)
    ap.add_argument("--owl-lambdas", default="0.02,0.05,0.08,0.1,0.15,0.2")
    ap.add_argument("--owl-ms", default="3,5,7,10")
    args = ap.parse_args()
    args.owl_lambdas = tuple(float(x) for x in args.owl_lambdas.split(","))
    args.owl_ms = tuple(float(x) for x in args.owl_ms.split(","))
    every = args.compare_inputs == "all"
    args.compare_inputs = {float(x) for x in (args.targets if every else args.compare_inputs).split(",") if x}
    args.db_options = {"num_levels": args.num_levels, "n_samples": args.n_samples}
    tokens, initial_tokens = search_tokens(args.tokens, args.calibration_rows)
    args.config = SearchConfig(
        generations=args.generations,
        offspring=args.offspring,
        survivors=tuple(int(s) for s in args.survivors.split(",")),
        tokens=tokens,
        seed=0,
        init="uniform",
        initial_tokens=initial_tokens,
        seed_baselines=tuple(n for n in args.seed_baselines.split(",") if n),
    )
    return args


def main() -> None:
    args = parse_args()
    _set_out(args.out)
    if args.report_only:
        save(load_results())
        print(markdown(load_results()))
        return
    torch.manual_seed(0)
    targets = [float(t) for t in args.targets.split(",")]
    data = calibration_data(
        args.calibration, args.model, args.bench_data, args.heldout_rows, rows_needed(args)
    )
    args.data = data.folder  # the databases' Hessians come from the same calibration rows as the search
    args.db_root = args.db_root or db_root(args.bench_data, data)
    args.runs = args.runs or Path(args.bench_data) / "search" / (
        data.tag if args.fitness_rows == "all" else f"{data.tag}-unseen"
    )
    sets, note = heldout_sets(args, data)
    results = adopt_data(load_results(), OUT_JSON, data, sets, note, EMPTY)
    results["targets"] = sorted(set(results.get("targets", [])) | set(targets))
    prepared = len(load_tokens(data.folder, "calibration"))
    span = args.fitness_span = fitness_span(
        args.fitness_rows, args.n_samples, args.calibration_rows, prepared
    )
    drop_cells_scored_elsewhere(results, span, data_free=("dense", "uniform", "uniform_seq", "magnitude"))
    results["settings"] = {
        "search": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args.config).items()},
        "database": args.db_options,
        "dtype": args.dtype,
        "baseline_tokens": args.baseline_tokens,
        "calibration_rows": args.calibration_rows,
        "fitness_rows": span,
        "calibration": data.description,
        "owl_grid": {"lambdas": args.owl_lambdas, "ms": args.owl_ms},
    }
    results["made_on"] = made_on(args.dtype, torch.get_num_threads())
    model, _ = load_model(args.model, dtype=args.dtype)
    adapter = ModelAdapter(model)
    dense_weights = {
        (i, name): lin.weight.detach().clone()
        for i in range(adapter.num_blocks)
        for name, lin in adapter.linears(i).items()
    }
    calibration = load_tokens(data.folder, "calibration")
    t0 = time.perf_counter()
    first, end = results["settings"]["fitness_rows"]
    ctx = FitnessContext.build(adapter, calibration[first:end], topk=512)
    build_references(adapter, sets)
    print(f"dense references built in {time.perf_counter() - t0:.0f}s", flush=True)
    if missing(results["cells"].get("dense"), sets):
        started = time.perf_counter()
        record(results, "dense", measure(adapter, sets), started)
    for target in targets:
        run_target(args, results, adapter, ctx, sets, dense_weights, target)
    print(markdown(results))


if __name__ == "__main__":
    main()
