"""Unstructured sparsity on the default model: held-out perplexity of EvoPress, OWL, uniform SparseGPT, magnitude
and dense at 50/60/70% average sparsity (parameter-weighted over the block linears); database build time and
size; seconds per generation and seconds per level swap from the database.

    .venv/bin/python benchmarks/sparsity_quality.py [--targets 0.5,0.6,0.7] [--generations 40]

Writes benchmarks/results/sparsity_quality.json and sparsity_quality.md. Resumable: databases resume, searches
checkpoint every generation under data/search/sparsity-<target>, finished cells are kept in the json and skipped.
Settings are scaled for a shared 2-core CPU (see --help and the json's "settings"): 5 levels per linear
(num_levels=2, the authors' span 0.5*min(s,1-s)*hidden^2 on each side), Hessians from 32 x 512 calibration tokens,
8 offspring, selection on 256 then 1024 tokens, 30 generations, dtype auto (float32 on this CPU: its bfloat16 is slow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.baselines.sparsity import BASELINES
from evopress.compressors.sparsity import build_database, make
from evopress.data import load_tokens
from evopress.evaluate import evaluate_live, evaluate_profile
from evopress.fitness import DenseReference
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model
from evopress.search import FitnessContext, SearchConfig, run_search

RESULTS = Path("benchmarks/results")
OUT_JSON = RESULTS / "sparsity_quality.json"
OUT_MD = RESULTS / "sparsity_quality.md"
# *_seq / *_seqdb: SparseGPT Hessians from sequentially pruned inputs instead of the dense model's
ROWS = ("evopress", "evopress_seqdb", "owl", "uniform", "uniform_seq", "magnitude")


def load_results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {"cells": {}, "databases": {}}


def save(results: dict) -> None:
    atomic_write_json(OUT_JSON, results)
    atomic_write_text(OUT_MD, markdown(results))


def _set_out(path: str) -> None:
    global OUT_JSON, OUT_MD
    OUT_JSON, OUT_MD = Path(path), Path(path).with_suffix(".md")


def markdown(results: dict) -> str:
    cells, targets = results["cells"], results.get("targets", [])
    head = " | ".join(f"{int(round(t * 100))}% ppl" for t in targets)
    lines = [f"| method | {head} |", "| --- |" + " --- |" * len(targets)]
    dense = cells.get("dense", {}).get("perplexity")
    lines.append("| dense | " + " | ".join(f"{dense:.2f}" if dense else "-" for _ in targets) + " |")
    for name in ROWS:
        vals = [cells.get(f"{name}/{t}", {}).get("perplexity") for t in targets]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    lines += ["", "| target | db build s | db size MB | median s/generation | generations | s/swap (load) |"]
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
        "| search | started from | start KL | final KL | generations | offspring | tokens per step |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for key, c in searched:
        cfg = c.get("config", {})
        start = c.get("initial_fitness")
        lines.append(
            f"| {key} | {c.get('initial_source', 'uniform')} | {'-' if start is None else f'{start:.4f}'} | "
            f"{c['fitness']:.4f} | {c['generations']} | {cfg.get('offspring', '-')} | {cfg.get('tokens', '-')} |"
        )
    owl = {t: cells.get(f"owl/{t}", {}).get("choice") for t in targets}
    lines += ["", f"OWL lambda/M picked on calibration KL: {json.dumps(owl)}"]
    lines += ["", f"settings: {json.dumps(results.get('settings'))}", ""]
    return "\n".join(lines)


def record(results, key, metrics, started):
    results["cells"][key] = {**metrics, "seconds": time.perf_counter() - started}
    save(results)
    print(f"{key}: ppl {metrics['perplexity']:.2f} kl {metrics.get('kl', float('nan')):.4f}", flush=True)


def run_target(args, results, adapter, ctx, heldout, heldout_ref, dense_weights, target: float) -> None:
    cells = results["cells"]
    if args.db_inputs == "uniform":
        return search_on_sequential_database(
            args, results, adapter, ctx, heldout, heldout_ref, dense_weights, target
        )
    db_dir = Path(args.db_root) / f"sparsity-{target}"
    t = time.perf_counter()
    db = build_database(Path(args.model), Path(args.data), db_dir, {"target": target, **args.db_options})
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
        if key in cells:
            continue
        started = time.perf_counter()
        comp = fresh()
        extra = {"grid": True, "lambdas": args.owl_lambdas, "ms": args.owl_ms} if name == "owl" else {}
        profile = BASELINES[name](comp, ctx, seed=0, tokens=args.baseline_tokens, **extra)
        metrics = evaluate_profile(adapter, comp, profile, heldout, heldout_ref)
        metrics["sparsity"] = comp.sparsity(profile)
        if name == "owl":
            metrics["choice"] = getattr(comp, "chosen", None)
            metrics["profile"] = profile  # seeds the search below without recomputing the grid
        record(results, key, metrics, started)
    if target in args.compare_inputs and f"uniform_seq/{target}" not in cells:
        # The database's Hessians come from dense inputs (one database serves every level). SparseGPT's own
        # sequential mode feeds each block the already-pruned model's outputs: compare at the uniform profile.
        started = time.perf_counter()
        seq_dir = Path(args.db_root) / f"sparsity-{target}-seq"
        options = {"target": target, **args.db_options, "num_levels": 0, "inputs": "uniform"}
        build_database(Path(args.model), Path(args.data), seq_dir, options)
        _restore(adapter, dense_weights)
        comp = make(adapter, target, db=seq_dir)
        metrics = evaluate_profile(adapter, comp, comp.initial_profile(), heldout, heldout_ref)
        record(
            results,
            f"uniform_seq/{target}",
            {**metrics, "sparsity": comp.sparsity(comp.initial_profile())},
            started,
        )
    key = f"evopress/{target}"
    if key not in cells:
        started = time.perf_counter()
        comp = fresh()
        tag = "" if not args.config.seed_baselines else "-seeded-" + "-".join(args.config.seed_baselines)
        out = Path(args.runs) / f"sparsity-{target}{tag}"
        metrics, res = seeded_search(args, cells, comp, ctx, heldout, heldout_ref, target, out)
        atomic_write_json(out / "profile.json", res.profile)
        record(results, key, metrics, started)


def seeded_search(args, cells, comp, ctx, heldout, heldout_ref, target, out) -> tuple[dict, object]:
    """The search (seeded from the baselines' stored profiles) and its held-out metrics."""
    config = args.config
    seeds = {n: cells[f"{n}/{target}"]["profile"] for n in config.seed_baselines}
    res = run_search(comp, ctx, config, out, on_generation=_log, seeds=seeds)
    metrics = evaluate_profile(comp.adapter, comp, res.profile, heldout, heldout_ref)
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


def search_on_sequential_database(args, results, adapter, ctx, heldout, heldout_ref, dense_weights, target):
    """EvoPress over a database whose Hessians come from the model pruned uniformly at the target (inputs=uniform):
    the same levels, other weights. Seeded like the main row (OWL's profile, which names levels, not weights)."""
    cells, key = results["cells"], f"evopress_seqdb/{target}"
    if key in cells:
        return
    started = time.perf_counter()
    db_dir = Path(args.db_root) / f"sparsity-{target}-seqdb"
    options = {"target": target, **args.db_options, "inputs": "uniform"}
    db = build_database(Path(args.model), Path(args.data), db_dir, options)
    results["databases"][f"{target}-seqdb"] = {
        "build_seconds": db.manifest.get("build_seconds"),
        "bytes": db.size_on_disk(),
    }
    _restore(adapter, dense_weights)
    comp = make(adapter, target, db=db_dir)
    out = Path(args.runs) / f"sparsity-{target}-seqdb"
    metrics, _ = seeded_search(args, cells, comp, ctx, heldout, heldout_ref, target, out)
    record(results, key, metrics, started)


def _log(info) -> None:
    if info.generation % 5 == 0:
        print(f"  generation {info.generation}: KL {info.fitness:.4f} ({info.seconds:.1f}s)", flush=True)


def _restore(adapter, dense_weights) -> None:
    with torch.no_grad():
        for (block, name), w in dense_weights.items():
            adapter.linear(block, name).weight.copy_(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--data", default="data/text")
    ap.add_argument("--db-root", default="data/db")
    ap.add_argument("--runs", default="data/search")
    ap.add_argument("--targets", default="0.5,0.6,0.7")
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--survivors", default="2,1")
    ap.add_argument("--tokens", default="256,1024")
    ap.add_argument("--baseline-tokens", type=int, default=1024)
    ap.add_argument(
        "--seed-baselines",
        default="owl",
        help="profiles competing with the uniform start ('' = uniform start only, as the paper)",
    )
    ap.add_argument("--num-levels", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--calibration-rows", type=int, default=64, help="calibration sequences the search samples"
    )
    ap.add_argument("--out", default=str(OUT_JSON))
    ap.add_argument("--heldout-rows", type=int, default=32, help="held-out sequences for the perplexity")
    ap.add_argument(
        "--compare-inputs", default="", help="targets at which uniform SparseGPT also runs on pruned inputs"
    )
    ap.add_argument(
        "--db-inputs",
        default="dense",
        choices=["dense", "uniform"],
        help="uniform: only the EvoPress row, on a database built from uniformly pruned inputs",
    )
    ap.add_argument("--owl-lambdas", default="0.02,0.05,0.08,0.1,0.15,0.2")
    ap.add_argument("--owl-ms", default="3,5,7,10")
    ap.add_argument("--heldout-kl", action="store_true", help="also report held-out KL to the dense model")
    args = ap.parse_args()
    _set_out(args.out)
    args.owl_lambdas = tuple(float(x) for x in args.owl_lambdas.split(","))
    args.owl_ms = tuple(float(x) for x in args.owl_ms.split(","))
    args.compare_inputs = {float(x) for x in args.compare_inputs.split(",") if x}
    torch.manual_seed(0)
    targets = [float(t) for t in args.targets.split(",")]
    args.db_options = {"num_levels": args.num_levels, "n_samples": args.n_samples}
    args.config = SearchConfig(
        generations=args.generations,
        offspring=args.offspring,
        survivors=tuple(int(s) for s in args.survivors.split(",")),
        tokens=tuple(int(t) for t in args.tokens.split(",")),
        seed=0,
        init="uniform",
        initial_tokens=int(args.tokens.split(",")[-1]),
        seed_baselines=tuple(n for n in args.seed_baselines.split(",") if n),
    )
    results = load_results()
    results["targets"] = sorted(set(results.get("targets", [])) | set(targets))
    results["settings"] = {
        "search": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args.config).items()},
        "database": args.db_options,
        "dtype": args.dtype,
        "baseline_tokens": args.baseline_tokens,
        "calibration_rows": args.calibration_rows,
        "heldout_rows": args.heldout_rows,
        "owl_grid": {"lambdas": args.owl_lambdas, "ms": args.owl_ms},
    }
    model, _ = load_model(args.model, dtype=args.dtype)
    adapter = ModelAdapter(model)
    dense_weights = {
        (i, name): lin.weight.detach().clone()
        for i in range(adapter.num_blocks)
        for name, lin in adapter.linears(i).items()
    }
    calibration = load_tokens(args.data, "calibration")
    heldout = load_tokens(args.data, "heldout")[: args.heldout_rows]
    t0 = time.perf_counter()
    ctx = FitnessContext.build(adapter, calibration[: args.calibration_rows], topk=512)
    # held-out KL doubles the cost of every evaluation; perplexity is the figure asked for
    heldout_ref = DenseReference.build(adapter, heldout, topk=512) if args.heldout_kl else None
    print(f"dense references built in {time.perf_counter() - t0:.0f}s", flush=True)
    if "dense" not in results["cells"]:
        started = time.perf_counter()
        record(results, "dense", evaluate_live(adapter, heldout, heldout_ref), started)
    for target in targets:
        run_target(args, results, adapter, ctx, heldout, heldout_ref, dense_weights, target)
    print(markdown(results))


if __name__ == "__main__":
    main()
