"""Candidates scored on Ray actors: the same profile bit for bit as one process; a killed actor is replaced."""

from __future__ import annotations

import pytest

from conftest import prepare_quantized_workspace, short_quantized_search
from evopress.compressors import quantization
from evopress.config import ComputeConfig

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    yield prepare_quantized_workspace(tmp_path_factory.mktemp("workers"))
    if ray.is_initialized():
        ray.shutdown()


def _search(root, out, workers: int):
    return short_quantized_search(root, out, workers=workers, threads=1)


def test_two_actors_find_the_profile_one_process_finds(workspace, tmp_path):
    one, p1 = _search(workspace, tmp_path / "one", 1)
    two, p2 = _search(workspace, tmp_path / "two", 2)
    assert p1 == p2 and one["fitness"] == two["fitness"]
    h1 = (tmp_path / "one" / "history.csv").read_text().splitlines()
    h2 = (tmp_path / "two" / "history.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in h1] == [r.split(",")[:3] for r in h2]  # generation, fitness, improved


def test_an_actor_killed_mid_search_is_replaced_and_nothing_changes(workspace, tmp_path):
    from evopress.adapter import ModelAdapter
    from evopress.data import load_tokens
    from evopress.models import load_model
    from evopress.scoring import FitnessContext, LiveModel, score_pool
    from evopress.workers import RayScorer, WorkerSpec

    model, _ = load_model(str(workspace / "model"), dtype="float32")
    comp = quantization.make(ModelAdapter(model), 3.0, db=workspace / "db")
    tokens = load_tokens(workspace / "text", "calibration")
    ctx = FitnessContext.build(comp.adapter, tokens, topk=None, batch_size=4)
    spec = WorkerSpec(
        "quantization", str(workspace / "model"), str(workspace / "db"), 3.0, {}, "float32", tokens, 4, 1
    )
    scorer = RayScorer(spec, ctx.ref, workers=2)
    import random

    from evopress.mutation import mutate

    rng = random.Random(0)
    parent = comp.initial_profile()
    pool = [mutate(comp, parent, rng) for _ in range(5)]
    rows = ctx.all_rows()
    expected = score_pool(ctx, LiveModel(comp), pool, rows, parent)
    assert scorer.score(pool, rows, parent) == expected
    ray.kill(scorer.actors[1])  # dies between calls: the next call finds it dead, replaces it, scores again
    assert scorer.score(pool, rows, parent) == expected and scorer.restarts == 1
    scorer.close()


def test_bad_worker_settings_are_one_line_errors():
    from evopress.errors import UserError

    with pytest.raises(UserError, match="compute.workers must be >= 1"):
        ComputeConfig(workers=0).validate()
