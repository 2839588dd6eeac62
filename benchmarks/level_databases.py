"""Level databases plain vs compact: bytes per parameter per level, and the search's level-swap time.

For each database given (a quantization and/or a sparsity database of the same prepared model, in either
encoding), the other encoding is made with `evopress.database.recode` (resumable, in --work), then:
- bytes on disk per parameter of the units, per level, plain and compact;
- level-swap time: the seconds of `compressor.apply(unit, level)` (load from the database, decode, dequantize,
  copy into the model), the search's only contact with the database, over the same random (unit, level)
  sequence for both encodings, side by side in every round; "warm" with every file in the in-memory cache,
  "cold" with no cache (every swap reads its file; the OS page cache may still hold it). Median over rounds.

    .venv/bin/python benchmarks/level_databases.py --model data/model \\
        --db data/db/quantization --db data/db/sparsity [--swaps 200 --rounds 3 --work /tmp/evopress-dbs]

Prints a table and writes benchmarks/results/level_databases.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.database import LevelDatabase, recode
from evopress.device import cpu_name
from evopress.methods import make_compressor
from evopress.models import load_model

RESULTS = Path(__file__).parent / "results" / "level_databases"


def both_encodings(db_dir: Path, work: Path) -> dict[str, Path]:
    """{encoding: folder} for `db_dir` and its recoded copy."""
    have = LevelDatabase.open(db_dir).encoding
    other = "compact" if have == "plain" else "plain"
    copy = work / f"{db_dir.name}-{other}"
    start = time.perf_counter()
    recode(db_dir, copy, other)
    print(f"{db_dir} ({have}) -> {copy} ({other}) in {time.perf_counter() - start:.1f} s")
    return {have: db_dir, other: copy}


def params_of(db: LevelDatabase, unit: str) -> int:
    shapes = db.shapes(unit)
    rows, cols = shapes.get("weight") or shapes["codes"]
    return rows * cols


def bytes_per_param(db: LevelDatabase) -> dict[int, float]:
    """level -> bytes on disk per parameter of the units that have it."""
    size: dict[int, int] = {}
    params: dict[int, int] = {}
    for unit, level in db.pairs():
        size[level] = size.get(level, 0) + db.manifest["files"][db.key(unit, level)]["size"]
        params[level] = params.get(level, 0) + params_of(db, unit)
    return {level: size[level] / params[level] for level in sorted(size)}


def compressor_for(adapter: ModelAdapter, db: LevelDatabase):
    target = db.params.get(
        "target", 3.0
    )  # quantization: any target inside the grid; levels do not depend on it
    return make_compressor(db.method, adapter, target, db=db, options={})


def swap_sequence(db: LevelDatabase, swaps: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    pairs = db.pairs()
    return [pairs[rng.randrange(len(pairs))] for _ in range(swaps)]


def time_swaps(comp, sequence: list[tuple[str, int]]) -> float:
    """Median seconds of one apply over the sequence."""
    seconds = []
    for unit, level in sequence:
        start = time.perf_counter()
        comp.apply(unit, level)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def forward_ms(model, rounds: int, seq_len: int = 512) -> float:
    """Median ms of one bare forward over one row of `seq_len` tokens: the smallest unit of fitness work, for scale."""
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    seconds = []
    with torch.no_grad():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False).logits.sum()
            seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds[1:])


def measure(model_dir: str, folders: dict[str, Path], swaps: int, rounds: int, seed: int) -> dict:
    model, _ = load_model(model_dir, dtype="float32")
    adapter = ModelAdapter(model)
    dbs = {enc: LevelDatabase.open(path) for enc, path in folders.items()}
    sequence = swap_sequence(dbs["plain"], swaps, seed)
    warm = {
        enc: compressor_for(adapter, LevelDatabase.open(path, cache_bytes=8 << 30))
        for enc, path in folders.items()
    }
    cold = {
        enc: compressor_for(adapter, LevelDatabase.open(path, cache_bytes=0)) for enc, path in folders.items()
    }
    for comp in [
        *warm.values(),
        *cold.values(),
    ]:  # warm-up: fills the warm caches, verifies every checksum once
        for unit, level in dict.fromkeys(sequence):
            comp.apply(unit, level)
    times = {(kind, enc): [] for kind in ("warm", "cold") for enc in folders}
    for _ in range(rounds):
        for kind, comps in (("warm", warm), ("cold", cold)):
            for enc, comp in comps.items():
                times[(kind, enc)].append(time_swaps(comp, sequence))
    per_level = {enc: bytes_per_param(db) for enc, db in dbs.items()}
    forward = forward_ms(model, rounds)
    return {
        "method": dbs["plain"].method,
        "params": dbs["plain"].params,
        "files": len(dbs["plain"].pairs()),
        "bytes": {enc: db.size_on_disk() for enc, db in dbs.items()},
        "bytes_per_param": {
            enc: {str(k): round(v, 4) for k, v in lv.items()} for enc, lv in per_level.items()
        },
        "swap_ms": {
            f"{kind}.{enc}": round(1e3 * statistics.median(t), 3) for (kind, enc), t in times.items()
        },
        "forward_ms_1x512": round(forward, 1),
        "swaps": swaps,
        "rounds": rounds,
    }


def markdown(results: list[dict], info: dict) -> list[str]:
    lines = ["# Level databases: plain vs compact", ""]
    lines += [
        "Bytes on disk per parameter of the database's units, per level (plain: GPTQ codes in a byte each, sparse "
        "weights with their zeros; compact: evopress/level_codecs.py), and the median time of one level swap "
        "(`compressor.apply`: load, decode, dequantize, copy into the model) over the same random swaps.",
        "",
        "| method | level | plain B/param | compact B/param | compact / plain |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for level, plain in r["bytes_per_param"]["plain"].items():
            compact = r["bytes_per_param"]["compact"][level]
            lines.append(f"| {r['method']} | {level} | {plain:.4f} | {compact:.4f} | {compact / plain:.3f} |")
        plain, compact = r["bytes"]["plain"], r["bytes"]["compact"]
        lines.append(
            f"| {r['method']} | all ({r['files']} files) | {plain / 1e6:.1f} MB | {compact / 1e6:.1f} MB "
            f"| {compact / plain:.3f} |"
        )
    lines += [
        "",
        "| method | cache | plain ms/swap | compact ms/swap | compact / plain |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for kind in ("warm", "cold"):
            plain, compact = r["swap_ms"][f"{kind}.plain"], r["swap_ms"][f"{kind}.compact"]
            lines.append(f"| {r['method']} | {kind} | {plain:.2f} | {compact:.2f} | {compact / plain:.2f} |")
    r = results[0]
    lines += [
        "",
        f"For scale: one bare forward of the model over one row of 512 tokens took {r['forward_ms_1x512']:.0f} ms "
        "in the same run; a search generation runs several such rows per candidate and swaps a few units.",
        "",
        f"{r['swaps']} random swaps x {r['rounds']} rounds, median; float32 model; {info['cpu']}, "
        f"{info['threads']} threads, torch {info['torch']}.",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--db", action="append", required=True, help="a level database (repeatable)")
    ap.add_argument("--work", default="/tmp/evopress-dbs", help="where the recoded copies go")
    ap.add_argument("--swaps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    results = []
    for db in args.db:
        folders = both_encodings(Path(db), Path(args.work))
        results.append(measure(args.model, folders, args.swaps, args.rounds, args.seed))
    lines = markdown(results, info)
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {RESULTS}.json and .md")


if __name__ == "__main__":
    main()
