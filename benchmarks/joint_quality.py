"""Joint depth + quantization on the default model at equal bytes: held-out perplexity and KL of the joint EvoPress
profile against quantization-only EvoPress, "depth then quantize" (the depth search's profile, then uniform or DP
bits for what is left), uniform bits and DP bits, at each size (average bits per block-linear weight, removed
weights counted as 0); and how the joint profile spends its budget.

    .venv/bin/python benchmarks/joint_quality.py [--targets 2.5,3] [--generations 20] [--depth-k 2]

Calibrates on the pydoc + stdlib-docstrings mix (--calibration); every row on 32 x 512 held-out tokens of that
domain and of Shakespeare's plays (benchmarks/quality_common.py). One GPTQ database (bits 2..5, group 64) serves
every row. Resumable: the database resumes, searches checkpoint every generation under
<bench-data>/search/<calibration>/joint-*, finished cells are skipped. Writes benchmarks/results/joint_quality.json
and .md. The joint EvoPress folder at each size is stitched (removed sublayers absent, linears packed) and reloaded
with evopress.load_model; its perplexity as delivered is in the table's notes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from quality_common import (
    Row,
    add_data_arguments,
    adopt_data,
    build_references,
    calibration_data,
    calibration_line,
    describe,
    heldout_sets,
    measure,
    missing,
    quality_tables,
    search_tokens,
)

from evopress.adapter import ModelAdapter
from evopress.baselines import joint as jbase
from evopress.baselines import quantization as bq
from evopress.compressors import depth as depth_method
from evopress.compressors import joint, quantization
from evopress.data import load_tokens
from evopress.fitness import perplexity
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model, read_manifest
from evopress.search import FitnessContext, SearchConfig, run_search

RESULTS = Path("benchmarks/results")
OUT_JSON = RESULTS / "joint_quality.json"
OUT_MD = RESULTS / "joint_quality.md"
ROWS = (
    Row("evopress (joint)", "joint"),
    Row("evopress (quantization only)", "quant"),
    Row("depth then DP bits", "depth_then_dp"),
    Row("depth then uniform bits", "depth_then_uniform"),
    Row("DP bits", "dp"),
    Row("uniform bits", "uniform"),
)
EMPTY = {"cells": {}}
# The joint search starts from the best of uniform and the baselines in its own space (the quantization-only search
# from the better of uniform and DP bits): what it adds beyond them is what the table measures.
JOINT_SEEDS = ("dp", "depth_then_dp")


def load_results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else json.loads(json.dumps(EMPTY))


def save(results: dict) -> None:
    atomic_write_json(OUT_JSON, results)
    atomic_write_text(OUT_MD, markdown(results))


def spending(comp: joint.JointCompressor, profile: dict) -> dict:
    """How a profile spends its budget: sublayers removed per kind, and the share of kept linear weights per bits."""
    removed = comp.removed_sublayers(profile)
    kept = comp.kept_linears(profile)
    total = sum(comp.quant.sizes[u] for u in kept)
    bits = {}
    for u in kept:
        bits[str(profile[u])] = bits.get(str(profile[u]), 0) + comp.quant.sizes[u] / total
    return {
        "removed": {k: len(v) for k, v in removed.items()},
        "removed_blocks": removed,
        "kept_bits_share": {b: round(s, 4) for b, s in sorted(bits.items())},
        "average_bits": comp.average_bits(profile),
    }


def markdown(results: dict) -> str:
    targets = results.get("targets", [])
    lines = [
        "# Joint depth + quantization at equal bytes",
        "",
        "Size = average bits per block-linear weight, removed weights counted as 0 (group scales not counted, as in "
        "the quantization tables); every row at a size has the same budget.",
        "",
    ]
    lines += quality_tables(results, [(str(t), f"{t:g} bits") for t in targets], list(ROWS))
    lines += [
        "How each profile spends its budget (sublayers removed; share of kept linear weights at each bits):",
        "",
    ]
    lines += ["| size | row | attn removed | mlp removed | bits: share of kept weights | average bits |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for t in targets:
        for row in ROWS:
            s = results["cells"].get(f"{row.cell}/{t}", {}).get("spending")
            if s:
                shares = ", ".join(f"{b}: {v:.2f}" for b, v in s["kept_bits_share"].items())
                lines.append(
                    f"| {t:g} | {row.label} | {s['removed']['attn']} | {s['removed']['mlp']} | {shares} | "
                    f"{s['average_bits']:.3f} |"
                )
    lines.append("")
    delivered = {
        k: v["delivered_perplexity"] for k, v in results["cells"].items() if "delivered_perplexity" in v
    }
    if delivered:
        lines.append(
            f"joint folders reloaded with evopress.load_model, held-out perplexity: {json.dumps(delivered)}"
        )
    searched = sorted((k, c) for k, c in results["cells"].items() if "initial_fitness" in c)
    if searched:
        lines += [
            "",
            "| search | start KL | final KL | generations | s/generation |",
            "| --- | --- | --- | --- | --- |",
        ]
        for key, c in searched:
            start = "-" if c["initial_fitness"] is None else f"{c['initial_fitness']:.4f}"
            lines.append(
                f"| {key} | {start} | {c['fitness']:.4f} | {c['generations']} | {c['seconds_per_generation']:.1f} |"
            )
    settings = results.get("settings") or {}
    lines += [
        "",
        "Starts: the quantization-only search starts from the better of uniform and DP bits, the joint search from "
        f"the best of uniform, {' and '.join(JOINT_SEEDS)} (scored on the same calibration rows); the start KL "
        "above is the one it took.",
    ]
    lines += ["", calibration_line(results, settings.get("calibration_rows"))]
    lines += ["", f"settings: {json.dumps(settings)}", ""]
    return "\n".join(lines)


def _jsonable(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}


def _tag(config) -> str:
    return hashlib.sha256(json.dumps(_jsonable(config), sort_keys=True).encode()).hexdigest()[:8]


def _log(info) -> None:
    if info.generation % 5 == 0:
        print(f"  generation {info.generation}: KL {info.fitness:.4f} ({info.seconds:.1f}s)", flush=True)


def searched(comp, ctx, config, out: Path, seeds: dict) -> tuple[dict, dict]:
    res = run_search(comp, ctx, config, out, on_generation=_log, seeds=seeds)
    extra = {
        "fitness": res.fitness,
        "initial_fitness": res.initial_fitness,
        "generations": len(res.history),
        "seconds_per_generation": statistics.median(h["seconds"] for h in res.history)
        if res.history
        else 0.0,
        "config": _jsonable(config),
    }
    return res.profile, extra


def finish(results, key, comp: joint.JointCompressor, profile: dict, sets, started, extra=None) -> None:
    problem = comp.budget_problem(profile)
    assert problem is None, f"{key}: {problem}"
    comp.apply_profile(profile)  # every unit: sublayers removed or restored, every linear at its bits
    metrics = {**measure(comp.adapter, sets), "spending": spending(comp, profile), **(extra or {})}
    metrics["profile"] = profile
    results["cells"][key] = {**metrics, "seconds": time.perf_counter() - started}
    save(results)
    print(f"{key}: {describe(metrics)}; {metrics['spending']['removed']}", flush=True)


def delivered(args, results, key, comp, profile, sets) -> None:
    """Stitch the joint profile and measure the folder as a user loads it."""
    doc = {"method": "joint", "target": comp.target, "options": {}, "source": key, "units": profile}
    doc["model_sha256"] = read_manifest(Path(args.model))["sha256"]
    folder = Path(args.stitched) / key.replace("/", "-")
    report = joint.stitch(Path(args.model), doc, Path(args.db), folder)
    model, _ = load_model(str(folder), dtype="float32")
    results["cells"][key]["delivered_perplexity"] = perplexity(ModelAdapter(model), sets[0].tokens, 8)
    results["cells"][key]["stitch"] = report
    save(results)


def cache_layer_errors(folder: Path) -> None:
    """Keep the DP baselines' per-linear errors on disk: they depend on the model, the database, the sublayers
    removed and the rows, not on the size, so the second size (and a resumed run) reuses them (a DP measures
    every linear at every bits: ~20 minutes here)."""
    real = bq.layer_errors

    def layer_errors(comp, ctx, rows, units=None):
        removed = [
            (b, k)
            for b in range(comp.adapter.num_blocks)
            for k in ("attn", "mlp")
            if comp.adapter.is_dropped(b, k)
        ]
        key = {
            "removed": removed,
            "rows": rows.tolist(),
            "units": units,
            "db": str(comp.db.root),
            "n": len(ctx.tokens),
        }
        path = folder / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16] + ".json")
        if path.exists():
            return json.loads(path.read_text())["errors"]
        errors = real(comp, ctx, rows, units)
        atomic_write_json(path, {"key": key, "errors": errors})
        return errors

    bq.layer_errors = layer_errors


def run_target(args, results, adapter, ctx, sets, dense_weights, depth_profile: Path, target: float) -> None:
    cells = results["cells"]

    def fresh(**options) -> joint.JointCompressor:
        """The dense model again (the baselines measure errors against it), and a compressor on it."""
        adapter.restore_all()
        with torch.no_grad():
            for (block, name), w in dense_weights.items():
                adapter.linear(block, name).weight.copy_(w)
        return joint.make(adapter, target, db=Path(args.db), options=options)

    for name in ("uniform", "dp", "depth_then_uniform", "depth_then_dp"):
        if missing(cells.get(f"{name}/{target}"), sets):
            started = time.perf_counter()
            comp = fresh(depth_profile=str(depth_profile))
            profile = jbase.BASELINES[name](comp, ctx, seed=0, tokens=args.dp_tokens)
            finish(results, f"{name}/{target}", comp, profile, sets, started)
    key = f"quant/{target}"
    if missing(cells.get(key), sets):
        started = time.perf_counter()
        fresh()
        qcomp = quantization.make(adapter, target, db=Path(args.db))
        dp_bits = {u: cells[f"dp/{target}"]["profile"][u] for u in qcomp.units()}
        out = Path(args.runs) / f"joint-quant-{target}-{_tag(args.config)}"
        profile, extra = searched(qcomp, ctx, args.config, out, {"dp": dp_bits})
        comp = fresh()
        finish(results, key, comp, {**comp.initial_profile(), **profile}, sets, started, extra)
    key = f"joint/{target}"
    if missing(cells.get(key), sets):
        started = time.perf_counter()
        comp = fresh(depth_moves=args.depth_moves)
        config = replace(args.config, seed_baselines=JOINT_SEEDS)
        tag = _tag(config) + f"-m{args.depth_moves:g}"
        seeds = {name: dict(cells[f"{name}/{target}"]["profile"]) for name in JOINT_SEEDS}
        profile, extra = searched(comp, ctx, config, Path(args.runs) / f"joint-{target}-{tag}", seeds)
        finish(results, key, comp, profile, sets, started, extra)
    if "delivered_perplexity" not in cells[key]:
        delivered(args, results, key, fresh(), cells[key]["profile"], sets)


def depth_search(args, results, adapter, ctx) -> Path:
    """The depth search's profile at --depth-k sublayers of each kind (shared by every size)."""
    out = Path(args.runs) / f"joint-depth-k{args.depth_k}-{_tag(args.depth_config)}"
    path = out / "profile.json"
    if not path.exists():
        adapter.restore_all()
        comp = depth_method.make(adapter, args.depth_k)
        res = run_search(comp, ctx, args.depth_config, out, on_generation=_log)
        atomic_write_json(path, {"method": "depth", "target": args.depth_k, "units": res.profile})
        results["depth_search"] = {
            "k": args.depth_k,
            "fitness": res.fitness,
            "removed": comp.removed_blocks(res.profile),
        }
        save(results)
        adapter.restore_all()
    return path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap, tokens="512,all")
    ap.add_argument(
        "--db", default="", help="a quantization database ('' = <bench-data>/db/<calibration>/joint)"
    )
    ap.add_argument("--runs", default="", help="search checkpoints ('' = <bench-data>/search/<calibration>)")
    ap.add_argument(
        "--stitched", default="", help="stitched models ('' = <bench-data>/stitched/<calibration>)"
    )
    ap.add_argument("--targets", default="2.5,3")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--survivors", default="2,1")
    ap.add_argument("--depth-moves", type=float, default=0.3)
    ap.add_argument("--depth-k", type=int, default=2, help="sublayers of each kind the depth search removes")
    ap.add_argument("--dp-tokens", type=int, default=1024)
    ap.add_argument("--bits", default="2,3,4,5")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--calibration-rows", type=int, default=16, help="calibration sequences the search samples"
    )
    ap.add_argument("--out", default=str(OUT_JSON))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tokens, initial_tokens = search_tokens(args.tokens, args.calibration_rows)
    common = dict(
        offspring=args.offspring,
        survivors=tuple(int(s) for s in args.survivors.split(",")),
        tokens=tokens,
        seed=0,
        initial_tokens=initial_tokens,
    )
    # Both EvoPress rows start from the better of uniform and DP bits (the DP row's profile at that size), as
    # `search.seed_baselines: [dp]` does in params.yaml: the search then never ends worse than the DP baseline on
    # the calibration rows, and what it adds beyond DP is what the table measures.
    args.config = SearchConfig(generations=args.generations, init="uniform", seed_baselines=("dp",), **common)
    args.depth_config = SearchConfig(
        generations=args.generations, init="random", initially_generated=8, **common
    )
    return args


def main() -> None:
    global OUT_JSON, OUT_MD
    args = parse_args()
    OUT_JSON, OUT_MD = Path(args.out), Path(args.out).with_suffix(".md")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = [float(t) for t in args.targets.split(",")]
    data = calibration_data(args.calibration, args.model, args.bench_data, args.heldout_rows)
    root = Path(args.bench_data)
    args.db = args.db or str(root / "db" / data.tag / "joint")
    args.runs = args.runs or str(root / "search" / data.tag)
    args.stitched = args.stitched or str(root / "stitched" / data.tag)
    sets, note = heldout_sets(args, data)
    results = adopt_data(load_results(), OUT_JSON, data, sets, note, EMPTY)
    results["targets"] = sorted(set(results.get("targets", [])) | set(targets))
    db_options = {"bits": args.bits, "n_samples": args.n_samples, "group_size": args.group_size}
    results["settings"] = {
        "search": _jsonable(args.config),
        "depth_search": {**_jsonable(args.depth_config), "k": args.depth_k},
        "depth_moves": args.depth_moves,
        "database": db_options,
        "dtype": args.dtype,
        "dp_tokens": args.dp_tokens,
        "calibration_rows": args.calibration_rows,
        "calibration": data.description,
    }
    t = time.perf_counter()
    db = quantization.build_database(Path(args.model), data.folder, Path(args.db), db_options)
    results["database"] = {
        "bytes": db.size_on_disk(),
        "files": len(db.pairs()),
        "seconds": time.perf_counter() - t,
    }
    model, _ = load_model(args.model, dtype=args.dtype)
    adapter = ModelAdapter(model)
    calibration = load_tokens(data.folder, "calibration")[: args.calibration_rows]
    ctx = FitnessContext.build(adapter, calibration, topk=512)
    build_references(adapter, sets)
    if missing(results["cells"].get("dense"), sets):
        results["cells"]["dense"] = measure(adapter, sets)
    save(results)
    print(f"dense: {describe(results['cells']['dense'])}", flush=True)
    dense_weights = {
        (i, name): lin.weight.detach().clone()
        for i in range(adapter.num_blocks)
        for name, lin in adapter.linears(i).items()
    }
    cache_layer_errors(root / "layer-errors" / data.tag)
    depth_profile = depth_search(args, results, adapter, ctx)
    for target in targets:
        run_target(args, results, adapter, ctx, sets, dense_weights, depth_profile, target)
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
