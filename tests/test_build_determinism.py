"""Level-database builds are reproducible bit for bit: the same build repeated in one process, and the same build
in two fresh processes running 1 and 2 CPU threads, write files with the same sha256 (manifest["files"]).

Measured (benchmarks/build_determinism.py, torch 2.13 CPU wheel, MKL, AMD EPYC, 1/2/8 threads): every file is
identical across repeats and thread counts. Here MKL's sgemm gave the same bits at 1, 2 and 8 threads for every
X^T X shape tried (up to 65536 x 1536), i.e. it splits output tiles, not the reduced dimension; the parallel ATen
reductions the builders run are per row (RMSNorm, softmax) or small (mean of a Hessian diagonal); argsort is
stable. Only a full float sum over > 32768 elements changed with the thread count, and the builders run none.
Another CPU or BLAS (MKL conditional numerical reproducibility is off) may round differently: across machines this
test promises nothing.

`batch_size` is left out of `build_params` ("not what a database depends on"), so it must not change a bit either.
It used to: the Hessian summed one float32 X^T X per batch, the rounding depended on how the calibration rows were
split, and the ~3e-7 relative difference flipped SparseGPT mask entries and GPTQ codes (hidden 256: 2.8% of the
codes, max |dw| 0.08). HessianAccumulator now sums one product per sequence in sequence order.

Each build runs in a subprocess (`sys.executable -c`) so its thread count is set before torch starts. Tiny models
only: the conftest workspace (hidden 64) and one at hidden 128 with 8 x 64 calibration tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import prepare_tiny_workspace

OPTIONS = {
    "sparsity": {"target": 0.5, "num_levels": 2, "n_samples": 8},
    "quantization": {"bits": [2, 3, 4], "group_size": 16, "n_samples": 8},
}
WORKSPACES = ("h64", "h128")

# builds[i] = [workspace, method, out_dir, options]; prints the thread count torch ran with
CHILD = """
import json, sys
import torch
threads, builds = int(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(threads)
from pathlib import Path
from evopress.compressors import quantization, sparsity
for ws, method, out, options in builds:
    module = sparsity if method == "sparsity" else quantization
    module.build_database(Path(ws) / "model", Path(ws) / "text", Path(out), options)
print("threads", torch.get_num_threads())
"""


def start_builds(threads: int, builds: list, cwd: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "MKL_DYNAMIC": "FALSE",
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(threads), json.dumps(builds)],
        cwd=cwd,  # not the repo root: `-c` puts the cwd first on sys.path, ahead of PYTHONPATH
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_builds(threads: int, proc: subprocess.Popen) -> None:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"threads {threads}" in stdout


def workspace_h128(root: Path) -> Path:
    """Like the conftest workspace, wider (hidden 128) and longer rows (8 x 64), so GEMMs split."""
    return prepare_tiny_workspace(root, hidden=128, seq_len=64)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """out[(run, workspace, method)] -> database folder; runs: t1, t2, t2-repeat (same process), t2-bs2."""
    root = tmp_path_factory.mktemp("determinism")
    spaces = {"h64": root / "h64", "h128": root / "h128"}
    for path in spaces.values():
        path.mkdir()
    prepare_tiny_workspace(spaces["h64"])
    workspace_h128(spaces["h128"])
    out = {}

    def plan(run: str, extra: dict | None = None) -> list:
        jobs = []
        for ws in WORKSPACES:
            for method, options in OPTIONS.items():
                out[(run, ws, method)] = root / "db" / run / ws / method
                jobs.append(
                    [str(spaces[ws]), method, str(out[(run, ws, method)]), {**options, **(extra or {})}]
                )
        return jobs

    # both processes at once (wall time); sharing the cores changes timing, not arithmetic
    one = start_builds(1, plan("t1"), root)
    two = start_builds(2, plan("t2") + plan("t2-repeat") + plan("t2-bs2", {"batch_size": 2}), root)
    finish_builds(1, one)
    finish_builds(2, two)
    return out


def file_hashes(db: Path) -> dict[str, str]:
    manifest = json.loads((db / "manifest.json").read_text())
    assert manifest["complete"], f"{db} is incomplete"
    return {key: entry["sha256"] for key, entry in manifest["files"].items()}


def assert_same_files(a: Path, b: Path) -> None:
    ha, hb = file_hashes(a), file_hashes(b)
    assert len(ha) > 0 and ha.keys() == hb.keys()
    differ = sorted(k for k in ha if ha[k] != hb[k])
    assert not differ, f"{len(differ)}/{len(ha)} files differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("ws", WORKSPACES)
@pytest.mark.parametrize("method", list(OPTIONS))
def test_repeated_build_in_one_process_is_bit_identical(builds, method, ws):
    assert_same_files(builds[("t2", ws, method)], builds[("t2-repeat", ws, method)])


@pytest.mark.parametrize("ws", WORKSPACES)
@pytest.mark.parametrize("method", list(OPTIONS))
def test_build_with_1_and_2_threads_is_bit_identical(builds, method, ws):
    assert_same_files(builds[("t1", ws, method)], builds[("t2", ws, method)])


@pytest.mark.parametrize("method", list(OPTIONS))
def test_batch_size_does_not_change_a_bit(builds, method):
    for ws in WORKSPACES:
        assert_same_files(builds[("t2", ws, method)], builds[("t2-bs2", ws, method)])
