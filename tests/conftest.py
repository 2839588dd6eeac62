"""Shared fixtures: tiny random models built in the test (no download), and a tiny tokenizer-free token set."""

from __future__ import annotations

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
