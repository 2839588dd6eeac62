"""The `evopress` command line: one command per pipeline stage, each a thin call into the library.

User errors (`UserError`) print one line `error: ...` and exit with status 2; bugs keep their traceback.
Commands of each method live in their own module (listed in COMMAND_MODULES) and register on `app`.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import typer

from evopress.cli_app import app
from evopress.errors import UserError
from evopress.layout import MODEL as MODEL_DIR
from evopress.layout import TEXT as TEXT_DIR

# Modules that add commands to `app` when imported (one per topic, so methods do not share a file).
COMMAND_MODULES: list[str] = ["evopress.cli_database", "evopress.cli_compress", "evopress.cli_pipeline"]


@app.command("prepare-model")
def prepare_model_cmd(
    source: str = typer.Option(
        "embedded:smollm2-135m",
        help="embedded:<name>, a local HF folder, a local .gguf file, or hf:<org>/<name>",
    ),
    out: Path = typer.Option(Path(MODEL_DIR), help="folder to write the safetensors model into"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 (weights as saved)"),
    trust_remote_code: bool = typer.Option(
        False, help="allow custom model code from the source (hub models)"
    ),
) -> None:
    """Load a base model from any source and save it once as a plain safetensors folder with its tokenizer."""
    from evopress.stages import prepare_model

    manifest = prepare_model(source, out, dtype, trust_remote_code)
    typer.echo(
        f"saved {source} -> {out} ({manifest['model_type']}, {manifest['num_hidden_layers']} blocks, "
        f"{manifest['parameters'] / 1e6:.1f}M parameters, sha256 {manifest['sha256'][:12]})"
    )


@app.command("prepare-data")
def prepare_data_cmd(
    model: Path = typer.Option(Path(MODEL_DIR), help="prepared model folder (its tokenizer is used)"),
    source: list[str] = typer.Option(
        ["builtin:pydoc"],
        help="builtin:pydoc | builtin:docstrings | file:<path-or-glob> | hf:<ds>[/<cfg>]:<split>[:<field>]; "
        "repeat it for a mix",
    ),
    weight: list[float] = typer.Option(None, help="one per --source: its share of the rows (default: equal)"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    n_calibration: int = typer.Option(128, help="calibration sequences"),
    n_heldout: int = typer.Option(32, help="held-out sequences"),
    field: str = typer.Option("text", help="record field holding the text (jsonl / parquet / hf)"),
    out: Path = typer.Option(Path(TEXT_DIR), help="folder to write the token sets into"),
) -> None:
    """Tokenize a text source into calibration and held-out sequences (split on whole documents)."""
    from evopress.data import DataSpec
    from evopress.errors import require
    from evopress.stages import prepare_data

    require(
        not weight or len(weight) == len(source),
        f"--weight given {len(weight or [])} times for {len(source)} --source; give one per source or none",
    )
    mix = source[0] if len(source) == 1 else dict(zip(source, weight or [1.0] * len(source), strict=True))
    spec = DataSpec(
        source=mix, seq_len=seq_len, n_calibration=n_calibration, n_heldout=n_heldout, field=field
    )
    manifest = prepare_data(model, spec, out)
    typer.echo(
        f"wrote {out}: {manifest['calibration_tokens']} calibration and {manifest['heldout_tokens']} held-out "
        f"tokens from {manifest['documents']} documents of {', '.join(source)}"
    )


def _register_command_modules() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def usage_error_line(err) -> str:
    """A click/typer usage error as one line: the command, what was wrong (with the value given), where help is.

    typer (0.29) raises its own vendored click exceptions (typer._click.exceptions), not click's; both carry
    `format_message()` and, for a usage error, the context of the command it is about."""
    ctx = getattr(err, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    message = _one_line(err.format_message())
    cause = getattr(err, "__cause__", None)
    errors = getattr(cause, "errors", None)
    if callable(errors):  # a value typer's pydantic coercion rejected: name the value itself
        given = [e.get("input") for e in errors() if "input" in e]
        message += f" (got {given[0]!r})" if given else ""
    message = message.rstrip(".")
    if ctx is not None and message.startswith("No such command"):
        message += f"; allowed: {', '.join(ctx.command.list_commands(ctx))}"
    hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    return f"{where}{message}{hint}"


def _click_exception_types() -> tuple[type, ...]:
    """Every click exception base the command line can raise: typer's vendored copy and click's own."""
    import click
    from typer._click import exceptions as vendored

    return (vendored.ClickException, click.ClickException)


def _fail(line: str, code: int = 2) -> None:
    typer.echo(f"error: {line}", err=True)
    sys.exit(code)


def _quiet_progress_bars() -> None:
    """No weight-loading progress bars where stderr is no terminal (DVC, Prefect, pipes): there they are junk lines
    in the log, and they would come before a one-line error."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main() -> None:
    _register_command_modules()
    _quiet_progress_bars()
    from typer._click.exceptions import NoArgsIsHelpError

    try:
        # standalone_mode=False hands errors to us; it returns the exit code for --help and friends.
        result = app(standalone_mode=False)
    except UserError as err:
        _fail(_one_line(str(err)))
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except NoArgsIsHelpError as err:  # `evopress` alone: the help is what was asked for, not an error
        typer.echo(err.format_message())
        sys.exit(0)
    except _click_exception_types() as err:
        _fail(usage_error_line(err), 2)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
