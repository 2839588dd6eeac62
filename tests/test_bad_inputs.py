"""Bad input never costs finished work, and every error is one line (issue 13).

Each case asserts the exit status (2), that stderr is exactly one line naming the bad value, and that every file
that existed before is still there, byte for byte (sha256 of everything under the workspace before and after).

With EVOPRESS_ERROR_LOG=<file> set, every case appends what it ran and the line it printed to that file (json
lines): the list of cases and their messages that the issue's closing note quotes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import char_tokenizer, prepare_tiny_workspace, run_cli, tiny_llama
from evopress.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


# --- helpers ------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def assert_kept(before: dict[str, str], root: Path) -> None:
    """Every file of `before` is still there, unchanged (new files may appear)."""
    after = snapshot(root)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"changed or removed: {changed[:5]}"


def record(command: str, code: int, err: str) -> None:
    """Append the case to $EVOPRESS_ERROR_LOG (when set): the closing note's list of cases and messages."""
    if os.environ.get("EVOPRESS_ERROR_LOG"):
        case = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(os.environ["EVOPRESS_ERROR_LOG"], "a") as f:
            f.write(json.dumps({"case": case, "command": command, "exit": code, "stderr": err}) + "\n")


def refused(monkeypatch, capsys, root: Path, *args, names: tuple[str, ...] = ()) -> str:
    """Run the CLI, assert: exit 2, one stderr line starting `error:` holding every one of `names`, nothing
    under `root` changed. Returns the line."""
    before = snapshot(root)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    record(
        " ".join(["evopress", *(Path(a).name if isinstance(a, Path) else str(a) for a in args)]), code, err
    )
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    assert_kept(before, root)
    return err


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny prepared model (with data.json-checked token sets) and a tiny sparsity database."""
    from evopress.compressors import sparsity
    from evopress.data import DATA_MANIFEST
    from evopress.io import sha256_file

    root = prepare_tiny_workspace(tmp_path_factory.mktemp("bad"))
    names = ("calibration.safetensors", "heldout.safetensors")
    manifest = {
        "sha256": {n: sha256_file(root / "text" / n) for n in names},
        "sizes": {n: (root / "text" / n).stat().st_size for n in names},
    }
    (root / "text" / DATA_MANIFEST).write_text(json.dumps(manifest))
    opts = {"target": 0.5, "num_levels": 1, "n_samples": 4, "batch_size": 4, "blocksize": 32}
    sparsity.build_database(root / "model", root / "text", root / "db", opts)
    return root


def copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def depth_profile(ws: Path, path: Path, target=1, edit=None) -> Path:
    from evopress.adapter import ModelAdapter
    from evopress.compressors import depth
    from evopress.models import load_model
    from evopress.profile import make_profile, model_sha256

    model, _ = load_model(str(ws / "model"))
    comp = depth.make(ModelAdapter(model), target)
    profile = make_profile(
        comp, comp.initial_profile(), target=target, source="test", sha=model_sha256(ws / "model")
    )
    if edit:
        edit(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile))
    return path


# --- 1. every command-line error is one line, exit 2 -----------------------------------------------------------------
@pytest.mark.parametrize(
    "args, names",
    [
        (["search", "--generations", "abc", "--target", "1"], ("--generations", "'abc'")),
        (["frobnicate"], ("frobnicate", "allowed: prepare-model")),
        (["search"], ("--target",)),
        (["build-db", "--method", "sparsity"], ("--out",)),
        (["prepare-model", "--dtype"], ("--dtype",)),
        (["search", "--target", "1", "--nope"], ("--nope",)),
        (["search", "--target", "x"], ("--target", "'x'")),
        (["stage", "frob"], ("'frob'", "allowed: prepare_model")),
        (["search", "--method", "pruning", "--target", "1"], ("'pruning'", "allowed: depth")),
        (["stage", "build_db", "--params", "/no/params.yaml"], ("/no/params.yaml",)),
    ],
)
def test_command_line_usage_errors_are_one_line(monkeypatch, capsys, tmp_path, args, names):
    refused(monkeypatch, capsys, tmp_path, *args, names=names)


def test_no_arguments_prints_the_help_not_an_error(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys)
    assert code == 0 and "Usage" in out and "stage" in out and err == ""


# --- 2. settings are checked before anything is touched ---------------------------------------------------------------
def pipeline_tree(model_source: str) -> dict:
    tree = yaml.safe_load((REPO / "params-smoke.yaml").read_text())
    tree["model"]["source"] = model_source
    tree["data"].update(seq_len=32, n_calibration=8, n_heldout=4)
    tree["compute"].update(dtype="float32", topk=0, batch_size=4)
    tree["methods"] = {"sparsity": tree["methods"]["sparsity"]}
    sp = tree["methods"]["sparsity"]
    sp["database"] = {"num_levels": 1, "n_samples": 4, "batch_size": 4, "blocksize": 32}
    sp["search"].update(tokens=[32, "all"], initial_tokens=32)
    sp["baseline_tokens"] = 32
    tree["tracking"] = {"enabled": False}
    return tree


@pytest.fixture(scope="module")
def project(ws, tmp_path_factory):
    """A pipeline layout (data/model, data/text) with a finished sparsity database built by the build_db stage."""
    from evopress import params as P
    from evopress.layout import Layout
    from evopress.pipeline import run_stage

    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    copy_of(ws / "model", root / "data" / "model")
    copy_of(ws / "text", root / "data" / "text")
    tree = pipeline_tree(str(root / "data" / "model"))
    run_stage("build_db", P.parse(tree), Layout(root), "sparsity", log=lambda _: None)
    return root, tree


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: setattr(m, "target", 60), "sparsity target 60"),
        (lambda m: m.database.update(num_levels=99), "num_levels=99"),
        (lambda m: m.database.update(damp=2.0), "damp=2.0"),
        (lambda m: setattr(m, "search", dataclasses.replace(m.search, survivors=(1, 2))), "survivors"),
    ],
)
def test_bad_settings_leave_a_finished_database_untouched(project, edit, message):
    """Params built in code (not through params.load) still reach no output: run_stage checks them first, before
    the stamp is compared, so the database, its stamp and every other file stay."""
    from evopress import params as P
    from evopress.layout import Layout
    from evopress.pipeline import run_stage

    root, tree = project
    p = P.parse(json.loads(json.dumps(tree)))
    edit(p.methods["sparsity"])
    before = snapshot(root)
    with pytest.raises(UserError, match=message) as err:
        run_stage("build_db", p, Layout(root), "sparsity", log=lambda _: None)
    record("run_stage('build_db', <edited params>)", 2, f"error: {err.value}\n")
    assert "\n" not in str(err.value)
    assert_kept(before, root)


def test_bad_params_file_through_the_stage_command_changes_nothing(project, monkeypatch, capsys):
    root, tree = project
    bad = json.loads(json.dumps(tree))
    bad["methods"]["sparsity"]["target"] = 60
    params = root.parent / f"{root.name}-bad-params.yaml"
    params.write_text(yaml.safe_dump(bad))
    monkeypatch.chdir(root)
    refused(
        monkeypatch, capsys, root, "stage", "build_db", "--method", "sparsity", "--params", params,
        names=("sparsity target 60", "(0, 1)"),
    )  # fmt: skip


def test_valid_new_settings_move_the_old_database_aside(ws, tmp_path):
    """A database whose settings changed (validly) is moved to `<db>.superseded-<time>`, whole, and said so."""
    from evopress import params as P
    from evopress.layout import Layout
    from evopress.pipeline import run_stage

    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    copy_of(ws / "model", root / "data" / "model")
    copy_of(ws / "text", root / "data" / "text")
    tree = pipeline_tree(str(root / "data" / "model"))
    run_stage("build_db", P.parse(tree), Layout(root), "sparsity", log=lambda _: None)
    old = snapshot(root / "data" / "db" / "sparsity")
    tree["methods"]["sparsity"]["target"] = 0.4
    lines: list[str] = []
    run_stage("build_db", P.parse(tree), Layout(root), "sparsity", log=lines.append)
    (aside,) = (root / "data" / "db").glob("sparsity.superseded-*")
    assert snapshot(aside) == old
    assert any("moved aside to" in line and "superseded" in line for line in lines)
    assert (
        json.loads((root / "data" / "db" / "sparsity" / "manifest.json").read_text())["params"]["target"]
        == 0.4
    )


def test_a_changed_search_moves_its_outputs_aside_together(tmp_path):
    from evopress.pipeline import fresh_unless_same

    out = tmp_path / "search"
    out.mkdir()
    for name in ("checkpoint.json", "profile.json", "search.json", "history.csv", "layers.csv"):
        (out / name).write_text(name)
    stamp = tmp_path / "checkpoint.json.params.json"
    stamp.write_text(json.dumps({"a": 1}))
    others = [out / n for n in ("profile.json", "search.json", "history.csv", "layers.csv")]
    fresh_unless_same(stamp, out / "checkpoint.json", {"a": 2}, log=lambda _: None, together=others)
    (aside,) = out.glob("checkpoint.json.superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["checkpoint.json", "profile.json", "search.json", "history.csv", "layers.csv"]
    )
    assert not (out / "profile.json").exists() and json.loads(stamp.read_text()) == {"a": 2}


def test_dvc_yaml_persists_every_expensive_output():
    """DVC deletes an output before its stage runs unless it is `persist: true`; the stage validates first, so
    persisted outputs survive a bad params.yaml. dvc.yaml must say what `Layout.persisted` says."""
    from evopress.layout import Layout

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, body in stages.items():
        body = body.get("do", body)
        entries = [*(body.get("outs") or []), *(body.get("metrics") or []), *(body.get("plots") or [])]
        persisted = sorted(
            next(iter(e)).replace("${key}", "M")
            for e in entries
            if isinstance(e, dict) and next(iter(e.values())).get("persist")
        )
        assert persisted == sorted(Layout.persisted(stage, "M")), stage
    for must in ("data/db/M", "runs/search/M/checkpoint.json", "runs/search/M/profile.json", "models/M"):
        assert any(must in Layout.persisted(s, "M") for s in stages), must


# --- 3. no command writes over its own inputs -------------------------------------------------------------------------
def test_prepare_data_out_inside_the_model_is_refused(monkeypatch, capsys, ws):
    refused(
        monkeypatch, capsys, ws, "prepare-data", "--model", ws / "model", "--out", ws / "model" / "text",
        names=("--out", "model"),
    )  # fmt: skip


def test_prepare_model_out_equal_to_its_source_is_refused(monkeypatch, capsys, ws):
    refused(
        monkeypatch, capsys, ws, "prepare-model", "--source", ws / "model", "--out", ws / "model",
        names=("--out", "model source"),
    )  # fmt: skip


def test_prepare_model_out_holding_its_source_is_refused(monkeypatch, capsys, ws):
    refused(
        monkeypatch, capsys, ws, "prepare-model", "--source", ws / "model", "--out", ws,
        names=("holds the model source",),
    )  # fmt: skip


def test_build_db_out_inside_the_data_is_refused(monkeypatch, capsys, ws):
    refused(
        monkeypatch, capsys, ws, "build-db", "--method", "sparsity", "--model", ws / "model",
        "--data", ws / "text", "--out", ws / "text" / "db", "--option", "target=0.5", names=("data",),
    )  # fmt: skip


def test_search_out_inside_the_database_is_refused(monkeypatch, capsys, ws):
    refused(
        monkeypatch, capsys, ws, "search", "--method", "sparsity", "--model", ws / "model",
        "--data", ws / "text", "--db", ws / "db", "--target", "0.5", "--out", ws / "db" / "search",
        names=("database",),
    )  # fmt: skip


def test_stitch_out_equal_to_the_profiles_folder_is_refused(monkeypatch, capsys, ws, tmp_path):
    profile = depth_profile(ws, tmp_path / "search" / "profile.json")
    refused(
        monkeypatch, capsys, tmp_path, "stitch", "--method", "depth", "--model", ws / "model",
        "--profile", profile, "--out", profile.parent, names=("profile",),
    )  # fmt: skip


def test_evaluate_out_inside_the_model_is_refused(monkeypatch, capsys, ws):
    refused(
        monkeypatch, capsys, ws, "evaluate", "--model", ws / "model", "--data", ws / "text",
        "--out", ws / "model" / "metrics.json", names=("model",),
    )  # fmt: skip


# --- 4. profiles are checked against their target and the model's units -----------------------------------------------
def _remove_more(profile):
    for unit in list(profile["units"])[:5]:
        profile["units"][unit] = 1


def test_stitch_refuses_a_profile_off_its_budget(monkeypatch, capsys, ws, tmp_path):
    profile = depth_profile(ws, tmp_path / "p" / "profile.json", target=1, edit=_remove_more)
    refused(
        monkeypatch, capsys, tmp_path, "stitch", "--method", "depth", "--model", ws / "model",
        "--profile", profile, "--out", tmp_path / "stitched", names=("off its target's budget", "target 1"),
    )  # fmt: skip
    assert not (tmp_path / "stitched").exists()


def test_stitch_refuses_a_profile_whose_target_disagrees_with_its_units(monkeypatch, capsys, ws, tmp_path):
    profile = depth_profile(ws, tmp_path / "p" / "profile.json", target=1, edit=lambda p: p.update(target=2))
    refused(
        monkeypatch, capsys, tmp_path, "stitch", "--method", "depth", "--model", ws / "model",
        "--profile", profile, "--out", tmp_path / "stitched", names=("budget", "target 2"),
    )  # fmt: skip


def test_evaluate_refuses_a_profile_off_its_budget(monkeypatch, capsys, ws, tmp_path):
    profile = depth_profile(ws, tmp_path / "p" / "profile.json", target=1, edit=_remove_more)
    refused(
        monkeypatch, capsys, tmp_path, "evaluate", "--model", ws / "model", "--data", ws / "text",
        "--profile", profile, "--out", tmp_path / "m.json", names=(str(profile), "budget"),
    )  # fmt: skip


def test_evaluate_refuses_a_profile_for_other_units(monkeypatch, capsys, ws, tmp_path):
    profile = depth_profile(
        ws, tmp_path / "p" / "profile.json", edit=lambda p: p["units"].update({"block.7.attn": 0})
    )
    refused(
        monkeypatch, capsys, tmp_path, "evaluate", "--model", ws / "model", "--data", ws / "text",
        "--profile", profile, "--out", tmp_path / "m.json", names=("block.7.attn",),
    )  # fmt: skip


def test_a_sparsity_profile_off_budget_is_refused_before_stitching(monkeypatch, capsys, ws, tmp_path):
    from evopress.adapter import ModelAdapter
    from evopress.compressors import sparsity
    from evopress.models import load_model

    comp = sparsity.make(ModelAdapter(load_model(str(ws / "model"))[0]), 0.5, db=ws / "db")
    units = comp.initial_profile()
    first = comp.units()[0]
    units[first] = comp.levels(first)[-1]  # one unit one step up, nobody down
    doc = {"method": "sparsity", "target": 0.5, "options": {}, "units": units}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    refused(
        monkeypatch, capsys, ws, "stitch", "--method", "sparsity", "--model", ws / "model",
        "--profile", tmp_path / "p.json", "--db", ws / "db", "--out", tmp_path / "out", names=("budget",),
    )  # fmt: skip


# --- 5. recorded checksums are checked -----------------------------------------------------------------------------------
def test_a_truncated_model_file_is_refused_naming_it(monkeypatch, capsys, ws, tmp_path):
    model = copy_of(ws / "model", tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(
        monkeypatch, capsys, tmp_path, "prepare-data", "--model", model, "--out", tmp_path / "t",
        names=("model.safetensors", "truncated"),
    )  # fmt: skip


def test_a_changed_model_file_is_refused_before_stitching(monkeypatch, capsys, ws, tmp_path):
    model = copy_of(ws / "model", tmp_path / "model")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content: only the hash can tell
    weights.write_bytes(bytes(data))
    profile = depth_profile(ws, tmp_path / "p" / "profile.json")
    refused(
        monkeypatch, capsys, tmp_path, "stitch", "--method", "depth", "--model", model, "--profile", profile,
        "--out", tmp_path / "stitched", names=("model.safetensors", "sha256"),
    )  # fmt: skip


def test_a_truncated_model_file_at_prepare_model_is_one_line(monkeypatch, capsys, tmp_path):
    src = tmp_path / "src"
    tiny_llama(num_layers=2).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    refused(
        monkeypatch, capsys, tmp_path, "prepare-model", "--source", src, "--out", tmp_path / "out",
        names=(str(src), "unreadable weights"),
    )  # fmt: skip


def test_a_corrupt_model_config_at_prepare_model_is_one_line(monkeypatch, capsys, tmp_path):
    src = tmp_path / "src"
    tiny_llama(num_layers=2).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (src / "config.json").write_text("{ not json")
    refused(
        monkeypatch, capsys, tmp_path, "prepare-model", "--source", src, "--out", tmp_path / "out",
        names=(str(src), "config"),
    )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_a_tokenizer_is_refused(monkeypatch, capsys, tmp_path):
    src = tmp_path / "src"
    tiny_llama(num_layers=2).save_pretrained(src)
    refused(
        monkeypatch, capsys, tmp_path, "prepare-model", "--source", src, "--out", tmp_path / "out",
        names=("has no tokenizer", "tokenizer.json"),
    )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_changed_token_set_is_refused(monkeypatch, capsys, ws, tmp_path):
    text = copy_of(ws / "text", tmp_path / "text")
    from safetensors.torch import save_file

    save_file({"input_ids": torch.zeros(8, 32, dtype=torch.int64)}, text / "calibration.safetensors")
    refused(
        monkeypatch, capsys, tmp_path, "search", "--model", ws / "model", "--data", text, "--target", "1",
        "--out", tmp_path / "s", names=("calibration.safetensors",),
    )  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_a_truncated_database_file_is_refused_before_a_search(monkeypatch, capsys, ws, tmp_path):
    db = copy_of(ws / "db", tmp_path / "db")
    victim = sorted((db / "files").rglob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    refused(
        monkeypatch, capsys, tmp_path, "search", "--method", "sparsity", "--model", ws / "model",
        "--data", ws / "text", "--db", db, "--target", "0.5", "--out", tmp_path / "s",
        "--tokens", "32,all", "--initial-tokens", "32", names=(victim.name, "incomplete or damaged"),
    )  # fmt: skip


def test_a_corrupt_database_file_is_refused_before_stitching(monkeypatch, capsys, ws, tmp_path):
    from evopress.adapter import ModelAdapter
    from evopress.compressors import sparsity
    from evopress.models import load_model

    db = copy_of(ws / "db", tmp_path / "db")
    victim = sorted((db / "files").rglob("*.safetensors"))[-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    comp = sparsity.make(ModelAdapter(load_model(str(ws / "model"))[0]), 0.5, db=ws / "db")
    doc = {"method": "sparsity", "target": 0.5, "options": {}, "units": comp.initial_profile()}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    refused(
        monkeypatch, capsys, tmp_path, "stitch", "--method", "sparsity", "--model", ws / "model",
        "--profile", tmp_path / "p.json", "--db", db, "--out", tmp_path / "out",
        names=(victim.name, "sha256"),
    )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_binary_file_given_as_text_is_one_line(monkeypatch, capsys, ws, tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    refused(
        monkeypatch, capsys, tmp_path, "prepare-data", "--model", ws / "model", "--source", f"file:{binary}",
        "--seq-len", "32", "--out", tmp_path / "t", names=("weights.txt", "utf-8"),
    )  # fmt: skip


def test_a_jsonl_file_with_a_bad_line_is_one_line(monkeypatch, capsys, ws, tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    refused(
        monkeypatch, capsys, tmp_path, "prepare-data", "--model", ws / "model", "--source", f"file:{bad}",
        "--seq-len", "32", "--out", tmp_path / "t", names=("docs.jsonl", "line 2"),
    )  # fmt: skip


def test_an_unreadable_model_manifest_is_one_line(monkeypatch, capsys, ws, tmp_path):
    model = copy_of(ws / "model", tmp_path / "model")
    (model / "evopress_model.json").write_bytes(b"\x00\xff garbage")
    refused(
        monkeypatch, capsys, tmp_path, "prepare-data", "--model", model, "--out", tmp_path / "t",
        names=("evopress_model.json",),
    )  # fmt: skip


# --- 6. the flow ---------------------------------------------------------------------------------------------------------
def run_flow(monkeypatch, capsys, project: Path, *extra) -> tuple[int, str]:
    from flows import compress

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["compress", "run", "--project", str(project), *extra])
    with pytest.raises(SystemExit) as exit_info:
        compress.main()
    err = capsys.readouterr().err
    record(f"python -m flows.compress run {' '.join(map(str, extra))}".strip(), exit_info.value.code, err)
    return exit_info.value.code, err


def test_the_flow_with_a_bad_params_file_prints_the_cause_in_one_line(monkeypatch, capsys, tmp_path):
    tree = yaml.safe_load((REPO / "params-smoke.yaml").read_text())
    tree["methods"]["depth"]["serch"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    before = snapshot(tmp_path)
    code, err = run_flow(monkeypatch, capsys, tmp_path)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "methods.depth.serch" in err
    assert_kept(before, tmp_path)


def test_a_second_flow_in_the_same_workspace_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    from flows.compress import workspace_lock

    (tmp_path / "params.yaml").write_text((REPO / "params-smoke.yaml").read_text())
    with workspace_lock(tmp_path):
        before = snapshot(tmp_path)
        code, err = run_flow(monkeypatch, capsys, tmp_path)
    assert code == 2 and err.count("\n") == 1 and "another evopress flow is running" in err
    assert_kept(before, tmp_path)
