"""Stitched quantization in compressed-tensors' pack-quantized format: exact weights, stock transformers loads it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import prepare_tiny_workspace, tiny_llama
from evopress import ct_format
from evopress.adapter import ModelAdapter
from evopress.compressors import quantization
from evopress.compressors.quantization.gptq import rtn
from evopress.errors import UserError
from evopress.fitness import perplexity
from evopress.models import load_model
from evopress.packing import is_packed, load_packed

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = {"bits": "2,3,4,5,6,7,8", "group_size": 32, "n_samples": 8, "batch_size": 4}
TARGET = 4.5  # the tiny model's size groups hold 4, 4 and 6 linears: 4.5 bits splits into whole bits in each
MIXED = {  # per size group, bits summing to TARGET x its count: 2, 3, 4 and 8 bits all appear
    4096: [2, 3, 5, 8],  # q_proj, o_proj
    2048: [8, 5, 3, 2],  # k_proj, v_proj
    8192: [2, 3, 4, 8, 2, 8],  # gate, up, down
}


def block_linears(model) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    }


def test_round_trip_gives_our_weights_exactly(tmp_path):
    """Every bit-width 1..8, group sizes 16, 32 and whole rows: stock from_pretrained (float32) decompresses to
    exactly our float32 dequantization (the float16 scale and the integer codes are exact in float32)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoModelForCausalLM

    model = tiny_llama(num_layers=2)
    linears = block_linears(model)
    quantized = {
        name: rtn(lin.weight, 1 + i % 8, (16, 32, 0)[i % 3]) for i, (name, lin) in enumerate(linears.items())
    }
    ct_format.write(model, None, quantized, tmp_path / "ct")

    # the tensors we wrote are the ones the package's own compressor writes for these weights and qparams
    for name, q in list(quantized.items())[:4]:
        scheme = QuantizationScheme(targets=[name], weights=ct_format.weight_args(*ct_format.scheme_key(q)))
        state = {
            "weight": q.dequantize(),
            "weight_scale": q.scale.float(),
            "weight_zero_point": ct_format.signed(q.zero, q.bits),
        }
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        ours = ct_format.linear_tensors(name, q)
        for key in ("weight_packed", "weight_zero_point"):
            assert torch.equal(theirs[key], ours[f"{name}.{key}"]), (name, key)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert hasattr(loaded.get_submodule(next(iter(quantized))), "weight_packed")  # compressed until used
    ids = torch.randint(0, 128, (2, 16))
    logits = loaded(input_ids=ids).logits  # the first forward decompresses every linear
    for name, q in quantized.items():
        assert torch.equal(loaded.get_submodule(name).weight, q.dequantize()), name
        linears[name].weight.copy_(q.dequantize())
    assert torch.equal(logits, model(input_ids=ids).logits)

    # evopress's own loader: plain nn.Linear again, and at bfloat16 the float32 weights cast once (as load_packed)
    dense = ct_format.load(tmp_path / "ct", torch.bfloat16)
    for name, q in quantized.items():
        module = dense.get_submodule(name)
        assert not hasattr(module, "weight_scale") and "forward" not in module.__dict__
        assert torch.equal(module.weight, q.dequantize().to(torch.bfloat16)), name
    assert not hasattr(dense.config, "quantization_config")


def write_profile(path, units: dict) -> None:
    """A quantization profile file at TARGET holding `units`, for the stitch stage."""
    doc = {"method": "quantization", "target": TARGET, "options": {}, "units": units, "model_sha256": None}
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def stitched(tmp_path_factory):
    """A GPTQ database at 2..8 bits and a mixed profile (2, 3, 4, 5, 8 bits) stitched in the default format."""
    root = prepare_tiny_workspace(tmp_path_factory.mktemp("ct"))
    quantization.build_database(root / "model", root / "text", root / "db", OPTS)
    model, _ = load_model(str(root / "model"), dtype="float32")
    comp = quantization.make(ModelAdapter(model), TARGET, db=root / "db")
    left = {size: list(bits) for size, bits in MIXED.items()}
    units = {u: left[comp.sizes[u]].pop(0) for u in comp.units()}
    profile = {
        "method": "quantization",
        "target": TARGET,
        "options": {},
        "units": units,
        "model_sha256": None,
    }
    report = quantization.stitch(root / "model", profile, root / "db", root / "stitched")
    return root, comp, units, report


def test_config_has_one_group_per_bit_width_covering_every_linear_once(stitched):
    root, comp, units, report = stitched
    qconfig = json.loads((root / "stitched" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["quantization_status"] == "compressed" and qconfig["ignore"] == ["lm_head"]
    bits_of = {quantization.linear_prefix(comp.adapter, u): b for u, b in units.items()}
    targets = [t for g in qconfig["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(bits_of)  # every block linear exactly once
    seen = set()
    for group in qconfig["config_groups"].values():
        w = group["weights"]
        assert {bits_of[t] for t in group["targets"]} == {w["num_bits"]}
        assert w["block_structure"] == [1, OPTS["group_size"]] and w["symmetric"] is False
        seen.add(w["num_bits"])
    assert seen == {2, 3, 4, 5, 8} and report["format"] == "compressed-tensors"
    assert report["bytes_quantized"] + report["bytes_dense_rest"] < report["bytes_total"]


# Runs in a fresh interpreter: stock transformers only (compressed-tensors comes in through its quantizer).
STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
folder, tokens = sys.argv[1:]
ids = load_file(tokens)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float()
nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
print(json.dumps({
    "perplexity": float(torch.exp(nll.double())),
    "dtype": str(model.dtype),
    "quantizer": type(model.hf_quantizer).__name__,
    "evopress_modules": sorted(m for m in sys.modules if m.split(".")[0] == "evopress"),
}))
"""


def test_stock_transformers_perplexity_matches_evopress(stitched, tmp_path):
    root, comp, units, _ = stitched
    heldout = root / "text" / "heldout.safetensors"
    from safetensors.torch import load_file

    tokens = load_file(str(heldout))["input_ids"]
    comp.apply_profile(units)
    ours = perplexity(comp.adapter, tokens)
    out = subprocess.run(
        [sys.executable, "-c", STOCK, str(root / "stitched"), str(heldout)],
        cwd=tmp_path,  # nothing of the repository on the path
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stock = json.loads(out.stdout.strip().splitlines()[-1])
    assert stock["evopress_modules"] == [] and stock["quantizer"] == "CompressedTensorsHfQuantizer"
    assert stock["dtype"] == "torch.float32"
    # the weights are bit-identical; what is left is summation order (one forward vs evopress's block by block)
    assert abs(stock["perplexity"] / ours - 1) < 1e-5, (stock["perplexity"], ours)

    # evopress's loaders read the folder too, with the same logits as the profile applied in place
    ids = tokens[:2]
    expected = comp.adapter.model(input_ids=ids).logits
    loaded, _ = load_model(str(root / "stitched"), dtype="float32")
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert torch.equal(load_packed(root / "stitched")(input_ids=ids).logits, expected)


def test_stitch_format_option(stitched, tmp_path):
    """format=evopress-packed keeps our own layout (through the stage and its options); a bad option is refused."""
    from evopress.stages import stitch

    root, comp, units, ct_report = stitched
    write_profile(tmp_path / "p.json", units)
    args = ("quantization", root / "model", tmp_path / "p.json", root / "db")
    report = stitch(*args, tmp_path / "packed", {"format": "evopress-packed"})
    assert is_packed(tmp_path / "packed") and report["format"] == "evopress-packed"
    ids = torch.randint(0, 257, (2, 16))
    a = load_packed(tmp_path / "packed")(input_ids=ids).logits
    b = load_packed(root / "stitched")(input_ids=ids).logits
    assert torch.equal(a, b)
    # Bytes of the linears' tensors, exactly: the same codes (compressed-tensors pads each row to 32 codes, ours
    # the whole stream to a byte) and float16 scales; zero points int8 vs `bits` bits; + an int64 [2] shape.
    ct, packed = 0, 0
    for unit, bits in units.items():
        rows, cols = comp.adapter.linear(*quantization.split_unit(unit)).weight.shape
        groups = rows * cols // OPTS["group_size"]
        ct += 4 * rows * -(-cols * bits // 32) + groups + 2 * groups + 16
        packed += -(-rows * cols * bits // 8) + -(-groups * bits // 8) + 2 * groups
    assert ct_report["bytes_quantized"] == ct and report["bytes_quantized"] == packed
    allowed = "allowed: compressed-tensors, compressed-tensors-group, evopress-packed"
    with pytest.raises(UserError, match=f"stitch format 'gguf' for method 'quantization'; {allowed}"):
        stitch(*args, tmp_path / "bad", {"format": "gguf"})
    with pytest.raises(UserError, match=r"unknown stitch options \['bits'\]"):
        stitch(*args, tmp_path / "bad", {"bits": 3})
    assert not (tmp_path / "bad").exists()


def test_group_layout_is_what_the_package_writes_and_loads_back_exactly(stitched, tmp_path):
    """format=compressed-tensors-group: strategy group (channel for whole rows) with zero points packed along the
    rows, tensor for tensor what the package's own compressor writes (llm-compressor's asymmetric layout, the
    one vLLM's WNA16 reads); evopress.load_model gives the same logits as the default folder."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from evopress.artifact import model_format
    from evopress.stages import stitch

    root, comp, units, ct_report = stitched
    write_profile(tmp_path / "p.json", units)
    report = stitch(
        "quantization",
        root / "model",
        tmp_path / "p.json",
        root / "db",
        tmp_path / "g",
        {"format": "compressed-tensors-group"},
    )
    assert report["format"] == "compressed-tensors-group"
    qconfig = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    for group in qconfig["config_groups"].values():
        w = group["weights"]
        assert w["strategy"] == "group" and w["group_size"] == OPTS["group_size"] and w["symmetric"] is False
    assert ct_format.packs_zero_points(tmp_path / "g") and not ct_format.packs_zero_points(root / "stitched")
    assert model_format(tmp_path / "g")[0] == "compressed-tensors pack-quantized (zero points packed)"

    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "g" / "model.safetensors"))
    for unit, bits in list(units.items())[:6]:
        name = quantization.linear_prefix(comp.adapter, unit)
        q = comp.quantized(unit, bits)
        scheme = QuantizationScheme(
            targets=[name], weights=ct_format.weight_args(bits, q.group_size, strategy="group")
        )
        state = {
            "weight": q.dequantize(),
            "weight_scale": q.scale.float(),
            "weight_zero_point": ct_format.signed(q.zero, bits),
        }
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        rows = q.codes.shape[0]
        assert ours[f"{name}.weight_zero_point"].shape == (-(-rows * bits // 32), q.scale.shape[1])
        for key in ("weight_packed", "weight_zero_point"):
            assert torch.equal(theirs[key], ours[f"{name}.{key}"]), (name, key)
    # same numbers as the default layout, through evopress's loader
    ids = torch.randint(0, 257, (2, 16))
    a, _ = load_model(str(tmp_path / "g"), dtype="float32")
    b, _ = load_model(str(root / "stitched"), dtype="float32")
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    # a whole-row group is a channel scheme
    assert ct_format.weight_args(4, 64, cols=64, strategy="group")["strategy"] == "channel"
