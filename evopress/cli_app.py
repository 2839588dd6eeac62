"""The typer application every command module registers on (kept apart so no command module imports cli.py)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="EvoPress: non-uniform LLM compression by evolutionary search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts hold source syntax like hf:<ds>[/<cfg>], not markup
)

# Ray workers (evopress/workers.py, evopress/build_pool.py), shared by build-db and search
WORKERS = typer.Option(
    1, help="Ray workers (> 1: a local Ray cluster, one worker per slot of --threads CPUs)"
)
THREADS = typer.Option(0, help="torch threads per worker (0 = this process's threads split over the workers)")
RAY_ADDRESS = typer.Option(
    "", help="an existing Ray cluster to run the workers on (auto = the one on this host)"
)
