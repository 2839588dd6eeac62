"""`fitness_rows`: the search and the baselines score the calibration rows the level database was not fitted on
(`unseen`), every row (`all`) or the first N; a setting the data cannot meet fails in one line."""

import pytest
import torch

from conftest import prepare_tiny_workspace
from evopress.config import ComputeConfig, SearchConfig
from evopress.data import load_tokens
from evopress.errors import UserError
from evopress.fitness_rows import check_fitness_rows, fitness_tokens, row_span

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "value, n_database, span",
    [
        ("all", None, (0, 8)),
        ("all", 4, (0, 8)),
        ("unseen", 4, (4, 8)),
        ("unseen", 7, (7, 8)),
        (3, None, (0, 3)),
    ],
)
def test_row_span(value, n_database, span):
    assert row_span(value, 8, n_database) == span


@pytest.mark.parametrize(
    "value, n_database, message",
    [
        ("unseen", None, "fitness_rows 'unseen' needs a level database"),
        ("unseen", 8, "the database was fitted on 8 of the 8 calibration rows, so none is left"),
        ("unseen", 12, "the database was fitted on 12 of the 8"),
        (9, None, "fitness_rows 9 is more than the 8 calibration rows; allowed: 1..8"),
        (0, None, "fitness_rows 0: a number of rows must be >= 1"),
        ("first", None, "fitness_rows 'first'; allowed: all, unseen or a number of rows"),
        (True, None, "fitness_rows True; allowed"),
        (2.5, None, "fitness_rows 2.5; allowed"),
    ],
)
def test_settings_the_data_cannot_meet_are_one_line_errors(value, n_database, message):
    with pytest.raises(UserError) as err:
        row_span(value, 8, n_database)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_check_accepts_the_documented_values():
    for value in ("all", "unseen", 1, 32):
        check_fitness_rows(value)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model, 8 calibration rows, and a GPTQ database fitted on the first 5."""
    from evopress.compressors import quantization

    root = prepare_tiny_workspace(tmp_path_factory.mktemp("rows"))
    options = {"bits": "2,3,4", "group_size": 32, "n_samples": 5, "batch_size": 4}
    quantization.build_database(root / "model", root / "text", root / "db", options)
    return root


def test_unseen_rows_are_the_rows_after_the_databases_samples(workspace):
    calibration = load_tokens(workspace / "text", "calibration")
    assert torch.equal(fitness_tokens(calibration, "unseen", workspace / "db"), calibration[5:])
    assert torch.equal(fitness_tokens(calibration, "all", workspace / "db"), calibration)
    assert torch.equal(fitness_tokens(calibration, 2, None), calibration[:2])


def _scored_rows(monkeypatch) -> list:
    """Every token set a FitnessContext is built on (the rows the stage scores)."""
    from evopress import scoring

    seen, build = [], scoring.FitnessContext.build.__func__

    def spy(cls, adapter, tokens, *args, **kwargs):
        seen.append(tokens.clone())
        return build(cls, adapter, tokens, *args, **kwargs)

    monkeypatch.setattr(scoring.FitnessContext, "build", classmethod(spy))
    return seen


def test_search_and_baseline_stages_score_the_unseen_rows(workspace, tmp_path, monkeypatch):
    from evopress.stages import baseline, search

    calibration = load_tokens(workspace / "text", "calibration")
    compute = ComputeConfig(dtype="float32", batch_size=4, topk=0)
    seen = _scored_rows(monkeypatch)
    config = SearchConfig(generations=1, offspring=2, survivors=(1, 1), tokens=(32, "all"), initial_tokens=32)
    w = workspace
    search("quantization", w / "model", w / "text", w / "db", tmp_path / "s", 3.0, {}, config, compute,
           fitness_rows="unseen")  # fmt: skip
    baseline("quantization", "uniform", w / "model", w / "text", w / "db", tmp_path / "b", 3.0, {}, compute,
             tokens=64, fitness_rows="unseen")  # fmt: skip
    assert torch.equal(seen[0], calibration[5:])  # the search: rows 5..7
    assert torch.equal(seen[1], calibration[5:7])  # the baseline: its 64 tokens from row 5 on


def test_unseen_with_no_row_left_fails_before_the_model_loads(workspace, tmp_path):
    from evopress.stages import search

    config = SearchConfig(generations=1, offspring=2, survivors=(1, 1), tokens=(32, "all"), initial_tokens=32)
    compute = ComputeConfig(dtype="float32", batch_size=4, topk=0)
    text = tmp_path / "text"
    text.mkdir()
    from safetensors.torch import save_file

    rows = load_tokens(workspace / "text", "calibration")[:5]
    save_file({"input_ids": rows.contiguous()}, text / "calibration.safetensors")
    with pytest.raises(UserError, match="the database was fitted on 5 of the 5 calibration rows"):
        search("quantization", workspace / "model", text, workspace / "db", tmp_path / "s", 3.0, {}, config,
               compute, fitness_rows="unseen")  # fmt: skip
