"""Fitness throughput on the default model: tokens/s of a bare forward vs forward + KL (full, top-K).

Each round runs every variant once, side by side, so a noisy shared machine slows all of them alike; the
table reports the median over rounds and each variant's ratio to the bare forward of the same dtype.

    .venv/bin/python benchmarks/fitness_throughput.py [--model data/model] [--data data/text] [--rounds 5]

Prints a table and writes benchmarks/results/fitness_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.data import load_tokens
from evopress.fitness import DenseReference, mean_kl
from evopress.models import has_fast_bfloat16, load_model

RESULTS = Path(__file__).parent / "results" / "fitness_throughput.json"


def bare_forward(model, tokens: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            model(input_ids=batch, use_cache=False).logits.sum()  # .sum(): the logits are really produced


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(dtype: str, tokens: torch.Tensor, batch_size: int, rounds: int, model_dir: str) -> list[dict]:
    model, _ = load_model(model_dir, dtype=dtype)
    adapter = ModelAdapter(model)
    refs = {
        "forward + full KL": DenseReference.build(adapter, tokens, topk=None, batch_size=batch_size),
        "forward + top-512 KL": DenseReference.build(adapter, tokens, topk=512, batch_size=batch_size),
    }
    variants = {"bare forward": lambda: bare_forward(model, tokens, batch_size)}
    for name, ref in refs.items():
        variants[name] = lambda ref=ref: mean_kl(adapter, tokens, ref, batch_size=batch_size)
    for fn in variants.values():  # warm-up
        fn()
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            seconds[name].append(timed(fn))
    n = tokens.numel()
    bare = n / statistics.median(seconds["bare forward"])
    rows = []
    for name, secs in seconds.items():
        tps = n / statistics.median(secs)
        rows.append(
            {
                "dtype": dtype,
                "variant": name,
                "tokens_per_s": round(tps, 1),
                "ratio_to_bare": round(tps / bare, 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/model")
    parser.add_argument("--data", default="data/text")
    parser.add_argument("--sequences", type=int, default=8, help="calibration sequences per measurement")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated; rows of other dtypes in the "
        "results file are kept, so a slow dtype can be measured in a separate, smaller run",
    )
    args = parser.parse_args()

    tokens = load_tokens(Path(args.data), "calibration")[: args.sequences]
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bfloat16: {has_fast_bfloat16()}")
    rows = []
    for dtype in args.dtypes.split(","):
        rows += [
            dict(r, sequences=tokens.shape[0], rounds=args.rounds)
            for r in measure(dtype, tokens, args.batch_size, args.rounds, args.model)
        ]
    if RESULTS.exists():  # keep earlier rows of the dtypes not measured now
        rows = [
            r for r in json.loads(RESULTS.read_text())["rows"] if r["dtype"] not in args.dtypes.split(",")
        ] + rows

    print(
        f"sequences of {tokens.shape[1]} tokens, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        "median over rounds"
    )
    print(f"| {'dtype':9} | {'variant':22} | {'tokens/s':>9} | {'vs bare':>7} | seqs x rounds |")
    print(f"|{'-' * 11}|{'-' * 24}|{'-' * 11}|{'-' * 9}|---------------|")
    for r in rows:
        print(
            f"| {r['dtype']:9} | {r['variant']:22} | {r['tokens_per_s']:9.1f} | {r['ratio_to_bare']:7.3f} "
            f"| {r['sequences']:>4} x {r['rounds']:<6} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "seq_len": tokens.shape[1],
                "batch_size": args.batch_size,
                "native_bfloat16": has_fast_bfloat16(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
