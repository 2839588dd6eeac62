"""Depth stitching that is really smaller: removed sublayers absent from the files and the compute (DeciLM
block_configs, loaded by evopress.load_model); whole-block profiles load with stock transformers."""

from __future__ import annotations

import json

import pytest
import torch

import evopress
from conftest import char_tokenizer, tiny_llama
from evopress import depth_format
from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make, stitch
from evopress.ct_format import tensor_bytes
from evopress.profile import make_profile

pytestmark = pytest.mark.usefixtures("one_thread")

# Block 0 loses its attention (the first KV-cache layer), block 2 both sublayers (deleted), block 3 its MLP: the
# stitched blocks are old 0, 1, 3, 4, so the removed MLP is in new block 2.
REMOVED = {"attn": [0, 2], "mlp": [2, 3]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("depth") / "src"
    tiny_llama(num_layers=5).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    return src


def stitched(source, out, removed, granularity="sublayer"):
    """(live logits of the profile applied in memory, stitch report, the dense model) for `removed`."""
    model = tiny_llama(num_layers=5)
    comp = make(ModelAdapter(model), 2, options={"granularity": granularity})
    units = comp.profile_from_blocks(removed)
    removed_params = sum(comp.unit_params(u) for u, lvl in units.items() if lvl)
    comp.apply_profile(units)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    live = comp.adapter.forward_logits(ids)
    comp.adapter.restore_all()
    report = stitch(source, make_profile(comp, units, target=2, source="test"), None, out)
    return ids, live, report, removed_params


def test_sublayer_profile_reloads_without_the_removed_modules(source, tmp_path):
    ids, live, report, _ = stitched(source, tmp_path / "out", REMOVED)
    assert report["layout"] == "decilm" and report["num_hidden_layers"] == 4  # block 2 deleted outright
    model = evopress.load_model(tmp_path / "out")
    blocks = model.model.layers
    assert isinstance(blocks[0].self_attn, depth_format.NoOpSublayer)
    assert isinstance(blocks[2].mlp, depth_format.NoOpSublayer)
    gone = (".0.self_attn.", ".0.input_layernorm", ".2.mlp.", ".2.post_attention_layernorm")
    assert not any(g in n for g in gone for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, live, atol=1e-5, rtol=1e-5)
    # cached generation: the kept attentions are KV-cache layers 0.., so a cache matches recomputing everything
    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))


def test_bytes_on_disk_fall_by_the_removed_share(source, tmp_path):
    """The weights file holds exactly the dense tensors less those of removed sublayers and their norms."""
    _, _, report, removed_params = stitched(source, tmp_path / "out", REMOVED)
    hidden = 64
    norms = len(REMOVED["attn"]) + len(REMOVED["mlp"])  # one norm in front of each removed sublayer
    dense = tensor_bytes(source / "model.safetensors")
    pruned = tensor_bytes(tmp_path / "out" / "model.safetensors")
    assert dense - pruned == 4 * (removed_params + norms * hidden)
    # two attention and two MLP sublayers with their norms are exactly two of the five blocks' bytes
    blocks = dense - 4 * (128 * hidden + hidden)  # all but the (tied) embedding and the final norm
    assert (dense - pruned) * 5 == blocks * 2


def test_config_is_decilm_and_stock_transformers_refuses_it(source, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    stitched(source, tmp_path / "out", REMOVED)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    no_ops = [(b["attention"]["no_op"], b["ffn"]["no_op"]) for b in config["block_configs"]]
    assert no_ops == [(True, False), (False, False), (False, True), (False, False)]
    assert {b["attention"]["n_heads_in_group"] for b in config["block_configs"]} == {2}
    # no silent random sublayers: stock transformers has no DeciLM class
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)
    # the shipped config class gives vLLM's DeciLM what it reads: attributes, and hasattr(ffn, "ffn_mult") false
    remote = AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert remote.block_configs[0].attention.no_op and not remote.block_configs[2].attention.no_op
    assert remote.block_configs[2].ffn.no_op and remote.block_configs[1].ffn.intermediate_size == 128
    assert not hasattr(remote.block_configs[1].ffn, "ffn_mult")
    assert remote.to_dict()["block_configs"] == config["block_configs"]


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_whole_block_profiles_load_with_stock_transformers(source, tmp_path, granularity):
    """Block profiles, and sublayer profiles whose removals pair up in whole blocks: plain, shorter Llama folders."""
    from transformers import AutoModelForCausalLM

    removed = [1, 3] if granularity == "block" else {"attn": [1, 3], "mlp": [1, 3]}
    ids, live, report, removed_params = stitched(source, tmp_path / "out", removed, granularity)
    assert report["layout"] == "dense" and report["num_hidden_layers"] == 3
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert stock.config.model_type == "llama" and stock.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, live, atol=1e-5, rtol=1e-5)
    dense = tensor_bytes(source / "model.safetensors")
    removed_bytes = dense - tensor_bytes(tmp_path / "out" / "model.safetensors")
    assert removed_bytes >= 4 * removed_params  # the blocks' norms go too
