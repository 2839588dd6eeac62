"""The EvoPress search: a (1 + lambda) evolutionary algorithm over the profiles of any compressor.

Each generation: `offspring` distinct children of the parent by level-switch mutation (budget exact); multi-step
selection scores them on fresh calibration samples of growing size (`tokens`), keeping `survivors[i]` after step i;
the parent joins the last step (elitism, re-scored on new data; a child wins a tie). A last step of `all` scores
every calibration row: parent and children meet on identical rows, the parent keeps its exact score (not scored
again), and the fitness can never rise from one generation to the next. Fitness = mean KL(dense ||
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
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evopress.compressors.base import Compressor, Profile
from evopress.config import ALL, SearchConfig
from evopress.errors import UserError, require
from evopress.io import atomic_write_json, atomic_write_text
from evopress.mutation import mutate
from evopress.profile import validate_units
from evopress.scoring import FitnessContext, LiveModel, select
from evopress.workers import LocalScorer

CHECKPOINT = "checkpoint.json"
HISTORY = "history.csv"


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


def _beating_parent(pool: list, scores: list[float], parent_score: float) -> tuple[list, list[float]]:
    """The children (and their scores) that score strictly below the parent on the same rows."""
    kept = [i for i, s in enumerate(scores) if s < parent_score]
    return [pool[i] for i in kept], [scores[i] for i in kept]


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
def initial_parent(comp, ctx, scorer, config, rng, seeds: dict) -> tuple[Profile, float | None, str]:
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
        # a baseline naming other units or levels is a bug; say so in one line rather than score it
        validate_units(seeds[name], comp)
        problem = comp.budget_problem(seeds[name])
        require(problem is None, f"seed baseline {name!r} is off budget: {problem}")
        pool.append(dict(seeds[name]))
        names.append(name)
    rows = ctx.sample(rng, config.initial_tokens)
    scores = scorer.score(pool, rows, None)
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
    scorer=None,
) -> SearchResult:
    """Run (or resume, when `out_dir` holds a checkpoint) the search; leaves the live model at the result.

    `seeds` maps each name in `config.seed_baselines` to its profile, or is a function making that map (called
    only when a fresh search starts, so a resumed one skips computing the baselines). `scorer` scores each
    selection step's pool (evopress/workers.py: Ray actors); by default this process's live model does.
    """
    config = config.for_method(comp.method).validate(calibration_tokens=ctx.total_tokens)
    out_dir = Path(out_dir) if out_dir is not None else None
    live = LiveModel(comp)
    scorer = scorer or LocalScorer(ctx, live)
    state = _load_checkpoint(out_dir, config, comp) if out_dir else None
    if state is None:
        rng = random.Random(config.seed)
        seed_profiles = ((seeds() if callable(seeds) else seeds) or {}) if config.seed_baselines else {}
        parent, fitness, source = initial_parent(comp, ctx, scorer, config, rng, seed_profiles)
        problem = comp.budget_problem(parent)
        require(problem is None, f"initial profile is off budget: {problem}")
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
                rows = ctx.all_rows() if n_tok == ALL else ctx.sample(rng, n_tok)
                # On an exact last step the parent's score is the one it won with: no need to score it again.
                known = state.get("exact_fitness") if last and n_tok == ALL else None
                # Only a parent scored the way the last step scores it can end a generation early: the uniform
                # start (never scored) or a start scored on the initial sample first gets its last-step score.
                screen = (
                    step == 0
                    and not last
                    and config.screen_with_parent
                    and (state.get("exact_fitness") if config.exact_last_step else fitness) is not None
                )
                if (last and known is None) or screen:
                    pool = pool + [parent]
                reuse = parent if (step == 0 and config.prefix_reuse) else None
                scores = scorer.score(pool, rows, reuse)
                tokens += len(pool) * len(rows) * ctx.seq_len
                if screen:
                    pool, scores = _beating_parent(pool[:-1], scores[:-1], scores[-1])
                    if not pool:  # no child beats the parent on these rows: the generation ends here
                        pool, best_score = [parent], fitness
                        step_seconds.append(time.perf_counter() - ts)
                        break
                if last and known is None and n_tok == ALL:  # the start on every row: what the end is held to
                    state.setdefault("initial_exact_fitness", scores[-1])
                if known is not None:
                    pool, scores = pool + [parent], scores + [known]
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
            padded = step_seconds + [0.0] * (len(config.tokens) - len(step_seconds))  # steps a screen skipped
            row.update({f"step{i + 1}_seconds": round(s, 4) for i, s in enumerate(padded)})
            state["history"].append(row)
            state.update(generation=gen, parent=parent, fitness=fitness, rng=_rng_state(rng))
            if config.exact_last_step:
                state["exact_fitness"] = fitness
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
