"""The adapter on two architectures with different module names (Llama, GPT-NeoX)."""

import copy

import pytest
import torch

from conftest import tiny_gpt_neox, tiny_llama
from evopress.adapter import DroppedSublayer, ModelAdapter
from evopress.errors import UserError

ARCHS = {"llama": tiny_llama, "gpt_neox": tiny_gpt_neox}


@pytest.mark.parametrize("arch", ARCHS)
def test_finds_every_blocks_sublayers_and_linears(arch):
    model = ARCHS[arch]()
    adapter = ModelAdapter(model)
    assert adapter.num_blocks == model.config.num_hidden_layers
    for i in range(adapter.num_blocks):
        assert adapter.sublayer(i, "attn") is not adapter.sublayer(i, "mlp")
        linears = adapter.linears(i)
        assert len(linears) >= 4
        for name, module in linears.items():
            assert adapter.linear(i, name) is module
    block_params = sum(p.numel() for p in adapter.blocks.parameters())
    linear_params = sum(
        m.weight.numel() for i in range(adapter.num_blocks) for m in adapter.linears(i).values()
    )
    assert 0.9 < linear_params / block_params <= 1.0  # the rest are norms and biases


@pytest.mark.parametrize("arch", ARCHS)
def test_block_by_block_forward_matches_model(arch, tokens):
    model = ARCHS[arch]()
    with torch.no_grad():
        expected = model(tokens).logits
    assert torch.allclose(ModelAdapter(model).forward_logits(tokens), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_drop_then_restore_gives_back_same_logits(arch, kind, tokens):
    model = ARCHS[arch]()
    adapter = ModelAdapter(model)
    before = adapter.forward_logits(tokens)
    adapter.drop(1, kind)
    assert adapter.is_dropped(1, kind)
    dropped = adapter.forward_logits(tokens)
    assert not torch.allclose(dropped, before, atol=1e-4)
    adapter.restore(1, kind)
    assert torch.equal(adapter.forward_logits(tokens), before)


def test_dropped_sublayer_equals_zeroed_output_projection(llama, tokens):
    zeroed = copy.deepcopy(llama)
    zeroed.model.layers[2].self_attn.o_proj.weight.zero_()
    zeroed.model.layers[0].mlp.down_proj.weight.zero_()
    adapter = ModelAdapter(llama)
    adapter.drop(2, "attn")
    adapter.drop(0, "mlp")
    assert isinstance(llama.model.layers[2].self_attn, DroppedSublayer)
    assert torch.allclose(
        adapter.forward_logits(tokens), ModelAdapter(zeroed).forward_logits(tokens), atol=1e-5
    )


def test_unsupported_family_is_a_user_error():
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="unsupported model type 'mystery'"):
        ModelAdapter(model)
