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
    assert stitch["from.search:depth"] == model.params["search_run_id"] == ids["search@depth"]
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
    assert evaluate.data.tags["from.stitch:depth"] == ids["stitch@depth"]
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


# --- the stage runs a flow creates ahead, in pipeline order -------------------------------------------------------
PLAN = [
    "prepare_model",
    "prepare_data",
    "build_db@depth",
    "baselines@depth",
    "search@depth",
    "stitch@depth",
    "evaluate",
    "report",
]


def _ui_listing(client, parent: str) -> list:
    """The parent's children as the MLflow 3 UI lists them by default (newest first by start time)."""
    exp = client.get_run(parent).info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent}'"
    return client.search_runs([exp], flt, order_by=["attributes.start_time DESC"])


def test_the_flow_creates_every_stage_run_ahead_and_the_ui_lists_them_in_pipeline_order(project, monkeypatch):
    """The parent run opens with one SCHEDULED run per stage; a stage reuses its run (no second run per label),
    a stage DVC skipped keeps its run, closed FINISHED with `evopress.skipped` and a link to the run that wrote
    its outputs; a stage never reached is KILLED; the UI's default order (and search_runs') is pipeline order."""
    tp = TrackingParams()
    # An earlier standalone search@depth wrote the outputs dvc.lock holds (p1): the skipped stage links it.
    with tracking.stage_run(tp, project, "search@depth", {}, ["data/model"], "depth") as earlier:
        pass
    assert tracking.backfill_lock_tags(tp, project) >= 1
    parent = tracking.start_pipeline_run(tp, project, {}, stages=PLAN)
    client = tracking.MlflowClient()
    planned = _ui_listing(client, parent)
    assert [r.info.run_name for r in planned] == PLAN
    assert {r.info.status for r in planned} == {"SCHEDULED"}
    assert [r.data.tags["evopress.order"] for r in planned] == [
        "1",
        "2",
        "3.1",
        "4.1",
        "5.1",
        "6.1",
        "7",
        "8",
    ]
    exp = client.get_run(parent).info.experiment_id
    default = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")  # no order_by: the same
    assert [r.info.run_name for r in default] == PLAN
    ids = {r.info.run_name: r.info.run_id for r in planned}

    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    for stage in ("prepare_model", "prepare_data", "build_db@depth", "baselines@depth"):  # search: up to date
        with tracking.stage_run(tp, project, stage, {"k": "v"}, ["data/model"]) as run:
            assert run.run_id == ids[stage]
            assert client.get_run(run.run_id).info.status == "RUNNING"
    with pytest.raises(RuntimeError):  # stitch fails, then its retry reuses the same run and succeeds
        with tracking.stage_run(tp, project, "stitch@depth", {"k": "v"}, []):
            raise RuntimeError("killed")
    assert client.get_run(ids["stitch@depth"]).info.status == "FAILED"
    with tracking.stage_run(tp, project, "stitch@depth", {"k": "v"}, []) as run:
        assert run.run_id == ids["stitch@depth"]
    with pytest.raises(RuntimeError):  # evaluate fails: report is never reached
        with tracking.stage_run(tp, project, "evaluate", {}, []):
            raise RuntimeError("bad input")
    tracking.end_pipeline_run(tp, project, parent, "FAILED", None, PLAN, skipped=["search@depth"])

    runs = _ui_listing(client, parent)
    assert [r.info.run_name for r in runs] == PLAN  # still one run per stage, still in pipeline order
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {
        **dict.fromkeys(PLAN[:6], "FINISHED"),  # search@depth among them: closed as up to date
        "evaluate": "FAILED",
        "report": "KILLED",
    }
    tags = {r.info.run_name: r.data.tags for r in runs}
    skipped = tags["search@depth"]
    assert skipped["evopress.skipped"] == "true" and skipped["evopress.outputs_from"] == earlier.run_id
    assert "up to date" in skipped["mlflow.note.content"] and earlier.run_id in skipped["mlflow.note.content"]
    assert not [k for k in skipped if k.startswith("dvc.out.")]  # it wrote nothing: never a producer
    assert tags["stitch@depth"]["evopress.attempt"] == "2" and "evopress.attempt" not in tags["prepare_model"]
    assert tags["report"]["evopress.not_run"] == "true" and "not run" in tags["report"]["mlflow.note.content"]
    # What ran: the runs that executed their stage (the report and the tests read these)
    executed = {r.data.tags["evopress.stage"] for r in tracking.stage_runs(tp, project, parent=parent)}
    assert executed == {
        "prepare_model",
        "prepare_data",
        "build_db@depth",
        "baselines@depth",
        "stitch@depth",
        "evaluate",
    }
    assert len(tracking.stage_runs(tp, project, parent=parent, planned=True)) == len(PLAN)
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    row = next(line for line in note.splitlines() if "| search@depth |" in line)
    assert "up to date: outputs of" in row and earlier.run_id in row
    assert client.get_run(parent).data.metrics["stages_ran"] == 6.0
    # The producer of p1 is still the earlier run, for the next stage that reads it
    assert (
        tracking.producer(client, exp, "runs/search/depth/profile.json", "p1").info.run_id == earlier.run_id
    )


def test_a_pipeline_that_finished_closes_every_untouched_run_as_up_to_date(project, monkeypatch):
    tp = TrackingParams()
    parent = tracking.start_pipeline_run(tp, project, {}, stages=["prepare_model", "search@depth"])
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    with tracking.stage_run(tp, project, "prepare_model", {}, []):
        pass
    tracking.end_pipeline_run(tp, project, parent, "FINISHED", None, ["prepare_model", "search@depth"])
    runs = tracking.stage_runs(tp, project, parent=parent, planned=True)
    by = {r.info.run_name: r for r in runs}
    assert set(by) == {"prepare_model", "search@depth"} and len(runs) == 2
    assert by["search@depth"].info.status == "FINISHED"
    assert by["search@depth"].data.tags["evopress.skipped"] == "true"
    assert "evopress.outputs_from" not in by["search@depth"].data.tags  # no tracked run wrote p1
    assert "no tracked run found" in by["search@depth"].data.tags["mlflow.note.content"]


def test_a_stage_outside_a_flow_with_no_planned_run_opens_a_new_nested_run(project, monkeypatch):
    """A parent run created without stages (an older flow): the stage opens its own nested run as before."""
    tp = TrackingParams()
    parent = tracking.start_pipeline_run(tp, project, {})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    with tracking.stage_run(tp, project, "report", {}, []) as run:
        pass
    (child,) = tracking.stage_runs(tp, project, parent=parent, planned=True)
    assert child.info.run_id == run.run_id and child.data.tags["mlflow.parentRunId"] == parent
