"""Level databases built on Ray workers: the same files, bit for bit, as one process; a worker that dies is retried.

The driver runs the forward passes and the upstream level of each block; the other levels are Ray tasks
(evopress/build_pool.py). Both methods, with the upstream path (quantization at calib_bits, sparsity with
inputs=uniform) and without it (sparsity's dense inputs).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import prepare_tiny_workspace
from evopress.compressors import quantization, sparsity

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_thread")

BUILDS = {
    "quantization": {"bits": "2,3,4", "group_size": 32, "n_samples": 8, "batch_size": 4},
    "sparsity-dense": {"target": 0.5, "num_levels": 2, "n_samples": 8},
    "sparsity-uniform": {"target": 0.5, "num_levels": 2, "n_samples": 8, "inputs": "uniform"},
}


def _method(build: str) -> str:
    return build.split("-")[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny prepared model and text, and every build of BUILDS made in this process (the reference)."""
    root = prepare_tiny_workspace(tmp_path_factory.mktemp("build-pool"))
    for build, options in BUILDS.items():
        module = quantization if _method(build) == "quantization" else sparsity
        module.build_database(root / "model", root / "text", root / "local" / build, options)
    yield root
    if ray.is_initialized():
        ray.shutdown()


def file_hashes(db: Path) -> dict[str, str]:
    manifest = json.loads((db / "manifest.json").read_text())
    assert manifest["complete"], f"{db} is incomplete"
    return {key: entry["sha256"] for key, entry in manifest["files"].items()}


@pytest.mark.parametrize("build", list(BUILDS))
def test_build_on_two_workers_writes_the_files_one_process_writes(workspace, build):
    import evopress.cli_database  # noqa: F401  (registers build-db)
    from evopress.cli import app

    out = workspace / "ray" / build
    args = ["build-db", "--method", _method(build), "--model", str(workspace / "model")]
    args += ["--data", str(workspace / "text"), "--out", str(out), "--workers", "2", "--threads", "1"]
    for key, value in BUILDS[build].items():
        args += ["--option", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    local = file_hashes(workspace / "local" / build)
    assert len(local) > 0 and file_hashes(out) == local


@dataclass(frozen=True)
class DiesOnce:
    """levels_of that kills the worker process running it the first time it runs outside the driver."""

    inner: object
    marker: str
    driver_pid: int

    def __call__(self, weights, hessians, wanted):
        if os.getpid() != self.driver_pid and not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            os._exit(1)  # the worker process is gone, as with an OOM kill
        return self.inner(weights, hessians, wanted)


def test_a_worker_killed_mid_build_is_retried_and_nothing_changes(workspace, tmp_path):
    from evopress.build_pool import RayBuildPool
    from evopress.compressors.linears import Upstream, build_by_block, open_build
    from evopress.compressors.quantization import GptqLevels, QuantOptions, _dequantized, database_spec

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    opts = QuantOptions.from_dict(BUILDS["quantization"])
    adapter, db, tokens = open_build(
        workspace / "model",
        workspace / "text",
        tmp_path / "db",
        lambda a, sha: database_spec(a, sha, opts),
        opts.n_samples,
    )
    marker = tmp_path / "died"
    levels_of = DiesOnce(GptqLevels(opts), str(marker), os.getpid())
    pool = RayBuildPool(workers=2, threads=1)
    try:
        upstream = Upstream(opts.calib_bits, _dequantized)
        build_by_block(adapter, db, tokens, opts.batch_size, levels_of, upstream, pool=pool)
    finally:
        pool.close()
    assert marker.exists(), "no worker ran a task"
    assert file_hashes(tmp_path / "db") == file_hashes(workspace / "local" / "quantization")
