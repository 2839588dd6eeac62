"""Search scoring on Ray workers vs one process: median seconds per generation, speed-up, identical profiles.

Runs the same depth search (the default model, a fixed seed) three ways, one after the other on this machine:
one process with one torch thread, one process with `--workers` threads, and `--workers` Ray actors with one thread
each (evopress/workers.py); reports the median seconds per generation of each (the first generation, which pays for
the actors' start, is left out), the speed-up of the actors over one thread, and whether all three found the same
profile. Database builds are not split across workers yet, so no per-block figure is reported.

    .venv/bin/python benchmarks/scaling.py --model data/model --data data/text [--workers 2 --generations 6]

Writes benchmarks/results/scaling.json and scaling.md.
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
from evopress.stages import search

RESULTS = Path(__file__).parent / "results" / "scaling"


def run(args, name: str, workers: int, threads: int, out: Path) -> dict:
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
        "median_seconds_per_generation": statistics.median(seconds[1:]),
        "wall_seconds": wall,
        "fitness": summary["fitness"],
        "profile": profile,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--data", default="data/text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run(args, "1 process, 1 thread", 1, 1, Path(tmp) / "a"))
        rows.append(run(args, f"1 process, {args.workers} threads", 1, args.workers, Path(tmp) / "b"))
        rows.append(run(args, f"{args.workers} Ray actors, 1 thread each", args.workers, 1, Path(tmp) / "c"))
    base = rows[0]["median_seconds_per_generation"]
    same = all(r["profile"] == rows[0]["profile"] for r in rows)
    lines = [
        "# Search scoring on Ray workers",
        "",
        f"Depth search, k={args.k} of the default model, {args.generations} generations of {args.offspring} "
        f"offspring, selection on {args.tokens} then {2 * args.tokens} tokens, float32; {cpu_name()}.",
        "",
        "| run | median s/generation | speed-up vs 1 thread |",
        "| --- | --- | --- |",
    ]
    for r in rows:
        s = r["median_seconds_per_generation"]
        lines.append(f"| {r['name']} | {s:.1f} | {base / s:.2f}x |")
    lines += ["", f"identical profiles and fitness in all three runs: {same}", ""]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps({"rows": rows, "identical": same}, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
