"""MLflow bookkeeping; the only module of the project that imports mlflow.

Layout: a SQLite backend in the project (`sqlite:///<project>/mlflow.db`, or `tracking.uri` from params.yaml) and
every artifact under one absolute root (`<project>/mlartifacts`), so `mlflow ui --backend-store-uri ...` run from
anywhere finds both. One *parent* run per pipeline run (opened by the Prefect flow, its id handed to the DVC stages
in EVOPRESS_MLFLOW_PARENT_RUN), one nested run per stage. A stage run without that variable (plain `dvc repro`)
opens a standalone run, so every stage execution is recorded either way.

Provenance tags on each stage run: git commit + dirty flag, sha256 of the model and of the token sets, and the
dvc.lock md5 of every input the stage read (those entries are final: upstream stages ran first). The report stage
back-fills each stage run with the md5 of its own outputs from dvc.lock, which DVC writes only after a stage ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

PARENT_ENV = "EVOPRESS_MLFLOW_PARENT_RUN"
STAGE_TAG = "evopress.stage"
PIPELINE_TAG = "evopress.pipeline_run"


def uris(tracking, root: Path) -> tuple[str, Path]:
    """(backend store URI, absolute artifact root) from the `tracking` params."""
    root = Path(root).resolve()
    uri = tracking.uri or f"sqlite:///{root / 'mlflow.db'}"
    art = Path(tracking.artifact_root)
    return uri, (art if art.is_absolute() else root / art)


def _experiment(tracking, root: Path) -> str:
    uri, art = uris(tracking, root)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(
            tracking.experiment, artifact_location=(art / tracking.experiment).as_uri()
        )
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(tracking.experiment).experiment_id


# --- provenance --------------------------------------------------------------------------------------------------
def git_tags(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def lock_outs(root: Path) -> dict[str, dict[str, str]]:
    """stage -> {output path: md5} from dvc.lock (empty before the first `dvc repro`)."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    return {name: {o["path"]: o.get("md5", "") for o in s.get("outs", [])} for name, s in stages.items()}


def input_tags(root: Path, deps: list[str]) -> dict[str, str]:
    """dvc.lock md5 of each input, as recorded when the upstream stage that made it ended."""
    made = {p: md5 for outs in lock_outs(root).values() for p, md5 in outs.items()}
    return {f"dvc.dep.{d}": made[d] for d in deps if d in made}


def manifest_tags(root: Path) -> dict[str, str]:
    """sha256 of the prepared model and token sets, from the manifests their stages wrote."""
    from evopress.layout import Layout

    layout, tags = Layout(Path(root)), {}
    model = layout.model / "evopress_model.json"
    if model.is_file():
        m = json.loads(model.read_text())
        tags.update({"model.sha256": m.get("sha256", ""), "model.source": m.get("source", "")})
    data = layout.text / "data.json"
    if data.is_file():
        d = json.loads(data.read_text())
        tags["data.source"] = str(d.get("source", ""))
        for name, sha in (d.get("sha256") or {}).items():
            tags[f"data.sha256.{name.split('.')[0]}"] = sha
    return tags


# --- runs --------------------------------------------------------------------------------------------------------
def start_pipeline_run(tracking, root: Path, flat_params: dict[str, str], name: str = "pipeline") -> str:
    """Open the parent run of one pipeline run; returns its id (hand it to stages in PARENT_ENV)."""
    exp = _experiment(tracking, root)
    client = MlflowClient()
    run = client.create_run(exp, run_name=name, tags={PIPELINE_TAG: "parent", **git_tags(root)})
    _log_params(client, run.info.run_id, flat_params)
    params_file = Path(root) / "params.yaml"
    if params_file.is_file():
        client.log_artifact(run.info.run_id, str(params_file))
    return run.info.run_id


def end_pipeline_run(tracking, root: Path, run_id: str, status: str, table_md: str | None = None) -> None:
    _experiment(tracking, root)
    client = MlflowClient()
    for name in ("dvc.lock", "params.yaml"):
        if (Path(root) / name).is_file():
            client.log_artifact(run_id, str(Path(root) / name))
    if table_md:
        client.log_text(run_id, table_md, "results.md")
    backfill_lock_tags(tracking, root, parent=run_id)
    client.set_terminated(run_id, status=status)


def _log_params(client, run_id: str, flat: dict[str, str]) -> None:
    items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):  # the backend takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


class StageRun:
    """What a stage may record on its run: metrics, files, tags, the compressed model."""

    def __init__(self, run_id: str, root: Path):
        self.run_id, self.root = run_id, Path(root)
        self.client = MlflowClient()

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self.client.log_metric(self.run_id, k, float(v), step=step or 0)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path), folder)

    def figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def model(self, name: str, folder: Path, sha256: str, params: dict[str, str]) -> str:
        """Record a stitched model folder as a LoggedModel pointing at its path and hash (weights stay in DVC)."""
        exp = self.client.get_run(self.run_id).info.experiment_id
        tags = {"path": str(Path(folder).resolve()), "sha256": sha256}
        model = mlflow.create_external_model(
            name=name, source_run_id=self.run_id, tags=tags, params=params, experiment_id=exp
        )
        self.tags({"model.stitched.path": tags["path"], "model.stitched.sha256": sha256})
        return model.model_id


@contextlib.contextmanager
def stage_run(tracking, root: Path, stage: str, flat_params: dict[str, str], deps: list[str]):
    """Open the stage's run (nested under the pipeline run when PARENT_ENV is set) and make it the active run."""
    exp = _experiment(tracking, root)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {
        STAGE_TAG: stage,
        PIPELINE_TAG: parent or "standalone",
        **git_tags(root),
        **manifest_tags(root),
        **input_tags(root, deps),
    }
    with mlflow.start_run(experiment_id=exp, run_name=stage, parent_run_id=parent, tags=tags) as run:
        _log_params(MlflowClient(), run.info.run_id, flat_params)
        yield StageRun(run.info.run_id, root)


def generation_hook(_params: dict):
    """An on_generation callback logging each search generation to the active run (None outside a run)."""
    run = mlflow.active_run()
    if run is None:
        return None
    client, run_id = MlflowClient(), run.info.run_id

    def on_generation(info) -> None:
        step = int(info.generation)
        metrics = {"fitness": info.fitness, "tokens": info.tokens, "seconds": info.seconds}
        metrics["improved"] = float(info.improved)
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v), step=step)

    return on_generation


def backfill_lock_tags(tracking, root: Path, parent: str | None = None) -> int:
    """Tag each stage's latest run with its outputs' dvc.lock md5 (DVC writes them only after the stage exits).

    Restricted to one pipeline run when `parent` (or PARENT_ENV) names it. Called at the start of every stage (the
    upstream stages' entries are in dvc.lock by then), by the report stage, and when a flow closes its pipeline
    run, so a stage DVC skips downstream never leaves an upstream run untagged.
    """
    exp = _experiment(tracking, root)
    client = MlflowClient()
    parent = parent or os.environ.get(PARENT_ENV)
    tagged = 0
    for stage, outs in lock_outs(root).items():
        flt = f"tags.`{STAGE_TAG}` = '{stage}'"
        if parent:
            flt += f" and tags.`{PIPELINE_TAG}` = '{parent}'"
        runs = client.search_runs([exp], flt, order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            for path, md5 in outs.items():
                client.set_tag(runs[0].info.run_id, f"dvc.out.{path}", md5)
            tagged += 1
    return tagged


def stage_runs(tracking, root: Path, parent: str | None = None) -> list:
    """Stage runs (of one pipeline run when `parent` is given), newest first: used by tests and the report."""
    exp = _experiment(tracking, root)
    flt = f"tags.`{PIPELINE_TAG}` = '{parent}'" if parent else f"tags.`{STAGE_TAG}` != ''"
    return MlflowClient().search_runs([exp], flt, order_by=["attributes.start_time DESC"], max_results=500)
