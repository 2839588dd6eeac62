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
