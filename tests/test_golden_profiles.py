"""Same params.yaml -> same profiles: each method's search stage on the tiny model ends at a committed profile.

The expected files in tests/golden/ were written by the code before the params -> library path was refactored
(issue 11); the refactor must not change a single level. Regenerate them only for a deliberate change of the
search's behaviour: `EVOPRESS_WRITE_GOLDEN=1 pytest tests/test_golden_profiles.py`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import prepare_tiny_workspace
from evopress import cli

GOLDEN = Path(__file__).parent / "golden"
SEARCH = {
    "generations": 4,
    "offspring": 4,
    "survivors": [2, 1],
    "tokens": [64, 256],
    "seed": 0,
    "initially_generated": 4,
    "initial_tokens": 128,
    "prefix_reuse": True,
    "screen_with_parent": False,  # pinned to how the golden files were written (the default became true later)
}
METHODS = {
    "depth": {
        "target": 1,
        "options": {"granularity": "sublayer"},
        "database": {},
        "search": {**SEARCH, "init": "random", "seed_baselines": ["shortgpt"]},
    },
    "sparsity": {
        "target": 0.5,
        "options": {},
        "database": {"num_levels": 2, "n_samples": 8},
        "search": {**SEARCH, "init": "uniform", "seed_baselines": []},
    },
    "quantization": {
        "target": 3.0,
        "options": {},
        # act_order pinned to the setting the golden file was written with (the default became true later)
        "database": {"bits": [2, 3, 4], "group_size": 32, "n_samples": 8, "act_order": False},
        "search": {**SEARCH, "init": "uniform", "seed_baselines": []},
    },
}


def params_tree() -> dict:
    methods = {
        m: {
            **v,
            "baselines": [],
            "baseline_tokens": 128,
            "baseline_seed": 0,
            "fitness_rows": "all",
            "stitch": {},
        }
        for m, v in METHODS.items()
    }
    return {
        "model": {"source": "test:tiny", "dtype": "float32"},
        "data": {
            "source": "builtin:pydoc",
            "seq_len": 32,
            "n_calibration": 8,
            "n_heldout": 4,
            "field": "text",
        },
        "compute": {"dtype": "float32", "batch_size": 4, "topk": 16},
        "methods": methods,
        "evaluate": {"sets": ["heldout"], "kl": True},
        "tracking": {"enabled": False, "uri": "", "artifact_root": "mlartifacts", "experiment": "evopress"},
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    (root / "data").mkdir()
    prepare_tiny_workspace(root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(params_tree(), sort_keys=False))
    return root


def stage(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["evopress", "stage", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)


@pytest.mark.parametrize("method", list(METHODS))
def test_search_stage_ends_at_the_golden_profile(workspace, method, monkeypatch):
    monkeypatch.chdir(workspace)
    torch.set_num_threads(1)
    stage(monkeypatch, "build_db", "--method", method)
    stage(monkeypatch, "search", "--method", method)
    got = json.loads((workspace / "runs/search" / method / "profile.json").read_text())
    path = GOLDEN / f"{method}.json"
    if os.environ.get("EVOPRESS_WRITE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        keep = {k: got[k] for k in ("method", "target", "budget", "fitness", "units")}
        path.write_text(json.dumps(keep, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert got["units"] == want["units"]
    assert got["budget"] == want["budget"] and got["target"] == want["target"]
    # float32 kernels differ between CPUs (AVX2, AVX512, AMX): the quantization fitness (KL ~7e-6) came out
    # 2.5e-4 apart on an AMX machine with the same levels; the levels above are the exact check
    assert got["fitness"] == pytest.approx(want["fitness"], rel=1e-3)
