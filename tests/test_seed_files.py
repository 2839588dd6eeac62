"""The pipeline's search starts from the baselines stage's profile files (`seed_files`) instead of computing the
seed baselines again; a file that is not a start of this search is refused in one line."""

import json

import pytest

from conftest import prepare_quantized_workspace
from evopress import methods, stages
from evopress import search as search_module
from evopress.config import ComputeConfig, SearchConfig
from evopress.errors import UserError

COMPUTE = ComputeConfig(dtype="float32", batch_size=4, topk=0)
CONFIG = SearchConfig(
    generations=2,
    offspring=3,
    survivors=(2, 1),
    tokens=(32, "all"),
    seed=0,
    init="uniform",
    initial_tokens=256,  # every calibration row (8 x 32): the start's fitness is comparable with the end's
    seed_baselines=("dp",),
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, one_thread):
    root = prepare_quantized_workspace(tmp_path_factory.mktemp("seeds"))
    stages.baseline(
        "quantization", "dp", root / "model", root / "text", root / "db", root / "dp", 3.0, {}, COMPUTE, 0, 64
    )
    return root


def _search(root, out, seed_file):
    return stages.search(
        "quantization", root / "model", root / "text", root / "db", out, 3.0, {}, CONFIG, COMPUTE,
        seed_files={"dp": seed_file},
    )  # fmt: skip


def test_search_starts_from_the_baseline_file_without_computing_the_baseline(
    workspace, tmp_path, monkeypatch
):
    seen = {}
    real_run_search = search_module.run_search

    def recording_run_search(*args, seeds=None, **kwargs):
        seen.update(seeds())  # the stage passes them lazily: a resumed search never computes them
        return real_run_search(*args, seeds=seeds, **kwargs)

    def computed_again(*_, **__):
        raise AssertionError("the seed baseline was computed again")

    monkeypatch.setattr(search_module, "run_search", recording_run_search)
    monkeypatch.setattr(methods, "get_baseline", lambda method, name: computed_again)
    summary = _search(workspace, tmp_path / "search", workspace / "dp" / "profile.json")
    assert seen == {"dp": json.loads((workspace / "dp" / "profile.json").read_text())["units"]}
    assert summary["initial_source"] in ("dp", "uniform")
    assert summary["fitness"] <= summary["initial_fitness"]


@pytest.mark.parametrize(
    ("key", "value"), [("target", 2.5), ("method", "sparsity"), ("model_sha256", "0" * 64)]
)
def test_a_seed_file_for_another_search_is_refused_in_one_line(workspace, tmp_path, key, value):
    profile = json.loads((workspace / "dp" / "profile.json").read_text())
    bad = tmp_path / "dp.json"
    bad.write_text(json.dumps({**profile, key: value}))
    with pytest.raises(UserError, match=rf"seed profile .*dp.json' has {key} .*this search needs") as err:
        _search(workspace, tmp_path / "search", bad)
    assert "\n" not in str(err.value)


def test_a_seed_file_with_a_unit_at_a_level_the_database_lacks_is_refused(workspace, tmp_path):
    profile = json.loads((workspace / "dp" / "profile.json").read_text())
    first = next(iter(profile["units"]))
    bad = tmp_path / "dp.json"
    bad.write_text(json.dumps({**profile, "units": {**profile["units"], first: 7}}))
    with pytest.raises(UserError, match="levels the units cannot take"):
        _search(workspace, tmp_path / "search", bad)


@pytest.mark.parametrize(("tokens", "shape"), [(20, (1, 20)), (32, (1, 32)), (40, (2, 32))])
def test_a_baseline_on_fewer_tokens_than_a_row_scores_a_prefix_of_the_first_row(
    workspace, tmp_path, tokens, shape
):
    """DP's cost is one forward per linear and bit-width: `baseline_tokens` below the row length buys a shorter
    forward (the first row's prefix) instead of rounding up to a whole row."""
    from evopress.scoring import FitnessContext

    built = []
    real = FitnessContext.build.__func__

    def recording(cls, adapter, tokens_, **kwargs):
        built.append(tuple(tokens_.shape))
        return real(cls, adapter, tokens_, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FitnessContext, "build", classmethod(recording))
        profile = stages.baseline(
            "quantization", "dp", workspace / "model", workspace / "text", workspace / "db", tmp_path, 3.0, {},
            COMPUTE, 0, tokens,
        )  # fmt: skip
    assert built == [shape]
    assert profile["source"] == "baseline:dp"
