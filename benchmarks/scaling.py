"""Ray workers vs one process: search generations and database blocks, speed-ups, identical results.

Two parts, each run three ways one after the other on this machine: one process with one torch thread, one
process with `--workers` threads, and `--workers` Ray workers with one thread each.
- search: the same depth search (the default model, a fixed seed); median seconds per generation (the first
  generation, which pays for the actors' start, is left out) and whether all three found the same profile
  (evopress/workers.py).
- build: the quantization level database of the main job (bits 2..5, group 64, act-order, 16 calibration rows);
  seconds per block = build wall time / blocks, Ray's start included, and whether all three wrote the same files
  (evopress/build_pool.py: the driver runs the forward passes and each block's calib_bits level; the workers
  compute the other bit-widths while the driver moves on).

    .venv/bin/python benchmarks/scaling.py --model data/model --data data/text [--parts search,build]

Writes benchmarks/results/scaling.json and scaling.md (a part not run keeps its earlier figures).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evopress.config import ComputeConfig, SearchConfig
from evopress.device import cpu_name
from evopress.stages import build_db, search

RESULTS = Path(__file__).parent / "results" / "scaling"
BUILD_OPTIONS = {"bits": [2, 3, 4, 5], "group_size": 64, "n_samples": 16, "act_order": True}


def ways(workers: int) -> list[tuple[str, int, int]]:
    """(name, Ray workers, torch threads of this process) of the three runs."""
    return [
        ("1 process, 1 thread", 1, 1),
        (f"1 process, {workers} threads", 1, workers),
        (f"{workers} Ray workers, 1 thread each", workers, 1),
    ]


def run_search(args, name: str, workers: int, threads: int, out: Path) -> dict:
    torch.set_num_threads(threads)
    compute = ComputeConfig(dtype="float32", batch_size=4, topk=512, workers=workers, threads=1)
    config = SearchConfig(
        generations=args.generations,
        offspring=args.offspring,
        survivors=(2, 1),
        tokens=(args.tokens, args.tokens * 2),
        seed=0,
        init="random",
        initially_generated=2,
        initial_tokens=args.tokens,
    )
    start = time.perf_counter()
    summary = search("depth", Path(args.model), Path(args.data), None, out, args.k, {}, config, compute)
    wall = time.perf_counter() - start
    with open(out / "history.csv") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    profile = json.loads((out / "profile.json").read_text())["units"]
    print(f"{name}: median {statistics.median(seconds[1:]):.1f} s/generation, wall {wall:.0f} s", flush=True)
    return {
        "name": name,
        "workers": workers,
        "threads": threads,
        "seconds": statistics.median(seconds[1:]),
        "wall_seconds": wall,
        "fitness": summary["fitness"],
        "result": profile,
    }


def run_build(args, name: str, workers: int, threads: int, out: Path) -> dict:
    torch.set_num_threads(threads)
    compute = ComputeConfig(workers=workers, threads=1)
    start = time.perf_counter()
    db = build_db("quantization", Path(args.model), Path(args.data), out, None, BUILD_OPTIONS, compute)
    wall = time.perf_counter() - start
    blocks = len({unit.split(".")[1] for unit in db.units()})
    print(f"{name}: {wall / blocks:.2f} s/block, wall {wall:.0f} s", flush=True)
    return {
        "name": name,
        "workers": workers,
        "threads": threads,
        "seconds": wall / blocks,
        "wall_seconds": wall,
        "blocks": blocks,
        "result": db.content_sha256(),
    }


PARTS = {"search": run_search, "build": run_build}


def summarize(rows: list[dict]) -> dict:
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = base / r["seconds"]
    return {"rows": rows, "identical": all(r["result"] == rows[0]["result"] for r in rows)}


def markdown(results: dict) -> str:
    lines = ["# Ray workers vs one process", "", f"float32; {results.get('cpu', '?')}.", ""]
    search_part, build_part = results.get("search"), results.get("build")
    if search_part:
        s = search_part["settings"]
        lines += [
            f"## Search: depth k={s['k']} of the default model, {s['generations']} generations of "
            f"{s['offspring']} offspring, selection on {s['tokens']} then {2 * s['tokens']} tokens",
            "",
            "| run | median s/generation | speed-up vs 1 thread |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {r['name']} | {r['seconds']:.1f} | {r['speedup']:.2f}x |" for r in search_part["rows"]]
        lines += ["", f"identical profiles and fitness in all three runs: {search_part['identical']}", ""]
    if build_part:
        lines += [
            f"## Database build: quantization {json.dumps(build_part['settings'])}, "
            f"{build_part['rows'][0]['blocks']} blocks",
            "",
            "| run | s/block (wall / blocks) | wall s | speed-up vs 1 thread |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['name']} | {r['seconds']:.2f} | {r['wall_seconds']:.0f} | {r['speedup']:.2f}x |"
            for r in build_part["rows"]
        ]
        lines += [
            "",
            f"identical database files (content sha256) in all three runs: {build_part['identical']}",
        ]
        lines += ["", "The Ray run's wall time includes starting Ray and its workers.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--data", default="data/text")
    ap.add_argument("--parts", default="search,build")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args()
    path = RESULTS.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results["cpu"] = cpu_name()
    settings = {
        "search": {
            "k": args.k,
            "generations": args.generations,
            "offspring": args.offspring,
            "tokens": args.tokens,
        },
        "build": BUILD_OPTIONS,
    }
    for part in args.parts.split(","):
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, workers, threads) in enumerate(ways(args.workers)):
                rows.append(PARTS[part](args, name, workers, threads, Path(tmp) / str(i)))
        results[part] = {**summarize(rows), "settings": settings[part]}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        RESULTS.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
