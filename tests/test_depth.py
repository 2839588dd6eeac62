"""Depth compressor: units, budget, dropped sublayers are exactly the residual path, stitching, baselines."""

import itertools

import pytest
import torch

import evopress
from conftest import tiny_llama
from evopress.adapter import ModelAdapter
from evopress.baselines.depth import BASELINES
from evopress.compressors.depth import make, stitch
from evopress.errors import UserError
from evopress.scoring import FitnessContext

pytestmark = pytest.mark.usefixtures("one_thread")


def test_units_and_budget():
    adapter = ModelAdapter(tiny_llama(num_layers=4))
    sub = make(adapter, 2)
    assert sub.units()[:2] == ["block.0.attn", "block.0.mlp"] and len(sub.units()) == 8
    assert sub.total_cost(sub.initial_profile()) == 4 == sub.budget()
    blk = make(adapter, 2, options={"granularity": "block"})
    assert blk.units() == [f"block.{i}" for i in range(4)] and blk.budget() == 2


@pytest.mark.parametrize("target", [-1, 5, 1.5])
def test_infeasible_targets_are_one_line_errors(target):
    adapter = ModelAdapter(tiny_llama(num_layers=4))
    with pytest.raises(UserError) as err:
        make(adapter, target)
    assert "\n" not in str(err.value)


def test_unknown_option():
    with pytest.raises(UserError, match="granularity"):
        make(ModelAdapter(tiny_llama(num_layers=2)), 1, options={"granularity": "head"})


def _zeroed(model, block: int, kind: str):
    layer = model.model.layers[block]
    lin = layer.self_attn.o_proj if kind == "attn" else layer.mlp.down_proj
    with torch.no_grad():
        lin.weight.zero_()


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_dropped_sublayer_equals_zeroed_weights(kind, tokens):
    """A dropped sublayer contributes nothing: same logits as the model whose sublayer outputs are zeroed."""
    model = tiny_llama(num_layers=3)
    adapter = ModelAdapter(model)
    comp = make(adapter, 1)
    dense = adapter.forward_logits(tokens)
    comp.apply(f"block.1.{kind}", 1)
    dropped = adapter.forward_logits(tokens)
    comp.apply(f"block.1.{kind}", 0)
    assert torch.equal(adapter.forward_logits(tokens), dense)  # restore is exact
    reference = tiny_llama(num_layers=3)
    _zeroed(reference, 1, kind)
    zeroed = ModelAdapter(reference).forward_logits(tokens)
    assert not torch.allclose(dropped, dense, atol=1e-3)
    torch.testing.assert_close(dropped, zeroed, atol=1e-5, rtol=1e-5)


def test_block_drop_equals_both_sublayers(tokens):
    adapter = ModelAdapter(tiny_llama(num_layers=3))
    blk, sub = make(adapter, 1, options={"granularity": "block"}), make(adapter, 1)
    blk.apply("block.2", 1)
    a = adapter.forward_logits(tokens)
    blk.apply("block.2", 0)
    sub.apply("block.2.attn", 1)
    sub.apply("block.2.mlp", 1)
    assert torch.equal(a, adapter.forward_logits(tokens))


def stitched_layers(comp, units) -> int:
    """Blocks left: removed blocks go, and so does a block that loses both its sublayers."""
    removed = comp.removed_blocks(units)
    return 4 - len(set.intersection(*map(set, removed.values())))


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_stitch_matches_live_profile(tmp_path, tokens, granularity):
    from transformers import AutoModelForCausalLM

    from evopress.profile import make_profile

    src = tmp_path / "src"
    tiny_llama(num_layers=4).save_pretrained(src)
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(src)
    adapter = ModelAdapter(tiny_llama(num_layers=4))
    comp = make(adapter, 2, options={"granularity": granularity})
    units = (
        comp.profile_from_blocks([1, 3])
        if granularity == "block"
        else comp.random_profile(__import__("random").Random(3))
    )
    comp.apply_profile(units)
    live = adapter.forward_logits(tokens)
    profile = make_profile(comp, units, target=2, source="test")
    out = tmp_path / "out"
    report = stitch(src, profile, None, out)
    assert report["num_hidden_layers"] == stitched_layers(comp, units)
    # block profiles are plain folders; sublayer profiles keep removed sublayers out (DeciLM block_configs)
    stitched = (
        AutoModelForCausalLM.from_pretrained(out) if granularity == "block" else evopress.load_model(out)
    )
    assert stitched.config.num_hidden_layers == stitched_layers(comp, units)
    with torch.no_grad():
        torch.testing.assert_close(stitched(tokens).logits, live, atol=1e-5, rtol=1e-5)
    assert (out / "profile.json").exists()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_keep_budget_and_leave_model_dense(name, tokens):
    adapter = ModelAdapter(tiny_llama(num_layers=5))
    ctx = FitnessContext.build(adapter, tokens, topk=16)
    for granularity in ("block", "sublayer"):
        comp = make(adapter, 2, options={"granularity": granularity})
        profile = BASELINES[name](comp, ctx, seed=0, tokens=64)
        assert sorted(profile) == sorted(comp.units())
        assert comp.total_cost(profile) == comp.budget()
        assert not adapter._stash  # live model back to dense


def test_sleb_first_step_is_the_least_harmful_block(tokens):
    """SLEB's first removal (prefix-started) agrees with removing each block from scratch."""
    from evopress.fitness import perplexity

    adapter = ModelAdapter(tiny_llama(num_layers=5))
    ctx = FitnessContext.build(adapter, tokens, topk=16)
    comp = make(adapter, 1, options={"granularity": "block"})
    chosen = comp.removed_blocks(BASELINES["sleb"](comp, ctx, seed=0, tokens=tokens.numel()))["block"]
    ppl = {}
    for j in range(5):
        comp.apply(f"block.{j}", 1)
        ppl[j] = perplexity(adapter, tokens)
        comp.apply(f"block.{j}", 0)
    assert chosen == [min(ppl, key=ppl.get)]


def test_window_is_contiguous(tokens):
    adapter = ModelAdapter(tiny_llama(num_layers=6))
    ctx = FitnessContext.build(adapter, tokens, topk=16)
    comp = make(adapter, 3, options={"granularity": "block"})
    removed = comp.removed_blocks(BASELINES["window"](comp, ctx, seed=0, tokens=64))["block"]
    assert removed in [list(range(s, s + 3)) for s in range(4)]
    assert list(itertools.pairwise(removed))
