"""Shared fixtures: tiny random models built in the test (no download), and a tiny tokenizer-free token set."""

from __future__ import annotations

import sys

import pytest
import torch


def tiny_llama(num_layers: int = 4, hidden: int = 64, vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def tiny_gpt_neox(num_layers: int = 3, hidden: int = 64, vocab: int = 128, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        use_parallel_residual=True,
        attn_implementation="sdpa",
    )
    model = GPTNeoXForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


# Gemma blocks alternate sliding-window and full attention; a window of 8 under the tests' 32 tokens makes the two
# masks differ, and Gemma 3's local and global rotary bases differ, so a block given the other type's inputs shows.
GEMMA_LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention")


def _tiny_gemma_config(config_class, num_layers: int, hidden: int, vocab: int, **extra):
    return config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        query_pre_attn_scalar=hidden // 4,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=[GEMMA_LAYER_TYPES[i % 3] for i in range(num_layers)],
        tie_word_embeddings=True,
        **extra,
    )


def _randomize_norms(model) -> None:
    """Gemma's RMSNorm scales by (1 + w) with w initialized to 0; random w makes every norm's weight matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)


def tiny_gemma2(num_layers: int = 4, hidden: int = 64, vocab: int = 128, seed: int = 0):
    """Gemma 2 with a final-logit soft-cap of 0.5 (real models: 30), below the tiny random logits, so it matters;
    eager attention, as transformers refuses SDPA for Gemma 2 (it cannot soft-cap attention logits)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = _tiny_gemma_config(
        Gemma2Config, num_layers, hidden, vocab, final_logit_softcapping=0.5, attn_implementation="eager"
    )
    model = Gemma2ForCausalLM(config).eval()
    _randomize_norms(model)
    model.requires_grad_(False)
    return model


def tiny_gemma3(num_layers: int = 4, hidden: int = 64, vocab: int = 128, seed: int = 0):
    """Gemma 3 text (`Gemma3ForCausalLM`, model type gemma3_text): local and global rotary bases differ."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = _tiny_gemma_config(Gemma3TextConfig, num_layers, hidden, vocab, attn_implementation="sdpa")
    model = Gemma3ForCausalLM(config).eval()
    _randomize_norms(model)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: a second torch thread only spins (30x slower here); restored after.
    Use it per module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokens():
    """Random token ids [8, 32] in the tiny models' vocabulary."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)


def char_tokenizer():
    """A byte-level tokenizer built in memory (no download): one token per byte, eos = 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    vocab["</s>"] = 256
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")

    class Bytes(PreTrainedTokenizerFast):
        def __call__(self, text, add_special_tokens=False, **kwargs):
            return {"input_ids": list(text.encode("utf-8"))}

        def __len__(self):
            return 257

    return Bytes(tokenizer_object=inner, eos_token="</s>")


@pytest.fixture
def tokenizer():
    return char_tokenizer()


def prepare_tiny_workspace(root, hidden: int = 64, seq_len: int = 32):
    """A tiny Llama saved like `evopress prepare-model` (vocab 257 = the byte tokenizer) and random token sets
    like `evopress prepare-data` (calibration 8 x seq_len, held-out 4 x seq_len) under `root`; returns `root`."""
    from safetensors.torch import save_file

    from evopress.models import save_model

    save_model(
        tiny_llama(num_layers=2, hidden=hidden, vocab=257),
        char_tokenizer(),
        root / "model",
        source="test:tiny",
    )
    g = torch.Generator().manual_seed(3)
    (root / "text").mkdir()
    for split, n in (("calibration", 8), ("heldout", 4)):
        save_file(
            {"input_ids": torch.randint(0, 257, (n, seq_len), generator=g)},
            root / "text" / f"{split}.safetensors",
        )
    return root


def run_cli(monkeypatch, capsys, *args):
    """`evopress *args` in-process: (exit status, stdout, stderr); what fixtures printed before is dropped."""
    from evopress import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["evopress", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


# --- a tiny quantization workspace and a short search on it (the Ray and CUDA tests) ------------------------------
def prepare_quantized_workspace(root):
    """`prepare_tiny_workspace` plus a GPTQ database (bits 2..4, group 32) at `root / "db"`; returns `root`."""
    from evopress.compressors import quantization

    prepare_tiny_workspace(root)
    options = {"bits": "2,3,4", "group_size": 32, "n_samples": 8, "batch_size": 4}
    quantization.build_database(root / "model", root / "text", root / "db", options)
    return root


def short_quantized_search(root, out, **compute):
    """A 3-generation quantization search at 3 bits on `prepare_quantized_workspace(root)`, float32, full-vocabulary
    KL; `compute` adds ComputeConfig fields (workers, threads, device). Returns (summary, profile units)."""
    import json

    from evopress.config import ComputeConfig, SearchConfig
    from evopress.stages import search

    config = SearchConfig(
        generations=3,
        offspring=4,
        survivors=(2, 1),
        tokens=(64, "all"),
        seed=1,
        init="uniform",
        initial_tokens=64,
    )
    settings = ComputeConfig(dtype="float32", batch_size=4, topk=0, **compute)
    summary = search(
        "quantization", root / "model", root / "text", root / "db", out, 3.0, {}, config, settings
    )
    return summary, json.loads((out / "profile.json").read_text())["units"]
