"""The numbers we report, checked against independent computations: a metrics row against the model's own loss and a
float64 KL, and the stitched folder of every method against the profile applied live. Every row's figures come from
its stitched folder: a tampered folder changes the row, and past the tolerance the row is refused."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from conftest import prepare_tiny_workspace
from evopress import stages
from evopress.artifact import bytes_on_disk, model_format
from evopress.compressors import depth, quantization, sparsity
from evopress.config import ComputeConfig
from evopress.data import load_tokens
from evopress.errors import UserError
from evopress.evaluate import Candidate, evaluate_candidates
from evopress.models import load_adapter, load_model
from evopress.profile import make_profile, model_sha256, save_profile
from evopress.report import markdown, table_rows
from evopress.stages import stitch

FLOAT32_FULL_KL = ComputeConfig(dtype="float32", batch_size=3, topk=0)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = prepare_tiny_workspace(tmp_path_factory.mktemp("evaluate"))
    sparsity.build_database(
        root / "model", root / "text", root / "db-sparsity", {"target": 0.5, "num_levels": 1, "n_samples": 2}
    )
    quantization.build_database(
        root / "model",
        root / "text",
        root / "db-quantization",
        {"bits": [2, 3, 4], "group_size": 32, "n_samples": 2},
    )
    return root


def _profile(ws, method: str, path, seed: int = 0):
    """A random feasible profile of `method` on the tiny model, written as a profile file."""
    adapter = load_adapter(ws / "model", "float32")
    make = {"depth": depth.make, "sparsity": sparsity.make, "quantization": quantization.make}[method]
    target = {"depth": 1, "sparsity": 0.5, "quantization": 3.0}[method]
    db = None if method == "depth" else ws / f"db-{method}"
    comp = make(adapter, target, db=db, options={})
    units = comp.random_profile(random.Random(seed))
    profile = make_profile(comp, units, target=target, source="test", sha=model_sha256(ws / "model"))
    save_profile(path, profile)
    return profile, db


def test_metrics_row_equals_the_models_own_loss_and_a_float64_kl(ws, tmp_path):
    profile, _ = _profile(ws, "depth", tmp_path / "p.json", seed=3)
    row = evaluate_candidates(
        ws / "model", ws / "text", [Candidate("p", "depth", tmp_path / "p.json")], FLOAT32_FULL_KL,
        log=lambda _: None,
    )["depth/p"]  # fmt: skip
    ids = load_tokens(ws / "text", "heldout")
    dense, _ = load_model(str(ws / "model"))
    live = load_adapter(ws / "model", "float32")
    depth.make(live, 1).apply_profile(profile["units"])
    with torch.no_grad():
        loss = live.model(ids, labels=ids).loss  # transformers' own mean next-token cross-entropy
        p = torch.log_softmax(dense(ids).logits.double(), -1)
        q = torch.log_softmax(live.model(ids).logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert row["heldout_perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert row["heldout_kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-4
    assert row["heldout_tokens"] == ids.numel() and row["target"] == 1 and row["budget"] == 2


@pytest.mark.parametrize("method", ["depth", "sparsity", "quantization"])
def test_stitched_folder_computes_what_the_live_profile_computes(ws, tmp_path, method):
    profile, db = _profile(ws, method, tmp_path / "p.json", seed=5)
    stitch(method, ws / "model", tmp_path / "p.json", db, tmp_path / "stitched")
    stitched, _ = load_model(str(tmp_path / "stitched"))
    live = load_adapter(ws / "model", "float32")
    make = {"depth": depth.make, "sparsity": sparsity.make, "quantization": quantization.make}[method]
    make(live, profile["target"], db=db, options={}).apply_profile(profile["units"])
    ids = load_tokens(ws / "text", "heldout")
    dense, _ = load_model(str(ws / "model"))
    with torch.no_grad():
        want, got, base = live.model(ids).logits, stitched(ids).logits, dense(ids).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the profile changes the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


FORMATS = {
    "depth": ("DeciLM block_configs", "safetensors LlamaForCausalLM"),  # sublayers removed, or whole blocks
    "sparsity": ("safetensors LlamaForCausalLM",),  # dense with zeros: the default stitch format
    "quantization": ("compressed-tensors pack-quantized",),
}


def test_each_baseline_row_is_measured_from_a_folder_stitched_for_it(ws, tmp_path):
    """Profiles without a folder of their own are stitched by evaluate (into `scratch`, removed afterwards) and
    measured from it: format and bytes of that folder, delivered perplexity equal to the live one."""
    candidates = [Candidate("dense")]
    for i, method in enumerate(FORMATS):
        _, db = _profile(ws, method, tmp_path / f"{method}.json", seed=i)
        candidates.append(Candidate("base", method, tmp_path / f"{method}.json", db))
    rows = evaluate_candidates(
        ws / "model",
        ws / "text",
        candidates,
        FLOAT32_FULL_KL,
        log=lambda _: None,
        scratch=tmp_path / "scratch",
    )
    assert not list((tmp_path / "scratch").iterdir())  # the temporary folders are gone
    dense = rows["dense"]
    assert dense["size_on_disk"] == 1.0 and dense["bytes_on_disk"] == bytes_on_disk(ws / "model")
    for method, fmt in FORMATS.items():
        row = rows[f"{method}/base"]
        # the same profile stitched here: same files, same bytes, same format
        stitch(method, ws / "model", tmp_path / f"{method}.json", row_db(ws, method), tmp_path / method)
        assert row["bytes_on_disk"] == bytes_on_disk(tmp_path / method)
        assert (row["format"], row["loader"]) == model_format(tmp_path / method) and row["format"] in fmt
        assert row["size_on_disk"] == pytest.approx(row["bytes_on_disk"] / dense["bytes_on_disk"])
        assert row["heldout_perplexity"] == pytest.approx(row["heldout_perplexity_live"], rel=1e-4)
        assert abs(row["heldout_live_gap"]) < 1e-4 and row["heldout_kl"] > 0
        assert row["tokens_per_second"] > 0 and row["speed_vs_dense"] > 0
    assert rows["quantization/base"]["size_on_disk"] < 1  # packed integer codes
    table = markdown(table_rows(rows))
    assert "| quantization | base | 3 |" in table and "compressed-tensors pack-quantized" in table


def row_db(ws, method: str):
    return None if method == "depth" else ws / f"db-{method}"


def _tampering_stitch(scale: float, seen: dict):
    """stages.stitch, then the final norm's weights scaled in the written folder (the manifest left as it was)."""
    from safetensors.torch import load_file, save_file

    real = stages.stitch

    def fake(method, model_dir, profile, db, out, options=None):
        report = real(method, model_dir, profile, db, out, options)
        (weights,) = Path(out).glob("*.safetensors")
        tensors = load_file(weights)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * scale
        save_file(tensors, weights, metadata={"format": "pt"})
        seen["bytes"] = bytes_on_disk(out)
        return report

    return fake


def test_check_rows_compare_live_and_delivered_on_the_same_rows(ws, tmp_path):
    """With fewer check rows the gap compares the two models on those rows only: the full-set figure of the
    delivered model and the live figure of two rows differ, their gap on the same two rows does not."""
    _profile(ws, "depth", tmp_path / "p.json", seed=3)
    candidates = [Candidate("dense"), Candidate("shortgpt", "depth", tmp_path / "p.json")]
    row = evaluate_candidates(
        ws / "model", ws / "text", candidates, FLOAT32_FULL_KL, log=lambda _: None, check_rows=2
    )["depth/shortgpt"]
    assert row["heldout_check_rows"] == 2 and abs(row["heldout_live_gap"]) < 1e-4
    assert abs(row["heldout_perplexity"] / row["heldout_perplexity_live"] - 1) > 1e-3
    # the row carries both figures of the check, so a table can show them side by side
    assert row["heldout_perplexity_check"] / row["heldout_perplexity_live"] - 1 == row["heldout_live_gap"]


def test_a_tampered_baseline_folder_changes_the_row_and_past_the_tolerance_fails_it(
    ws, tmp_path, monkeypatch
):
    _profile(ws, "depth", tmp_path / "p.json", seed=3)
    candidates = [Candidate("dense"), Candidate("shortgpt", "depth", tmp_path / "p.json")]
    seen: dict = {}
    monkeypatch.setattr(stages, "stitch", _tampering_stitch(8.0, seen))
    with pytest.raises(UserError, match="depth/shortgpt: the stitched folder .* not what was searched"):
        evaluate_candidates(ws / "model", ws / "text", candidates, FLOAT32_FULL_KL, log=lambda _: None)
    # With the check relaxed the row shows the tampered folder's figures, not the live profile's.
    row = evaluate_candidates(
        ws / "model", ws / "text", candidates, FLOAT32_FULL_KL, log=lambda _: None, tolerance=math.inf
    )["depth/shortgpt"]
    assert abs(row["heldout_live_gap"]) > 1e-3
    assert row["heldout_perplexity"] == pytest.approx(
        row["heldout_perplexity_live"] * (1 + row["heldout_live_gap"])
    )
    assert row["bytes_on_disk"] == seen["bytes"]


def test_a_named_stitched_folder_is_the_one_measured(ws, tmp_path):
    """The searched profile's row reads its own folder (models/<method> in the pipeline): tampered, it fails;
    missing, it fails naming the stitch stage."""
    _, db = _profile(ws, "quantization", tmp_path / "p.json", seed=4)
    folder = tmp_path / "stitched"
    _tampering_stitch(8.0, {})("quantization", ws / "model", tmp_path / "p.json", db, folder)

    def run(stitched):
        candidate = Candidate("evopress", "quantization", tmp_path / "p.json", db, stitched)
        return evaluate_candidates(
            ws / "model", ws / "text", [candidate], FLOAT32_FULL_KL, log=lambda _: None
        )

    with pytest.raises(UserError, match="not what was searched"):
        run(folder)
    with pytest.raises(UserError, match="run the stitch stage"):
        run(tmp_path / "absent")


def test_results_table_has_the_delivered_columns_and_any_lm_eval_figures():
    rows = {
        "dense": {"method": "dense", "profile": "dense", "heldout_perplexity": 10.0, "size_on_disk": 1.0,
                  "speed_vs_dense": 1.0, "format": "safetensors LlamaForCausalLM", "loader": "x",
                  "lm_eval.piqa.acc": 0.5},
        "depth/evopress": {"method": "depth", "profile": "evopress", "target": 2.0, "heldout_perplexity": 12.0,
                           "heldout_kl": 0.1, "size_on_disk": 0.8, "speed_vs_dense": 1.2,
                           "format": "DeciLM block_configs", "loader": "evopress.load_model",
                           "lm_eval.piqa.acc": 0.45},
    }  # fmt: skip
    table = markdown(table_rows(rows))
    header = table.splitlines()[0]
    assert "size on disk (% dense)" in header and "tokens/s (x dense)" in header and "piqa.acc" in header
    assert (
        "| depth | evopress | 2 | 12.00 | 0.1000 | 80.0 | 1.20 | DeciLM block_configs | evopress.load_model | 0.4500 |"
        in table
    )
