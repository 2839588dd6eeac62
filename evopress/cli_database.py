"""`evopress build-db` and `evopress stitch`: dispatch by method to evopress/compressors/<method>.py.

  evopress build-db --method sparsity --model data/model --data data/text --out data/db/sparsity \\
      --option target=0.5 [--option num_levels=4 ...]
  evopress stitch --method sparsity --model data/model --profile P.json --db data/db/sparsity --out DIR
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import typer

from evopress.cli import app
from evopress.errors import require
from evopress.methods import METHODS, check_method, needs_database


def parse_options(pairs: list[str]) -> dict:
    """['key=value', ...] -> {key: value}; values are read as json when they parse (numbers, true), else text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        require(sep == "=" and key.strip(), f"bad --option {pair!r}; expected key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def method_module(method: str, function: str):
    check_method(method)
    module = importlib.import_module(METHODS[method][0])
    require(hasattr(module, function), f"method {method!r} has no {function} (nothing to do for it)")
    return getattr(module, function)


@app.command("build-db")
def build_db_cmd(
    method: str = typer.Option(..., help="sparsity | quantization (methods with a level database)"),
    model: Path = typer.Option(Path("data/model"), help="prepared model folder"),
    data: Path = typer.Option(Path("data/text"), help="prepared token sets (calibration is used)"),
    out: Path = typer.Option(..., help="database folder (resumes when it holds a matching manifest)"),
    option: list[str] = typer.Option([], help="method option key=value (repeatable), e.g. target=0.5"),
) -> None:
    """Build (or resume, or repair) a method's level database: one file per (unit, level) + manifest."""
    check_method(method)
    require(needs_database(method), f"method {method!r} needs no level database")
    from evopress.models import read_manifest

    read_manifest(model)
    build = method_module(method, "build_database")
    start = time.perf_counter()
    db = build(model, data, out, parse_options(option))
    typer.echo(
        f"database {out}: {len(db.pairs())} files, {db.size_on_disk() / 1e6:.1f} MB, "
        f"complete={db.manifest['complete']}, {time.perf_counter() - start:.1f} s"
    )


@app.command("stitch")
def stitch_cmd(
    method: str = typer.Option(..., help="depth | sparsity | quantization"),
    model: Path = typer.Option(Path("data/model"), help="prepared (dense) model folder"),
    profile: Path = typer.Option(..., help="profile json from `search` or `baseline`"),
    db: Path | None = typer.Option(None, help="level database (methods that have one)"),
    out: Path = typer.Option(..., help="folder to write the compressed model into"),
) -> None:
    """Profile + database -> a compressed model folder (safetensors) that evopress and transformers load."""
    from evopress.stitch import stitch

    report = stitch(method, model, profile, db, out)
    summary = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items())
    typer.echo(f"stitched {out}: {summary}")
