"""Depth pruning on the default model: held-out perplexity and KL to dense of EvoPress (sublayer and block
granularity) vs every baseline at k = 4, 8, 12 of 30 blocks removed, plus the dense model; and seconds per
generation with and without parent-prefix reuse, side by side in one run.

    .venv/bin/python benchmarks/depth_quality.py [--generations 40] [--calibration data/text] [--no-shakespeare]

Calibrates on the pydoc + stdlib-docstrings mix by default (--calibration), with an exact last selection step
(--tokens 512,all); evaluates on 32 x 512 held-out tokens of the calibration domain (first table) and of
Shakespeare's plays (second table; benchmarks/corpora.py, benchmarks/quality_common.py).

Writes benchmarks/results/depth_quality.json and depth_quality.md. Resumable: finished cells are kept in the json
and skipped; searches checkpoint every generation under data/benchmarks/depth_quality_runs/<calibration>/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from quality_common import (
    Row,
    add_data_arguments,
    adopt_data,
    build_references,
    calibration_data,
    calibration_line,
    checkpoint_folder,
    describe,
    heldout_sets,
    made_on,
    made_on_lines,
    measure,
    missing,
    quality_tables,
    screens,
    search_tokens,
)

from evopress.adapter import ModelAdapter
from evopress.baselines.depth import BASELINES, shortened_order, sleb_order
from evopress.compressors.depth import make
from evopress.data import load_tokens
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model
from evopress.search import FitnessContext, SearchConfig, run_search

RESULTS = Path("benchmarks/results")
OUT_JSON = RESULTS / "depth_quality.json"
OUT_MD = RESULTS / "depth_quality.md"
BASELINE_NAMES = ("shortgpt", "window", "shortened_ppl", "sleb", "random")
ROWS = ("evopress_sublayer", "evopress_block", *BASELINE_NAMES)
EMPTY = {"cells": {}}


def runs_dir(bench_data: str | Path, data) -> Path:
    """Checkpoints and the cached dense reference (git-ignored), per calibration set: they do not record it."""
    return Path(bench_data) / "depth_quality_runs" / data.tag


def _set_out(path: str) -> None:
    global OUT_JSON, OUT_MD
    OUT_JSON, OUT_MD = Path(path), Path(path).with_suffix(".md")


def load_results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else json.loads(json.dumps(EMPTY))


def save(results: dict) -> None:
    atomic_write_json(OUT_JSON, results)
    atomic_write_text(OUT_MD, markdown(results))


def markdown(results: dict) -> str:
    cells, ks = results["cells"], results.get("ks", [])
    lines = quality_tables(results, [(f"k{k}", f"k={k}") for k in ks], [Row(n, n) for n in ROWS])
    searched = [(key, c) for key, c in cells.items() if key.startswith("evopress_") and "initial_source" in c]
    if searched:
        lines += [
            "| search | started from | start KL | final KL | generations | tokens per step | parent screens | "
            "s/generation | minutes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, c in sorted(searched):
            lines.append(
                f"| {key} | {c['initial_source']} | {c['initial_fitness']:.4f} | {c['fitness']:.4f} | "
                f"{c['config']['generations']} | {','.join(map(str, c['config']['tokens']))} | "
                f"{screens(c['config'])} | {c['median_seconds_per_generation']:.1f} | {c['seconds'] / 60:.1f} |"
            )
    speed = results.get("speed")
    if speed:
        lines += [
            "",
            "| prefix reuse | median s/generation | median s first step |",
            "| --- | --- | --- |",
            f"| on | {speed['with_reuse']['median_seconds']:.2f} | {speed['with_reuse']['median_step1']:.2f} |",
            f"| off | {speed['without_reuse']['median_seconds']:.2f} | {speed['without_reuse']['median_step1']:.2f} |",
            f"| speed-up | {speed['speedup']:.2f}x | {speed['speedup_step1']:.2f}x |",
        ]
    lines += [
        "",
        f"search settings: {json.dumps(results.get('search_config'))}",
        f"{calibration_line(results, results.get('calibration_rows'))}; baseline tokens: "
        f"{results.get('baseline_tokens')}; dtype {results.get('dtype')}, {results.get('threads')} torch thread(s)",
        *made_on_lines(results),
        "",
    ]
    return "\n".join(lines)


def speed_run(adapter, ctx, config: SearchConfig, k: int, generations: int) -> dict:
    """Same seed, same search, with and without reuse: the histories must match, only the time differs."""
    out = {}
    for reuse in (True, False):
        comp = make(adapter, k, options={"granularity": "sublayer"})
        cfg = replace(config, generations=generations, prefix_reuse=reuse, seed_baselines=())
        res = run_search(comp, ctx, cfg)
        secs = [h["seconds"] for h in res.history]
        step1 = [h["step1_seconds"] for h in res.history]
        out["with_reuse" if reuse else "without_reuse"] = {
            "seconds": secs,
            "median_seconds": statistics.median(secs),
            "median_step1": statistics.median(step1),
            "fitness": [h["fitness"] for h in res.history],
        }
    on, off = out["with_reuse"], out["without_reuse"]
    out["identical_results"] = on["fitness"] == off["fitness"]
    out["speedup"] = off["median_seconds"] / on["median_seconds"]
    out["speedup_step1"] = off["median_step1"] / on["median_step1"]
    out.update(k=k, generations=generations)
    adapter.restore_all()
    return out


def baseline_cell(adapter, ctx, sets, name, k, k_max, args, sleb_cache) -> dict:
    t = time.perf_counter()
    comp = make(adapter, k, options={"granularity": "sublayer" if name == "random" else "block"})
    if name in ("sleb", "shortened_ppl"):  # orders: the answer for k is the first k (kept in the json)
        big = make(adapter, k_max, options={"granularity": "block"})
        done = sleb_cache.get(name, {"order": [], "seconds": 0.0})
        if name == "sleb" and len(done["order"]) < k:  # continue the greedy order (same seed and tokens)
            order = sleb_order(big, ctx, k, seed=0, tokens=args.baseline_tokens, start=done["order"])
            done = {"order": order, "seconds": done["seconds"] + time.perf_counter() - t}
        elif name == "shortened_ppl" and not done["order"]:
            order = shortened_order(big, ctx, seed=0, tokens=args.baseline_tokens)
            done = {"order": order, "seconds": time.perf_counter() - t}
        sleb_cache[name] = done
        order, seconds = done["order"], done["seconds"]
        profile = comp.profile_from_blocks(order[:k])
    else:
        profile = BASELINES[name](comp, ctx, seed=0, tokens=args.baseline_tokens)
        seconds = time.perf_counter() - t
    comp.apply_profile(profile)
    cell = {**measure(adapter, sets), "removed": comp.removed_blocks(profile)}
    adapter.restore_all()
    return {**cell, "seconds": seconds}


def seed_profiles(comp, cells: dict, names: tuple[str, ...], k: int) -> dict:
    """The baselines' profiles at k, rebuilt from the blocks their cells removed (no recomputation)."""
    return {n: comp.profile_from_blocks(cells[f"{n}/k{k}"]["removed"]["block"]) for n in names}


def search_cell(adapter, ctx, sets, config, gran, k, cells, runs: Path) -> dict:
    comp = make(adapter, k, options={"granularity": gran})
    seeds = seed_profiles(comp, cells, config.seed_baselines, k)
    out = checkpoint_folder(runs, f"{gran}_k{k}", config, [0, ctx.tokens.shape[0]])  # the rows it scores
    res = run_search(comp, ctx, config, out, seeds=seeds)
    comp.apply_profile(res.profile)
    cell = {
        **measure(adapter, sets),
        "removed": comp.removed_blocks(res.profile),
        "fitness": res.fitness,
        "initial_fitness": res.initial_fitness,
        "initial_source": res.initial_source,
        "config": asdict(config),
        "seconds": res.history[-1]["elapsed"] if res.history else 0.0,
        "median_seconds_per_generation": statistics.median(h["seconds"] for h in res.history),
    }
    adapter.restore_all()
    return cell


def cached_context(adapter, calibration, args) -> FitnessContext:
    """The dense top-512 reference on the calibration rows, cached on disk (minutes on this CPU) under the
    rows' own hash: a cache made on other rows can never be read for these."""
    from safetensors.torch import load_file

    from evopress.fitness import DenseReference
    from evopress.io import atomic_save_safetensors

    rows = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()[:12]
    path = Path(args.runs) / f"dense_ref_{len(calibration)}rows_{rows}_{args.dtype}.safetensors"
    if path.exists():
        t = load_file(path)
        return FitnessContext(adapter, calibration, DenseReference(512, t["logp"], t["index"]))
    ctx = FitnessContext.build(adapter, calibration, topk=512)
    atomic_save_safetensors(path, {"logp": ctx.ref.logp, "index": ctx.ref.index})
    return ctx


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap, tokens="512,all")
    ap.add_argument("--ks", default="4,8,12")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--offspring", type=int, default=6)
    ap.add_argument("--survivors", default="2,1")
    ap.add_argument("--baseline-tokens", type=int, default=512)
    ap.add_argument("--speed-generations", type=int, default=1)
    ap.add_argument("--initially-generated", type=int, default=16, help="random starting candidates")
    ap.add_argument(
        "--initial-tokens", type=int, default=0, help="tokens scoring the starts (0 = the last step's)"
    )
    ap.add_argument(
        "--seed-baselines",
        default="shortgpt,window,shortened_ppl,sleb",
        help="baselines whose profiles compete for the search's start ('' = random starts only, as the paper)",
    )
    ap.add_argument("--grans", default="sublayer,block", help="EvoPress granularities to search")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--calibration-rows", type=int, default=16, help="calibration sequences the search samples"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 threads on a shared 2-core CPU spin)"
    )
    ap.add_argument("--out", default=str(OUT_JSON))
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the json and stop")
    return ap.parse_args()


def search_config(args) -> SearchConfig:
    tokens, last = search_tokens(args.tokens, args.calibration_rows)
    return SearchConfig(
        generations=args.generations,
        offspring=args.offspring,
        survivors=tuple(int(s) for s in args.survivors.split(",")),
        tokens=tokens,
        seed=0,
        init="random",
        initially_generated=args.initially_generated,
        initial_tokens=args.initial_tokens or last,
        seed_baselines=tuple(n for n in args.seed_baselines.split(",") if n),
    )


def log(key: str, cell: dict) -> None:
    print(f"{key}: {describe(cell)} ({cell['seconds']:.0f}s)", flush=True)


def main() -> None:
    args = parse_args()
    _set_out(args.out)
    if args.report_only:
        save(load_results())
        print(markdown(load_results()))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ks = [int(k) for k in args.ks.split(",")]
    config = search_config(args)
    data = calibration_data(args.calibration, args.model, args.bench_data, args.heldout_rows)
    sets, note = heldout_sets(args, data)
    args.runs = runs_dir(args.bench_data, data)
    results = adopt_data(load_results(), OUT_JSON, data, sets, note, EMPTY)
    if results.get("calibration_rows", args.calibration_rows) != args.calibration_rows:
        # every baseline and search scored its candidates on those rows: only the dense cell still holds
        print(
            f"the table was made on {results['calibration_rows']} calibration rows, this run uses "
            f"{args.calibration_rows}: every cell but dense is made again",
            flush=True,
        )
        results["cells"] = {k: v for k, v in results["cells"].items() if k == "dense"}
        results.pop("orders", None)
    results.update(
        ks=sorted(set(results.get("ks", [])) | set(ks)),  # a run over some levels keeps the others' columns
        search_config=asdict(config),
        baseline_tokens=args.baseline_tokens,
        dtype=args.dtype,
        threads=args.threads,
        calibration_rows=args.calibration_rows,
        made_on=made_on(args.dtype, args.threads),
    )
    model, _ = load_model(args.model, dtype=args.dtype)
    adapter = ModelAdapter(model)
    calibration = load_tokens(data.folder, "calibration")[: args.calibration_rows]
    t0 = time.perf_counter()
    ctx = cached_context(adapter, calibration, args)
    build_references(adapter, sets)
    print(f"dense references built in {time.perf_counter() - t0:.0f}s", flush=True)
    cells = results["cells"]
    if missing(cells.get("dense"), sets):
        t = time.perf_counter()
        cells["dense"] = {**measure(adapter, sets), "seconds": time.perf_counter() - t}
        save(results)
    log("dense", cells["dense"])
    sleb_cache = results.setdefault("orders", {})
    for k in ks:  # baselines first (cheap), then the searches: the main (sublayer) row before the block row
        for name in BASELINE_NAMES:
            if name == "sleb":
                continue  # the costliest baseline (k x n removals) runs after the main search row
            key = f"{name}/k{k}"
            if missing(cells.get(key), sets):
                cells[key] = baseline_cell(adapter, ctx, sets, name, k, max(ks), args, sleb_cache)
                save(results)
            log(key, cells[key])
    grans = args.grans.split(",")
    # The main row first, then timing, SLEB, the block row; SLEB first when its profile seeds the searches.
    first = ("sleb", "sublayer") if "sleb" in config.seed_baselines else ("sublayer", "sleb")
    order = [g for g in (*first, "speed", "block") if g in grans or g in ("speed", "sleb")]
    for gran in order:
        if gran == "sleb":
            for k in ks:
                key = f"sleb/k{k}"
                if missing(cells.get(key), sets):
                    cells[key] = baseline_cell(adapter, ctx, sets, "sleb", k, max(ks), args, sleb_cache)
                    save(results)
                log(key, cells[key])
            continue
        if gran == "speed":
            if "speed" not in results and args.speed_generations:
                results["speed"] = speed_run(adapter, ctx, config, 8, args.speed_generations)
                save(results)
            print(
                f"speed: {json.dumps({k: v for k, v in results.get('speed', {}).items() if not isinstance(v, dict)})}"
            )
            continue
        for k in ks:
            key = f"evopress_{gran}/k{k}"
            cell = cells.get(key)
            if missing(cell, sets) or cell.get("config") != asdict(config):  # other settings: search again
                cells[key] = search_cell(adapter, ctx, sets, config, gran, k, cells, args.runs)
                save(results)
            log(key, cells[key])
    print(markdown(results))


if __name__ == "__main__":
    main()
