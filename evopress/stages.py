"""One function per pipeline stage: typed settings and paths in, what it wrote out. No command-line strings.

The per-stage commands (`evopress search`, `build-db`, ...) call these with their flags; the pipeline
(`evopress stage <name>`, see pipeline.py) calls them with params.yaml's settings and the `Layout`'s paths.
Tracking wraps them from outside: nothing here knows about MLflow, DVC or Prefect.

Every function validates its settings before it touches any file, so a bad value never costs finished work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from evopress.config import ComputeConfig, SearchConfig
from evopress.data import DataSpec
from evopress.errors import require
from evopress.io import atomic_write_json, require_apart
from evopress.methods import database_of, database_sha256
from evopress.models import load_adapter


# --- the stages ---------------------------------------------------------------------------------------------------
def prepare_model(source: str, out: Path, dtype: str = "float32", trust_remote_code: bool = False) -> dict:
    """Load a base model from any source and save it once as a plain safetensors folder; returns its manifest.

    A family the adapter cannot work with fails here, on the config alone, not at the first search."""
    from evopress.adapter import require_supported
    from evopress.models import (
        load_config,
        load_model,
        parse_dtype,
        require_tokenizer,
        resolve_source,
        save_model,
    )

    parse_dtype(dtype)  # a bad dtype fails before any config or weight is read
    src = resolve_source(source)
    if src.kind == "folder":
        require_apart(out, folders={"model source": Path(src.location)})
        require_tokenizer(Path(src.location))
    elif src.kind == "gguf":
        require_apart(out, files={"model source": Path(src.location) / src.gguf_file})
    require_supported(load_config(source, trust_remote_code=trust_remote_code).model_type)
    model, tokenizer = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
    return save_model(model, tokenizer, Path(out), source)


def prepare_data(model_dir: Path, spec: DataSpec, out: Path) -> dict:
    """Tokenize a text source into calibration and held-out sequences; returns the data manifest."""
    from transformers import AutoConfig, AutoTokenizer

    from evopress.data import prepare_data as prepare
    from evopress.models import verify_model

    require_apart(out, folders={"model": model_dir})
    verify_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    return prepare(spec, tokenizer, Path(out), max_context=max_context)


def build_db(
    method: str,
    model_dir: Path,
    text_dir: Path,
    out: Path,
    target: float | None,
    database: dict,
    compute: ComputeConfig | None = None,
):
    """Build (or resume) a method's level database; a method without one gets a one-file marker.

    `target` matters only where the levels depend on it (sparsity); None skips it for the others. With
    `compute.workers` > 1 (or a Ray address) the levels are computed on Ray workers (evopress/build_pool.py);
    the files are the same either way."""
    from evopress.methods import check_settings, method_function, needs_database
    from evopress.models import verify_model

    check_settings(method, target, {}, database)
    out = Path(out)
    require_apart(out, folders={"model": model_dir, "data": text_dir})
    if not needs_database(method):
        # Every search stage depends on data/db/<method>; a method without a database gets a marker.
        atomic_write_json(
            out / "manifest.json", {"method": method, "database": None, "why": "no level database"}
        )
        return None
    verify_model(model_dir)
    from evopress.build_pool import make_pool

    target_option = {} if target is None else {"target": target}
    pool = make_pool(compute)
    try:
        build = method_function(method, "build_database")
        return build(model_dir, text_dir, out, {**target_option, **database}, pool=pool)
    finally:
        pool.close()


def search(
    method: str,
    model_dir: Path,
    text_dir: Path,
    db: Path | None,
    out: Path,
    target: float,
    options: dict,
    config: SearchConfig,
    compute: ComputeConfig,
    on_generation: Callable | None = None,
    seed_files: dict[str, Path] | None = None,
    fitness_rows: int | str = "all",
) -> dict:
    """Search a profile at the target; resumes from `out`'s checkpoint. Writes profile.json, search.json,
    layers.csv (and history.csv, checkpoint.json every generation); returns search.json's content.

    `seed_files` maps seed baselines to profiles the baselines stage already wrote: those are read, not computed
    again (the pipeline's DP seed costs about as much as the search itself)."""
    import json

    from evopress.data import load_tokens
    from evopress.device import describe, resolve_device
    from evopress.fitness_rows import fitness_tokens
    from evopress.methods import check_settings, get_baseline, make_compressor
    from evopress.profile import make_profile, model_sha256, save_profile, write_layers_csv
    from evopress.scoring import FitnessContext
    from evopress.search import run_search

    out = Path(out)
    compute = compute.validate()
    config = config.for_method(method)
    check_settings(method, target, options, {})
    require_apart(out, folders={"model": model_dir, "data": text_dir, "database": db})
    for name in config.seed_baselines:
        get_baseline(method, name)  # an unknown name fails before the model loads
    calibration = fitness_tokens(load_tokens(text_dir, "calibration"), fitness_rows, database_of(method, db))
    config.validate("search", calibration.numel())
    adapter = load_adapter(model_dir, compute.dtype, resolve_device(compute.device))
    comp = make_compressor(method, adapter, target, db=database_of(method, db), options=options)
    ctx = FitnessContext.build(adapter, calibration, topk=compute.topk or None, batch_size=compute.batch_size)

    given = {n: seed_profile(f, method, target, model_dir) for n, f in (seed_files or {}).items()}

    def seeds() -> dict:  # on the dense model; the search then applies every unit of its first candidate
        return {
            n: given[n]
            if n in given
            else get_baseline(method, n)(comp, ctx, seed=config.seed, tokens=config.initial_tokens)
            for n in config.seed_baselines
        }

    scorer = None
    if compute.distributed:
        from evopress.device import resolve_dtype
        from evopress.workers import RayScorer, WorkerSpec

        spec = WorkerSpec(
            method,
            str(model_dir),
            str(database_of(method, db) or "") or None,
            target,
            options,
            resolve_dtype(compute.dtype),
            calibration,
            compute.batch_size,
            compute.threads_per_worker(),
            resolve_device(compute.device),
        )
        scorer = RayScorer(spec, ctx.ref, compute.workers, compute.ray_address)
    try:
        result = run_search(comp, ctx, config, out, on_generation=on_generation, seeds=seeds, scorer=scorer)
    finally:
        if scorer is not None:
            scorer.close()
    profile = make_profile(
        comp,
        result.profile,
        target=target,
        source="search",
        fitness=result.fitness,
        sha=model_sha256(model_dir),
    )
    save_profile(out / "profile.json", profile)
    state = json.loads((out / "checkpoint.json").read_text())
    summary = {
        "fitness": profile["fitness"],
        "initial_fitness": state.get("initial_fitness"),  # on initial_tokens
        # on every row (an exact last step), or None
        "initial_exact_fitness": state.get("initial_exact_fitness"),
        "initial_source": state.get("initial_source"),
        "generations": state["generation"],
        "seconds": round(state["elapsed"], 2),
        "tokens": state["tokens"],
        "budget": profile["budget"],
        "database_sha256": database_sha256(method, db),
        "compute": describe(compute.dtype, compute.device),
    }
    atomic_write_json(out / "search.json", summary)
    write_layers_csv(out / "profile.json", out / "layers.csv")
    return summary


def seed_profile(path: Path, method: str, target: float, model_dir: Path) -> dict:
    """The units of a baseline's profile file, checked to be a start of this search (method, target, model)."""
    from evopress.profile import model_sha256, read_profile

    profile = read_profile(path, keys=("method", "target", "units"))
    for key, want in (("method", method), ("target", target), ("model_sha256", model_sha256(model_dir))):
        have = profile.get(key)
        require(have == want, f"seed profile {str(path)!r} has {key} {have!r}, this search needs {want!r}")
    # units and levels: run_search checks every seed (validate_units, budget) before scoring it
    return {u: int(v) for u, v in profile["units"].items()}


def baseline(
    method: str,
    name: str,
    model_dir: Path,
    text_dir: Path,
    db: Path | None,
    out: Path,
    target: float,
    options: dict,
    compute: ComputeConfig,
    seed: int = 0,
    tokens: int = 2048,
    fitness_rows: int | str = "all",
) -> dict:
    """A baseline's profile at the target, in the same format as a searched one; returns the profile file.
    It scores `tokens` from the start of the rows `fitness_rows` names (the search's rows)."""
    from evopress.data import load_tokens
    from evopress.device import resolve_device
    from evopress.fitness_rows import fitness_tokens
    from evopress.methods import check_settings, get_baseline, make_compressor
    from evopress.profile import make_profile, model_sha256, save_profile
    from evopress.scoring import FitnessContext

    compute = compute.validate()
    check_settings(method, target, options, {})
    make_baseline = get_baseline(method, name)
    require_apart(out, folders={"model": model_dir, "data": text_dir, "database": db})
    calibration = fitness_tokens(load_tokens(text_dir, "calibration"), fitness_rows, database_of(method, db))
    require(
        1 <= tokens <= calibration.numel(),
        f"baseline tokens {tokens} is outside 1..{calibration.numel()} (the calibration rows it scores)",
    )
    adapter = load_adapter(model_dir, compute.dtype, resolve_device(compute.device))
    comp = make_compressor(method, adapter, target, db=database_of(method, db), options=options)
    # Only the rows the baseline scores need a dense reference. Fewer tokens than a row means the first row's
    # prefix: DP costs one forward per linear and bit-width, so a 256-token prefix halves what a 512-token row
    # costs (20 minutes of the main job on a 2-core CPU), and DP only needs the linears' errors ranked.
    seq_len = calibration.shape[1]
    rows = (
        calibration[: math.ceil(tokens / seq_len)] if tokens >= seq_len else calibration[:1, : max(tokens, 2)]
    )
    ctx = FitnessContext.build(adapter, rows, topk=compute.topk or None, batch_size=compute.batch_size)
    units = make_baseline(comp, ctx, seed=seed, tokens=tokens)
    profile = make_profile(comp, units, target=target, source=f"baseline:{name}", sha=model_sha256(model_dir))
    save_profile(Path(out) / "profile.json", profile)
    return profile


def stitch(
    method: str, model_dir: Path, profile_path: Path, db: Path | None, out: Path, options: dict | None = None
) -> dict:
    """Profile file + database -> a compressed model folder; returns the stitch report.

    `options` are the method's stitch keywords (`check_stitch_options`)."""
    from evopress.database import verify_database
    from evopress.methods import check_stitch_options, method_function, needs_database
    from evopress.models import verify_model
    from evopress.profile import read_profile

    profile = read_profile(profile_path, keys=("method", "target", "units"))
    require(
        profile["method"] == method,
        f"profile {str(profile_path)!r} is for method {profile['method']!r}, not {method!r}",
    )
    options = check_stitch_options(method, options)
    function = method_function(method, "stitch")
    require_apart(out, folders={"model": model_dir, "database": db}, files={"profile": profile_path})
    if needs_database(method):
        require(db is not None, f"stitching {method} needs its level database (--db)")
        verify_database(Path(db))
    verify_model(model_dir)
    report = function(Path(model_dir), profile, database_of(method, db), Path(out), **options)
    return {**report, "database_sha256": database_sha256(method, db)}
