"""Where a level database's files are computed: in this process, or as Ray tasks on several workers.

A database build (evopress/compressors/linears.py: `build_by_block`) is sequential only in its forward passes:
block b+1's Hessians need block b's outputs. The expensive part, GPTQ or SparseGPT of each linear at each level,
needs nothing but the linear's dense weight and its input Hessian, so the driver hands each block's levels to a
pool and moves on to the next block while they are computed:

- `InProcessPool` (the default) computes them at once, in this process: the single-process build.
- `RayBuildPool` submits one Ray task per block (`compute.workers` tasks at a time, each with `compute.threads`
  CPUs, on a local Ray or the cluster at `compute.ray_address`) and hands back the files of finished tasks. The
  driver writes them into the database, so the manifest keeps one writer and the workers need no shared disk.

Ray tasks rather than the search's actors (evopress/workers.py): a build task holds no model, only a block's
weights and Hessians (a few MB), so a stateless task costs nothing to start and Ray retries it by itself when its
worker dies (`max_retries`); the file it then computes is the same, bit for bit. An interrupted build resumes as
before: files not yet written are simply computed again.

    compute: {workers: 2, threads: 1}   # params.yaml: both the database builds and the searches
    evopress build-db --workers 2 ...
"""

from __future__ import annotations

from typing import Any

import torch

Files = dict[tuple[str, int], dict[str, torch.Tensor]]


class InProcessPool:
    """Computes each job when it is submitted (the single-process build)."""

    def __init__(self):
        self.done: Files = {}

    def submit(self, levels_of, weights, hessians, wanted) -> None:
        self.done.update(levels_of(weights, hessians, wanted))

    def ready(self) -> Files:
        done, self.done = self.done, {}
        return done

    def drain(self) -> Files:
        return self.ready()

    def close(self) -> None:
        pass


def _compute(threads: int, levels_of, weights, hessians, wanted) -> Files:
    """The body of a Ray task: a block's level files, on `threads` torch threads."""
    torch.set_num_threads(threads)
    return levels_of(weights, hessians, wanted)


class RayBuildPool:
    """Computes jobs as Ray tasks, at most `workers` (+ `queued`) in flight; returns the files of finished ones."""

    def __init__(self, workers: int, threads: int, address: str = "", queued: int = 1, max_retries: int = 3):
        from evopress.ray_cluster import start_ray

        self.ray = start_ray(workers, threads, address)
        self.threads, self.limit = threads, workers + queued
        self.task = self.ray.remote(num_cpus=threads, max_retries=max_retries)(_compute)
        self.pending: list[Any] = []
        self.done: Files = {}

    def submit(self, levels_of, weights, hessians, wanted) -> None:
        self.pending.append(self.task.remote(self.threads, levels_of, weights, hessians, wanted))
        while len(self.pending) > self.limit:  # bounded: the driver never runs far ahead of the workers
            self._collect(num_returns=1, timeout=None)

    def _collect(self, num_returns: int, timeout: float | None) -> None:
        finished, self.pending = self.ray.wait(self.pending, num_returns=num_returns, timeout=timeout)
        for files in self.ray.get(finished):
            self.done.update(files)

    def ready(self) -> Files:
        if self.pending:
            self._collect(num_returns=len(self.pending), timeout=0)
        done, self.done = self.done, {}
        return done

    def drain(self) -> Files:
        if self.pending:
            self._collect(num_returns=len(self.pending), timeout=None)
        return self.ready()

    def close(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending = []


def make_pool(compute) -> InProcessPool | RayBuildPool:
    """The pool `compute` (a ComputeConfig, or None) asks for."""
    if compute is None or not compute.distributed:
        return InProcessPool()
    return RayBuildPool(compute.workers, compute.threads_per_worker(), compute.ray_address)
