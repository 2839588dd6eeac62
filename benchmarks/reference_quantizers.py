"""Our level databases side by side with llm-compressor 0.14 (the quantizer users already have), on one model and text.

    .venv/bin/python benchmarks/reference_quantizers.py [--model data/model] [--data data/text] [--rows 16] [--draws 4]

For each configuration and each of --draws disjoint calibration draws (draw d: rows [d * rows, (d + 1) * rows) of
<data>/calibration.safetensors, 512 tokens each) both tools compress the prepared float32 model on the same rows,
and the evopress venv measures held-out perplexity of both results with the same code
(evopress.fitness.perplexity on every row of <data>/heldout.safetensors). The table gives the median over the
draws with its range and the paired per-draw differences: at 3 bits one calibration sample is not enough to rank
two quantizers a few percent apart (benchmarks/results/build_rounding.md). The configurations:

- GPTQ 3 bits, groups of 64, asymmetric, act-order "static" (llm-compressor's default); the same without
  act-order; 4 bits with act-order. Ours: `build_database` with bits=[b] and calib_bits=b, so every block is
  calibrated on the blocks before it quantized at b bits. That is llm-compressor's sequential pipeline
  (propagate_error=True): per decoder layer it collects the Hessians with the layer's weights still dense,
  quantizes the layer, then re-runs it quantized to make the next layer's inputs; our build does the same per
  block (Hessians from the dense block, then the block at calib_bits produces the next inputs).
- SparseGPT 50% and 60% unstructured. Ours: the sparsity database with num_levels=0 (the target only) and
  inputs=uniform (each block calibrated on the blocks before it pruned at the target: SparseGPT's and
  llm-compressor's sequential mode), stored in float32 so that no storage rounding enters the comparison.

Both sides use their defaults otherwise (damping 0.01 of the mean Hessian diagonal on both; llm-compressor's
min-max observer and block size 128). Only the transformer blocks' linears are compressed (lm_head and the
embeddings stay dense), which both sides check. llm-compressor runs in its own venv (.venv-reference, created
here on first use by `ensure_reference_venv`: it pins transformers <= 5.17) through
benchmarks/reference_llmcompressor_worker.py, which writes the compressed linears as dense float32.

Writes benchmarks/results/reference_quantizers.json and .md; finished cells are kept (same model and data)
unless --redo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from statistics import median

import torch

from evopress.adapter import ModelAdapter
from evopress.compressors import quantization, sparsity
from evopress.data import load_tokens
from evopress.fitness import perplexity
from evopress.io import atomic_write_json, atomic_write_text
from evopress.models import load_model, read_manifest

REPO = Path(__file__).resolve().parents[1]
REF_VENV = REPO / ".venv-reference"
WORKER = REPO / "benchmarks" / "reference_llmcompressor_worker.py"
RESULTS = REPO / "benchmarks" / "results"
# torch first and pinned (the CPU wheel on this disk; a looser request pulls a multi-GB CUDA build), then
# llm-compressor under a constraint that keeps that torch.
TORCH_PIN = "torch==2.13.0"
LLMCOMPRESSOR_PIN = "llmcompressor==0.14.0.1"
TOLERANCE = 0.02  # the bar: our perplexity within 2% of llm-compressor's
GROUP = 64


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    method: str  # quantization | sparsity (ours)
    target: float  # bits or sparsity of the uniform profile (ours)
    reference: dict  # the worker's config (llm-compressor)
    ours: dict = field(default_factory=dict)  # build_database options besides n_samples


def gptq_config(bits: int, act_order: bool) -> Config:
    return Config(
        key=f"w{bits}-{'actorder' if act_order else 'no-actorder'}",
        label=f"GPTQ {bits}-bit, g{GROUP}, asym, {'act-order static' if act_order else 'no act-order'}",
        method="quantization",
        target=bits,
        reference={"kind": "gptq", "bits": bits, "actorder": "default" if act_order else None},
        ours={"bits": [bits], "calib_bits": bits, "group_size": GROUP, "act_order": act_order},
    )


def sparse_config(share: float) -> Config:
    return Config(
        key=f"sparse-{round(share * 100)}",
        label=f"SparseGPT {share:.0%} unstructured",
        method="sparsity",
        target=share,
        reference={"kind": "sparsegpt", "sparsity": share},
        ours={"target": share, "num_levels": 0, "inputs": "uniform", "storage": "float32"},
    )


CONFIGS = (
    gptq_config(3, True),
    gptq_config(3, False),
    gptq_config(4, True),
    sparse_config(0.5),
    sparse_config(0.6),
)


# --- the reference venv --------------------------------------------------------------------------------------
def reference_versions(python: Path) -> dict | None:
    """Versions of what the worker imports in that venv; None when it cannot import them."""
    names = ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets")
    code = f"import json, importlib.metadata as m; print(json.dumps({{n: m.version(n) for n in {names!r}}}))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def reference_ready(versions: dict | None) -> bool:
    return (
        versions is not None
        and versions["llmcompressor"] == LLMCOMPRESSOR_PIN.split("==")[1]
        and versions["torch"].split("+")[0] == TORCH_PIN.split("==")[1]
    )


def ensure_reference_venv(venv: Path = REF_VENV) -> Path:
    """The reference venv's python, created or completed first when needed (torch pinned before anything)."""
    python = venv / "bin" / "python"
    if python.exists() and reference_ready(reference_versions(python)):
        return python
    print(f"setting up {venv} ({TORCH_PIN}, {LLMCOMPRESSOR_PIN}); a few minutes", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH_PIN], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write(TORCH_PIN + "\n")
        constraints.flush()
        subprocess.run([*pip, LLMCOMPRESSOR_PIN, "-c", constraints.name], check=True)
    versions = reference_versions(python)
    if not reference_ready(versions):
        raise SystemExit(f"{venv} is not usable after installing ({versions}); remove it and run again")
    return python


# --- compressing -----------------------------------------------------------------------------------------------
def block_linear_weights(model) -> dict[str, torch.Tensor]:
    """The weight of every nn.Linear inside the decoder layers, by state-dict key (as the worker writes them)."""
    return {
        f"{name}.weight": m.weight.detach().float().clone()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    }


def reference_weights(python: Path, cfg: Config, args, data: Path) -> tuple[dict, dict]:
    """(compressed block linears, the worker's run.json) of one llm-compressor oneshot run on `data`'s rows."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="reference-llmc-") as tmp:
        cmd = [str(python), str(WORKER), "--model", str(args.model), "--data", str(data)]
        cmd += ["--rows", str(args.rows), "--config", json.dumps(cfg.reference), "--out", tmp]
        subprocess.run(cmd, check=True)
        return load_file(str(Path(tmp) / "weights.safetensors")), json.loads(
            (Path(tmp) / "run.json").read_text()
        )


def evopress_weights(cfg: Config, args, data: Path) -> tuple[dict, dict]:
    """(compressed block linears, build info) of our database build at the config's one level, uniform profile."""
    module = quantization if cfg.method == "quantization" else sparsity
    options = {**cfg.ours, "n_samples": args.rows}
    with tempfile.TemporaryDirectory(prefix="reference-db-") as tmp:
        started = time.perf_counter()
        module.build_database(args.model, data, Path(tmp) / "db", options)
        seconds = time.perf_counter() - started
        model, _ = load_model(str(args.model), dtype="float32")
        comp = module.make(ModelAdapter(model), cfg.target, db=Path(tmp) / "db")
        profile = comp.initial_profile()
        assert len(set(profile.values())) == 1, f"not a uniform profile: {set(profile.values())}"
        comp.apply_profile(profile)
        return block_linear_weights(model), {"seconds": seconds, "options": options}


def weight_check(weights: dict[str, torch.Tensor], cfg: Config) -> dict:
    """What the weights are: the most distinct values in any group of 64 (quantized), or the zero share."""
    if cfg.method == "sparsity":
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        return {"linears": len(weights), "zero_share": zeros / sum(w.numel() for w in weights.values())}
    most = 0
    for w in weights.values():
        groups = w.reshape(w.shape[0], -1, GROUP).sort(dim=-1).values
        most = max(most, int(((groups.diff(dim=-1) != 0).sum(-1) + 1).max()))
    return {"linears": len(weights), "max_values_per_group": most, "allowed": 2 ** int(cfg.target)}


def evaluate(args, heldout: torch.Tensor, weights: dict | None) -> float:
    """Held-out perplexity of the prepared model with `weights` (block linears) put in; dense when None."""
    model, _ = load_model(str(args.model), dtype="float32")
    if weights is not None:
        result = model.load_state_dict(weights, strict=False)
        assert not result.unexpected_keys, f"weights the model does not have: {result.unexpected_keys[:3]}"
        assert len(block_linear_weights(model)) == len(weights), "not every block linear was given"
    return perplexity(ModelAdapter(model), heldout)


def measure(side: str, cfg: Config, args, heldout, python, data: Path) -> dict:
    if side == "llmcompressor":
        weights, info = reference_weights(python, cfg, args, data)
    else:
        weights, info = evopress_weights(cfg, args, data)
    check = weight_check(weights, cfg)
    started = time.perf_counter()
    ppl = evaluate(args, heldout, weights)
    return {
        "perplexity": ppl,
        "eval_seconds": time.perf_counter() - started,
        "check": check,
        "cpu": cpu_model(),  # cells of one table may come from several sessions (and machines)
        "threads": torch.get_num_threads(),
        **info,
    }


def cell_key(cfg: Config, side: str, draw: int) -> str:
    return f"{cfg.key}/{side}/draw{draw}"


def draw_folder(calibration: torch.Tensor, heldout: torch.Tensor, rows: int, draw: int, root: Path) -> Path:
    """A data folder holding calibration rows [rows * draw, rows * (draw + 1)) and the held-out rows.

    Both tools read the first --rows of a folder's calibration set, so each draw is its own folder; it has no
    data.json, which evopress reads as a folder made by hand (no checksums to check against).
    """
    from safetensors.torch import save_file

    folder = root / f"draw{draw}"
    folder.mkdir(parents=True, exist_ok=True)
    part = calibration[rows * draw : rows * (draw + 1)].contiguous()
    save_file({"input_ids": part}, str(folder / "calibration.safetensors"))
    save_file({"input_ids": heldout.contiguous()}, str(folder / "heldout.safetensors"))
    return folder


# --- results ---------------------------------------------------------------------------------------------------
def sha256_of(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def verdict(ours: float, reference: float) -> tuple[float, str]:
    """(relative difference, whether ours is within TOLERANCE of llm-compressor's; better counts as within)."""
    rel = ours / reference - 1
    if rel > TOLERANCE:
        return rel, "no"
    return rel, "yes" if rel >= -TOLERANCE else "yes (better)"


def fmt_seconds(cells: list[dict]) -> str:
    return "-" if not cells else f"{median([c['seconds'] for c in cells]) / 60:.1f} min"


def draw_cells(results: dict, cfg: Config, side: str) -> list[dict]:
    """The finished cells of one config and side, one per calibration draw, in draw order."""
    cells = results["cells"]
    return [cells[k] for d in range(results["info"]["draws"]) if (k := cell_key(cfg, side, d)) in cells]


def fmt_spread(cells: list[dict]) -> str:
    """median [min, max] of the draws' perplexities; one figure for one draw."""
    if not cells:
        return "-"
    ppl = [c["perplexity"] for c in cells]
    return f"{median(ppl):.2f}" if len(ppl) == 1 else f"{median(ppl):.2f} [{min(ppl):.2f}, {max(ppl):.2f}]"


def paired_differences(ref: list[dict], ours: list[dict]) -> list[float]:
    """ours / llm-compressor - 1 per draw where both sides finished (same calibration rows)."""
    return [o["perplexity"] / r["perplexity"] - 1 for r, o in zip(ref, ours, strict=False)]


def markdown(results: dict) -> str:
    info = results["info"]
    head = (
        "| config | llm-compressor ppl | evopress ppl | difference of medians | within 2%? "
        "| per-draw differences | llm-compressor time | evopress time |"
    )
    lines = [head, "| --- |" + " --- |" * 7]
    dense = results["cells"].get("dense", {}).get("perplexity")
    lines.append(
        f"| dense (float32) | {dense:.2f} | {dense:.2f} | - | - | - | - | - |" if dense else "| dense |"
    )
    for cfg in CONFIGS:
        ref, ours = draw_cells(results, cfg, "llmcompressor"), draw_cells(results, cfg, "evopress")
        diff, ok, per_draw = "-", "-", "-"
        if ref and ours:
            rel, ok = verdict(median([c["perplexity"] for c in ours]), median([c["perplexity"] for c in ref]))
            diff = f"{rel * 100:+.2f}%"
            per_draw = " ".join(f"{d * 100:+.1f}%" for d in paired_differences(ref, ours))
        lines.append(
            f"| {cfg.label} | {fmt_spread(ref)} | {fmt_spread(ours)} | {diff} | {ok} | {per_draw} "
            f"| {fmt_seconds(ref)} | {fmt_seconds(ours)} |"
        )
    lines += ["", *footer(results, info)]
    return "\n".join(lines) + "\n"


def cpus_line(results: dict) -> str:
    """Which CPU (and threads) measured which configs: '<cpu>, <n> threads: <label>, <label>; ...'."""
    by_cpu: dict[str, list[str]] = {}
    for cfg in CONFIGS:
        for side in ("llmcompressor", "evopress"):
            for cell in draw_cells(results, cfg, side):
                where = f"{cell.get('cpu', '?')}, {cell.get('threads', '?')} threads"
                if cfg.label not in by_cpu.setdefault(where, []):
                    by_cpu[where].append(cfg.label)
    return "; ".join(f"{where}: {', '.join(labels)}" for where, labels in by_cpu.items()) or "-"


def footer(results: dict, info: dict) -> list[str]:
    ref_run = next((c for k, c in results["cells"].items() if "/llmcompressor" in k), {})
    ref_versions = ref_run.get("versions", {})
    lines = [
        f"held-out: {info['heldout_rows']} x {info['seq_len']} tokens ({info['data']}/heldout.safetensors; whole "
        "documents never calibrated on); perplexity by evopress.fitness.perplexity for both columns",
        f"model: {info['model']} ({info['model_source']}, sha256 {info['model_sha256'][:12]}), float32, "
        "block linears only (lm_head and embeddings dense)",
        f"calibration: {info['draws']} draw(s) of {info['calibration_rows']} x {info['seq_len']} tokens, draw d = "
        f"rows [{info['calibration_rows']}d, {info['calibration_rows']}(d+1)) of {info['data']}/calibration.safetensors "
        "(disjoint), the same rows on both sides; ppl cells: median [min, max] over the draws",
        "why draws: at 3 bits a 1e-7 change of the Hessian alone moves this model's GPTQ perplexity by ~15% "
        "(benchmarks/results/build_rounding.md), so one calibration sample cannot rank two quantizers 2% apart",
        f"CPU of each config's cells: {cpus_line(results)}; time = compression wall time (llm-compressor: its "
        "oneshot call; evopress: build_database), evaluation not included; times from different CPUs or a "
        "shared machine are not a speed comparison",
        f"evopress venv: torch {info['torch']}, transformers {info['transformers']}; reference venv: "
        + ", ".join(f"{k} {v}" for k, v in ref_versions.items()),
        f"within {TOLERANCE:.0%}: evopress ppl <= {1 + TOLERANCE:g} x llm-compressor ppl (lower is better; "
        f"'yes (better)': more than {TOLERANCE:.0%} lower)",
        "",
        "Settings (llm-compressor as resolved by the worker; evopress build options):",
        "",
    ]
    for cfg in CONFIGS:
        ref, ours = (
            results["cells"].get(cell_key(cfg, "llmcompressor", 0)),
            results["cells"].get(cell_key(cfg, "evopress", 0)),
        )
        if ref:
            lines.append(
                f"- {cfg.label}, llm-compressor: {json.dumps(ref['settings'])}; {json.dumps(ref['check'])}"
            )
        if ours:
            lines.append(
                f"- {cfg.label}, evopress: {json.dumps(ours['options'])}; {json.dumps(ours['check'])}"
            )
    return lines


def run_info(args, calibration: torch.Tensor, heldout: torch.Tensor) -> dict:
    manifest = read_manifest(args.model)
    return {
        "model": str(args.model),
        "model_source": manifest.get("source", "?"),
        "model_sha256": manifest["sha256"],
        "data": str(args.data),
        "calibration_rows": len(calibration) // args.draws,
        "draws": args.draws,
        "calibration_sha256": sha256_of(calibration),
        "heldout_rows": len(heldout),
        "heldout_sha256": sha256_of(heldout),
        "seq_len": int(heldout.shape[1]),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
    }


def load_results(path: Path, info: dict) -> dict:
    """The previous results when they were made on this model and data (cells kept), else an empty set."""
    same = ("model_sha256", "heldout_sha256")  # each cell records its own draw's calibration rows
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get("info", {}).get(k) == info[k] for k in same):
            return {"info": info, "cells": old.get("cells", {})}
    return {"info": info, "cells": {}}


def save(results: dict, out_json: Path) -> None:
    atomic_write_json(out_json, results)
    atomic_write_text(out_json.with_suffix(".md"), markdown(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "data" / "model", help="a prepared model folder")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "text", help="a prepared data folder")
    ap.add_argument("--rows", type=int, default=16, help="calibration rows per draw, the same on both sides")
    ap.add_argument(
        "--draws",
        type=int,
        default=1,
        help="disjoint calibration draws (rows*draws rows needed); medians reported",
    )
    ap.add_argument(
        "--only", default="", help="comma-separated config keys: " + ", ".join(c.key for c in CONFIGS)
    )
    ap.add_argument("--redo", action="store_true", help="measure every selected cell again")
    ap.add_argument("--out", type=Path, default=RESULTS / "reference_quantizers.json")
    args = ap.parse_args()
    configs = [c for c in CONFIGS if not args.only or c.key in args.only.split(",")]
    wanted = args.rows * args.draws
    calibration = load_tokens(args.data, "calibration")[:wanted]
    if len(calibration) < wanted:
        raise SystemExit(
            f"{args.data} has {len(calibration)} calibration rows, fewer than --rows {args.rows} x --draws "
            f"{args.draws}; prepare it with --n-calibration {wanted} or more"
        )
    heldout = load_tokens(args.data, "heldout")
    results = load_results(args.out, run_info(args, calibration, heldout))
    python = ensure_reference_venv()
    cells = results["cells"]
    if "dense" not in cells or args.redo:
        started = time.perf_counter()
        cells["dense"] = {
            "perplexity": evaluate(args, heldout, None),
            "eval_seconds": time.perf_counter() - started,
        }
        save(results, args.out)
    with tempfile.TemporaryDirectory(prefix="reference-draws-") as tmp:
        # draw by draw, so that a stopped run has whole draws of every config to compare
        for draw in range(args.draws):
            data = draw_folder(calibration, heldout, args.rows, draw, Path(tmp))
            for cfg in configs:
                for side in ("llmcompressor", "evopress"):
                    key = cell_key(cfg, side, draw)
                    rows_sha = sha256_of(calibration[args.rows * draw : args.rows * (draw + 1)])
                    if cells.get(key, {}).get("calibration_sha256") == rows_sha and not args.redo:
                        continue
                    print(f"--- {cfg.label}, draw {draw}: {side}", flush=True)
                    cells[key] = {
                        **measure(side, cfg, args, heldout, python, data),
                        "calibration_sha256": rows_sha,
                    }
                    print(
                        f"{key}: ppl {cells[key]['perplexity']:.3f} in {cells[key]['seconds']:.0f} s",
                        flush=True,
                    )
                    save(results, args.out)
    save(results, args.out)
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
