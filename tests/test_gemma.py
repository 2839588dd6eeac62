"""Gemma 2 and Gemma 3 text in the adapter: per-type block inputs (sliding / full attention), sandwich norms,
tied embeddings and logit soft-capping, dropped sublayers, and depth stitching with `config.layer_types`."""

import copy

import pytest
import torch

from conftest import char_tokenizer, tiny_gemma2, tiny_gemma3
from evopress.adapter import DroppedSublayer, ModelAdapter, TypedBlockKwargs
from evopress.compressors.depth import make, stitch

pytestmark = pytest.mark.usefixtures("one_thread")

GEMMAS = {"gemma2": tiny_gemma2, "gemma3_text": tiny_gemma3}


def model_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", GEMMAS)
def test_block_by_block_forward_equals_model_logits(family, tokens):
    model = GEMMAS[family]()
    assert model.config.model_type == family
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    torch.testing.assert_close(
        ModelAdapter(model).forward_logits(tokens), model_logits(model, tokens), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", GEMMAS)
def test_each_block_needs_the_inputs_of_its_attention_type(family, tokens):
    """The tiny configs make sliding and full attention blocks differ: block 0's inputs for all would be wrong."""
    model = GEMMAS[family]()
    adapter = ModelAdapter(model)
    hidden, kwargs = adapter.block_inputs(tokens)
    assert isinstance(kwargs, TypedBlockKwargs)
    assert set(kwargs.by_type) == {"sliding_attention", "full_attention"}
    assert kwargs.block_types == tuple(model.config.layer_types)
    one_for_all = adapter.logits(adapter.run_blocks(hidden, kwargs.of_block(0)))
    assert not torch.allclose(one_for_all, model_logits(model, tokens), atol=1e-3)


def test_soft_capping_is_applied_once(tokens):
    """Gemma 2's final_logit_softcapping bounds the logits; the adapter caps exactly as the model does."""
    model = tiny_gemma2()
    cap = model.config.final_logit_softcapping
    logits = ModelAdapter(model).forward_logits(tokens)
    assert logits.abs().max() < cap
    model.config.final_logit_softcapping = None
    uncapped = model_logits(model, tokens)
    assert uncapped.abs().max() > cap  # the tiny config's cap is below the raw logits, so capping is tested
    torch.testing.assert_close(logits, cap * torch.tanh(uncapped / cap), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", GEMMAS)
def test_capture_skips_the_blocks_before_the_last_type(family, tokens):
    """Reaching the first full-attention block (block 2) runs no sublayer: blocks 0 and 1 are passed through."""
    model = GEMMAS[family]()
    adapter = ModelAdapter(model)
    calls = []
    sublayers = [adapter.sublayer(i, kind) for i in range(adapter.num_blocks) for kind in ("attn", "mlp")]
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in sublayers]
    adapter.block_inputs(tokens)
    assert calls == []
    for h in handles:
        h.remove()
    assert all("forward" not in block.__dict__ for block in adapter.blocks)
    torch.testing.assert_close(
        adapter.forward_logits(tokens), model_logits(model, tokens), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", GEMMAS)
def test_inputs_captured_from_one_row_serve_any_batch(family, tokens):
    """The database build captures the block inputs from one row and reuses them for every batch."""
    adapter = ModelAdapter(GEMMAS[family]())
    hidden, kwargs = adapter.block_inputs(tokens)
    _, from_one_row = adapter.block_inputs(tokens[:1])
    torch.testing.assert_close(
        adapter.run_blocks(hidden, from_one_row), adapter.run_blocks(hidden, kwargs), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", GEMMAS)
def test_post_norm_of_a_dropped_sublayer_is_zero(family):
    """Gemma's post-attention / post-feedforward RMSNorm computes x * (1 + w) / rms(x): zeros stay zeros."""
    block = ModelAdapter(GEMMAS[family]()).blocks[1]
    zeros = torch.zeros(2, 5, block.hidden_size)
    for norm in (block.post_attention_layernorm, block.post_feedforward_layernorm):
        assert norm.weight.abs().sum() > 0  # random weights: (1 + w) != 1
        assert torch.equal(norm(zeros), zeros)
        assert torch.equal(norm(DroppedSublayer("mlp")(zeros)), zeros)


@pytest.mark.parametrize("family", GEMMAS)
def test_dropped_sublayers_match_the_model_and_zeroed_projections(family, tokens):
    model = GEMMAS[family]()
    zeroed = copy.deepcopy(model)
    adapter = ModelAdapter(model)
    dense = adapter.forward_logits(tokens)
    dropped = [(0, "mlp"), (2, "attn"), (3, "attn"), (3, "mlp")]
    for block, kind in dropped:
        adapter.drop(block, kind)
        layer = zeroed.model.layers[block]
        (layer.self_attn.o_proj if kind == "attn" else layer.mlp.down_proj).weight.zero_()
    live = adapter.forward_logits(tokens)
    assert not torch.allclose(live, dense, atol=1e-3)
    torch.testing.assert_close(
        live, model_logits(model, tokens), atol=1e-5, rtol=1e-5
    )  # same modules dropped
    torch.testing.assert_close(live, model_logits(zeroed, tokens), atol=1e-5, rtol=1e-5)
    adapter.restore_all()
    assert torch.equal(adapter.forward_logits(tokens), dense)


def test_scoring_from_a_cached_prefix_equals_a_full_pass(tokens):
    """The search's prefix reuse carries the per-type block inputs along with the cached hidden states."""
    from evopress.scoring import FitnessContext

    adapter = ModelAdapter(tiny_gemma3())
    ctx = FitnessContext.build(adapter, tokens, topk=16, batch_size=4)
    rows = ctx.all_rows()
    prefix = ctx.prefix(rows)
    adapter.drop(2, "attn")
    full = ctx.kl(rows)
    assert full > 0
    assert ctx.kl_from(prefix, 2) == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("family", GEMMAS)
@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_stitched_model_reloads_with_the_live_logits(tmp_path, tokens, family, granularity):
    """Removed blocks take their entry of config.layer_types with them: the reloaded model keeps every remaining
    block's attention type (here the first full-attention block and a sliding one go)."""
    from transformers import AutoModelForCausalLM

    from evopress.profile import make_profile

    build = GEMMAS[family]
    src = tmp_path / "src"
    build(num_layers=6).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    adapter = ModelAdapter(build(num_layers=6))
    comp = make(adapter, 2, options={"granularity": granularity})
    removed = {"block": [1, 2]} if granularity == "block" else {"attn": [1, 2], "mlp": [2, 4]}
    units = comp.profile_from_blocks(removed)
    comp.apply_profile(units)
    live = adapter.forward_logits(tokens)
    report = stitch(src, make_profile(comp, units, target=2, source="test"), None, tmp_path / "out")
    stitched = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    if granularity == "block":
        assert report["num_hidden_layers"] == 4
        assert stitched.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert stitched.config.model_type == family
    torch.testing.assert_close(model_logits(stitched, tokens), live, atol=1e-5, rtol=1e-5)
