"""The numbers we report, checked against independent computations: a metrics row against the model's own loss and a
float64 KL, and the stitched folder of every method against the profile applied live."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import prepare_tiny_workspace
from evopress.compressors import depth, quantization, sparsity
from evopress.config import ComputeConfig
from evopress.data import load_tokens
from evopress.evaluate import Candidate, evaluate_candidates
from evopress.models import load_adapter, load_model
from evopress.profile import make_profile, model_sha256, save_profile
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
