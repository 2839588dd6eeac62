"""On a CUDA device: the model, the fitness and the search run there and agree with the CPU.

Skipped where torch sees no GPU (CI, the 2-core CPU machines); benchmarks/gpu_check.sh runs them on a GPU machine.
float32 on both devices; agreement within float32 rounding of different kernels, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from conftest import prepare_quantized_workspace, short_quantized_search
from evopress.compressors import quantization

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return prepare_quantized_workspace(tmp_path_factory.mktemp("cuda"))


def _fitness(workspace, device: str) -> tuple[float, float]:
    """KL to the dense model and perplexity of the uniform 3-bit profile, computed on `device`."""
    from evopress.data import load_tokens
    from evopress.fitness import DenseReference, perplexity
    from evopress.models import load_adapter
    from evopress.scoring import FitnessContext

    tokens = load_tokens(workspace / "text", "calibration")
    ref = DenseReference.build(load_adapter(workspace / "model", "float32", device), tokens, None, 4)
    adapter = load_adapter(workspace / "model", "float32", device)
    comp = quantization.make(adapter, 3.0, db=workspace / "db")
    comp.apply_profile(comp.initial_profile())
    ctx = FitnessContext(adapter, tokens, ref, 4)
    return ctx.kl(ctx.all_rows()), perplexity(adapter, tokens, 4)


def test_kl_and_perplexity_on_cuda_match_the_cpu(workspace):
    kl_cpu, ppl_cpu = _fitness(workspace, "cpu")
    kl_gpu, ppl_gpu = _fitness(workspace, "cuda")
    assert kl_gpu == pytest.approx(kl_cpu, rel=1e-3) and ppl_gpu == pytest.approx(ppl_cpu, rel=1e-4)


def test_search_on_cuda_ends_where_the_cpu_search_ends(workspace, tmp_path):
    cpu, _ = short_quantized_search(workspace, tmp_path / "cpu", device="cpu")
    gpu, _ = short_quantized_search(workspace, tmp_path / "cuda", device="cuda")
    assert gpu["compute"]["device"].startswith("cuda")
    assert gpu["fitness"] == pytest.approx(cpu["fitness"], rel=1e-3)


def test_two_actors_on_one_gpu_find_the_profile_one_process_finds(workspace, tmp_path):
    pytest.importorskip("ray")
    one, p1 = short_quantized_search(workspace, tmp_path / "one", device="cuda", workers=1, threads=1)
    two, p2 = short_quantized_search(workspace, tmp_path / "two", device="cuda", workers=2, threads=1)
    assert p1 == p2 and one["fitness"] == two["fitness"]
