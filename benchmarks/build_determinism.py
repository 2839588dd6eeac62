"""Are level-database builds reproducible bit for bit? Per method (sparsity, quantization) and tiny model width:

- repeat: the same build twice in one process;
- threads: the same build in fresh processes with 1 and with N threads (torch.set_num_threads, OMP/MKL_NUM_THREADS);
- batch_size: the same build with batch_size 8 and 2 (left out of the database's build_params);

each as files with the same sha256 (manifest["files"]), and where they differ: max |w - w'| of the (dequantized)
weights, GPTQ codes / scales / zero points that differ, SparseGPT mask entries that differ.

    .venv/bin/python benchmarks/build_determinism.py [--hidden 64,128,256] [--threads 1,2]
        [--accumulate current,batched]

Hessian accumulations (`--accumulate`): `current` is evopress/hessians.py as it is (one float32 X^T X per
calibration sequence, summed in float64 in sequence order: no arithmetic depends on the batch split); `batched`
patches HessianAccumulator.add in the build processes (nothing under evopress/ is edited) back to the arithmetic
before that fix, one float32 X^T X per batch, to show the batch_size dependence the fix removed. Also reports,
per accumulation, the relative difference of H for one batch of 8 rows vs 4 batches of 2, and times both at the
default model's widths (576, 1536; a batch of 8 x 512 tokens). Tiny random Llamas only (2 blocks,
tests/conftest.py); a few minutes on 2 cores. Writes benchmarks/results/build_determinism.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "benchmarks" / "results" / "build_determinism.json"
OPTIONS = {
    "sparsity": {"target": 0.5, "num_levels": 2, "n_samples": 8, "batch_size": 8},
    "quantization": {"bits": [2, 3, 4], "group_size": 16, "n_samples": 8, "batch_size": 8},
}
ACCUMULATE = ("current", "batched")

# The build process: argv = threads, accumulate, json list of [workspace, method, out_dir, options].
CHILD = r"""
import json, sys, time
import torch
threads, accumulate, builds = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(threads)
from pathlib import Path
from evopress.compressors import quantization, sparsity
from evopress.hessians import HessianAccumulator

def batched_add(self, x):  # before the fix: one float32 product per batch, rounding depends on the batch split
    x = x.reshape(-1, x.shape[-1]).float()
    self.xtx += (x.T @ x).double()
    self.tokens += x.shape[0]

if accumulate == "batched":  # the class attribute: every builder (GPTQ, SparseGPT) sees the patch
    HessianAccumulator.add = batched_add
seconds = {}
for ws, method, out, options in builds:
    module = sparsity if method == "sparsity" else quantization
    start = time.perf_counter()
    module.build_database(Path(ws) / "model", Path(ws) / "text", Path(out), options)
    seconds[out] = time.perf_counter() - start
print(json.dumps({"threads": torch.get_num_threads(), "seconds": seconds}))
"""


def make_workspace(root: Path, hidden: int) -> Path:
    """tests/conftest.py's tiny Llama (2 blocks) at `hidden`, and 8 calibration rows (32 tokens at hidden 64,
    as prepare_tiny_workspace; 64 tokens above, so the GEMMs are big enough for threads to split them)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import prepare_tiny_workspace

    root.mkdir(parents=True)
    return prepare_tiny_workspace(root, hidden=hidden, seq_len=32 if hidden == 64 else 64)


def run_builds(threads: int, accumulate: str, builds: list, cwd: Path) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "MKL_DYNAMIC": "FALSE",
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), accumulate, json.dumps(builds)],
        cwd=cwd,  # `-c` puts the cwd first on sys.path: not the repo root, so PYTHONPATH can point elsewhere
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["threads"] == threads, report
    return report


def weights(tensors: dict) -> torch.Tensor:
    if "weight" in tensors:
        return tensors["weight"].float()
    group = tensors["codes"].shape[-1] // tensors["scale"].shape[-1]
    zero = tensors["zero"].float().repeat_interleave(group, dim=-1)
    scale = tensors["scale"].float().repeat_interleave(group, dim=-1)
    return (tensors["codes"].float() - zero) * scale


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    fa = json.loads((a / "manifest.json").read_text())["files"]
    fb = json.loads((b / "manifest.json").read_text())["files"]
    assert fa.keys() == fb.keys()
    out = {"files": len(fa), "identical_files": 0, "max_abs_diff": 0.0, "entries": 0}
    counts = {"differing_codes": 0, "differing_scales": 0, "differing_zeros": 0, "differing_mask": 0}
    for key in fa:
        if fa[key]["sha256"] == fb[key]["sha256"]:
            out["identical_files"] += 1
        ta, tb = load_file(a / "files" / key), load_file(b / "files" / key)
        out["max_abs_diff"] = max(out["max_abs_diff"], (weights(ta) - weights(tb)).abs().max().item())
        if "codes" in ta:
            out["entries"] += ta["codes"].numel()
            counts["differing_codes"] += int((ta["codes"] != tb["codes"]).sum())
            counts["differing_scales"] += int((ta["scale"] != tb["scale"]).sum())
            counts["differing_zeros"] += int((ta["zero"] != tb["zero"]).sum())
        else:
            out["entries"] += ta["weight"].numel()
            counts["differing_mask"] += int(((ta["weight"] == 0) != (tb["weight"] == 0)).sum())
    out.update({k: v for k, v in counts.items() if (k == "differing_mask") == ("weight" in ta)})
    out["bit_identical"] = out["identical_files"] == out["files"]
    return out


def batched_add(self, x: torch.Tensor) -> None:
    """HessianAccumulator.add before the fix (as CHILD patches it in): one float32 X^T X per batch."""
    x = x.reshape(-1, x.shape[-1]).float()
    self.xtx += (x.T @ x).double()
    self.tokens += x.shape[0]


def accumulators() -> dict:
    """accumulation name -> add(accumulator, x): the current HessianAccumulator.add and the old batched one."""
    from evopress.hessians import HessianAccumulator

    return {"current": HessianAccumulator.add, "batched": batched_add}


def hessian_batch_split(columns: int = 256, rows: int = 8, tokens: int = 64) -> dict:
    """Per accumulation: max relative difference of H for one batch of 8 rows vs 4 batches of 2."""
    from evopress.hessians import HessianAccumulator

    x = torch.randn(rows, tokens, columns, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, add in accumulators().items():
        one, four = HessianAccumulator(columns), HessianAccumulator(columns)
        add(one, x)
        for part in x.split(2):
            add(four, part)
        out[name] = float((one.hessian - four.hessian).abs().max() / one.hessian.abs().max())
    return out


def time_accumulation(threads: int) -> dict:
    """ms per batch of 8 x 512 tokens at the default model's widths: current vs batched accumulation."""
    from evopress.hessians import HessianAccumulator

    torch.set_num_threads(threads)
    out = {}
    for columns in (576, 1536):
        x = torch.randn(8, 512, columns, generator=torch.Generator().manual_seed(0))
        for name, add in accumulators().items():
            acc = HessianAccumulator(columns)
            add(acc, x)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                add(acc, x)
                times.append(time.perf_counter() - start)
            out[f"{name}@{columns}"] = round(1000 * min(times), 1)
    return out


def environment() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    config = torch.__config__.show()
    libs = [
        ln.strip(" -")
        for ln in config.splitlines()
        if "Math Kernel" in ln or "MKL-DNN" in ln or "CPU cap" in ln
    ]
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "libraries": libs,
        "dtype": {
            "model": "float32",
            "hessian": "float64 sum of float32 X^T X products (current: one per sequence; batched: one per batch), used as float32",
            "sparsity_files": "float16 weights (storage=float16)",
            "quantization_files": "uint8 codes, float16 scales, uint8 zero points",
        },
    }


def db_path(db: Path, run: str, hidden: int, method: str) -> Path:
    return db / run / f"h{hidden}" / method


def plan(spaces: dict[int, Path], db: Path, run: str, extra: dict | None = None) -> list:
    """The builds of one run: every workspace x method, as [workspace, method, out_dir, options]."""
    return [
        [str(ws), m, str(db_path(db, run, h, m)), {**o, **(extra or {})}]
        for h, ws in spaces.items()
        for m, o in OPTIONS.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", default="64,128,256", help="tiny model widths (2 blocks each)")
    ap.add_argument(
        "--threads", default="1,2", help="thread counts of the fresh processes (first = reference)"
    )
    ap.add_argument(
        "--accumulate", default=",".join(ACCUMULATE), help="Hessian accumulations: current,batched"
    )
    ap.add_argument("--out", default=str(OUT_JSON))
    args = ap.parse_args()
    hidden = [int(h) for h in args.hidden.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    modes = [m for m in args.accumulate.split(",") if m]
    assert set(modes) <= set(ACCUMULATE), f"--accumulate: {modes}; allowed {ACCUMULATE}"
    assert len(threads) >= 2, "--threads needs two or more counts"

    results = {"environment": environment(), "options": OPTIONS, "threads": threads, "hidden": hidden}
    results["hessian_rel_diff_batch_8_vs_4x2"] = hessian_batch_split()
    results["accumulate_ms_per_batch_8x512"] = time_accumulation(threads[-1])
    results["runs"] = {}
    with tempfile.TemporaryDirectory(prefix="build-determinism-") as tmp:
        tmp = Path(tmp)
        spaces = {h: make_workspace(tmp / f"h{h}", h) for h in hidden}
        for mode in modes:
            db = tmp / "db" / mode

            seconds = {}
            for i, t in enumerate(threads):
                jobs = plan(spaces, db, f"t{t}")
                if i == len(threads) - 1:  # the last process also repeats the build and changes batch_size
                    jobs += plan(spaces, db, f"t{t}-repeat") + plan(
                        spaces, db, f"t{t}-bs2", {"batch_size": 2}
                    )
                seconds.update(run_builds(t, mode, jobs, tmp)["seconds"])
            ref, last = f"t{threads[0]}", f"t{threads[-1]}"
            rows = {}
            for h in hidden:
                for m in OPTIONS:
                    row = {"repeat": compare(db_path(db, last, h, m), db_path(db, f"{last}-repeat", h, m))}
                    for t in threads[1:]:
                        row[f"threads_{threads[0]}_vs_{t}"] = compare(
                            db_path(db, ref, h, m), db_path(db, f"t{t}", h, m)
                        )
                    row["batch_size_8_vs_2"] = compare(
                        db_path(db, last, h, m), db_path(db, f"{last}-bs2", h, m)
                    )
                    row["build_seconds"] = round(seconds[str(db_path(db, last, h, m))], 2)
                    rows[f"h{h}/{m}"] = row
            results["runs"][mode] = rows
            print_table(mode, rows)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    env = results["environment"]
    print(f"\ntorch {env['torch']} | {env['cpu']} | {env['cpu_count']} cpus")
    split = results["hessian_rel_diff_batch_8_vs_4x2"]
    print(
        "H rel diff, one batch of 8 vs 4 batches of 2: " + ", ".join(f"{k} {v:.1e}" for k, v in split.items())
    )
    print(f"accumulation ms per 8x512 batch: {results['accumulate_ms_per_batch_8x512']}")
    print(f"wrote {args.out}")


def print_table(mode: str, rows: dict) -> None:
    print(f"\nHessian accumulation: {mode}")
    print(
        f"{'model/method':24} {'comparison':18} {'files same':>11} {'max |dw|':>9} {'codes':>8} {'scales':>7} "
        f"{'mask':>5}"
    )
    for name, row in rows.items():
        for comp, r in row.items():
            if not isinstance(r, dict):
                continue
            same = f"{r['identical_files']}/{r['files']}"
            codes = r.get("differing_codes", "-")
            scales = r.get("differing_scales", "-")
            mask = r.get("differing_mask", "-")
            print(
                f"{name:24} {comp:18} {same:>11} {r['max_abs_diff']:9.2e} {codes!s:>8} {scales!s:>7} {mask!s:>5}"
            )


if __name__ == "__main__":
    main()
