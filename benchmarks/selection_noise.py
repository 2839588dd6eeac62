"""How noisy is selection on a few calibration sequences? The paper's open question (rank stability of candidates
between small and large token samples), measured on the depth search and on one sparsity level of the default model.

    .venv/bin/python benchmarks/selection_noise.py [--parts stability,drift] [--methods depth,sparsity]

1. Rank stability, per method of --methods. Children of one parent (level-switch mutation, as the search makes them)
   are scored on every calibration row once. Any sample of whole rows then has an exact score (the mean of its
   rows), so for samples of 1, 2, 4 and 8 rows we report, over many random samples: Spearman correlation with the
   full-set ranking, how often the sample's best candidate is the full set's best, and how often a child that is
   worse than the parent on the full set beats it on the sample (a false replacement in the last selection step).
   depth: the parent is a baseline's profile at --k (a cell of depth_quality.json); sparsity: the uniform profile
   at --sparsity-target (60%), from the inputs=dense level database of sparsity_quality.py (the same folder: built
   here the same way when that script has not built it yet), scored on the --calibration-rows rows after the
   database's n_samples (as sparsity_quality.py's searches: not the rows SparseGPT fitted its levels to).
2. Drift. For every EvoPress cell of benchmarks/results/depth_quality.json: KL on all calibration rows of the profile
   the search started from and of the one it ended at, next to their held-out perplexities.
3. Held-out check at the levels of --heldout-ks (not a default part: the depth table itself now reports perplexity
   and KL to dense on 32 held-out rows): every row of the depth table re-measured on --heldout-rows rows.

Calibrates on the data of the quality scripts (--calibration, default the pydoc + stdlib-docstrings mix; see
benchmarks/quality_common.py) and reuses depth_quality.py's cached dense reference.
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
from depth_quality import cached_context, runs_dir
from quality_common import BUILTIN_MIX, HELDOUT_ROWS, calibration_data
from sparsity_quality import DB_OPTIONS

from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make
from evopress.data import load_tokens
from evopress.fitness import DenseReference, mean_kl, perplexity_and_kl
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model
from evopress.scoring import FitnessContext
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
    if n < 2:
        return float("nan")  # a single child has no ranking to agree with
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
    for size in sorted({s for s in (1, 2, 4, 8) if s < n_rows} | {n_rows}):
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
                "median_spearman": statistics.median(rhos) if len(full) > 1 else None,
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
                "tokens": cell["config"]["tokens"],
                "generations": cell["config"]["generations"],
                "start": cell["initial_source"],
                "start_full_kl": kl_start,
                "end_full_kl": kl_end,
                "start_ppl": start["perplexity"],
                "end_ppl": cell["perplexity"],
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def heldout_table(adapter, heldout, cells: dict, ks: list[int]) -> list[dict]:
    """Every row of the depth table at the levels `ks`, re-measured on `heldout` (more rows than the table's)."""
    ref = DenseReference.build(adapter, heldout, 512)
    ppl, kl = perplexity_and_kl(adapter, heldout, ref)
    out = [
        {
            "cell": "dense",
            "k": 0,
            "heldout_kl": kl,
            "perplexity": ppl,
            "table_perplexity": cells["dense"]["perplexity"],
        }
    ]
    for k in ks:
        for key, cell in sorted(cells.items()):
            if not key.endswith(f"/k{k}") or "removed" not in cell:
                continue
            gran = "block" if "block" in cell["removed"] else "sublayer"  # random's profile is sublayers
            comp = make(adapter, k, options={"granularity": gran})
            comp.apply_profile(comp.profile_from_blocks(cell["removed"]))
            ppl, kl = perplexity_and_kl(adapter, heldout, ref)
            adapter.restore_all()
            out.append(
                {
                    "cell": key,
                    "k": k,
                    "heldout_kl": kl,
                    "perplexity": ppl,
                    "table_perplexity": cell["perplexity"],
                }
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def stability(ctx, comp, parent, parent_info: dict, args) -> dict:
    """Rank stability of `parent`'s children (made as the search makes them) on samples of calibration rows."""
    children = make_offspring(comp, parent, args.children, random.Random(0), max_steps=3)
    parent_rows = row_kls(ctx, comp, parent)
    child_rows = [row_kls(ctx, comp, c) for c in children]
    parent_kl = statistics.fmean(parent_rows)
    return {
        "parent": {**parent_info, "full_kl": parent_kl},
        "children": len(children),
        "draws": args.draws,
        "calibration_rows": len(ctx.tokens),
        "calibration": args.calibration_description,
        "worse_children": sum(statistics.fmean(r) > parent_kl for r in child_rows),
        "stability": rank_stability(parent_rows, child_rows, args.draws, seed=0),
    }


def depth_stability(ctx, adapter, cells: dict, args) -> dict:
    comp = make(adapter, args.k, options={"granularity": args.granularity})
    parent = comp.profile_from_blocks(cells[f"{args.parent}/k{args.k}"]["removed"]["block"])
    return stability(
        ctx, comp, parent, {"name": args.parent, "level": f"k={args.k} ({args.granularity})"}, args
    )


def sparsity_stability(ctx, adapter, data, args) -> dict:
    """Children of the uniform profile at the target, from sparsity_quality.py's database (dense weights back
    after: the other parts prune blocks of the dense model)."""
    from sparsity_quality import db_root, open_database

    from evopress.compressors.sparsity import make as make_sparsity

    root = args.db_root or db_root(args.bench_data, data)
    options = {"num_levels": args.num_levels, "n_samples": args.n_samples}  # must match the built database's
    db_dir, _ = open_database(args.model, data.folder, root, args.sparsity_target, options)
    dense = {
        (i, n): lin.weight.detach().clone()
        for i in range(adapter.num_blocks)
        for n, lin in adapter.linears(i).items()
    }
    # Score the rows after the database's n_samples, as sparsity_quality.py's searches do: SparseGPT fitted its
    # levels to its own rows, which would flatter every candidate there (context built while the model is dense).
    first = args.n_samples
    tokens = load_tokens(data.folder, "calibration")[first : first + args.calibration_rows]
    ctx = FitnessContext.build(adapter, tokens, topk=512)
    comp = make_sparsity(adapter, args.sparsity_target, db=db_dir)
    try:
        info = {"name": "uniform", "level": f"{args.sparsity_target:.0%} (database inputs=dense)"}
        rows = (
            f"{data.description}, rows {first}..{first + len(tokens) - 1} (the database's are 0..{first - 1})"
        )
        return {**stability(ctx, comp, comp.initial_profile(), info, args), "calibration": rows}
    finally:
        with torch.no_grad():
            for (i, n), w in dense.items():
                adapter.linear(i, n).weight.copy_(w)


def legacy_stability(res: dict) -> dict:
    """Results written before the stability part had methods: one depth entry at the top level."""
    if not isinstance(res.get("stability"), list):
        return res.get("stability", {})
    old = {k: res.pop(k) for k in ("parent", "children", "draws", "worse_children") if k in res}
    parent = old.get("parent", {})
    parent.setdefault("level", f"k={parent.pop('k', '?')} ({parent.pop('granularity', '?')})")
    rows = res["stability"][-1]["rows"]  # the last sample size was every calibration row
    return {"depth": {**old, "parent": parent, "calibration_rows": rows, "stability": res["stability"]}}


def stability_lines(stab: dict) -> list[str]:
    """One table, a row per method and sample size; under it, per method, its parent and children."""
    lines = [
        "| method | parent | sample | median Spearman vs all rows | sample best = full best "
        "| worse child beats parent |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for method, m in stab.items():
        p = m["parent"]
        for r in m["stability"]:
            fr = "-" if r["false_replacement"] is None else f"{r['false_replacement']:.2f}"
            rho = "-" if r["median_spearman"] is None else f"{r['median_spearman']:.2f}"
            lines.append(
                f"| {method} | {p['name']}, {p['level']} | {r['rows']} rows ({r['tokens']} tokens) | "
                f"{rho} | {r['best_is_full_best']:.2f} | {fr} |"
            )
        notes.append(
            f"- {method}: {m['children']} children of {p['name']} at {p['level']}, {m['draws']} random samples "
            f"per size; parent KL on all {m.get('calibration_rows', '?')} rows {p['full_kl']:.4f}, "
            f"{m['worse_children']} children worse than it; calibration {m.get('calibration', 'data/text')}"
        )
    return [*lines, "", *notes]


def markdown(res: dict) -> str:
    lines = ["Rank stability of the selection:", "", *stability_lines(res.get("stability", {}))]
    if res.get("calibration"):
        lines += ["", f"drift measured on calibration {res['calibration']}"]
    lines += [
        "",
        "| search | generations | tokens per step | started from | start KL (all rows) | end KL (all rows) "
        "| start ppl | end ppl |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in res.get("drift", []):
        lines.append(
            f"| {d['search']} | {d['generations']} | {','.join(map(str, d['tokens']))} | {d['start']} | "
            f"{d['start_full_kl']:.4f} | {d['end_full_kl']:.4f} | "
            f"{d['start_ppl']:.2f} | {d['end_ppl']:.2f} |"
        )
    if res.get("heldout"):
        lines += [
            "",
            f"Held-out, {res['heldout_rows']} rows x 512 tokens:",
            "",
            "| row | held-out KL to dense | perplexity | table perplexity |",
            "| --- | --- | --- | --- |",
        ]
        for h in sorted(res["heldout"], key=lambda h: (h["k"], h["heldout_kl"])):
            lines.append(
                f"| {h['cell']} | {h['heldout_kl']:.4f} | {h['perplexity']:.2f} | {h['table_perplexity']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model")
    ap.add_argument(
        "--calibration",
        "--data",
        dest="calibration",
        default=json.dumps(BUILTIN_MIX),
        help="as the quality scripts: a prepared folder, a source or a json mix (prepared under --bench-data)",
    )
    ap.add_argument("--bench-data", default="data/benchmarks")
    ap.add_argument(
        "--depth-json", default=str(DEPTH_JSON), help="depth_quality.py's results (parents, drift)"
    )
    ap.add_argument("--calibration-rows", type=int, default=16)
    ap.add_argument("--methods", default="depth,sparsity", help="methods of the rank-stability part")
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--parent", default="shortened_ppl", help="a baseline cell of depth_quality.json")
    ap.add_argument("--sparsity-target", type=float, default=0.6)
    ap.add_argument("--db-root", default="", help="sparsity databases ('' = sparsity_quality.py's folder)")
    ap.add_argument("--num-levels", type=int, default=DB_OPTIONS["num_levels"], help="as sparsity_quality.py")
    ap.add_argument("--n-samples", type=int, default=DB_OPTIONS["n_samples"], help="as sparsity_quality.py")
    ap.add_argument("--children", type=int, default=12)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--heldout-ks", default="4", help="levels whose rows get a held-out KL ('' = none)")
    ap.add_argument("--heldout-rows", type=int, default=HELDOUT_ROWS)
    ap.add_argument("--out", default=str(RESULTS / "selection_noise.json"))
    ap.add_argument(
        "--parts",
        default="stability,drift",
        help="parts to measure (stability, drift, heldout); others are kept",
    )
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = calibration_data(args.calibration, args.model, args.bench_data, args.heldout_rows)
    args.runs = runs_dir(args.bench_data, data)  # depth_quality.py's cached dense reference
    depth_json = Path(args.depth_json)
    cells = json.loads(depth_json.read_text())["cells"] if depth_json.exists() else {}
    model, _ = load_model(args.model, dtype=args.dtype)
    adapter = ModelAdapter(model)
    calibration = load_tokens(data.folder, "calibration")[: args.calibration_rows]
    ctx = cached_context(adapter, calibration, args)

    parts, methods = args.parts.split(","), args.methods.split(",")
    out_json = Path(args.out)
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    res["stability"] = legacy_stability(res)
    args.calibration_description = f"{data.description}, {len(calibration)} rows"
    if "stability" in parts:
        if "depth" in methods:
            res["stability"]["depth"] = depth_stability(ctx, adapter, cells, args)
            print(json.dumps(res["stability"]["depth"]["stability"]), flush=True)
        if "sparsity" in methods:
            res["stability"]["sparsity"] = sparsity_stability(ctx, adapter, data, args)
            print(json.dumps(res["stability"]["sparsity"]["stability"]), flush=True)
    if "drift" in parts:
        new = drift(ctx, adapter, cells)  # earlier searches of other settings stay in the table
        done = {(d["search"], tuple(d["tokens"]), d["generations"]) for d in new}
        old = [
            d for d in res.get("drift", []) if (d["search"], tuple(d["tokens"]), d["generations"]) not in done
        ]
        res["drift"] = old + new
        res["calibration"] = args.calibration_description
    if "heldout" in parts:
        heldout = load_tokens(data.folder, "heldout")[: args.heldout_rows]
        res["heldout_rows"] = len(heldout)
        res["heldout"] = heldout_table(
            adapter, heldout, cells, [int(k) for k in args.heldout_ks.split(",") if k]
        )
    atomic_write_json(out_json, res)
    atomic_write_text(out_json.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
