"""Worker of benchmarks/reference_quantizers.py: one llm-compressor 0.14 oneshot run on the prepared model.

Runs in the reference virtual environment (.venv-reference: llm-compressor pins transformers <= 5.17, the
project's venv has a newer one), so it imports nothing of evopress. It reads the prepared model folder and the
calibration rows (calibration.safetensors, key input_ids, as `evopress prepare-data` writes them) directly,
runs oneshot with one modifier at its defaults except what the config names, and writes the weights of every
linear it changed as plain float32 (the fake-quantized or pruned values the model computes with) into
<out>/weights.safetensors, plus <out>/run.json (settings as resolved by llm-compressor, seconds, versions).
The evopress venv then evaluates those weights with its own perplexity code.

    .venv-reference/bin/python benchmarks/reference_llmcompressor_worker.py --model data/model \
        --data data/text --rows 16 --config '{"kind": "gptq", "bits": 3, "actorder": "default"}' --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch

# Only the transformer blocks' linears are compressed, as evopress does: lm_head is a Linear (tied to the
# embeddings in the default model) and must be left out explicitly; embeddings are not Linear modules.
IGNORE = ["lm_head"]
# SparseGPTModifier 0.14 does not honour the plain name: with IGNORE its log reads "Sparsifying lm_head" (which would
# prune the tied embeddings too). The regex form is what llm-compressor's own SparseGPT recipes use. Only block
# linears are written out, so that run's results were unaffected; it cost time and was not what we meant.
IGNORE_SPARSE = ["re:.*lm_head"]


def calibration_rows(data_dir: Path, rows: int) -> torch.Tensor:
    from safetensors.torch import load_file

    tokens = load_file(str(data_dir / "calibration.safetensors"))["input_ids"]
    if len(tokens) < rows:
        raise SystemExit(f"{data_dir} has {len(tokens)} calibration rows, fewer than --rows {rows}")
    return tokens[:rows]


def as_dataset(tokens: torch.Tensor):
    """The rows as a tokenized datasets.Dataset: llm-compressor then uses them as they are (no tokenizer)."""
    from datasets import Dataset

    ids = tokens.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def gptq_modifier(bits: int, actorder: str | None):
    """GPTQ, `bits`-bit integer weights, groups of 64 columns, asymmetric (a zero point per group).

    actorder "default" leaves the modifier's own default (the sentinel that resolves to "static"); None turns
    act-order off. Every other setting (damping, block size, min-max observer) is llm-compressor's default.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=64)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    kwargs = {} if actorder == "default" else {"actorder": actorder}
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=IGNORE, **kwargs)


def sparsegpt_modifier(sparsity: float):
    """Unstructured SparseGPT ("0:0") at `sparsity` in every targeted linear; everything else at its default."""
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    return SparseGPTModifier(
        sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=IGNORE_SPARSE
    )


def make_modifier(config: dict):
    if config["kind"] == "gptq":
        return gptq_modifier(int(config["bits"]), config.get("actorder", "default"))
    if config["kind"] == "sparsegpt":
        return sparsegpt_modifier(float(config["sparsity"]))
    raise SystemExit(f"unknown config kind {config['kind']!r}; allowed: gptq, sparsegpt")


def resolved_settings(modifier) -> dict:
    """What llm-compressor uses, defaults resolved (for GPTQ: the scheme after its act-order resolution)."""
    out = {
        "modifier": type(modifier).__name__,
        "dampening_frac": modifier.dampening_frac,
        "block_size": modifier.block_size,
        "ignore": list(modifier.ignore),
    }
    if hasattr(modifier, "resolve_quantization_config"):
        w = modifier.resolve_quantization_config().config_groups["group_0"].weights
        actorder = None if w.actorder is None else getattr(w.actorder, "value", str(w.actorder))
        out.update(
            num_bits=w.num_bits,
            symmetric=w.symmetric,
            strategy=getattr(w.strategy, "value", str(w.strategy)),
            group_size=w.group_size,
            actorder=actorder,
            observer=w.observer,
        )
    if hasattr(modifier, "sparsity"):
        out.update(sparsity=modifier.sparsity, mask_structure=modifier.mask_structure)
    return out


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the decoder layers (model.layers.<i>.<...>), by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument(
        "--config", required=True, help="json: kind gptq (bits, actorder) or sparsegpt (sparsity)"
    )
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    config = json.loads(args.config)

    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    tokens = calibration_rows(args.data, args.rows)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    model.eval()
    before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
    modifier = make_modifier(config)
    settings = resolved_settings(modifier)
    started = time.perf_counter()
    oneshot(
        model=model,
        recipe=modifier,
        dataset=as_dataset(tokens),
        num_calibration_samples=len(tokens),
        max_seq_length=tokens.shape[1],
        shuffle_calibration_samples=False,  # all rows are used; keep their order (only rounding depends on it)
        batch_size=1,
        pipeline="sequential",  # what "independent" infers for these modifiers; named so the run says so
    )
    seconds = time.perf_counter() - started

    weights = {f"{n}.weight": m.weight.detach().float().contiguous() for n, m in block_linears(model).items()}
    changed = sum(not torch.equal(before[k.removesuffix(".weight")], w) for k, w in weights.items())
    if changed != len(weights):
        raise SystemExit(f"llm-compressor changed {changed} of {len(weights)} block linears; expected all")
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out / "weights.safetensors"))
    run = {
        "config": config,
        "settings": settings,
        "calibration_rows": len(tokens),
        "seq_len": int(tokens.shape[1]),
        "linears": len(weights),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers")},
    }
    (args.out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    print(json.dumps({k: run[k] for k in ("settings", "seconds", "linears")}, default=str), flush=True)


if __name__ == "__main__":
    main()
