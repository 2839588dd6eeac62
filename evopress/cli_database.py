"""`evopress build-db` and `evopress stitch`: dispatch by method to evopress/compressors/<method>.py.

  evopress build-db --method sparsity --model data/model --data data/text --out data/db/sparsity \\
      --option target=0.5 [--option num_levels=4 ...] [--workers 2 --threads 1: levels on Ray workers]
  evopress stitch --method sparsity --model data/model --profile P.json --db data/db/sparsity --out DIR
  evopress stitch --method quantization ... --option format=evopress-packed   (default: compressed-tensors)
  evopress recode-db data/db/quantization data/db/quantization-compact   (an old plain database made compact)
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from evopress.cli_app import RAY_ADDRESS, THREADS, WORKERS, app
from evopress.config import parse_option_pairs
from evopress.layout import MODEL as MODEL_DIR
from evopress.layout import TEXT as TEXT_DIR


@app.command("build-db")
def build_db_cmd(
    method: str = typer.Option(..., help="sparsity | quantization (methods with a level database)"),
    model: Path = typer.Option(Path(MODEL_DIR), help="prepared model folder"),
    data: Path = typer.Option(Path(TEXT_DIR), help="prepared token sets (calibration is used)"),
    out: Path = typer.Option(..., help="database folder (resumes when it holds a matching manifest)"),
    option: list[str] = typer.Option([], help="method option key=value (repeatable), e.g. target=0.5"),
    workers: int = WORKERS,
    threads: int = THREADS,
    ray_address: str = RAY_ADDRESS,
) -> None:
    """Build (or resume, or repair) a method's level database: one file per (unit, level) + manifest."""
    from evopress.config import ComputeConfig
    from evopress.errors import require
    from evopress.methods import needs_database
    from evopress.stages import build_db

    compute = ComputeConfig(workers=workers, threads=threads, ray_address=ray_address).validate("compute")
    require(needs_database(method), f"method {method!r} needs no level database")
    settings = parse_option_pairs(option)
    target = settings.pop("target", None)
    require(
        method != "sparsity" or target is not None,
        "build-db --method sparsity needs --option target=<sparsity in (0, 1)>",
    )
    start = time.perf_counter()
    # no target for quantization: its levels do not depend on one (a stand-in 3.0 would refuse a 4,8-bit grid)
    db = build_db(method, model, data, out, target, settings, compute)
    typer.echo(
        f"database {out}: {len(db.pairs())} files, {db.size_on_disk() / 1e6:.1f} MB, "
        f"complete={db.manifest['complete']}, {time.perf_counter() - start:.1f} s"
    )


@app.command("recode-db")
def recode_db_cmd(
    src: Path = typer.Argument(..., help="a complete level database"),
    dst: Path = typer.Argument(..., help="new folder for the copy (resumes a copy left unfinished)"),
    encoding: str = typer.Option("compact", help="compact (bit planes, bitmask + non-zeros) | plain"),
) -> None:
    """Copy a level database with every file in another encoding; every tensor reads back the same."""
    from evopress.database import LevelDatabase, recode

    start = time.perf_counter()
    before = LevelDatabase.open(src).size_on_disk()
    db = recode(src, dst, encoding)
    typer.echo(
        f"database {dst}: {len(db.pairs())} files, {db.encoding}, {db.size_on_disk() / 1e6:.1f} MB "
        f"(was {before / 1e6:.1f} MB), {time.perf_counter() - start:.1f} s"
    )


@app.command("stitch")
def stitch_cmd(
    method: str = typer.Option(..., help="depth | sparsity | quantization"),
    model: Path = typer.Option(Path(MODEL_DIR), help="prepared (dense) model folder"),
    profile: Path = typer.Option(..., help="profile json from `search` or `baseline`"),
    db: Path | None = typer.Option(None, help="level database (methods that have one)"),
    out: Path = typer.Option(..., help="folder to write the compressed model into"),
    option: list[str] = typer.Option(
        [],
        help="stitch option key=value (repeatable); quantization: format=compressed-tensors|evopress-packed",
    ),
) -> None:
    """Profile + database -> a compressed model folder (safetensors) that evopress and transformers load."""
    from evopress.stages import stitch

    report = stitch(method, model, profile, db, out, parse_option_pairs(option))
    summary = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items())
    typer.echo(f"stitched {out}: {summary}")
