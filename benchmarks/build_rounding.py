"""How far does float rounding alone move the uniform 3-bit quality of the default model?

Two GPTQ databases of the embedded default model (SmolLM2-135M) that differ only in float rounding, as two machines
(CPU, BLAS, thread split) would build them:

- A: the current code (one float32 X^T X per calibration sequence, summed in float64 in sequence order);
- B: HessianAccumulator.add patched in this process back to the old arithmetic (one float32 X^T X per batch of 8
  sequences), which rounds H differently by ~1e-7 relative (benchmarks/build_determinism.py), nothing else.

Everything else is params.yaml's: the float32 model, builtin:pydoc data (32 x 512 calibration, 16 x 512 held-out
tokens), the database at bits 2,3,4,5 / group size 64 / 16 calibration sequences, the `uniform` baseline at 3.0
bits (1024 tokens), evaluated on held-out with the KL to the dense model (float32 forward, top-512). Reports per
database the held-out perplexity and KL, content_sha256(), and per bit-width the fraction of GPTQ codes (and
group scales) that differ between A and B.

    .venv/bin/python benchmarks/build_rounding.py [--work /tmp/evopress-rounding]

Resumable: the prepared model and data are reused when present, a database is skipped when its manifest says
complete (nothing in B's manifest records the patch: delete --work to rebuild after a code change). Each build
takes 11-22 minutes on a busy 2-core CPU; ~40 minutes in all. Writes benchmarks/results/build_rounding.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from evopress import stages
from evopress.config import ComputeConfig
from evopress.data import DataSpec
from evopress.database import LevelDatabase
from evopress.device import describe
from evopress.evaluate import Candidate, evaluate_candidates
from evopress.hessians import HessianAccumulator
from evopress.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "benchmarks" / "results" / "build_rounding.json"
MODEL = "embedded:smollm2-135m"
DATA = DataSpec(source="builtin:pydoc", seq_len=512, n_calibration=32, n_heldout=16)
DATABASE = {"bits": [2, 3, 4, 5], "group_size": 64, "n_samples": 16, "batch_size": 8}
TARGET = 3.0
BASELINE_TOKENS = 1024
COMPUTE = ComputeConfig(dtype="float32", batch_size=8, topk=512)
ISSUE = {"reported_perplexities": [28.76, 32.07], "relative_gap": 32.07 / 28.76 - 1}
BUILDS = {
    "A": "current: one float32 X^T X per sequence, float64 sum in sequence order",
    "B": "batched (old): one float32 X^T X per batch of 8 sequences, float64 sum",
}


def batched_add(self, x: torch.Tensor) -> None:
    """The accumulation before the fix: one float32 product per batch (its rounding depends on the batch split)."""
    x = x.reshape(-1, x.shape[-1]).float()
    self.xtx += (x.T @ x).double()
    self.tokens += x.shape[0]


@contextlib.contextmanager
def accumulation(name: str):
    """HessianAccumulator.add as the current code has it (A) or patched to the batched one (B), then restored."""
    current = HessianAccumulator.add
    if name == "B":
        HessianAccumulator.add = batched_add
    try:
        yield
    finally:
        HessianAccumulator.add = current


def complete(db_dir: Path) -> bool:
    path = db_dir / "manifest.json"
    return path.exists() and bool(json.loads(path.read_text()).get("complete"))


def prepare(work: Path) -> tuple[Path, Path]:
    model_dir, text_dir = work / "model", work / "text"
    if not (model_dir / "config.json").exists():
        start = time.perf_counter()
        stages.prepare_model(MODEL, model_dir, "float32")
        print(f"prepared {MODEL} in {time.perf_counter() - start:.0f} s", flush=True)
    if not (text_dir / "heldout.safetensors").exists():
        stages.prepare_data(model_dir, DATA, text_dir)
    return model_dir, text_dir


def build(name: str, model_dir: Path, text_dir: Path, work: Path) -> float | None:
    """Build database `name` unless complete; returns its build seconds (kept beside it; None: unknown)."""
    db_dir, timing = work / f"db-{name}", work / f"db-{name}.seconds.json"
    if complete(db_dir):
        print(f"database {name}: complete, reused", flush=True)
        return json.loads(timing.read_text())["seconds"] if timing.exists() else None
    start = time.perf_counter()
    with accumulation(name):
        stages.build_db("quantization", model_dir, text_dir, db_dir, None, DATABASE)
    seconds = time.perf_counter() - start
    atomic_write_json(timing, {"seconds": seconds})
    print(f"database {name}: built in {seconds:.0f} s", flush=True)
    return seconds


def compare_codes(a: LevelDatabase, b: LevelDatabase) -> dict:
    """Per bit-width: differing codes / scales / zero points between A and B, over every unit and per block (the
    next block is calibrated on this one at calib_bits, so a flipped code in one block changes every later H)."""
    out = {}
    for bits in DATABASE["bits"]:
        n = codes = scales = n_scales = zeros = 0
        max_dw = 0.0
        block_n, block_codes = {}, {}
        for unit in a.units():
            ta, tb = a.load(unit, bits), b.load(unit, bits)
            n += ta["codes"].numel()
            differ = int((ta["codes"] != tb["codes"]).sum())
            codes += differ
            block = int(unit.split(".")[1])
            block_n[block] = block_n.get(block, 0) + ta["codes"].numel()
            block_codes[block] = block_codes.get(block, 0) + differ
            n_scales += ta["scale"].numel()
            scales += int((ta["scale"] != tb["scale"]).sum())
            zeros += int((ta["zero"] != tb["zero"]).sum())
            max_dw = max(max_dw, (dequant(ta) - dequant(tb)).abs().max().item())
            a._evict(a.key(unit, bits))  # 4 bit-widths x 210 linears: keep the cache small
            b._evict(b.key(unit, bits))
        out[str(bits)] = {
            "codes": n,
            "differing_codes": codes,
            "differing_codes_fraction": codes / n,
            "scales": n_scales,
            "differing_scales_fraction": scales / n_scales,
            "differing_zeros_fraction": zeros / n_scales,
            "max_abs_dw": max_dw,
            "differing_codes_fraction_by_block": [
                round(block_codes[k] / block_n[k], 5) for k in sorted(block_n)
            ],
        }
    return out


def dequant(t: dict) -> torch.Tensor:
    group = t["codes"].shape[-1] // t["scale"].shape[-1]
    zero = t["zero"].float().repeat_interleave(group, dim=-1)
    scale = t["scale"].float().repeat_interleave(group, dim=-1)
    return (t["codes"].float() - zero) * scale


def markdown(r: dict) -> str:
    lines = [
        "# Float rounding alone: uniform 3-bit GPTQ of SmolLM2-135M from two databases",
        "",
        "A = current Hessian accumulation (per sequence); B = the old per-batch one (batch 8) patched in: the two",
        "databases differ only in how X^T X is rounded. Written by benchmarks/build_rounding.py.",
        "",
        "| database | held-out ppl | held-out KL | content_sha256 | build s |",
        "| --- | --- | --- | --- | --- |",
        f"| dense | {r['dense_perplexity']:.2f} | - | - | - |",
    ]
    for name in BUILDS:
        e = r["databases"][name]
        secs = "-" if e["build_seconds"] is None else f"{e['build_seconds']:.0f}"
        lines.append(
            f"| {name} | {e['heldout_perplexity']:.2f} | {e['heldout_kl']:.4f} | {e['content_sha256'][:16]} | {secs} |"
        )
    d = r["difference"]
    lines += [
        "",
        f"B vs A: perplexity {d['perplexity_relative']:+.2%}, KL {d['kl_relative']:+.2%} "
        f"(the issue's gap: {ISSUE['relative_gap']:+.2%}, {ISSUE['reported_perplexities']})",
        "",
        "| bits | codes differing | scales differing | zero points differing | max abs dw |",
        "| --- | --- | --- | --- | --- |",
    ]
    for bits, c in r["codes"].items():
        lines.append(
            f"| {bits} | {c['differing_codes_fraction']:.2%} | {c['differing_scales_fraction']:.2%} | "
            f"{c['differing_zeros_fraction']:.2%} | {c['max_abs_dw']:.3g} |"
        )
    by_block = r["codes"][str(int(TARGET))]["differing_codes_fraction_by_block"]
    lines += [
        "",
        f"{int(TARGET)}-bit codes differing per block (0..{len(by_block) - 1}): "
        + " ".join(f"{f:.1%}" for f in by_block),
        "",
        f"settings: {json.dumps(r['settings'])}",
        "",
        f"environment: {json.dumps(r['environment'])}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", default="/tmp/evopress-rounding", help="model, data, databases, profiles (reused)"
    )
    ap.add_argument("--out", default=str(OUT_JSON))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    model_dir, text_dir = prepare(work)
    seconds = {name: build(name, model_dir, text_dir, work) for name in BUILDS}
    candidates = [Candidate(label="dense")]
    for name in BUILDS:
        profile_dir = work / f"profile-{name}"
        stages.baseline(
            "quantization",
            "uniform",
            model_dir,
            text_dir,
            work / f"db-{name}",
            profile_dir,
            TARGET,
            {},
            COMPUTE,
            tokens=BASELINE_TOKENS,
        )
        candidates.append(
            Candidate(
                label=name,
                method="quantization",
                profile=profile_dir / "profile.json",
                db=work / f"db-{name}",
            )
        )
    rows = evaluate_candidates(model_dir, text_dir, candidates, COMPUTE, sets=("heldout",), kl=True)

    dbs = {name: LevelDatabase.open(work / f"db-{name}") for name in BUILDS}
    results = {
        "question": "can float rounding alone (two machines) move uniform 3-bit held-out perplexity by 11%?",
        "issue": ISSUE,
        "builds": BUILDS,
        "settings": {
            "model": MODEL,
            "model_dtype": "float32",
            "data": vars(DATA),
            "heldout_tokens": [DATA.n_heldout, DATA.seq_len],
            "database": DATABASE,
            "profile": {
                "method": "quantization",
                "baseline": "uniform",
                "target": TARGET,
                "tokens": BASELINE_TOKENS,
            },
            "compute": vars(COMPUTE),
        },
        "environment": describe(COMPUTE.dtype),
        "dense_perplexity": rows["dense"]["heldout_perplexity"],
        "databases": {},
    }
    for name in BUILDS:
        row = rows[f"quantization/{name}"]
        results["databases"][name] = {
            "heldout_perplexity": row["heldout_perplexity"],
            "heldout_kl": row["heldout_kl"],
            "heldout_tokens": row["heldout_tokens"],
            "size": row["size"],
            "content_sha256": dbs[name].content_sha256(),
            "build_seconds": seconds[name],
        }
    a, b = results["databases"]["A"], results["databases"]["B"]
    results["difference"] = {
        "perplexity_relative": b["heldout_perplexity"] / a["heldout_perplexity"] - 1,
        "kl_relative": b["heldout_kl"] / a["heldout_kl"] - 1,
        "identical_databases": a["content_sha256"] == b["content_sha256"],
    }
    results["codes"] = compare_codes(dbs["A"], dbs["B"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    atomic_write_text(out.with_suffix(".md"), markdown(results))
    print()
    print(markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
