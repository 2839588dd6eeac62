"""Pipeline commands: `evopress stage <name>` (what every dvc.yaml stage runs), `check-params`, `report`.

`evopress stage` reads params.yaml (checked first: an unknown key or a wrong type fails in one line before any work),
turns the stage's settings into a call of the stage's own command (prepare-model, build-db, search, ...), and runs it
inside the stage's MLflow run. So dvc.yaml stays a plain graph of paths and params keys, and the settings live in one
place. Paths are fixed by the pipeline layout below (dvc.yaml uses the same ones).

Resume: databases and searches are `persist: true` outputs; a stamp next to each (`<out>.params.json`) holds the
settings it was made with. Same settings: the command resumes its partial work; other settings: it starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import typer

from evopress.cli import app
from evopress.errors import require

MODEL, DATA = "data/model", "data/text"
METRICS, RESULTS = "runs/metrics.json", "runs/results.md"
STAGES = ("prepare_model", "prepare_data", "build_db", "search", "baselines", "stitch", "evaluate", "report")


def db_dir(m: str) -> str:
    return f"data/db/{m}"


def search_dir(m: str) -> str:
    return f"runs/search/{m}"


def baselines_dir(m: str) -> str:
    return f"runs/baselines/{m}"


def stitched_dir(m: str) -> str:
    return f"models/{m}"


PARAMS = typer.Option(Path("params.yaml"), help="the pipeline's params file")


def invoke(args: list[str]) -> None:
    """Run another evopress command in this process (its UserError propagates as ours)."""
    args = [str(a) for a in args]
    typer.echo("$ evopress " + " ".join(args))
    app(args=args, standalone_mode=False)


def options(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def fresh_unless_same(out: Path, settings: dict) -> None:
    """Keep `out` (to resume it) only when the stamp beside it holds the same settings; then stamp it."""
    from evopress.io import atomic_write_json

    stamp = out.with_name(out.name + ".params.json")
    if out.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != settings):
        typer.echo(f"{out}: made with other settings; starting afresh")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    elif out.exists():
        typer.echo(f"{out}: resuming (same settings)")
    atomic_write_json(stamp, settings)


class _NoRun:
    def __getattr__(self, _name):
        return lambda *a, **k: None


def progress_hook(search_params: dict):
    """One line per generation on stdout: under DVC and Prefect there is no terminal for a progress bar."""
    total = search_params.get("generations")

    def on_generation(info) -> None:
        typer.echo(f"generation {info.generation}/{total}: KL {info.fitness:.5f} ({info.seconds:.1f} s)")

    return on_generation


@contextlib.contextmanager
def tracked(params, root: Path, stage: str, flat: dict, deps: list[str]):
    from evopress.cli_compress import GENERATION_HOOKS

    GENERATION_HOOKS.append(progress_hook)
    try:
        if not params.tracking.enabled:
            yield _NoRun()
            return
        from evopress import tracking

        tracking.backfill_lock_tags(params.tracking, root)  # upstream stages' dvc.lock outs, written by now
        GENERATION_HOOKS.append(tracking.generation_hook)
        try:
            with tracking.stage_run(params.tracking, root, stage, flat, deps) as run:
                yield run
        finally:
            GENERATION_HOOKS.remove(tracking.generation_hook)
    finally:
        GENERATION_HOOKS.remove(progress_hook)


# --- the stages ----------------------------------------------------------------------------------------------
def prepare_model(p, run, _m) -> None:
    invoke(["prepare-model", "--source", p.model.source, "--out", MODEL, "--dtype", p.model.dtype])
    run.artifact(Path(MODEL) / "evopress_model.json")


def prepare_data(p, run, _m) -> None:
    d = p.data
    invoke(
        ["prepare-data", "--model", MODEL, "--source", d.source, "--seq-len", d.seq_len]
        + ["--n-calibration", d.n_calibration, "--n-heldout", d.n_heldout, "--field", d.field, "--out", DATA]
    )
    run.artifact(Path(DATA) / "data.json")


def build_db(p, run, m) -> None:
    from evopress.io import atomic_write_json
    from evopress.methods import needs_database

    out = Path(db_dir(m))
    if not needs_database(m):
        # Every search stage depends on data/db/<method>; a method without a database gets a marker.
        atomic_write_json(out / "manifest.json", {"method": m, "database": None, "why": "no level database"})
        return
    settings = {"target": p.methods[m].target, **p.methods[m].database}
    fresh_unless_same(out, settings)
    invoke(["build-db", "--method", m, "--model", MODEL, "--data", DATA, "--out", out, *options(settings)])
    run.artifact(out / "manifest.json")


def _compute_args(p) -> list:
    c = p.compute
    return ["--dtype", c.dtype, "--batch-size", c.batch_size]


def search(p, run, m) -> None:
    from evopress.io import atomic_write_json
    from evopress.methods import needs_database
    from evopress.report import fitness_figure, profile_figure, write_layers_csv

    mp, s, out = p.methods[m], p.methods[m].search, Path(search_dir(m))
    checkpoint = out / "checkpoint.json"
    settings = {"method": asdict(mp), "compute": asdict(p.compute)}
    fresh_unless_same(checkpoint, settings)
    args = [
        "search",
        "--method",
        m,
        "--model",
        MODEL,
        "--data",
        DATA,
        "--target",
        mp.target,
        *options(mp.options),
    ]
    args += ["--db", db_dir(m)] if needs_database(m) else []
    args += ["--generations", s.generations, "--offspring", s.offspring, "--seed", s.seed]
    args += ["--survivors", ",".join(map(str, s.survivors)), "--tokens", ",".join(map(str, s.tokens))]
    args += ["--init", s.init] if s.init else []
    args += ["--initially-generated", s.initially_generated, "--initial-tokens", s.initial_tokens]
    args += ["--seed-baselines", ",".join(s.seed_baselines)] if s.seed_baselines else []
    args += ["--topk", p.compute.topk, "--prefix-reuse" if s.prefix_reuse else "--no-prefix-reuse"]
    invoke(args + _compute_args(p) + ["--out", out])
    profile = json.loads((out / "profile.json").read_text())
    state = json.loads(checkpoint.read_text())
    summary = {
        "fitness": profile["fitness"],
        "initial_fitness": state.get("initial_fitness"),
        "initial_source": state.get("initial_source"),
        "generations": state["generation"],
        "seconds": round(state["elapsed"], 2),
        "tokens": state["tokens"],
    }
    atomic_write_json(out / "search.json", summary)
    write_layers_csv(out / "profile.json", out / "layers.csv")
    run.metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    run.tags({"search.initial_source": str(summary["initial_source"])})
    for name in ("profile.json", "history.csv", "search.json", "layers.csv"):
        run.artifact(out / name)
    run.figure(fitness_figure(out / "history.csv"), "plots/fitness.png")
    run.figure(profile_figure(out / "profile.json"), "plots/profile.png")


def baselines(p, run, m) -> None:
    from evopress.io import atomic_write_json
    from evopress.methods import needs_database

    mp, out = p.methods[m], Path(baselines_dir(m))
    atomic_write_json(
        out / "index.json", {"method": m, "baselines": mp.baselines}
    )  # the out exists when empty
    for name in mp.baselines:
        t0 = time.perf_counter()
        args = ["baseline", "--method", m, "--name", name, "--model", MODEL, "--data", DATA]
        args += ["--target", mp.target, *options(mp.options), "--seed", mp.baseline_seed]
        args += ["--tokens", mp.baseline_tokens, "--topk", p.compute.topk]
        args += ["--db", db_dir(m)] if needs_database(m) else []
        invoke(args + _compute_args(p) + ["--out", out / name])
        run.metrics({f"{name}_seconds": time.perf_counter() - t0})
        run.artifact(out / name / "profile.json", f"profiles/{name}")


def stitch(p, run, m) -> None:
    from evopress.methods import needs_database

    out = Path(stitched_dir(m))
    args = ["stitch", "--method", m, "--model", MODEL, "--profile", Path(search_dir(m)) / "profile.json"]
    args += ["--db", db_dir(m)] if needs_database(m) else []
    invoke(args + ["--out", out])
    manifest = json.loads((out / "evopress_model.json").read_text())
    run.artifact(out / "evopress_model.json")
    run.artifact(Path(search_dir(m)) / "profile.json")
    run.model(f"evopress-{m}", out, manifest["sha256"], {"method": m, "target": str(p.methods[m].target)})


def evaluate(p, run, _m) -> None:
    from evopress.io import atomic_write_json
    from evopress.report import evaluate_all

    rows = evaluate_all(Path("."), p, log=typer.echo)
    atomic_write_json(Path(METRICS), rows)
    for label, row in rows.items():
        run.metrics({f"{label}.{k}": v for k, v in row.items()})
    run.artifact(Path(METRICS))


def report(p, run, _m) -> None:
    from evopress.io import atomic_write_text
    from evopress.report import load_metrics, markdown, table_rows

    table = markdown(table_rows(load_metrics(Path(METRICS))))
    atomic_write_text(Path(RESULTS), table)
    typer.echo(table)
    for name in (RESULTS, "dvc.lock", "params.yaml"):
        run.artifact(Path(name))
    if p.tracking.enabled:
        from evopress import tracking

        tracking.backfill_lock_tags(p.tracking, Path("."))
        uri, _ = tracking.uris(p.tracking, Path("."))
        typer.echo(f"MLflow: mlflow ui --backend-store-uri {uri}")


def stage_deps(stage: str, m: str | None) -> list[str]:
    """Inputs whose dvc.lock md5 the stage run is tagged with (the same paths dvc.yaml declares)."""
    return {
        "prepare_model": [],
        "prepare_data": [MODEL],
        "build_db": [MODEL, DATA],
        "search": [MODEL, DATA, db_dir(m or "")],
        "baselines": [MODEL, DATA, db_dir(m or "")],
        "stitch": [MODEL, db_dir(m or ""), f"{search_dir(m or '')}/profile.json"],
        "evaluate": [MODEL, DATA, "runs/search", "runs/baselines", "models"],
        "report": [METRICS],
    }[stage]


def stage_params(p, stage: str, m: str | None) -> dict:
    from evopress.params import as_dict, flatten

    tree = as_dict(p)
    if m:
        tree = {"method": m, **tree["methods"][m], "compute": tree["compute"]}
    return flatten(tree)


@app.command("stage")
def stage_cmd(
    name: str = typer.Argument(..., help=f"one of {', '.join(STAGES)}"),
    method: str = typer.Option(
        None, help="the method of a per-method stage (build_db, search, baselines, stitch)"
    ),
    params: Path = PARAMS,
) -> None:
    """Run one pipeline stage from params.yaml (what each dvc.yaml stage calls), tracked in MLflow."""
    from evopress import params as P

    p = P.load(params)
    require(name in STAGES, f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    per_method = name in ("build_db", "search", "baselines", "stitch")
    require(not per_method or bool(method), f"stage {name!r} needs --method (one of {', '.join(p.methods)})")
    require(
        not method or method in p.methods,
        f"method {method!r} is not in {params}'s methods: {', '.join(p.methods)}",
    )
    label = f"{name}@{method}" if per_method else name
    t0 = time.perf_counter()
    typer.echo(f"stage {label}: start")
    with tracked(
        p, Path("."), label, stage_params(p, name, method if per_method else None), stage_deps(name, method)
    ) as run:
        globals()[name](p, run, method)
        run.metrics({"stage_seconds": time.perf_counter() - t0})
    typer.echo(f"stage {label}: done in {time.perf_counter() - t0:.1f} s")


@app.command("check-params")
def check_params_cmd(params: Path = PARAMS) -> None:
    """Check params.yaml against the schema (unknown keys, types, allowed values); one line per verdict."""
    from evopress import params as P

    p = P.load(params)
    typer.echo(
        f"{params}: ok (methods: {', '.join(f'{m} target {v.target:g}' for m, v in p.methods.items())})"
    )


@app.command("report")
def report_cmd(
    metrics: Path = typer.Option(Path(METRICS), help="metrics json of the evaluate stage"),
) -> None:
    """Print the results table (method, profile, budget, held-out perplexity, KL, size) of the last evaluation."""
    from evopress.report import load_metrics, markdown, table_rows

    typer.echo(markdown(table_rows(load_metrics(metrics))))
