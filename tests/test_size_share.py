"""The size column of the results table, worked out by hand on the tiny model of prepare_tiny_workspace.

Tiny Llama: 2 blocks, hidden 64, MLP 128, 4 heads of 16 with 2 KV heads, no biases. Per block:
attention q, o 64x64 and k, v 32x64 = 12,288 weights; MLP gate, up, down 128x64 = 24,576; two RMSNorms 128.
Block weights 36,992; both blocks 73,984, of which 73,728 in linears.
"""

from __future__ import annotations

import pytest

from conftest import prepare_tiny_workspace
from evopress.compressors import depth, quantization, sparsity
from evopress.models import load_adapter

BLOCKS, LINEARS, ATTN, MLP = 73_984, 73_728, 12_288, 24_576


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = prepare_tiny_workspace(tmp_path_factory.mktemp("size"))
    quantization.build_database(
        root / "model", root / "text", root / "db", {"bits": [2, 3, 4], "group_size": 32, "n_samples": 2}
    )
    return root


def adapter(workspace):
    return load_adapter(workspace / "model", "float32")


def test_block_weights_are_what_the_docstring_says(workspace):
    comp = depth.make(adapter(workspace), 1)
    assert comp.block_params() == BLOCKS


def test_depth_sublayers_keep_all_but_one_attention_and_one_mlp(workspace):
    comp = depth.make(adapter(workspace), 1, options={"granularity": "sublayer"})
    profile = comp.initial_profile()
    assert comp.size_share(profile) == pytest.approx(1 - (ATTN + MLP) / BLOCKS)


def test_depth_blocks_keep_half_of_two_blocks(workspace):
    comp = depth.make(adapter(workspace), 1, options={"granularity": "block"})
    assert comp.size_share(comp.initial_profile()) == pytest.approx(0.5)


def test_sparsity_keeps_the_non_zeros_and_the_norms(workspace):
    comp = sparsity.make(adapter(workspace), 0.5, options={"weights": "magnitude"})
    assert comp.size_share(comp.initial_profile()) == pytest.approx(1 - 0.5 * LINEARS / BLOCKS)


def test_quantization_counts_bits_over_16_with_norms_at_16(workspace):
    comp = quantization.make(adapter(workspace), 3.0, db=workspace / "db")
    expected = (3 * LINEARS + 16 * (BLOCKS - LINEARS)) / (16 * BLOCKS)
    assert comp.size_share(comp.initial_profile()) == pytest.approx(expected)
    two = dict.fromkeys(comp.units(), 2)
    assert comp.size_share(two) == pytest.approx((2 * LINEARS + 16 * 256) / (16 * BLOCKS))
