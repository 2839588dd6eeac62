"""MLflow bookkeeping; the only module of the project that imports mlflow (evopress/lineage.py computes, this records).

Layout: a SQLite backend in the project (`sqlite:///<project>/mlflow.db`, or `tracking.uri` from params.yaml) and
every artifact under one absolute root (`<project>/mlartifacts`), so `mlflow ui --backend-store-uri ...` run from
anywhere finds both. One *parent* run per pipeline run (opened by the Prefect flow, its id handed to the DVC stages
in EVOPRESS_MLFLOW_PARENT_RUN), one nested run per stage. A stage run without that variable (plain `dvc repro`)
opens a standalone run, so every stage execution is recorded either way. The flow creates every stage's run when
it opens the parent (status SCHEDULED, start times that make the UI's newest-first listing read in pipeline
order); a stage reuses the run of its label, and a stage DVC skipped keeps its run, closed as FINISHED with
`evopress.skipped = true` and a link to the run that wrote its outputs. The experiment is tagged as a model
development one, so the MLflow 3 UI opens it on its runs (not on an empty GenAI traces view).

Lineage, by run id: a stage run tags `from.<stage>` = the id of each run whose outputs it read. Those runs are found
through their `dvc.out.<path>` tags (the md5 dvc.lock holds for each output, back-filled onto a stage's latest
finished run at the start of every later stage, by the report stage and when a flow closes its pipeline run: DVC
writes a stage's hashes only after it ends). Short `in.*` tags pin what the run read (base model and token set
sha256, upstream md5s), `dvc.dep.*` the dvc.lock md5 of each declared dep; `lineage.json` holds all of it, and the
run's description (markdown) links to each upstream run. A stitch run records its model as a LoggedModel output
with the facts an auditor needs as params; the evaluate run records the models it scored as inputs and logs their
held-out metrics onto them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelInput, LoggedModelOutput
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as context_registry

from evopress import lineage
from evopress.layout import STAGES, stage_order

PARENT_ENV = "EVOPRESS_MLFLOW_PARENT_RUN"
STAGE_TAG = "evopress.stage"
PIPELINE_TAG = "evopress.pipeline_run"
ORDER_TAG = "evopress.order"
SKIPPED_TAG = "evopress.skipped"  # "true" on the run of a stage DVC found up to date in a pipeline run
OUTPUTS_FROM_TAG = "evopress.outputs_from"  # on such a run: the run that wrote its current outputs
NOT_RUN_TAG = "evopress.not_run"  # "true" on the run of a stage the pipeline run never reached
ATTEMPT_TAG = "evopress.attempt"  # set from the second attempt on (a Prefect retry reuses the stage's run)
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run description the UI renders as markdown
# Read by the MLflow 3 UI: without it an experiment opens on the GenAI traces view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
MODEL_METRICS = ("_perplexity", "_kl")
SOURCE_TAG = "mlflow.source.name"  # mlflow would record the absolute path of the running executable


def _source(stage: str) -> str:
    """The command a stage runs (`evopress stage search --method depth`): the same on every machine."""
    return f"evopress stage {stage.replace('@', ' --method ')}"


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
    if exp is None:
        try:
            return mlflow.create_experiment(
                tracking.experiment,
                artifact_location=(art / tracking.experiment).as_uri(),
                tags=dict([EXPERIMENT_KIND]),
            )
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            exp = mlflow.get_experiment_by_name(tracking.experiment)
    if (
        EXPERIMENT_KIND[0] not in exp.tags
    ):  # an experiment made before this tag: never override a user's choice
        MlflowClient().set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


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
    return {stage: entry["outs"] for stage, entry in lineage.read_lock(root).items()}


def dep_tags(root: Path, deps: list[str]) -> dict[str, str]:
    """dvc.lock md5 of each declared dep, as recorded when the upstream stage that made it ended."""
    made = {p: md5 for outs in lock_outs(root).values() for p, md5 in outs.items()}
    return {f"dvc.dep.{d}": made[d] for d in deps if d in made}


def producer(client, exp: str, path: str, md5: str):
    """The newest run tagged as having written `path` with this md5 (None: no tracked run wrote it)."""
    flt = f"tags.`dvc.out.{path}` = '{md5}'"
    runs = client.search_runs([exp], flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _record(
    client, exp: str, root: Path, stage: str, deps: list[str], method: str | None, parent: str
) -> dict:
    """What a stage run reads and who wrote it: the content of lineage.json (the run id is added once open)."""
    inputs = lineage.consumed(lineage.read_lock(root), deps)
    for i in inputs:
        run = producer(client, exp, i["path"], i["md5"])
        i["run_id"] = run.info.run_id if run else None
    git = git_tags(root)
    return {
        "stage": stage,
        "method": method,
        "experiment_id": exp,
        "pipeline_run": parent,
        "git": {"commit": git["git.commit"], "dirty": git["git.dirty"]},
        "base": lineage.base_hashes(root),
        "inputs": inputs,
    }


def _lineage_tags(record: dict) -> dict[str, str]:
    tags = lineage.input_tags(record["base"], record["inputs"], record["method"])
    tags.update({lineage.from_key(i["stage"]): i["run_id"] for i in record["inputs"] if i["run_id"]})
    return tags


# --- runs --------------------------------------------------------------------------------------------------------
def start_pipeline_run(
    tracking, root: Path, flat_params: dict[str, str], name: str = "pipeline", stages: list[str] = ()
) -> str:
    """Open the parent run of one pipeline run and a SCHEDULED child run per stage of `stages` (dvc.yaml
    labels, pipeline order); returns the parent's id (hand it to stages in PARENT_ENV)."""
    exp = _experiment(tracking, root)
    client = MlflowClient()
    tags = {PIPELINE_TAG: "parent", SOURCE_TAG: "python -m flows.compress", **git_tags(root)}
    tags[NOTE_TAG] = "**EvoPress pipeline run**: running; this description lists the stages when it ends."
    run = client.create_run(exp, run_name=name, tags=tags)
    _log_params(client, run.info.run_id, flat_params)
    params_file = Path(root) / "params.yaml"
    if params_file.is_file():
        client.log_artifact(run.info.run_id, str(params_file))
    plan_stage_runs(client, exp, run, list(stages))
    return run.info.run_id


def plan_stage_runs(client, exp: str, parent, stages: list[str]) -> dict[str, str]:
    """One SCHEDULED child run per stage, created before any stage runs; returns {label: run id}.

    The MLflow 3 UI lists runs by `attributes.start_time` DESC (its default sort, also search_runs' default order;
    the store breaks ties by run id, i.e. at random) and shows children under their parent in that order. So stage
    k of n (0-based) gets start_time = the parent's + (n - k) ms: the first stage on top, all of them next to
    their parent. The start time (the UI's "Created") is thus when the flow scheduled the stage; what the stage
    itself took is its `stage_seconds` metric, when it began is `started` in its lineage.json."""
    t0 = parent.info.start_time
    methods = list(dict.fromkeys(s.partition("@")[2] for s in stages if "@" in s))
    planned = {}
    for k, label in enumerate(stages):
        tags = {
            STAGE_TAG: label,
            PIPELINE_TAG: parent.info.run_id,
            PARENT_TAG: parent.info.run_id,
            ORDER_TAG: stage_order(label, methods) if label.partition("@")[0] in STAGES else str(k + 1),
            SOURCE_TAG: _source(label),
            NOTE_TAG: lineage.planned_description(exp, parent.info.run_id, label),
        }
        tags = context_registry.resolve_tags(tags)  # mlflow.user etc., as mlflow.start_run records them
        run = client.create_run(exp, start_time=t0 + len(stages) - k, tags=tags, run_name=label)
        client.update_run(run.info.run_id, status="SCHEDULED")
        planned[label] = run.info.run_id
    return planned


def _planned_run(client, exp: str, parent: str, stage: str):
    """The run the flow created for this stage of this pipeline run, unless it already finished (None: none)."""
    flt = f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{STAGE_TAG}` = '{stage}'"
    runs = client.search_runs([exp], flt, max_results=50)
    return next((r for r in runs if r.info.status != "FINISHED"), None)


def end_pipeline_run(
    tracking,
    root: Path,
    run_id: str,
    status: str,
    table_md: str | None = None,
    stages: list[str] = (),
    skipped: list[str] | None = None,
) -> None:
    """Close the parent run: dvc.lock, results, summary metrics, and a description listing `stages` in order.

    `skipped`: the stages DVC found up to date; their SCHEDULED runs close as FINISHED with `evopress.skipped`.
    Any other run still SCHEDULED was never reached: KILLED. None: every SCHEDULED run was up to date if the
    pipeline run FINISHED (each stage was tried), else unreached."""
    from evopress.layout import Layout

    exp = _experiment(tracking, root)
    client = MlflowClient()
    for name in ("dvc.lock", "params.yaml"):
        if (Path(root) / name).is_file():
            client.log_artifact(run_id, str(Path(root) / name))
    if table_md:
        client.log_text(run_id, table_md, "results.md")
    backfill_lock_tags(tracking, root, parent=run_id)
    close_planned_runs(client, exp, root, run_id, status, skipped)
    metrics = Layout(Path(root)).metrics
    if status == "FINISHED" and metrics.is_file():
        for key, value in lineage.summary_metrics(json.loads(metrics.read_text())).items():
            client.log_metric(run_id, key, value)
    rows = _stage_rows(client, exp, root, run_id, stages)
    client.log_metric(run_id, "stages_ran", float(sum(r["status"].startswith("ran") for r in rows)))
    git = {"commit": git_tags(root)["git.commit"]}
    client.set_tag(run_id, NOTE_TAG, lineage.pipeline_description(exp, rows, table_md, git))
    client.set_terminated(run_id, status=status)


def close_planned_runs(
    client, exp: str, root: Path, parent: str, status: str, skipped: list[str] | None
) -> None:
    """Close the runs the flow created for stages that did not run: up to date (FINISHED, `evopress.skipped`,
    described with the runs that wrote their current outputs), or never reached (KILLED)."""
    flt = f"tags.`{PARENT_TAG}` = '{parent}' and attributes.status = 'SCHEDULED'"
    outs = lock_outs(root)
    for run in client.search_runs([exp], flt, max_results=500):
        run_id, label = run.info.run_id, run.data.tags.get(STAGE_TAG, run.info.run_name)
        if label in skipped if skipped is not None else status == "FINISHED":
            made = [{"path": p, "md5": md5} for p, md5 in outs.get(label, {}).items() if md5]
            for o in made:
                by = producer(client, exp, o["path"], o["md5"])
                o["run_id"] = by.info.run_id if by else None
            client.set_tag(run_id, SKIPPED_TAG, "true")
            writer = next((o["run_id"] for o in made if o["run_id"]), None)
            if writer:
                client.set_tag(run_id, OUTPUTS_FROM_TAG, writer)
            client.set_tag(run_id, NOTE_TAG, lineage.skipped_description(exp, parent, label, made))
            client.set_terminated(run_id, status="FINISHED")
        else:
            client.set_tag(run_id, NOT_RUN_TAG, "true")
            client.set_tag(run_id, NOTE_TAG, lineage.not_run_description(exp, parent, label, status))
            client.set_terminated(run_id, status="KILLED")


def _stage_rows(client, exp: str, root: Path, parent: str, stages: list[str]) -> list[dict]:
    """Per stage (pipeline order): its run in this pipeline run, else the run that wrote its current outputs."""
    mine = {r.data.tags[STAGE_TAG]: r for r in reversed(stage_runs_of(client, exp, parent))}
    outs = lock_outs(root)
    rows = []
    for stage in stages:
        run = mine.get(stage)
        status = f"ran ({run.info.status})" if run else "not run"
        if run is not None and run.data.tags.get(SKIPPED_TAG) == "true":
            writer = run.data.tags.get(OUTPUTS_FROM_TAG)
            by = lineage.run_link(exp, writer, writer[:8]) if writer else "no tracked run"
            status = f"up to date: outputs of {by}"
        elif run is not None and run.data.tags.get(NOT_RUN_TAG) == "true":
            status = "not run (not reached)"
        if run is None:
            made = next(((p, md5) for p, md5 in outs.get(stage, {}).items() if md5), None)
            run = producer(client, exp, *made) if made else None
            status = "up to date: outputs of an earlier run" if run else status
        rows.append({"stage": stage, "run_id": run.info.run_id if run else None, "status": status})
    return rows


def _log_params(client, run_id: str, flat: dict[str, str]) -> None:
    items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):  # the backend takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


class StageRun:
    """What a stage may record on its run: metrics, files, tags, the compressed model, the models it scored."""

    def __init__(self, run_id: str, root: Path, record: dict):
        self.run_id, self.root, self.record = run_id, Path(root), record
        self.client = MlflowClient()
        self.exp = record["experiment_id"]
        self.notes: list[str] = []  # lines the description gains as the stage records its outputs
        self.tagged: dict[str, str] = {}

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
            self.tagged[k] = str(v)

    def save_lineage(self) -> None:
        """lineage.json and the description, rewritten whenever the record grows (an overwrite, same name)."""
        self.client.log_text(self.run_id, json.dumps(self.record, indent=2), "lineage.json")
        self.client.set_tag(self.run_id, NOTE_TAG, lineage.stage_description(self.record, self.notes))

    def _input(self, kind: str) -> dict:
        """The input of this method of a kind (`profile`, `db`), {} when the stage read none."""
        m = self.record["method"]
        for i in self.record["inputs"]:
            if lineage.short_key(i["path"], i["stage"], m) == f"in.{kind}":
                return i
        return {}

    def model(self, name: str, folder: Path, sha256: str, params: dict[str, str]) -> str:
        """Record a stitched model folder as a LoggedModel output of this run (weights stay in DVC): its page lists
        where it is, what it is, and what made it (base model, data, profile, search run)."""
        folder = Path(folder)
        path = lineage.rel(folder, self.root)
        fmt, loader = lineage.model_format(folder)
        base, profile = dict(self.record["base"]), self._input("profile")
        if profile.get("run_id"):  # the token sets the search read (stitch reads none itself)
            read = self.client.get_run(profile["run_id"]).data.tags
            base.update({s: read[f"in.{s}"] for s in ("calibration", "heldout") if f"in.{s}" in read})
        facts = {
            **params,
            "path": path,
            "sha256": sha256,
            "format": fmt,
            "loader": loader,
            "bytes_on_disk": str(lineage.bytes_on_disk(folder)),
            "base_model_sha256": base.get("model", ""),
            **{f"{s}_sha256": base.get(s, "") for s in ("calibration", "heldout")},
            "profile_path": profile.get("path", ""),
            "profile_md5": profile.get("md5", ""),
            "profile_sha256": lineage.sha256_of(self.root / profile["path"]) if profile else "",
            "search_run_id": profile.get("run_id") or "",
            "stitch_run_id": self.run_id,
            "database_sha256": self.tagged.get("database.sha256", ""),
            "git_commit": self.record["git"]["commit"],
        }
        facts = {k: str(v) for k, v in facts.items() if v not in ("", None)}  # the store refuses empty params
        tags = {
            "path": path,
            "sha256": sha256,
            STAGE_TAG: self.record["stage"],
            SOURCE_TAG: _source(self.record["stage"]),
        }
        model = mlflow.create_external_model(
            name=name, source_run_id=self.run_id, tags=tags, params=facts, experiment_id=self.exp
        )
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
        self.tags({"model.stitched.path": path, "model.stitched.sha256": sha256, "out.model": model.model_id})
        self.record["model"] = {"model_id": model.model_id, "name": name, **facts}
        link = lineage.model_link(self.exp, model.model_id, name)
        self.notes.append(f"**Output**: LoggedModel {link}, `{path}`, sha256 `{sha256[:16]}`, {fmt}")
        self.save_lineage()
        return model.model_id

    def score_models(self, metrics_path: Path) -> dict[str, str]:
        """After evaluate: each searched profile's stitched model (a LoggedModel of the stitch run this run read)
        becomes an input of this run and gets its held-out metrics; returns {method: model id}."""
        rows = json.loads(Path(metrics_path).read_text())
        scored = {}
        for row in rows.values():
            m = row.get("method")
            stitch = next(
                (i for i in self.record["inputs"] if i["stage"] == f"stitch@{m}" and i["run_id"]), None
            )
            model_id = _output_model(self.client, stitch["run_id"]) if stitch else None
            if row.get("profile") != "evopress" or model_id is None:
                continue
            for key, value in row.items():
                if key.endswith(MODEL_METRICS) and not key.startswith("stitched"):
                    # The metric's run is the stitch run (one model per run: keys do not collide); the
                    # token set's name and sha256 show in the model page's dataset column.
                    data = key.rsplit("_", 1)[0]
                    digest = self.record["base"].get(data, "")[:16]
                    dataset = {"dataset_name": data, "dataset_digest": digest} if digest else {}
                    self.client.log_metric(stitch["run_id"], key, float(value), model_id=model_id, **dataset)
            self.client.set_logged_model_tags(model_id, {"evaluated_by": self.run_id})
            self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
            scored[m] = model_id
            values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.endswith(MODEL_METRICS))
            self.notes.append(f"Scored {lineage.model_link(self.exp, model_id, f'evopress-{m}')}: {values}")
        self.record["models_scored"] = scored
        self.save_lineage()
        return scored


def _output_model(client, run_id: str) -> str | None:
    """The LoggedModel a (stitch) run recorded as its output, the newest if several."""
    outputs = client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs else []
    return models[-1].model_id if models else None


@contextlib.contextmanager
def stage_run(
    tracking, root: Path, stage: str, flat_params: dict[str, str], deps: list[str], method: str | None = None,
    order: str = "",
):  # fmt: skip
    """Open the stage's run (nested under the pipeline run when PARENT_ENV is set) and make it the active run.

    Under a pipeline run, the run the flow created for this stage is reused (set RUNNING, then FINISHED or
    FAILED): one run per stage per pipeline run, a retry included (tag `evopress.attempt`). Without one (no
    parent, or a flow that created none) a new run opens.
    `order` (e.g. "4.1": the fourth stage of dvc.yaml, first method) sorts runs in pipeline order in the UI."""
    exp = _experiment(tracking, root)
    client = MlflowClient()
    parent = os.environ.get(PARENT_ENV) or None
    record = _record(client, exp, Path(root), stage, deps, method, parent or "standalone")
    record["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {
        STAGE_TAG: stage,
        PIPELINE_TAG: parent or "standalone",
        ORDER_TAG: order,
        SOURCE_TAG: _source(stage),
        **git_tags(root),
        **_lineage_tags(record),
        **dep_tags(root, deps),
    }
    planned = _planned_run(client, exp, parent, stage) if parent else None
    if planned is None:
        opened = mlflow.start_run(experiment_id=exp, run_name=stage, parent_run_id=parent, tags=tags)
    else:
        if planned.info.status != "SCHEDULED":  # an earlier attempt of this stage in this pipeline run
            tags[ATTEMPT_TAG] = str(int(planned.data.tags.get(ATTEMPT_TAG, "1")) + 1)
        tags = context_registry.resolve_tags(tags)  # what start_run records on a run it creates
        opened = mlflow.start_run(run_id=planned.info.run_id, run_name=stage, tags=tags)
    with opened as run:
        _log_params(client, run.info.run_id, flat_params)
        record["run_id"] = run.info.run_id
        staged = StageRun(run.info.run_id, root, record)
        staged.save_lineage()
        yield staged


def generation_hook(_params: dict):
    """An on_generation callback logging each search generation to the active run (None outside a run).

    Each generation scores fresh samples, so `fitness` zigzags; `best_fitness` (lowest so far) shows the trend."""
    run = mlflow.active_run()
    if run is None:
        return None
    client, run_id, best = MlflowClient(), run.info.run_id, [float("inf")]

    def on_generation(info) -> None:
        step = int(info.generation)
        best[0] = min(best[0], float(info.fitness))
        metrics = {"fitness": info.fitness, "best_fitness": best[0], "tokens": info.tokens}
        metrics.update(seconds=info.seconds, improved=float(info.improved))
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v), step=step)

    return on_generation


def backfill_lock_tags(tracking, root: Path, parent: str | None = None) -> int:
    """Tag each stage's latest finished run with its outputs' dvc.lock md5 (DVC writes them after the stage exits).

    Restricted to one pipeline run when `parent` (or PARENT_ENV) names it. Called at the start of every stage (the
    upstream stages' entries are in dvc.lock by then), by the report stage, and when a flow closes its pipeline
    run, so a stage DVC skips downstream never leaves an upstream run untagged. A failed run wrote nothing DVC
    recorded: it is never tagged (it would pass for the producer of an older run's outputs)."""
    exp = _experiment(tracking, root)
    client = MlflowClient()
    parent = parent or os.environ.get(PARENT_ENV)
    tagged = 0
    for stage, outs in lock_outs(root).items():
        flt = f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'"
        if parent:
            flt += f" and tags.`{PIPELINE_TAG}` = '{parent}'"
        runs = client.search_runs([exp], flt, order_by=["attributes.start_time DESC"], max_results=50)
        # a skipped stage's run wrote nothing: never tag it as a producer
        run = next((r for r in runs if r.data.tags.get(SKIPPED_TAG) != "true"), None)
        if run:
            for path, md5 in outs.items():
                client.set_tag(run.info.run_id, f"dvc.out.{path}", md5)
            tagged += 1
    return tagged


def executed(run) -> bool:
    """Whether a stage run recorded an execution (not a run the flow created for a stage that never ran)."""
    tags = run.data.tags
    return run.info.status != "SCHEDULED" and "true" not in (tags.get(SKIPPED_TAG), tags.get(NOT_RUN_TAG))


def stage_runs_of(client, exp: str, parent: str | None) -> list:
    flt = f"tags.`{PIPELINE_TAG}` = '{parent}'" if parent else f"tags.`{STAGE_TAG}` != ''"
    return client.search_runs([exp], flt, order_by=["attributes.start_time DESC"], max_results=500)


def stage_runs(tracking, root: Path, parent: str | None = None, planned: bool = False) -> list:
    """Stage runs (of one pipeline run when `parent` is given), newest first: used by tests and the report.

    Only runs that executed their stage, unless `planned` (then also the runs of stages that were up to date,
    never reached or not started yet)."""
    exp = _experiment(tracking, root)  # first: it points mlflow at the project's store
    runs = stage_runs_of(MlflowClient(), exp, parent)
    return runs if planned else [r for r in runs if executed(r)]
