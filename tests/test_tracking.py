"""MLflow bookkeeping on a SQLite store in a temp project: parent/nested runs, provenance tags, metrics, back-fill."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from evopress import tracking
from evopress.params import TrackingParams


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    (root / "data/model").mkdir(parents=True)
    (root / "data/text").mkdir(parents=True)
    (root / "data/model/evopress_model.json").write_text(json.dumps({"sha256": "a" * 64, "source": "tiny"}))
    (root / "data/text/data.json").write_text(
        json.dumps({"source": "builtin:pydoc", "sha256": {"calibration.safetensors": "c" * 64}})
    )
    lock = {
        "stages": {
            "prepare_model": {"outs": [{"path": "data/model", "md5": "m1.dir"}]},
            "search@depth": {"outs": [{"path": "runs/search/depth/profile.json", "md5": "p1"}]},
        }
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    monkeypatch.chdir(root)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return root


def test_uris_default_to_sqlite_and_an_absolute_artifact_root(project):
    uri, art = tracking.uris(TrackingParams(), project)
    assert uri == f"sqlite:///{project.resolve() / 'mlflow.db'}" and art == project.resolve() / "mlartifacts"


def test_stage_run_nests_under_the_pipeline_run_with_provenance(project, monkeypatch):
    tp = TrackingParams()
    parent = tracking.start_pipeline_run(tp, project, {"methods.depth.target": "6"})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    with tracking.stage_run(tp, project, "search@depth", {"target": "6"}, ["data/model", "data/text"]) as run:
        hook = tracking.generation_hook({})
        for g, f in enumerate([0.5, 0.4, 0.4], start=1):
            hook(SimpleNamespace(generation=g, fitness=f, tokens=100 * g, seconds=1.0, improved=f < 0.5))
        run.metrics({"final_fitness": 0.4})
    assert tracking.backfill_lock_tags(tp, project) >= 1
    (child,) = tracking.stage_runs(tp, project, parent=parent)
    tags = child.data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["evopress.stage"] == "search@depth"
    # in.* pins what the run read through dvc.lock: data/text is not in this lock yet
    assert tags["in.model"] == "a" * 64 and "in.calibration" not in tags
    assert tags["dvc.dep.data/model"] == "m1.dir" and "dvc.dep.data/text" not in tags  # not in the lock yet
    assert tags["dvc.out.runs/search/depth/profile.json"] == "p1"
    assert tags["git.commit"] == "unknown" and tags["git.dirty"] in ("true", "false")  # no commit yet
    history = tracking.MlflowClient().get_metric_history(child.info.run_id, "fitness")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4), (3, 0.4)]
    tracking.end_pipeline_run(tp, project, parent, "FINISHED", "| a |\n")
    names = {a.path for a in tracking.MlflowClient().list_artifacts(parent)}
    assert {"dvc.lock", "results.md"} <= names


def test_a_stage_outside_the_flow_opens_its_own_run(project):
    tp = TrackingParams()
    with tracking.stage_run(tp, project, "evaluate", {}, []):
        pass
    (run,) = tracking.stage_runs(tp, project)
    assert (
        run.data.tags["evopress.pipeline_run"] == "standalone" and "mlflow.parentRunId" not in run.data.tags
    )
    assert tracking.generation_hook({}) is None  # no active run: no callback


def _lineage_project(project):
    """The fixture's project grown to a finished depth pipeline: a lock with search, stitch, evaluate outputs."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    lock["stages"]["prepare_data"] = {"outs": [{"path": "data/text", "md5": "t1.dir"}]}
    lock["stages"]["stitch@depth"] = {
        "deps": [{"path": "runs/search/depth/profile.json", "md5": "p1"}],
        "outs": [{"path": "models/depth", "md5": "s1.dir"}],
    }
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    (project / "runs/search/depth").mkdir(parents=True)
    (project / "runs/search/depth/profile.json").write_text('{"units": {}}')
    (project / "models/depth").mkdir(parents=True)
    (project / "models/depth/config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    rows = {"depth/evopress": {"method": "depth", "profile": "evopress", "heldout_perplexity": 12.5}}
    rows["depth/evopress"].update(heldout_kl=0.25, size=0.8, target=1.0)
    (project / "runs/metrics.json").write_text(json.dumps(rows))


def test_lineage_goes_from_the_model_to_its_search_run_and_data(project, monkeypatch):
    """Each stage run names the runs it read by id; the stitched model is the stitch run's LoggedModel output,
    with its facts as params and, after evaluate, its held-out metrics; the parent run lists the stages."""
    _lineage_project(project)
    tp = TrackingParams()
    parent = tracking.start_pipeline_run(tp, project, {})
    client = tracking.MlflowClient()  # after the first call has set the tracking URI
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    ids = {}
    plan = [
        ("prepare_model", [], None),
        ("prepare_data", ["data/model"], None),
        ("search@depth", ["data/model", "data/text"], "depth"),
        ("stitch@depth", ["data/model", "runs/search/depth/profile.json"], "depth"),
        ("evaluate", ["data/model", "data/text", "runs/search", "models"], None),
    ]
    for n, (stage, deps, method) in enumerate(plan, start=1):
        tracking.backfill_lock_tags(tp, project)  # as each stage's command does before it opens its run
        with tracking.stage_run(tp, project, stage, {}, deps, method, str(n)) as run:
            ids[stage] = run.run_id
            if stage == "stitch@depth":
                run.tags({"database.sha256": "d" * 64})
                model_id = run.model(
                    "evopress-depth", project / "models/depth", "e" * 64, {"method": "depth"}
                )
            if stage == "evaluate":
                assert run.score_models(project / "runs/metrics.json") == {"depth": model_id}
    tracking.end_pipeline_run(tp, project, parent, "FINISHED", "| t |\n", [s for s, _, _ in plan])

    exp = client.get_experiment(client.get_run(parent).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    model = client.get_logged_model(model_id)
    assert model.source_run_id == ids["stitch@depth"]
    assert [o.model_id for o in client.get_run(ids["stitch@depth"]).outputs.model_outputs] == [model_id]
    stitch = client.get_run(model.params["stitch_run_id"]).data.tags
    assert stitch["from.search@depth"] == model.params["search_run_id"] == ids["search@depth"]
    assert stitch["in.profile"] == model.params["profile_md5"] == "p1"
    search = client.get_run(model.params["search_run_id"]).data.tags
    assert search["from.prepare_data"] == ids["prepare_data"] and search["in.calibration"] == "c" * 64
    assert model.params["base_model_sha256"] == search["in.model"] == "a" * 64
    assert model.params["path"] == "models/depth" and model.params["format"].startswith("safetensors")
    assert int(model.params["bytes_on_disk"]) > 0 and model.params["database_sha256"] == "d" * 64
    assert {m.key: m.value for m in model.metrics} == {"heldout_perplexity": 12.5, "heldout_kl": 0.25}
    evaluate = client.get_run(ids["evaluate"])
    assert [m.model_id for m in evaluate.inputs.model_inputs] == [model_id]
    assert (
        evaluate.data.tags["in.depth.stitched"] == "s1.dir" and evaluate.data.tags["in.depth.profile"] == "p1"
    )
    assert evaluate.data.tags["from.stitch@depth"] == ids["stitch@depth"]
    (project / "dl").mkdir()
    record = json.loads(
        Path(client.download_artifacts(ids["stitch@depth"], "lineage.json", str(project / "dl"))).read_text()
    )
    assert {i["path"]: i["run_id"] for i in record["inputs"]}["runs/search/depth/profile.json"] == ids[
        "search@depth"
    ]
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert [
        line.split("|")[2].strip() for line in note.splitlines() if line.startswith("| ") and "#/" in line
    ] == [s for s, _, _ in plan]
    assert client.get_run(parent).data.metrics["depth/evopress.heldout_kl"] == 0.25


def test_best_fitness_is_the_running_minimum_and_the_profile_plot_has_a_legend(tmp_path):
    from evopress.report import best_so_far, profile_figure, unit_kind

    assert best_so_far([0.5, 0.3, 0.4, 0.2]) == [0.5, 0.3, 0.3, 0.2]
    assert unit_kind("block.3.mlp.up_proj") == (3, "mlp.up_proj") and unit_kind("block.2") == (2, "block")
    units = {f"block.{b}.{k}": b % 2 for b in range(3) for k in ("attn", "mlp")}
    (tmp_path / "profile.json").write_text(json.dumps({"method": "depth", "units": units}))
    ax = profile_figure(tmp_path / "profile.json").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["attn", "mlp"]
    assert ax.get_ylabel() == "level (1 = removed)"
