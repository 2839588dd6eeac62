"""The `evopress` command line: one command per pipeline stage, each a thin call into the library.

User errors (`UserError`) print one line `error: ...` and exit with status 2; bugs keep their traceback.
Commands of each method live in their own module (listed in COMMAND_MODULES) and register on `app`.
"""

from __future__ import annotations

import importlib
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


def main() -> None:
    _register_command_modules()
    try:
        # standalone_mode=False hands errors to us; it returns the exit code for --help and friends.
        result = app(standalone_mode=False)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as err:
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
