"""The DVC pipeline end to end on a tiny random Llama in a temp copy of the project (smoke params).

One module-scoped project runs `dvc repro` once; the tests then check what a second repro does, what a changed
search param reruns, what MLflow holds, and the Prefect flow under `prefect_test_harness`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_llama

# ~15 stage processes (torch + mlflow imports each): about 5 minutes on an idle 2-core CPU, within CI's budget.

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "params-smoke.yaml")


def char_tokenizer_folder(path: Path) -> None:
    """A character tokenizer (printable ASCII -> ids 1..95, else 0) that survives save/reload, vocab < 128."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}, "</s>": 96}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="</s>", unk_token="<unk>").save_pretrained(path)


def smoke_params(model_dir: Path) -> dict:
    params = yaml.safe_load((REPO / "params-smoke.yaml").read_text())
    params["model"]["source"] = str(model_dir)
    params["data"].update(seq_len=32, n_calibration=16, n_heldout=4)
    params["compute"].update(dtype="float32", topk=32)
    params["methods"]["depth"]["target"] = 1
    for m in params["methods"].values():
        m["search"].update(tokens=[64, 128], initial_tokens=64)
        m["baseline_tokens"] = 64
    return params


def sh(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


def make_project(tmp: Path) -> Path:
    """A git + DVC project holding the pipeline files, smoke params and a tiny model folder."""
    proj, model = tmp / "proj", tmp / "tiny-model"
    tiny_llama(num_layers=4, hidden=64, vocab=128).save_pretrained(model)
    char_tokenizer_folder(model)
    for name in PROJECT_FILES:
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, proj / name)
    # The stages depend on the library code (dvc.yaml's code deps), as in a checkout of the project.
    shutil.copytree(REPO / "evopress", proj / "evopress", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "params.yaml").write_text(yaml.safe_dump(smoke_params(model), sort_keys=False))
    (proj / ".gitignore").write_text("/data/\n/mlflow.db\n/mlartifacts/\n")
    sh(["git", "init", "-q"], proj)
    sh(["git", "add", "."], proj)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], proj)
    return proj


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("pipeline"))
    first = sh(["dvc", "repro"], proj)
    return proj, first.stdout


def ran_stages(stdout: str) -> set[str]:
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")}


def test_repro_runs_every_stage_and_prints_the_table(project):
    proj, out = project
    assert {
        "prepare_model",
        "search@depth",
        "search@sparsity",
        "stitch@depth",
        "evaluate",
        "report",
    } <= ran_stages(out)
    metrics = json.loads((proj / "runs/metrics.json").read_text())
    assert {"dense", "depth/evopress", "depth/shortgpt", "sparsity/evopress", "sparsity/uniform"} <= set(
        metrics
    )
    row = metrics["depth/evopress"]
    assert row["heldout_perplexity"] > 1 and 0 < row["size"] < 1
    # Every row is measured from its stitched folder (baselines stitched by evaluate, then removed), and scores
    # as its profile applied live.
    for key in ("depth/evopress", "depth/shortgpt", "sparsity/uniform", "quantization/uniform"):
        r = metrics[key]
        assert abs(r["heldout_live_gap"]) < 1e-3 and r["heldout_check_rows"] == 2, (
            key
        )  # the pipeline's check rows
        assert r["bytes_on_disk"] > 0 and r["speed_vs_dense"] > 0 and r["format"] and r["loader"], key
    assert metrics["quantization/uniform"]["format"] == "compressed-tensors pack-quantized"
    assert metrics["quantization/uniform"]["size_on_disk"] < 1
    assert not list((proj / "runs").glob(".evaluate-*"))
    results = (proj / "runs/results.md").read_text()
    assert "| depth | evopress |" in results and "size on disk (% dense)" in results
    assert "mlflow ui --backend-store-uri sqlite:///" in out


def test_second_repro_does_nothing(project):
    proj, _ = project
    out = sh(["dvc", "repro"], proj).stdout
    assert ran_stages(out) == set(), out


def test_a_bad_params_value_on_a_finished_project_costs_nothing(project):
    """`dvc repro` after a typo in params.yaml (survivors must not grow) fails in one stage, and every finished
    output (data, searches, stitched models, metrics) is still there byte for byte: DVC keeps persisted outs and
    the stage checks the settings before it touches anything. Fixing the typo leaves nothing to do."""
    import hashlib

    proj, _ = project

    def snapshot() -> dict:
        return {
            str(p.relative_to(proj)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("data", "runs", "models")
            for p in sorted((proj / folder).rglob("*"))
            if p.is_file()
        }

    good = (proj / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["methods"]["depth"]["search"]["survivors"] = [1, 2]
    before = snapshot()
    try:
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        res = sh(["dvc", "repro"], proj, check=False)
        assert res.returncode != 0 and "survivors" in res.stdout + res.stderr
        assert snapshot() == before
    finally:
        (proj / "params.yaml").write_text(good)
    assert ran_stages(sh(["dvc", "repro"], proj).stdout) == set()


def test_changed_search_param_reruns_only_search_and_dependents(project):
    proj, _ = project
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["depth"]["search"]["generations"] += 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], proj).stdout
    # report reruns only when the metrics changed (one more generation may find the same profile).
    ran = ran_stages(out)
    assert {"search@depth", "evaluate"} <= ran <= {"search@depth", "stitch@depth", "evaluate", "report"}, out


def test_changed_method_code_reruns_that_methods_stages(project):
    """A change to the depth package makes DVC see its stages changed, and no other method's (nothing runs)."""
    proj, _ = project
    code = proj / "evopress/compressors/depth/__init__.py"
    original = code.read_text()
    code.write_text(original + "\n# a changed line\n")
    try:
        status = sh(["dvc", "status", "--json"], proj).stdout
        changed = set(json.loads(status))
    finally:
        code.write_text(original)
    assert {"build_db@depth", "search@depth", "baselines@depth", "stitch@depth", "evaluate"} <= changed
    assert not {s for s in changed if "@" in s and not s.endswith("@depth")}, changed


def test_stage_outputs_record_the_resolved_compute_and_database(project):
    proj, _ = project
    search = json.loads((proj / "runs/search/quantization/search.json").read_text())
    assert search["compute"]["dtype"] == "float32" and search["compute"]["cpu"]
    db = json.loads((proj / "data/db/quantization/manifest.json").read_text())
    assert len(search["database_sha256"]) == 64 and len(db["code_sha256"]) == 64
    metrics = json.loads((proj / "runs/metrics.json").read_text())
    assert metrics["quantization/evopress"]["database_sha256"] == search["database_sha256"]


def test_mlflow_holds_stage_runs_with_provenance(project):
    proj, _ = project
    from evopress import params as P
    from evopress import tracking

    p = P.load(proj / "params.yaml")
    runs = tracking.stage_runs(p.tracking, proj)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["evopress.stage"], r)
    assert {"prepare_model", "search@depth", "stitch@depth", "evaluate", "report"} <= set(by_stage)
    search = by_stage["search@depth"]
    tags = search.data.tags
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert len(tags["in.model"]) == 64 and len(tags["in.calibration"]) == 64
    assert tags["dvc.dep.data/model"] and tags["dvc.dep.data/text"]
    # Back-filled by the report stage: the md5 dvc.lock holds for the search's own profile.
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["search@depth"]
    profile_md5 = next(o["md5"] for o in lock["outs"] if o["path"].endswith("profile.json"))
    assert tags["dvc.out.runs/search/depth/profile.json"] == profile_md5
    assert search.data.params["search.generations"]
    assert tags["compute.dtype"] == "float32" and tags["compute.device"] == "cpu"
    client = tracking.MlflowClient()
    history = client.get_metric_history(search.info.run_id, "fitness")
    assert len(history) >= 1 and [m.step for m in history] == sorted(m.step for m in history)
    names = {a.path for a in client.list_artifacts(search.info.run_id)}
    assert {"profile.json", "history.csv", "plots"} <= names
    stitched = by_stage["stitch@depth"].data.tags
    assert (
        stitched["model.stitched.path"].endswith("models/depth")
        and len(stitched["model.stitched.sha256"]) == 64
    )


def _latest(metrics) -> dict[str, float]:
    """A LoggedModel's metrics, the newest value of each key (evaluate may have scored the model twice)."""
    return {m.key: m.value for m in sorted(metrics, key=lambda m: m.timestamp)}


def test_mlflow_lineage_from_each_stitched_model_to_its_inputs(project):
    """An auditor's path through the MLflow client, by run id only: LoggedModel -> the stitch run that output it ->
    the search run it names -> the base model and token set hashes that search read. The evaluate run pins every
    profile, baseline folder and stitched model it read (dvc.lock md5s) and puts held-out metrics on each model."""
    proj, _ = project
    from evopress import params as P
    from evopress import tracking
    from evopress.lineage import read_lock

    runs = tracking.stage_runs(P.load(proj / "params.yaml").tracking, proj)  # newest first
    client, lock = tracking.MlflowClient(), read_lock(proj)
    assert (
        client.get_experiment(runs[0].info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    base = json.loads((proj / "data/model/evopress_model.json").read_text())["sha256"]
    data = json.loads((proj / "data/text/data.json").read_text())["sha256"]
    rows = json.loads((proj / "runs/metrics.json").read_text())
    evaluate = next(r for r in runs if r.data.tags["evopress.stage"] == "evaluate")
    evaluate = client.get_run(evaluate.info.run_id)  # a search leaves a run's inputs out
    assert not [k for k in evaluate.data.metrics if k.endswith(".budget")]  # the target is what runs show
    for m in ("depth", "sparsity", "quantization"):
        stitch = client.get_run(evaluate.data.tags[f"from.stitch:{m}"])
        (output,) = stitch.outputs.model_outputs
        model = client.get_logged_model(output.model_id)
        assert model.name == f"evopress-{m}" and model.source_run_id == stitch.info.run_id
        search = client.get_run(model.params["search_run_id"])
        assert stitch.data.tags[f"from.search:{m}"] == search.info.run_id
        profile_md5 = search.data.tags[f"dvc.out.runs/search/{m}/profile.json"]
        assert profile_md5 == stitch.data.tags["in.profile"] == model.params["profile_md5"]
        assert search.data.tags["in.model"] == model.params["base_model_sha256"] == base
        assert (
            search.data.tags["in.calibration"]
            == model.params["calibration_sha256"]
            == data["calibration.safetensors"]
        )
        assert search.data.tags[f"from.build_db:{m}"] and search.data.tags["from.prepare_data"]
        assert model.params["path"] == f"models/{m}" and int(model.params["bytes_on_disk"]) > 0
        assert model.params["format"] and model.params["loader"] and len(model.params["profile_sha256"]) == 64
        pins = evaluate.data.tags
        assert pins[f"in.{m}.stitched"] == lock[f"stitch@{m}"]["outs"][f"models/{m}"]
        assert pins[f"in.{m}.profile"] == lock[f"search@{m}"]["outs"][f"runs/search/{m}/profile.json"]
        assert pins[f"in.{m}.baselines"] == lock[f"baselines@{m}"]["outs"][f"runs/baselines/{m}"]
        assert output.model_id in {i.model_id for i in evaluate.inputs.model_inputs}
        scored = _latest(model.metrics)
        assert scored["heldout_perplexity"] == pytest.approx(rows[f"{m}/evopress"]["heldout_perplexity"])
        assert scored["heldout_kl"] == pytest.approx(rows[f"{m}/evopress"]["heldout_kl"])
        assert client.get_metric_history(search.info.run_id, "best_fitness")  # beside the per-generation one


def test_bad_params_fail_before_any_stage(tmp_path):
    """In a fresh project (nothing run yet): check-params names the key in one line, and `dvc repro` stops at its
    first stage before writing anything."""
    proj = make_project(tmp_path)
    bad = yaml.safe_load((proj / "params.yaml").read_text())
    bad["methods"]["depth"]["search"]["generatoins"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(bad))
    res = sh(["evopress", "check-params"], proj, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "methods.depth.search.generatoins" in res.stderr
    repro = sh(["dvc", "repro"], proj, check=False)
    assert repro.returncode != 0 and "methods.depth.search.generatoins" in repro.stdout + repro.stderr
    assert ran_stages(repro.stdout) <= {"prepare_model"}  # the first stage started and refused at once
    assert not (proj / "data").exists() and not (proj / "dvc.lock").exists()


def test_prefect_flow_runs_the_graph(project, monkeypatch):
    proj, _ = project
    from prefect.testing.utilities import prefect_test_harness

    from flows.compress import compress

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["depth"]["search"]["seed"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core CI box starts it slowly
        result = compress(project=str(proj))
    assert {"search@depth", "evaluate"} <= set(result["ran"])  # report skips when metrics are unchanged
    assert any(r["method"] == "depth" and r["profile"] == "evopress" for r in result["table"])
    from evopress import params as P
    from evopress import tracking

    p = P.load(proj / "params.yaml")
    children = tracking.stage_runs(p.tracking, proj, parent=result["mlflow_run"])
    by_stage = {r.data.tags["evopress.stage"]: r for r in children}
    assert set(by_stage) >= {"search@depth", "evaluate"}
    # Closing the pipeline run back-fills the dvc.lock hashes, even though DVC skipped the report stage.
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["search@depth"]["outs"]
    profile_md5 = next(o["md5"] for o in lock if o["path"] == "runs/search/depth/profile.json")
    assert by_stage["search@depth"].data.tags["dvc.out.runs/search/depth/profile.json"] == profile_md5


def test_parallel_flow_runs_independent_searches_at_once_and_leaves_dvc_clean(project, monkeypatch):
    """--parallel 2: both methods' searches (changed seeds) run side by side; DVC records them as `dvc repro` would."""
    proj, _ = project
    from prefect.testing.utilities import prefect_test_harness

    from flows.compress import compress

    params = yaml.safe_load((proj / "params.yaml").read_text())
    for method in ("depth", "quantization"):
        params["methods"][method]["search"]["seed"] = 7
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    with prefect_test_harness(server_startup_timeout=300):
        result = compress(project=str(proj), parallel=2)
    assert {"search@depth", "search@quantization", "evaluate"} <= set(result["ran"])
    (a0, a1), (b0, b1) = result["spans"]["search@depth"], result["spans"]["search@quantization"]
    assert a0 < b1 and b0 < a1, result["spans"]  # the two searches overlapped
    status = sh(["dvc", "status"], proj).stdout
    assert "up to date" in status, status  # dvc.lock holds every stage's hashes, as after `dvc repro`
    assert ran_stages(sh(["dvc", "repro"], proj).stdout) == set()


def test_a_stage_refusing_its_input_mid_flow_ends_the_flow_with_its_cause_in_one_line(
    tmp_path, monkeypatch, capsys
):
    """The params are valid, so the flow starts; the first stage then finds the model folder unreadable. The
    flow's one error line is that stage's own error (not Prefect's traceback, not 'exit status 1'), it exits 2 like the
    command, and the stage is not retried: the same input would be refused again."""
    import sys

    from prefect.testing.utilities import prefect_test_harness

    from flows import compress

    proj = make_project(tmp_path)
    (tmp_path / "tiny-model" / "config.json").write_text("{ not json")
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    monkeypatch.setattr(sys, "argv", ["compress", "run", "--project", str(proj)])
    capsys.readouterr()
    with prefect_test_harness(server_startup_timeout=300), pytest.raises(SystemExit) as exit_info:
        compress.main()
    err = capsys.readouterr().err
    # Prefect's own lines start with a time; ours with "error: "
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(ours) == 1
    assert ours[0].startswith("error: stage prepare_model failed: error: ") and "config.json" in ours[0]
    assert "Traceback" not in err
    log = (proj / ".evopress-flow.log").read_text()
    assert log.count("Running stage 'prepare_model'") == 1  # not retried


@pytest.mark.slow
def test_a_killed_repro_resumes_to_a_clean_status_and_the_uninterrupted_profiles(tmp_path):
    """`dvc repro` killed with SIGKILL twice in the middle of the depth search (the group: DVC and the stage's
    python) is run again: it ends with `dvc status` clean and the same profiles as an uninterrupted run of the same
    project (same model, data and params)."""
    import signal
    import time

    full, proj = make_project(tmp_path / "full"), make_project(tmp_path / "cut")
    sh(["dvc", "repro"], full)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    checkpoint = proj / "runs/search/depth/checkpoint.json"
    for generations in (1, 3):  # kill once early in the search, once after the resume has gone further
        proc = subprocess.Popen(
            ["dvc", "repro"], cwd=proj, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(checkpoint.read_text())["generation"] >= generations:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the repro ended before it could be killed"
    sh(["dvc", "repro"], proj)
    status = sh(["dvc", "status"], proj).stdout
    assert "up to date" in status.lower() or not status.strip(), status
    for method in ("depth", "sparsity"):
        resumed = json.loads((proj / f"runs/search/{method}/profile.json").read_text())
        uninterrupted = json.loads((full / f"runs/search/{method}/profile.json").read_text())
        assert resumed["units"] == uninterrupted["units"] and resumed["fitness"] == uninterrupted["fitness"]
