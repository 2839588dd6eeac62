"""The depth search at the authors' schedule on one GPU, with 1 and with several Ray actors; and the bare-forward
floor for the same tokens. Run by benchmarks/gpu_check.sh on a GPU machine; writes one JSON file.

    python3 benchmarks/gpu_search.py --out benchmarks/results/gpu_check.json [--actors 1,2] [--generations 117]

The model: --model (a prepared folder), else the default model's architecture (SmolLM2-135M: 30 Llama blocks,
hidden 576, vocabulary 49152) with random weights, so nothing of 98 MB has to travel; calibration: random token
ids (the speed of a forward pass does not depend on which tokens it reads). Schedule (EVOPRESS.md, depth): k = 8
of 30 blocks, k(n-k)/1.5 = 117 generations of 32 offspring, survivors [2, 1], selection on 2,048 then 32,768
tokens. Tokens/s counts the tokens the search's forward passes read (a child starting at its first changed block,
prefix reuse, counts its whole rows, as the authors' figure does); the floor is one bare forward pass of the model
over as many tokens, batched as the search batches them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_ARCH = {  # the default model's config.json (SmolLM2-135M), weights random
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
}


def byte_tokenizer():
    """A tokenizer built in memory (the search never decodes; a prepared folder needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<0>")


def random_workspace(root: Path, rows: int, seq_len: int) -> tuple[Path, Path]:
    """(model folder, text folder): the default architecture with random weights, random calibration ids."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from evopress.models import save_model

    model_dir, text_dir = root / "model", root / "text"
    if not model_dir.exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**DEFAULT_ARCH)).eval()
        save_model(model, byte_tokenizer(), model_dir, source="random:smollm2-135m-architecture")
    text_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for split, n in (("calibration", rows), ("heldout", 4)):
        ids = torch.randint(0, DEFAULT_ARCH["vocab_size"], (n, seq_len), generator=g)
        save_file({"input_ids": ids}, text_dir / f"{split}.safetensors")
    return model_dir, text_dir


def run_search(args, model_dir: Path, text_dir: Path, out: Path, actors: int) -> dict:
    import csv

    from evopress.config import ComputeConfig, SearchConfig
    from evopress.stages import search

    config = SearchConfig(
        generations=args.generations,
        offspring=args.offspring,
        survivors=(2, 1),
        tokens=(args.first_tokens, args.last_tokens),
        seed=0,
        init="random",
        initially_generated=args.offspring,
        initial_tokens=args.first_tokens,
    )
    compute = ComputeConfig(dtype=args.dtype, batch_size=args.batch_size, topk=512, workers=actors, threads=2)
    start = time.perf_counter()
    summary = search(
        "depth", model_dir, text_dir, None, out, args.k, {"granularity": "block"}, config, compute.validate()
    )
    wall = time.perf_counter() - start
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    tokens = int(history[-1]["tokens"]) if history else 0  # cumulative: every candidate of every step
    seconds = sum(float(h["seconds"]) for h in history)
    return {
        "actors": actors,
        "wall_seconds": round(wall, 2),
        "search_seconds": round(seconds, 2),
        "generations": len(history),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds) if seconds else None,
        "fitness": summary["fitness"],
        "initial_fitness": summary.get("initial_fitness"),
        "profile": json.loads((out / "profile.json").read_text())["units"],
    }


@torch.no_grad()
def bare_forward(model_dir: Path, tokens: int, seq_len: int, batch_size: int, dtype: str) -> dict:
    """Seconds of plain forward passes (logits included) over `tokens` tokens: the floor under any search."""
    from evopress.models import load_adapter

    adapter = load_adapter(model_dir, dtype, "cuda")
    rows = max(1, tokens // seq_len)
    ids = torch.randint(0, DEFAULT_ARCH["vocab_size"], (batch_size, seq_len), device="cuda")
    for _ in range(3):
        adapter.forward_logits(ids)  # warm-up: kernels chosen, memory allocated
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(0, rows, batch_size):
        adapter.forward_logits(ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done = ((rows + batch_size - 1) // batch_size) * batch_size * seq_len
    return {"tokens": done, "seconds": round(seconds, 3), "tokens_per_second": round(done / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--work", default="/tmp/evopress-gpu")
    ap.add_argument("--model", default="", help="a prepared model folder ('' = random weights)")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--generations", type=int, default=117)
    ap.add_argument("--offspring", type=int, default=32)
    ap.add_argument("--first-tokens", type=int, default=2048)
    ap.add_argument("--last-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible to torch; this benchmark is for a GPU machine")
    work = Path(args.work)
    rows = args.last_tokens // args.seq_len
    model_dir, text_dir = random_workspace(work, rows, args.seq_len)
    if args.model:
        model_dir = Path(args.model)
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "model": str(args.model or "random weights, SmolLM2-135M architecture"),
        "schedule": {
            k: getattr(args, k) for k in ("k", "generations", "offspring", "first_tokens", "last_tokens")
        },
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for actors in (int(a) for a in args.actors.split(",")):
        run = run_search(args, model_dir, text_dir, work / f"search-{actors}", actors)
        run["floor"] = bare_forward(model_dir, run["tokens"], args.seq_len, args.batch_size, args.dtype)
        result["runs"].append(run)
        out.write_text(json.dumps(result, indent=2) + "\n")  # each run is kept, even if a later one fails
        print(
            f"{actors} actor(s): {run['search_seconds']:.1f} s search, {run['tokens_per_second']} tokens/s; "
            f"bare forward {run['floor']['tokens_per_second']} tokens/s",
            flush=True,
        )
    runs = result["runs"]
    result["identical_profiles"] = all(r["profile"] == runs[0]["profile"] for r in runs)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
