"""Pipeline commands: `evopress stage <name>` (what every dvc.yaml stage runs), `check-params`, `report`.

Wiring only: params.yaml is loaded and checked (evopress/params.py), the stage runs through
`evopress.pipeline.run_stage` on the `Layout`'s paths, and what it returns is recorded in the stage's MLflow run.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from evopress.cli_app import app
from evopress.layout import METRICS, PER_METHOD, STAGES, Layout
from evopress.layout import stage_order as layout_order

PARAMS = typer.Option(Path("params.yaml"), help="the pipeline's params file")


def stage_params(p, stage: str, m: str | None) -> dict:
    """The stage's settings, flattened for MLflow params (a per-method stage: its method's and compute)."""
    from evopress.params import as_dict, flatten

    tree = as_dict(p)
    if m:
        tree = {"method": m, **tree["methods"][m], "compute": tree["compute"]}
    return flatten(tree)


def stage_order(p, name: str, method: str | None) -> str:
    """The stage's place in dvc.yaml ("4.2": fourth stage, second method; `dvc stage list` order), for sorting."""
    return layout_order(f"{name}@{method}" if method else name, list(p.methods))


def _record(run, result) -> None:
    run.metrics(result.metrics)
    run.tags(result.tags)
    for path, folder in result.artifacts:
        run.artifact(path, folder)
    for name, make_figure in result.figures.items():
        run.figure(make_figure(), name)
    if result.model:
        run.model(*result.model)


def _run_untracked(name, p, layout, method, on_generation):
    from evopress.pipeline import run_stage

    run_stage(name, p, layout, method, typer.echo, on_generation)


def _run_tracked(name, p, layout, method, label, on_generation, t0):
    from evopress import tracking
    from evopress.pipeline import run_stage

    tracking.backfill_lock_tags(p.tracking, layout.root)  # upstream stages' dvc.lock outs, written by now
    flat = stage_params(p, name, method)
    deps, order = Layout.deps(name, method), stage_order(p, name, method)
    with tracking.stage_run(p.tracking, layout.root, label, flat, deps, method, order) as run:
        hook = tracking.generation_hook(None)

        def on_gen(info):
            on_generation(info)
            if hook:
                hook(info)

        result = run_stage(name, p, layout, method, typer.echo, on_gen)
        _record(run, result)
        if name == "evaluate":
            run.score_models(layout.metrics)  # held-out metrics onto the stitched models' pages
        run.metrics({"stage_seconds": time.perf_counter() - t0})
        if name == "report":
            tracking.backfill_lock_tags(p.tracking, layout.root)
            uri, _ = tracking.uris(p.tracking, layout.root)
            typer.echo(f"MLflow: mlflow ui --backend-store-uri {uri}")


@app.command("stage")
def stage_cmd(
    name: str = typer.Argument(..., help=f"one of {', '.join(STAGES)}"),
    method: str = typer.Option(None, help=f"the method of a per-method stage ({', '.join(PER_METHOD)})"),
    params: Path = PARAMS,
) -> None:
    """Run one pipeline stage from params.yaml (what each dvc.yaml stage calls), tracked in MLflow."""
    from evopress import params as P
    from evopress.cli_compress import progress_line
    from evopress.errors import require

    p = P.load(params)
    require(name in STAGES, f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    per_method = name in PER_METHOD
    require(not per_method or bool(method), f"stage {name!r} needs --method (one of {', '.join(p.methods)})")
    require(
        not method or method in p.methods,
        f"method {method!r} is not in {params}'s methods: {', '.join(p.methods)}",
    )
    method = method if per_method else None
    label = f"{name}@{method}" if per_method else name
    on_generation = progress_line(p.methods[method].search.generations) if name == "search" else None
    layout = Layout(Path("."))
    t0 = time.perf_counter()
    typer.echo(f"stage {label}: start")
    if p.tracking.enabled:
        _run_tracked(name, p, layout, method, label, on_generation, t0)
    else:
        _run_untracked(name, p, layout, method, on_generation)
    typer.echo(f"stage {label}: done in {time.perf_counter() - t0:.1f} s")


@app.command("check-params")
def check_params_cmd(params: Path = PARAMS) -> None:
    """Check params.yaml: keys, types and every rule a stage applies later; one line per verdict."""
    from evopress import params as P

    p = P.load(params)
    typer.echo(
        f"{params}: ok (methods: {', '.join(f'{m} target {v.target:g}' for m, v in p.methods.items())})"
    )


@app.command("report")
def report_cmd(
    metrics: Path = typer.Option(Path(METRICS), help="metrics json of the evaluate stage"),
) -> None:
    """Print the results table (method, profile, target, held-out perplexity, KL, size) of the last evaluation."""
    from evopress.report import load_metrics, markdown, table_rows

    typer.echo(markdown(table_rows(load_metrics(metrics))))
