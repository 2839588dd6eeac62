"""Depth pruning as delivered: bytes on disk and forward tokens/s of the stitched folders vs the dense model.

The profiles are the searched ones of benchmarks/results/depth_quality.json (EvoPress, sublayer and block
granularity, k removed blocks' worth); each is stitched by `evopress stitch`'s code and loaded the way a user
would: the sublayer folder (DeciLM block_configs) with `evopress.load_model`, the block folder with stock
`transformers.AutoModelForCausalLM`. Each round times every model once, side by side, so a noisy shared machine
slows all alike; the table reports medians over rounds and each model's median per-round ratio to dense.

    .venv/bin/python benchmarks/depth_speed.py [--model data/model] [--k 8] [--rounds 7] [--dtype float32]

The model folder is prepared from the embedded default (`evopress prepare-model`) when it is missing.
Prints a table and writes benchmarks/results/depth_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import evopress
from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make, stitch
from evopress.device import cpu_name
from evopress.evaluate import timed_forwards
from evopress.models import load_model, parse_dtype
from evopress.profile import make_profile

RESULTS = Path(__file__).parent / "results" / "depth_speed.json"
QUALITY = Path(__file__).parent / "results" / "depth_quality.json"
PROFILES = {"sublayer": "evopress_sublayer", "block": "evopress_block"}


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def stitch_searched(model_dir: Path, granularity: str, k: int, out: Path) -> dict:
    """Stitch the searched profile of depth_quality.json (removed blocks per kind) into `out`."""
    removed = json.loads(QUALITY.read_text())["cells"][f"{PROFILES[granularity]}/k{k}"]["removed"]
    model, _ = load_model(str(model_dir))
    comp = make(ModelAdapter(model), k, options={"granularity": granularity})
    units = comp.profile_from_blocks(removed)
    report = stitch(
        model_dir, make_profile(comp, units, target=k, source=f"depth_quality:{granularity}"), None, out
    )
    return {**report, "removed": removed}


def load_models(model_dir: Path, folders: dict[str, Path], dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    models = {"dense": load_model(str(model_dir), dtype=dtype)[0]}
    models["sublayer"] = evopress.load_model(folders["sublayer"], dtype=dtype)
    stock = AutoModelForCausalLM.from_pretrained(
        folders["block"], dtype=parse_dtype(dtype), attn_implementation="sdpa"
    )
    models["block"] = stock.eval()
    return models


def ensure_model(model_dir: Path) -> None:
    if not (model_dir / "config.json").exists():
        from evopress.stages import prepare_model

        prepare_model("embedded:smollm2-135m", model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="data/model", type=Path)
    ap.add_argument("--k", type=int, default=8, help="blocks' worth removed (a k of depth_quality.json)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_model(args.model)
    tokens = torch.randint(0, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {g: Path(tmp) / g for g in PROFILES}
        reports = {g: stitch_searched(args.model, g, args.k, folders[g]) for g in PROFILES}
        sizes = {"dense": weights_bytes(args.model), **{g: weights_bytes(f) for g, f in folders.items()}}
        models = load_models(args.model, folders, args.dtype)
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
        seconds = timed_forwards(models, tokens, args.rounds)
    n = tokens.numel()
    rows = []
    for name, secs in seconds.items():
        ratios = [
            d / s for d, s in zip(seconds["dense"], secs, strict=True)
        ]  # per round: dense time / this time
        rows.append(
            {
                "model": name,
                "layout": "dense" if name == "dense" else reports[name]["layout"],
                "loader": {"dense": "evopress.load_model", "sublayer": "evopress.load_model"}.get(
                    name, "transformers.AutoModelForCausalLM"
                ),
                "weights_bytes": sizes[name],
                "bytes_vs_dense": sizes[name] / sizes["dense"],
                "parameters": params[name],
                "median_tokens_per_s": n / statistics.median(secs),
                "median_speedup_vs_dense": statistics.median(ratios),
            }
        )
    result = {
        "k": args.k,
        "removed": {g: r["removed"] for g, r in reports.items()},
        "dtype": args.dtype,
        "cpu": cpu_name(),
        "threads": args.threads,
        "tokens_per_forward": [args.batch, args.seq_len],
        "rounds": args.rounds,
        "rows": rows,
        "seconds": seconds,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(
        f"k={args.k}, {args.dtype}, {result['cpu']}, {args.threads} thread(s), {args.batch}x{args.seq_len} tokens"
    )
    print(
        "| model | layout | loader | weights MB | vs dense | tokens/s (median) | speed-up vs dense (median) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['layout']} | {r['loader']} | {r['weights_bytes'] / 1e6:.1f} | "
            f"{r['bytes_vs_dense']:.3f} | {r['median_tokens_per_s']:.0f} | {r['median_speedup_vs_dense']:.3f}x |"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
