"""MLflow bookkeeping on a SQLite store in a temp project: parent/nested runs, provenance tags, metrics, back-fill."""

from __future__ import annotations

import json
import subprocess
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
    assert tags["model.sha256"] == "a" * 64 and tags["data.sha256.calibration"] == "c" * 64
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
