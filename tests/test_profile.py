"""Profiles on disk and the search / baseline / evaluate commands end to end on a tiny prepared model."""

import json

import pytest
import torch

from conftest import char_tokenizer, run_cli, tiny_llama
from evopress.adapter import ModelAdapter
from evopress.compressors.depth import make
from evopress.errors import UserError
from evopress.io import atomic_save_safetensors
from evopress.profile import load_profile, make_profile, save_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def test_roundtrip_and_fields(tmp_path):
    comp = make(ModelAdapter(tiny_llama(num_layers=4)), 1)
    units = comp.initial_profile()
    profile = make_profile(comp, units, target=1, source="search", fitness=0.25, sha="abc")
    save_profile(tmp_path / "p.json", profile)
    loaded = load_profile(tmp_path / "p.json", comp)
    assert loaded == profile and loaded["budget"] == 2.0 and loaded["options"] == {"granularity": "sublayer"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["units"].update({"block.9.attn": 0}), "does not have, e.g. \\['block.9.attn'\\]"),
        (lambda p: p["units"].pop("block.0.mlp"), "lacks 1 unit"),
        (lambda p: p["units"].update({"block.0.mlp": 3}), "levels the units cannot take"),
        (lambda p: p.pop("budget"), "missing \\['budget'\\]"),
    ],
)
def test_bad_profiles_are_one_line_errors(tmp_path, edit, message):
    comp = make(ModelAdapter(tiny_llama(num_layers=4)), 1)
    profile = make_profile(comp, comp.initial_profile(), target=1, source="search")
    edit(profile)
    (tmp_path / "p.json").write_text(json.dumps(profile))
    with pytest.raises(UserError, match=message) as err:
        load_profile(tmp_path / "p.json", comp)
    assert "\n" not in str(err.value)


# --- CLI -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from evopress.models import load_model, save_model

    root = tmp_path_factory.mktemp("prep")
    tiny_llama(num_layers=6).save_pretrained(root / "src")
    char_tokenizer().save_pretrained(root / "src")
    model, tok = load_model(str(root / "src"))
    save_model(model, tok, root / "model", str(root / "src"))
    g = torch.Generator().manual_seed(0)
    atomic_save_safetensors(
        root / "text/calibration.safetensors", {"input_ids": torch.randint(0, 128, (16, 32), generator=g)}
    )
    atomic_save_safetensors(
        root / "text/heldout.safetensors", {"input_ids": torch.randint(0, 128, (4, 32), generator=g)}
    )
    return root


def one_line_error(err: str, message: str) -> bool:
    """The error is one line `error: ...` (transformers may print a loading bar before it)."""
    last = err.rstrip("\n").split("\n")[-1]
    return last.startswith("error: ") and message in last and "Traceback" not in err


def common(root):
    return ["--model", root / "model", "--data", root / "text", "--dtype", "float32"]


SMALL = [
    "--generations",
    "3",
    "--offspring",
    "4",
    "--survivors",
    "2,1",
    "--tokens",
    "64,128",
    "--initial-tokens",
    "64",
]


def test_search_baseline_evaluate(monkeypatch, capsys, prepared, tmp_path):
    out = tmp_path / "search"
    args = [
        "search",
        *common(prepared),
        "--target",
        "2",
        "--option",
        "granularity=block",
        *SMALL,
        "--out",
        out,
    ]
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    profile = json.loads((out / "profile.json").read_text())
    assert profile["source"] == "search" and profile["budget"] == 2 and profile["fitness"] > 0
    assert profile["options"] == {"granularity": "block"} and len(profile["units"]) == 6
    assert (out / "history.csv").read_text().count("\n") == 4
    code, _, err = run_cli(monkeypatch, capsys, *args)  # re-run: resumes at the end, same answer
    assert code == 0 and json.loads((out / "profile.json").read_text()) == profile

    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "baseline",
        *common(prepared),
        "--name",
        "sleb",
        "--target",
        "2",
        "--tokens",
        "64",
        "--out",
        tmp_path / "b",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "b/profile.json").read_text())["source"] == "baseline:sleb"

    metrics = tmp_path / "m.json"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "evaluate",
        *common(prepared),
        "--profile",
        out / "profile.json",
        "--out",
        metrics,
    )
    assert code == 0, err
    m = json.loads(metrics.read_text())
    assert m["method"] == "depth" and m["perplexity"] > 1 and m["kl"] > 0
    stitched = tmp_path / "stitched"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "stitch",
        "--method",
        "depth",
        "--model",
        prepared / "model",
        "--profile",
        out / "profile.json",
        "--out",
        stitched,
    )
    assert code == 0, err
    assert json.loads((stitched / "config.json").read_text())["num_hidden_layers"] == 4
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", *common(prepared), "--out", tmp_path / "d.json")
    dense = json.loads((tmp_path / "d.json").read_text())
    assert code == 0 and dense["method"] == "dense" and dense["perplexity"] != m["perplexity"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "7"], "cannot remove 7 of 6 blocks"),
        (["--target", "-1"], "depth target -1.0 must be a whole number >= 0"),
        (["--target", "2", "--offspring", "2", "--survivors", "4,1"], "exceed offspring"),
        (["--target", "2", "--tokens", "64,100000"], "calibration set"),
        (["--target", "2", "--option", "granularity=head"], "unknown granularity"),
        (["--target", "2", "--option", "nokey"], "expected key=value"),
    ],
)
def test_search_bad_input(monkeypatch, capsys, prepared, tmp_path, extra, message):
    code, _, err = run_cli(
        monkeypatch, capsys, "search", *common(prepared), *SMALL, *extra, "--out", tmp_path / "s"
    )
    assert code == 2 and one_line_error(err, message)


def test_evaluate_rejects_foreign_units(monkeypatch, capsys, prepared, tmp_path):
    comp = make(ModelAdapter(tiny_llama(num_layers=8)), 1)
    save_profile(tmp_path / "p.json", make_profile(comp, comp.initial_profile(), target=1, source="search"))
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "evaluate",
        *common(prepared),
        "--profile",
        tmp_path / "p.json",
        "--out",
        tmp_path / "m.json",
    )
    assert code == 2 and one_line_error(err, "does not have") and "block.6" in err
