"""CLI user errors: one line on stderr, exit status 2, no traceback."""

import pytest
import torch

from conftest import char_tokenizer, run_cli, tiny_llama
from evopress import cli


@pytest.fixture
def saved_tiny_model(tmp_path):
    """A tiny Llama prepared like `evopress prepare-model` would (from a local folder source)."""
    from evopress.models import load_model, save_model

    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    model, tok = load_model(str(src))
    save_model(model, tok, tmp_path / "model", str(src))
    return tmp_path / "model"


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare-model", "--source", "nowhere"], "unknown model source 'nowhere'"),
        (["prepare-model", "--source", "embedded:gpt5"], "unknown embedded model 'gpt5'"),
        (["prepare-model", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["prepare-data", "--model", "/no/model"], "/no/model is not a prepared model"),
    ],
)
def test_bad_input_is_one_line_error(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_prepare_data_errors_on_the_prepared_model(monkeypatch, capsys, saved_tiny_model, tmp_path):
    model = str(saved_tiny_model)
    cases = [
        (["--seq-len", "100000"], "seq_len 100000 exceeds the model's context 256"),
        (["--seq-len", "64", "--source", "file:/missing.txt"], "no text file matches '/missing.txt'"),
        (["--seq-len", "64", "--source", "ftp:x"], "unknown text source 'ftp:x'"),
        (["--seq-len", "64", "--n-calibration", "100000"], "too little text"),
        (
            ["--source", "builtin:pydoc", "--source", "ftp:x", "--weight", "1"],
            "--weight given 1 times for 2 --source",
        ),
        (
            ["--seq-len", "64", "--source", "builtin:pydoc", "--source", "ftp:x"],
            "unknown text source 'ftp:x'",
        ),
    ]
    for extra, message in cases:
        code, _, err = run_cli(
            monkeypatch, capsys, "prepare-data", "--model", model, "--out", str(tmp_path / "t"), *extra
        )
        assert code == 2 and message in err and err.count("\n") == 1


def test_prepare_model_from_folder_round_trips(monkeypatch, capsys, saved_tiny_model, tmp_path):
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "prepare-model",
        "--source",
        str(saved_tiny_model),
        "--out",
        str(tmp_path / "again"),
    )
    assert code in (0, None) and "2 blocks" not in out and "4 blocks" in out
    from evopress.models import load_model

    a, _ = load_model(str(saved_tiny_model))
    b, _ = load_model(str(tmp_path / "again"))
    ids = torch.arange(16).view(1, 16)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_every_command_has_help(monkeypatch, capsys):
    cli._register_command_modules()
    import typer.main

    group = typer.main.get_command(cli.app)
    for name in group.commands:
        code, out, _ = run_cli(monkeypatch, capsys, name, "--help")
        assert code == 0 and "Usage" in out


def test_prepare_data_mixes_repeated_sources(monkeypatch, capsys, saved_tiny_model, tmp_path):
    import json

    docs = tmp_path / "other.txt"
    docs.write_text("\n\n".join(f"paragraph {i} " + "words " * 40 for i in range(60)))
    args = ["--source", "builtin:pydoc", "--source", f"file:{docs}", "--weight", "3", "--weight", "1"]
    out_dir = tmp_path / "mix"
    code, out, _ = run_cli(
        monkeypatch, capsys, "prepare-data", "--model", str(saved_tiny_model), "--out", str(out_dir),
        "--seq-len", "32", "--n-calibration", "8", "--n-heldout", "4", *args,
    )  # fmt: skip
    assert code in (0, None) and "builtin:pydoc, file:" in out
    mix = json.loads((out_dir / "data.json").read_text())["mix"]
    assert [(m["calibration_rows"], m["heldout_rows"]) for m in mix] == [(6, 3), (2, 1)]
