"""Quantization on the default model: held-out perplexity and KL to dense of EvoPress, DP, uniform GPTQ (integer
targets) and dense at 2.5/3/3.5/4 average bits per parameter (over the block linears); bytes on disk of every
stitched (bit-packed) model against the float model; database build time and size.

    .venv/bin/python benchmarks/quant_quality.py [--targets 2.5,3,3.5,4] [--generations 30]

Calibrates on the pydoc + stdlib-docstrings mix by default (--calibration); evaluates every row on 32 x 512 held-out
tokens of the calibration domain (first table) and of Shakespeare's plays (second table; benchmarks/corpora.py,
benchmarks/quality_common.py). Every row uses the one GPTQ database.

Writes benchmarks/results/quant_quality.json and quant_quality.md. Resumable: the database resumes (under
data/benchmarks/db/<calibration>/quantization), searches checkpoint every generation under
data/benchmarks/search/<calibration>/quant-<target>-<settings>, the DP's per-layer errors are kept in the json,
finished cells are skipped. Settings are scaled for a shared 2-core CPU (see --help and the json's "settings"):
one GPTQ database at 2..6 bits, group size 64, Hessians from 32 x 512 calibration tokens, inputs propagated at
3 bits; search: 8 offspring, selection on 512 tokens then on every calibration row (exact), bfloat16 forward;
DP errors on 1024 tokens. The database is fitted on calibration rows 0..31; the searches and DP score rows
32..63 (--fitness-rows unseen: scored on its own rows, every GPTQ level looks better than it is).
"""

from __future__ import annotations

import argparse
import json
import random
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
from evopress.baselines import quantization as qbase
from evopress.compressors.quantization import build_database, make, stitch
from evopress.data import load_tokens
from evopress.fitness import perplexity
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model, parse_dtype, read_manifest
from evopress.packing import load_packed
from evopress.search import FitnessContext, SearchConfig, run_search

RESULTS = Path("benchmarks/results")
OUT_JSON = RESULTS / "quant_quality.json"
OUT_MD = RESULTS / "quant_quality.md"
ROWS = ("evopress", "dp", "uniform")
EMPTY = {"cells": {}}


def _set_out(path: str) -> None:
    global OUT_JSON, OUT_MD
    OUT_JSON, OUT_MD = Path(path), Path(path).with_suffix(".md")


def load_results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else json.loads(json.dumps(EMPTY))


def save(results: dict) -> None:
    atomic_write_json(OUT_JSON, results)
    atomic_write_text(OUT_MD, markdown(results))


def markdown(results: dict) -> str:
    cells, targets = results["cells"], results.get("targets", [])
    lines = quality_tables(results, [(str(t), f"{t:g} bits") for t in targets], [Row(n, n) for n in ROWS])
    float_mb = results.get("float_model_bytes", 0) / 1e6
    lines += [
        f"Bytes on disk of the stitched packed models (MB; float32 model: {float_mb:.1f} MB, of which "
        f"{results.get('float_linear_bytes', 0) / 1e6:.1f} MB block linears):",
        "",
    ]
    lines.append("| method | " + " | ".join(f"{t:g} bits total / linears" for t in targets) + " |")
    lines.append("| --- |" + " --- |" * len(targets))
    for name in ROWS:
        vals = []
        for t in targets:
            st = cells.get(f"{name}/{t}", {}).get("stitch")
            vals.append(
                "-" if not st else f"{st['bytes_total'] / 1e6:.1f} / {st['bytes_quantized'] / 1e6:.1f}"
            )
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    db = results.get("database", {})
    lines += [
        "",
        f"database: {db.get('files')} files, {db.get('bytes', 0) / 1e6:.0f} MB, "
        f"built in {db.get('build_seconds', float('nan')):.0f} s",
    ]
    checks = {k: v["packed_perplexity"] for k, v in cells.items() if "packed_perplexity" in v}
    if checks:
        lines.append(
            f"perplexity of the packed folder reloaded with evopress.packing.load_packed: {json.dumps(checks)}"
        )
    searched = sorted((k, c) for k, c in cells.items() if k.startswith("evopress/") and "initial_source" in c)
    if searched:
        lines += [
            "",
            "| search | started from | start KL | final KL | generations | offspring | survivors | tokens per step "
            "| parent screens | s/generation |",
        ]
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, c in searched:
            start = "-" if c["initial_fitness"] is None else f"{c['initial_fitness']:.4f}"
            config = c.get("config", {})  # each row's own settings: a level may have been searched harder
            lines.append(
                f"| {key} | {c['initial_source']} | {start} | {c['fitness']:.4f} | {c['generations']} | "
                f"{config.get('offspring', '?')} | {_joined(config.get('survivors'))} | "
                f"{_joined(config.get('tokens'))} | {screens(config)} | {c['median_seconds_per_generation']:.1f} |"
            )
    settings = results.get("settings") or {}
    lines += ["", calibration_line(results, settings.get("calibration_rows"))]
    lines += made_on_lines(results)
    lines += ["", f"settings of the last run (each search row above has its own): {json.dumps(settings)}", ""]
    return "\n".join(lines)


def _joined(values) -> str:
    return ",".join(str(v) for v in values) if values else "?"


def _jsonable(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}


def _restore(adapter, dense_weights) -> None:
    with torch.no_grad():
        for (block, name), w in dense_weights.items():
            adapter.linear(block, name).weight.copy_(w)


def _log(info) -> None:
    if info.generation % 5 == 0:
        print(f"  generation {info.generation}: KL {info.fitness:.4f} ({info.seconds:.1f}s)", flush=True)


def finish_cell(args, results, key, comp, profile, sets, started, extra=None) -> None:
    comp.apply_profile(profile)
    metrics = measure(comp.adapter, sets)
    metrics["average_bits"] = comp.average_bits(profile)
    metrics["bits_used"] = {str(b): sum(1 for v in profile.values() if v == b) for b in comp.opts.bits}
    metrics.update(extra or {})
    name, target = key.split("/")
    doc = {"method": "quantization", "target": float(target), "options": {}, "source": name, "units": profile}
    doc["model_sha256"] = read_manifest(Path(args.model))["sha256"]
    folder = Path(args.stitched) / f"quant-{name}-{target}"
    atomic_write_json(Path(args.runs) / f"quant-{name}-{target}.profile.json", doc)
    metrics["stitch"] = stitch(Path(args.model), doc, Path(args.db), folder)
    if key == f"evopress/{args.check_packed}":  # the packed folder is a working model with the same quality
        model = load_packed(folder, dtype=parse_dtype(args.dtype))
        metrics["packed_perplexity"] = perplexity(ModelAdapter(model), sets[0].tokens, 8)
        del model
    results["cells"][key] = {**metrics, "seconds": time.perf_counter() - started}
    save(results)
    print(f"{key}: {describe(metrics)}, bytes {metrics['stitch']['bytes_total']}", flush=True)


def run_target(args, results, adapter, ctx, sets, dense_weights, target: float) -> None:
    cells = results["cells"]

    def fresh():
        _restore(adapter, dense_weights)
        return make(adapter, target, db=Path(args.db))

    if float(target).is_integer() and missing(cells.get(f"uniform/{target}"), sets):
        started = time.perf_counter()
        comp = fresh()
        finish_cell(args, results, f"uniform/{target}", comp, qbase.uniform(comp), sets, started)
    if missing(cells.get(f"dp/{target}"), sets):
        started = time.perf_counter()
        comp = fresh()
        if "dp_layer_errors" not in results:  # target-independent: measured once, on the dense model
            n_rows = -(-args.dp_tokens // args.dp_seq)
            rows = sorted(random.Random(0).sample(range(len(args.calibration_tokens)), n_rows))
            dp_tokens = args.calibration_tokens[rows, : args.dp_seq]
            t = time.perf_counter()
            dp_ctx = FitnessContext.build(adapter, dp_tokens, topk=512)
            results["dp_layer_errors"] = qbase.layer_errors(comp, dp_ctx, torch.arange(n_rows))
            results["dp_layer_errors_seconds"] = time.perf_counter() - t
            save(results)
            print(f"DP per-layer errors in {results['dp_layer_errors_seconds']:.0f}s", flush=True)
        profile = qbase.dp_from_errors(comp, results["dp_layer_errors"])
        finish_cell(args, results, f"dp/{target}", comp, profile, sets, started)
    config, cell = args.config, cells.get(f"evopress/{target}")
    if missing(cell, sets) or cell.get("config") != _jsonable(config):  # other settings: search again
        started = time.perf_counter()
        comp = fresh()
        make_seed = {"dp": lambda: qbase.dp_from_errors(comp, results["dp_layer_errors"])}
        seeds = {n: make_seed[n]() for n in config.seed_baselines}  # the uniform start is always a candidate
        out = checkpoint_folder(args.runs, f"quant-{target}", config, args.fitness_span)
        res = run_search(comp, ctx, config, out, on_generation=_log, seeds=seeds)
        extra = {
            "fitness": res.fitness,
            "initial_fitness": res.initial_fitness,
            "initial_source": res.initial_source,
            "config": _jsonable(config),
            "generations": len(res.history),
            "median_seconds_per_generation": statistics.median(h["seconds"] for h in res.history),
            "db": comp.db.stats(),
        }
        finish_cell(args, results, f"evopress/{target}", comp, res.profile, sets, started, extra)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap, tokens="512,all")
    ap.add_argument("--db", default="", help="the database ('' = <bench-data>/db/<calibration>/quantization)")
    ap.add_argument("--runs", default="", help="search checkpoints ('' = <bench-data>/search/<calibration>)")
    ap.add_argument(
        "--stitched", default="", help="stitched models ('' = <bench-data>/stitched/<calibration>)"
    )
    ap.add_argument("--targets", default="2.5,3,3.5,4")
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--survivors", default="2,1")
    ap.add_argument(
        "--seed-baselines",
        default="dp",
        help="profiles competing with the uniform start ('' = uniform start only, as the paper)",
    )
    ap.add_argument("--dp-tokens", type=int, default=1024)
    ap.add_argument("--dp-seq", type=int, default=512, help="sequence length of the DP's error rows")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--calibration-rows", type=int, default=32, help="calibration sequences the search samples"
    )
    add_fitness_rows_argument(ap)
    ap.add_argument("--check-packed", type=float, default=3.0, help="target whose packed folder is reloaded")
    ap.add_argument("--out", default=str(OUT_JSON))
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on this oversubscribed CPU: 14x slower)"
    )
    args = ap.parse_args()
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


def place_outputs(args, data) -> None:
    """Database, checkpoints and stitched models per calibration set: none of them records the text it came from."""
    root = Path(args.bench_data)
    args.db = args.db or str(root / "db" / data.tag / "quantization")
    # searches and DP profiles per calibration rows too: a profile chosen on other rows is another result
    args.runs = args.runs or str(
        root / "search" / (data.tag if args.fitness_rows == "all" else f"{data.tag}-unseen")
    )
    args.stitched = args.stitched or str(root / "stitched" / data.tag)


def main() -> None:
    args = parse_args()
    _set_out(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = [float(t) for t in args.targets.split(",")]
    db_options = {"n_samples": args.n_samples, "group_size": args.group_size}
    data = calibration_data(
        args.calibration, args.model, args.bench_data, args.heldout_rows, rows_needed(args)
    )
    place_outputs(args, data)
    sets, note = heldout_sets(args, data)
    results = adopt_data(load_results(), OUT_JSON, data, sets, note, EMPTY)
    results["targets"] = sorted(set(results.get("targets", [])) | set(targets))
    prepared = len(load_tokens(data.folder, "calibration"))
    span = args.fitness_span = fitness_span(
        args.fitness_rows, args.n_samples, args.calibration_rows, prepared
    )
    if drop_cells_scored_elsewhere(results, span, data_free=("dense", "uniform")):
        results.pop("dp_layer_errors", None)  # measured on the old rows
    results["settings"] = {
        "search": _jsonable(args.config),
        "database": db_options,
        "dtype": args.dtype,
        "dp_tokens": args.dp_tokens,
        "dp_seq": args.dp_seq,
        "calibration_rows": args.calibration_rows,
        "fitness_rows": span,
        "calibration": data.description,
    }
    results["made_on"] = made_on(args.dtype, args.threads)
    t = time.perf_counter()
    db = build_database(Path(args.model), data.folder, Path(args.db), db_options)
    if results.get("database", {}).get("options") not in (
        None,
        db.params,
    ):  # every row but dense used the old one
        results["cells"] = {k: v for k, v in results["cells"].items() if k == "dense"}
        results.pop("dp_layer_errors", None)
    results["database"] = {
        "build_seconds": db.manifest.get("build_seconds", time.perf_counter() - t),
        "bytes": db.size_on_disk(),
        "files": len(db.pairs()),
        "options": db.params,
    }
    print(f"database ready: {results['database']}", flush=True)
    model, _ = load_model(args.model, dtype=args.dtype)
    adapter = ModelAdapter(model)
    results["float_model_bytes"] = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    linear_params = sum(
        lin.weight.numel() for i in range(adapter.num_blocks) for lin in adapter.linears(i).values()
    )
    results["float_linear_bytes"] = 4 * linear_params
    save(results)
    dense_weights = {
        (i, name): lin.weight.detach().clone()
        for i in range(adapter.num_blocks)
        for name, lin in adapter.linears(i).items()
    }
    # The rows the searches and DP score: after the database's own rows (--fitness-rows unseen) or from the first.
    args.calibration_tokens = load_tokens(data.folder, "calibration")[slice(*span)]
    t0 = time.perf_counter()
    ctx = FitnessContext.build(adapter, args.calibration_tokens, topk=512)
    build_references(adapter, sets)
    print(f"dense references built in {time.perf_counter() - t0:.0f}s", flush=True)
    if missing(results["cells"].get("dense"), sets):
        started = time.perf_counter()
        results["cells"]["dense"] = {**measure(adapter, sets), "seconds": time.perf_counter() - started}
        save(results)
    print(f"dense: {describe(results['cells']['dense'])}", flush=True)
    for target in targets:
        run_target(args, results, adapter, ctx, sets, dense_weights, target)
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
