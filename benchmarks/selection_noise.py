"""How noisy is selection on a few calibration sequences? The paper's open question (rank stability of candidates
between small and large token samples), measured on the depth search of the default model.

    .venv/bin/python benchmarks/selection_noise.py [--children 12] [--granularity block --k 12 --parent shortened_ppl]

1. Rank stability. Children of one parent (level-switch mutation, as the search makes them) are scored on every
   calibration row once. Any sample of whole rows then has an exact score (the mean of its rows), so for samples of
   1, 2, 4 and 8 rows we report, over many random samples: Spearman correlation with the full-set ranking, how often
   the sample's best candidate is the full set's best, and how often a child that is worse than the parent on the full
   set beats it on the sample (a false replacement in the last selection step).
2. Drift. For every EvoPress cell of benchmarks/results/depth_quality.json: KL on all calibration rows of the profile
   the search started from and of the one it ended at, next to their held-out perplexities.

Reads the model and data of the pipeline (data/model, data/text) and the cached dense reference of depth_quality.py.
Writes benchmarks/results/selection_noise.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
from depth_quality import OUT_JSON as DEPTH_JSON
from depth_quality import cached_context

from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make
from evopress.data import load_tokens
from evopress.fitness import mean_kl
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model
from evopress.search import make_offspring

RESULTS = Path("benchmarks/results")


def row_kls(ctx, comp, profile) -> list[float]:
    """KL of `profile` on every calibration row, one row at a time."""
    comp.apply_profile(profile)
    kls = [mean_kl(ctx.adapter, ctx.tokens, ctx.ref, torch.tensor([r])) for r in range(len(ctx.tokens))]
    ctx.adapter.restore_all()
    return kls


def ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0] * len(values)
    for rank, i in enumerate(order):
        out[i] = rank
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def rank_stability(
    parent_rows: list[float], child_rows: list[list[float]], draws: int, seed: int
) -> list[dict]:
    n_rows = len(parent_rows)
    full = [statistics.fmean(r) for r in child_rows]
    parent_full = statistics.fmean(parent_rows)
    worse = [i for i, f in enumerate(full) if f > parent_full]
    candidates = [*child_rows, parent_rows]  # the last step: the children and the parent
    best_full = min(range(len(candidates)), key=lambda i: statistics.fmean(candidates[i]))
    rng = random.Random(seed)
    out = []
    for size in (1, 2, 4, 8, n_rows):
        rhos, best_hits, false_wins = [], 0, 0
        for _ in range(draws):
            rows = rng.sample(range(n_rows), size)
            sample = [statistics.fmean(c[r] for r in rows) for c in candidates]
            rhos.append(spearman(sample[:-1], full))
            best_hits += min(range(len(sample)), key=sample.__getitem__) == best_full
            false_wins += sum(sample[i] <= sample[-1] for i in worse)
        out.append(
            {
                "rows": size,
                "tokens": size * 512,
                "median_spearman": statistics.median(rhos),
                "best_is_full_best": best_hits / draws,
                "false_replacement": false_wins / (draws * len(worse)) if worse else None,
            }
        )
    return out


def drift(ctx, adapter, cells: dict) -> list[dict]:
    out = []
    for key, cell in sorted(cells.items()):
        if not key.startswith("evopress_") or "initial_source" not in cell:
            continue
        gran, k = key.split("/")[0].removeprefix("evopress_"), int(key.split("/k")[1])
        start = cells.get(f"{cell['initial_source']}/k{k}")
        if start is None:  # a random start: nothing stored to compare with
            continue
        comp = make(adapter, k, options={"granularity": gran})
        kl_start = statistics.fmean(row_kls(ctx, comp, comp.profile_from_blocks(start["removed"]["block"])))
        kl_end = statistics.fmean(row_kls(ctx, comp, comp.profile_from_blocks(cell["removed"])))
        out.append(
            {
                "search": key,
                "start": cell["initial_source"],
                "start_full_kl": kl_start,
                "end_full_kl": kl_end,
                "start_ppl": start["perplexity"],
                "end_ppl": cell["perplexity"],
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def markdown(res: dict) -> str:
    p = res["parent"]
    lines = [
        f"Rank stability: {res['children']} children of {p['name']} ({p['granularity']}, k={p['k']}), "
        f"{res['draws']} random samples per size; parent KL on all rows {p['full_kl']:.4f}, "
        f"{res['worse_children']} children worse than it",
        "",
        "| sample | median Spearman vs all rows | sample best = full best | worse child beats parent |",
        "| --- | --- | --- | --- |",
    ]
    for r in res["stability"]:
        fr = "-" if r["false_replacement"] is None else f"{r['false_replacement']:.2f}"
        lines.append(
            f"| {r['rows']} rows ({r['tokens']} tokens) | {r['median_spearman']:.2f} | "
            f"{r['best_is_full_best']:.2f} | {fr} |"
        )
    lines += [
        "",
        "| search | started from | start KL (all rows) | end KL (all rows) | start ppl | end ppl |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in res["drift"]:
        lines.append(
            f"| {d['search']} | {d['start']} | {d['start_full_kl']:.4f} | {d['end_full_kl']:.4f} | "
            f"{d['start_ppl']:.2f} | {d['end_ppl']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--data", default="data/text")
    ap.add_argument("--calibration-rows", type=int, default=16)
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--parent", default="shortened_ppl", help="a baseline cell of depth_quality.json")
    ap.add_argument("--children", type=int, default=12)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cells = json.loads(DEPTH_JSON.read_text())["cells"]
    model, _ = load_model(args.model, dtype="auto")
    adapter = ModelAdapter(model)
    calibration = load_tokens(args.data, "calibration")[: args.calibration_rows]
    args.dtype = "auto"
    ctx = cached_context(adapter, calibration, args)

    comp = make(adapter, args.k, options={"granularity": args.granularity})
    parent = comp.profile_from_blocks(cells[f"{args.parent}/k{args.k}"]["removed"]["block"])
    children = make_offspring(comp, parent, args.children, random.Random(0), max_steps=3)
    parent_rows = row_kls(ctx, comp, parent)
    child_rows = [row_kls(ctx, comp, c) for c in children]
    full = [statistics.fmean(r) for r in child_rows]
    res = {
        "parent": {"name": args.parent, "granularity": args.granularity, "k": args.k},
        "children": len(children),
        "draws": args.draws,
        "worse_children": sum(f > statistics.fmean(parent_rows) for f in full),
        "stability": rank_stability(parent_rows, child_rows, args.draws, seed=0),
    }
    res["parent"]["full_kl"] = statistics.fmean(parent_rows)
    print(json.dumps(res["stability"]), flush=True)
    res["drift"] = drift(ctx, adapter, cells)
    atomic_write_json(RESULTS / "selection_noise.json", res)
    atomic_write_text(RESULTS / "selection_noise.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
