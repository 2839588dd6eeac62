"""The EvoPress search: a (1 + lambda) evolutionary algorithm over the profiles of any compressor.

Each generation: `offspring` distinct children of the parent by level-switch mutation (budget exact); multi-step
selection scores them on fresh calibration samples of growing size (`tokens`), keeping `survivors[i]` after step i;
the parent joins the last step (elitism, re-scored on new data; a child wins a tie). Fitness = mean KL(dense ||
candidate) per token, lower is better.

One live model: moving between candidates applies only the units that differ from the current state. Prefix
reuse: in the first step every child shares the parent's blocks up to the first unit it changes, so the parent's
hidden states at every block boundary are computed once and each child starts there.

Every generation is checkpointed atomically (parent, fitness, RNG state, history); a re-run with the same out_dir
resumes, and ends at exactly the profile an uninterrupted run finds (all randomness comes from one saved RNG).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evopress.adapter import ModelAdapter
from evopress.compressors.base import Compressor, Profile
from evopress.errors import UserError, require
from evopress.fitness import DenseReference, kl_of_hidden, mean_kl
from evopress.io import atomic_write_json, atomic_write_text
from evopress.mutation import mutate

INITS = ("uniform", "random")
CHECKPOINT = "checkpoint.json"
HISTORY = "history.csv"


@dataclass(frozen=True)
class SearchConfig:
    generations: int = 50
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    tokens: tuple[int, ...] = (1024, 8192)
    seed: int = 0
    init: str = "uniform"  # uniform: compressor.initial_profile(); random: best of `initially_generated`
    initially_generated: int = 16
    initial_tokens: int = 2048
    # Baseline profiles that compete with the initial candidates (scored on `initial_tokens`); the search then
    # starts from whichever is fittest. Cheap heuristics give a short search a far better start than random.
    seed_baselines: tuple[str, ...] = ()
    max_mutation_steps: int = 3
    prefix_reuse: bool = True

    def validate(self, calibration_tokens: int) -> None:
        require(self.generations >= 0, f"generations={self.generations} must be >= 0")
        require(self.offspring >= 1, f"offspring={self.offspring} must be >= 1")
        require(
            len(self.survivors) == len(self.tokens) and len(self.tokens) >= 1,
            f"survivors {list(self.survivors)} and tokens {list(self.tokens)} need one entry per selection step",
        )
        require(
            all(s >= 1 for s in self.survivors)
            and list(self.survivors) == sorted(self.survivors, reverse=True),
            f"survivors {list(self.survivors)} must be >= 1 and non-increasing",
        )
        require(
            self.survivors[0] <= self.offspring,
            f"survivors {self.survivors[0]} exceed offspring {self.offspring}; allowed: survivors <= offspring",
        )
        for t in (*self.tokens, self.initial_tokens):
            require(
                1 <= t <= calibration_tokens,
                f"token count {t} is outside 1..{calibration_tokens} (the calibration set's size)",
            )
        require(self.init in INITS, f"unknown init {self.init!r}; allowed: {', '.join(INITS)}")
        require(self.initially_generated >= 1, f"initially_generated={self.initially_generated} must be >= 1")
        require(self.max_mutation_steps >= 1, f"max_mutation_steps={self.max_mutation_steps} must be >= 1")

    def fingerprint(self) -> dict:
        """Settings a resumed run must share (the generation count may grow)."""
        d = asdict(self)
        d.pop("generations")
        d.pop("prefix_reuse")  # results are identical with or without it
        if not d["seed_baselines"]:
            d.pop("seed_baselines")  # checkpoints written before the field existed stay resumable
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class FitnessContext:
    """Calibration tokens, the dense reference on them, and KL of the live model on a subset of rows."""

    adapter: ModelAdapter
    tokens: torch.Tensor  # [n, seq_len]
    ref: DenseReference
    batch_size: int = 8

    @classmethod
    def build(cls, adapter, tokens, topk: int | None = 512, batch_size: int = 8) -> FitnessContext:
        """Call with the model dense: the reference is the current model's distribution."""
        return cls(adapter, tokens, DenseReference.build(adapter, tokens, topk, batch_size), batch_size)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def total_tokens(self) -> int:
        return self.tokens.numel()

    def sample(self, rng: random.Random, n_tokens: int) -> torch.Tensor:
        """Distinct random rows holding at least `n_tokens` tokens (whole sequences)."""
        n_rows = min(len(self.tokens), math.ceil(n_tokens / self.seq_len))
        return torch.tensor(sorted(rng.sample(range(len(self.tokens)), n_rows)))

    def kl(self, rows: torch.Tensor) -> float:
        return mean_kl(self.adapter, self.tokens, self.ref, rows, self.batch_size)

    @torch.no_grad()
    def prefix(self, rows: torch.Tensor) -> list:
        """Per batch: (rows, block kwargs, hidden states entering block 0..n) of the live model."""
        out = []
        for batch in rows.split(self.batch_size):
            hidden, kwargs = self.adapter.block_inputs(self.tokens[batch])
            bounds = [hidden]
            for i in range(self.adapter.num_blocks):
                bounds.append(self.adapter.run_blocks(bounds[-1], kwargs, i, i + 1))
            out.append((batch, kwargs, bounds))
        return out

    @torch.no_grad()
    def kl_from(self, prefix: list, start: int) -> float:
        """KL of the live model when blocks before `start` equal those the prefix was computed with."""
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for batch, kwargs, bounds in prefix:
            hidden = self.adapter.run_blocks(bounds[start], kwargs, start)
            total += kl_of_hidden(self.adapter, hidden, self.ref.rows(batch))
            count += len(batch) * self.seq_len
        return float(total / count)


@dataclass
class GenerationInfo:
    generation: int
    fitness: float
    improved: bool  # a child replaced the parent
    tokens: int  # tokens scored so far (all candidates, all steps)
    seconds: float  # this generation
    step_seconds: list[float]
    elapsed: float  # all generations so far (across resumes)


@dataclass
class SearchResult:
    profile: Profile
    fitness: float | None
    history: list[dict] = field(default_factory=list)
    initial_fitness: float | None = None
    initial_source: str = "uniform"  # which initial candidate the search started from


# --- candidates ----------------------------------------------------------------------------------------------
def _key(profile: Profile) -> tuple:
    return tuple(sorted(profile.items()))


def make_offspring(comp: Compressor, parent: Profile, n: int, rng: random.Random, max_steps: int) -> list:
    """Up to `n` distinct children, none equal to the parent (fewer only when the space is that small)."""
    seen, children = {_key(parent)}, []
    for _ in range(50 * n):
        child = mutate(comp, parent, rng, max_steps)
        if _key(child) not in seen:
            seen.add(_key(child))
            children.append(child)
            if len(children) == n:
                break
    return children


class _LiveModel:
    """Tracks which profile the live model holds, so moving to another applies only the differing units."""

    def __init__(self, comp: Compressor):
        self.comp, self.current = comp, None

    def set(self, profile: Profile) -> None:
        self.current = self.comp.apply_profile(profile, self.current)


def first_changed_block(comp: Compressor, a: Profile, b: Profile, num_blocks: int) -> int:
    changed = [comp.block_of(u) for u in a if a[u] != b[u]]
    return min(changed) if changed else num_blocks


def score_all(ctx, live: _LiveModel, pool: list, rows, parent: Profile | None) -> list[float]:
    """KL of every profile in `pool` on `rows`; with `parent`, children start at the parent's prefix."""
    if parent is None:
        scores = []
        for p in pool:
            live.set(p)
            scores.append(ctx.kl(rows))
        return scores
    live.set(parent)
    prefix = ctx.prefix(rows)
    scores = []
    for p in pool:
        live.set(p)
        start = first_changed_block(live.comp, parent, p, ctx.adapter.num_blocks)
        scores.append(ctx.kl_from(prefix, start))
    return scores


def select(pool: list, scores: list[float], keep: int) -> list[int]:
    """Indices of the `keep` lowest scores; ties go to the earlier entry (children come before the parent)."""
    return sorted(range(len(pool)), key=lambda i: (scores[i], i))[:keep]


# --- checkpoint ----------------------------------------------------------------------------------------------
def _compressor_id(comp: Compressor) -> dict:
    units = comp.units()
    return {
        "method": comp.method,
        "units_sha256": hashlib.sha256("\n".join(units).encode()).hexdigest(),
        "budget": comp.total_cost(comp.initial_profile()),
    }


def _save_checkpoint(out_dir: Path, state: dict) -> None:
    atomic_write_json(out_dir / CHECKPOINT, state)
    buf = io.StringIO()
    if state["history"]:
        writer = csv.DictWriter(buf, fieldnames=list(state["history"][0]))
        writer.writeheader()
        writer.writerows(state["history"])
    atomic_write_text(out_dir / HISTORY, buf.getvalue())


def _load_checkpoint(out_dir: Path, config: SearchConfig, comp: Compressor) -> dict | None:
    path = out_dir / CHECKPOINT
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    require(
        state.get("config") == config.fingerprint() and state.get("compressor") == _compressor_id(comp),
        f"{path} was made with other search settings or another compressor; use another --out or delete it",
    )
    return state


def _rng_from(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


# --- the search ----------------------------------------------------------------------------------------------
def initial_parent(comp, ctx, live, config, rng, seeds: dict) -> tuple[Profile, float | None, str]:
    """The start: the uniform profile or the best of random ones, competing with any seed profiles."""
    if config.init == "uniform":
        pool, names = [comp.initial_profile()], ["uniform"]
        if not config.seed_baselines:
            return pool[0], None, "uniform"
    else:
        pool = [comp.random_profile(rng) for _ in range(config.initially_generated)]
        names = ["random"] * len(pool)
    for name in config.seed_baselines:
        require(name in seeds, f"seed baseline {name!r} was asked for but no profile was given for it")
        total = comp.total_cost(seeds[name])
        require(
            total == comp.total_cost(comp.initial_profile()),
            f"seed baseline {name!r} is off budget ({total})",
        )
        pool.append(dict(seeds[name]))
        names.append(name)
    rows = ctx.sample(rng, config.initial_tokens)
    scores = score_all(ctx, live, pool, rows, None)
    best = select(pool, scores, 1)[0]
    return pool[best], scores[best], names[best]


def _bar(config: SearchConfig, start: int):
    from tqdm import tqdm

    return tqdm(
        total=config.generations, initial=start, desc="search", unit="gen", disable=not sys.stderr.isatty()
    )


def run_search(
    comp: Compressor,
    ctx: FitnessContext,
    config: SearchConfig,
    out_dir: Path | None = None,
    on_generation: Callable[[GenerationInfo], None] | None = None,
    seeds: dict[str, Profile] | Callable[[], dict[str, Profile]] | None = None,
) -> SearchResult:
    """Run (or resume, when `out_dir` holds a checkpoint) the search; leaves the live model at the result.

    `seeds` maps each name in `config.seed_baselines` to its profile, or is a function making that map (called
    only when a fresh search starts, so a resumed one skips computing the baselines).
    """
    config.validate(ctx.total_tokens)
    out_dir = Path(out_dir) if out_dir is not None else None
    live = _LiveModel(comp)
    state = _load_checkpoint(out_dir, config, comp) if out_dir else None
    if state is None:
        rng = random.Random(config.seed)
        seed_profiles = ((seeds() if callable(seeds) else seeds) or {}) if config.seed_baselines else {}
        parent, fitness, source = initial_parent(comp, ctx, live, config, rng, seed_profiles)
        total = comp.total_cost(parent)
        require(comp.total_cost(comp.initial_profile()) == total, f"initial profile is off budget ({total})")
        state = {
            "config": config.fingerprint(),
            "compressor": _compressor_id(comp),
            "generation": 0,
            "parent": parent,
            "fitness": fitness,
            "initial_fitness": fitness,
            "initial_source": source,
            "tokens": 0,
            "elapsed": 0.0,
            "history": [],
            "rng": _rng_state(rng),
        }
        if out_dir:  # the initial candidates' scoring is not repeated by a resumed run
            _save_checkpoint(out_dir, state)
    else:
        rng = _rng_from(state["rng"])
    parent, fitness = state["parent"], state["fitness"]
    bar = _bar(config, state["generation"])
    try:
        for gen in range(state["generation"] + 1, config.generations + 1):
            t0 = time.perf_counter()
            pool = make_offspring(comp, parent, config.offspring, rng, config.max_mutation_steps)
            if not pool:
                raise UserError("the budget admits a single profile: there is nothing to search")
            step_seconds, tokens = [], 0
            for step, (n_tok, keep) in enumerate(zip(config.tokens, config.survivors, strict=True)):
                ts = time.perf_counter()
                last = step == len(config.tokens) - 1
                rows = ctx.sample(rng, n_tok)
                if last:
                    pool = pool + [parent]
                reuse = parent if (step == 0 and config.prefix_reuse) else None
                scores = score_all(ctx, live, pool, rows, reuse)
                tokens += len(pool) * len(rows) * ctx.seq_len
                chosen = select(pool, scores, 1 if last else keep)
                pool, best_score = [pool[i] for i in chosen], scores[chosen[0]]
                step_seconds.append(time.perf_counter() - ts)
            improved = pool[0] is not parent
            parent, fitness = pool[0], best_score
            seconds = time.perf_counter() - t0
            state["tokens"] += tokens
            state["elapsed"] += seconds
            info = GenerationInfo(
                gen, fitness, improved, state["tokens"], seconds, step_seconds, state["elapsed"]
            )
            row = {k: v for k, v in asdict(info).items() if k != "step_seconds"}
            row.update({f"step{i + 1}_seconds": round(s, 4) for i, s in enumerate(step_seconds)})
            state["history"].append(row)
            state.update(generation=gen, parent=parent, fitness=fitness, rng=_rng_state(rng))
            if out_dir:
                _save_checkpoint(out_dir, state)
            bar.update(1)
            bar.set_postfix(kl=f"{fitness:.4f}")
            if on_generation:
                on_generation(info)
    finally:
        bar.close()
    live.set(parent)
    return SearchResult(
        dict(parent),
        fitness,
        state["history"],
        state.get("initial_fitness"),
        state.get("initial_source", "uniform" if config.init == "uniform" else "random"),
    )


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]
