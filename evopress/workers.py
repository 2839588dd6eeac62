"""Scoring a search's candidates on several workers: Ray actors, each holding the model and the level database.

The driver keeps everything that decides the search: the loop, the RNG, the selection and the checkpoint. Only
`score(pool, rows, parent)` is spread: the pool of one selection step is dealt round-robin over the actors, each
scores its share exactly as one process would (`scoring.score_pool` on its own live model, with prefix reuse from
the parent), and the scores come back in pool order. So a search on N workers ends at the same profile, bit for
bit, as on one (tests/test_workers.py), and resumes from the same checkpoints.

Each actor loads the prepared model and opens the level database itself (the database's files are read through
the OS page cache, shared between actors on one host, not copied per actor) and receives the dense reference
(the KL's target distribution) from the driver through Ray's object store, so it never recomputes it. An actor
that dies mid-step (killed, out of memory, its node lost) is replaced by a fresh one and its share scored again:
nothing is lost, and the scores are the same.

    compute: {workers: 2}                       # local Ray, one actor per worker
    compute: {workers: 4, ray_address: auto}    # an existing cluster (`ray start --head` on the head node)

Each actor asks Ray for `threads` CPUs and sets torch to that many threads; on a GPU run (`compute.device`), it
also asks for one GPU where the cluster has one per actor, else an equal share of them (two actors on one GPU:
0.5 each). Its forward passes run as the driver's do (the same dtype, the same kind of device), so the scores
are the driver's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evopress.compressors.base import Profile
from evopress.errors import require
from evopress.ray_cluster import start_ray
from evopress.scoring import FitnessContext, LiveModel, score_pool


@dataclass(frozen=True)
class WorkerSpec:
    """What an actor needs to rebuild the driver's compressor and fitness context."""

    method: str
    model_dir: str
    db: str | None
    target: float
    options: dict
    dtype: str  # resolved ("float32", "bfloat16", ...): every actor runs the driver's dtype
    tokens: torch.Tensor  # calibration rows [n, seq_len]
    batch_size: int
    threads: int
    device: str = "cpu"  # resolved: "cpu", or "cuda..." (each actor then runs on the GPU share Ray gives it)


def gpus_per_actor(ray, spec: WorkerSpec, workers: int) -> float:
    """0 on the CPU; on GPUs one each where the cluster has enough, else an equal share (several actors on one)."""
    if not spec.device.startswith("cuda"):
        return 0
    gpus = ray.cluster_resources().get("GPU", 0)
    require(gpus > 0, f"compute.device is {spec.device!r}, but the Ray cluster has no GPU")
    return min(1.0, gpus / workers)


class LocalScorer:
    """Scores in this process, on the driver's live model (the default)."""

    def __init__(self, ctx: FitnessContext, live: LiveModel):
        self.ctx, self.live = ctx, live

    def score(self, pool: list[Profile], rows: torch.Tensor, parent: Profile | None) -> list[float]:
        return score_pool(self.ctx, self.live, pool, rows, parent)

    def close(self) -> None:
        pass


def _build(spec: WorkerSpec, ref) -> tuple[FitnessContext, LiveModel]:
    """The actor's compressor and context: the driver's, rebuilt from files (the same numbers)."""
    from evopress.adapter import ModelAdapter
    from evopress.methods import make_compressor
    from evopress.models import load_model

    torch.set_num_threads(spec.threads)
    model, _ = load_model(spec.model_dir, dtype=spec.dtype)
    # Ray makes the actor's GPU share visible as device 0 (CUDA_VISIBLE_DEVICES), whatever the driver's index
    adapter = ModelAdapter(model.to("cuda" if spec.device.startswith("cuda") else "cpu"))
    comp = make_compressor(
        spec.method, adapter, spec.target, db=Path(spec.db) if spec.db else None, options=spec.options
    )
    return FitnessContext(adapter, spec.tokens, ref, spec.batch_size), LiveModel(comp)


class _Worker:
    """The actor's body (wrapped by `ray.remote` where Ray is imported, so importing this module needs no Ray)."""

    def __init__(self, spec: WorkerSpec, ref):
        self.ctx, self.live = _build(spec, ref)

    def score(self, pool: list[Profile], rows: torch.Tensor, parent: Profile | None) -> list[float]:
        return score_pool(self.ctx, self.live, pool, rows, parent)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayScorer:
    """Scores on `workers` Ray actors; replaces an actor that dies and scores its share again."""

    def __init__(self, spec: WorkerSpec, ref, workers: int, address: str = "", max_restarts: int = 3):
        require(workers >= 1, f"compute.workers={workers} must be >= 1")
        self.ray = ray = start_ray(workers, spec.threads, address)
        self.spec = spec
        self.spec_ref, self.ref = ray.put(spec), ray.put(ref)
        self.actor_class = ray.remote(num_cpus=spec.threads, num_gpus=gpus_per_actor(ray, spec, workers))(
            _Worker
        )
        self.actors = [self._start() for _ in range(workers)]
        self.max_restarts = max_restarts
        self.restarts = 0

    def _start(self):
        return self.actor_class.remote(self.spec_ref, self.ref)

    def score(self, pool: list[Profile], rows: torch.Tensor, parent: Profile | None) -> list[float]:
        n = min(len(self.actors), len(pool))
        shares = {k: list(range(k, len(pool), n)) for k in range(n)}  # round-robin: pool order comes back
        pending = {
            k: self.actors[k].score.remote([pool[i] for i in idx], rows, parent) for k, idx in shares.items()
        }
        scores: list[float | None] = [None] * len(pool)
        while pending:
            k, future = pending.popitem()
            try:
                values = self.ray.get(future)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorDiedError):
                self.restarts += 1
                require(
                    self.restarts <= self.max_restarts * len(self.actors),
                    f"scoring workers died {self.restarts} times; giving up (see the Ray logs)",
                )
                self.actors[k] = self._start()  # a fresh actor, the same share scored again
                pending[k] = self.actors[k].score.remote([pool[i] for i in shares[k]], rows, parent)
                continue
            for i, v in zip(shares[k], values, strict=True):
                scores[i] = v
        return scores  # type: ignore[return-value]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
