"""One Prefect task per DVC stage: `dvc repro --single-item <stage>`, its output streamed into the task's log.

Stages run one at a time (the flow calls them in order and waits): two `dvc` processes in one workspace contend for
its repo lock. A stage that DVC finds up to date costs a second; a failed one is retried, and because databases and
searches resume from their persisted outputs, a retry (or a re-run after a kill) continues where it stopped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

RAN_MARK = "Running stage '"


def dvc_executable() -> str:
    """`dvc` next to this interpreter (the project's venv) when present, else from PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def list_stages(project: Path) -> list[str]:
    """Stage names in dvc.yaml order (foreach stages expanded): the file lists them in dependency order."""
    res = subprocess.run(
        [dvc_executable(), "stage", "list", "--name-only"], cwd=project, capture_output=True, text=True
    )
    if res.returncode != 0:
        raise RuntimeError(f"dvc stage list failed: {res.stderr.strip()}")
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


class StageFailed(RuntimeError):
    """A stage that exited non-zero, with the line that says why: the stage's own `error: ...` line (every
    evopress command prints one), else DVC's `ERROR: ...`, else the exit status."""

    def __init__(self, stage: str, cause: str, bad_input: bool):
        super().__init__(f"stage {stage} failed: {cause}")
        self.bad_input = bad_input


def worth_retrying(task, task_run, state) -> bool:
    """Retry a crash (a killed process, a full disk, a flaky mount): the stage resumes from what it persisted.
    Not a refused input (exit status 2): the same input is refused again, three times over."""
    return not (isinstance(state.data, StageFailed) and state.data.bad_input)


def failure_cause(lines: list[str], status: int) -> tuple[str, bool]:
    """(the line that says why a stage failed, whether it was refused input) from its output."""
    ours = [line for line in lines if line.startswith("error: ")]
    dvc = [line for line in lines if line.startswith("ERROR: ")]
    # DVC relays the command's status as "..., exited with 2"; 2 is what our commands exit with on bad input.
    refused = any(line.rstrip().endswith("exited with 2") for line in dvc)
    if ours:
        return ours[-1], refused
    if dvc:
        return dvc[-1], refused
    return f"dvc repro exited with status {status}", False


def stage_env(env: dict[str, str] | None) -> dict[str, str]:
    """This process's environment, this interpreter's folder first on PATH (the stages' `evopress`), and `env`."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}


def stream(cmd: list[str], project: Path, env: dict[str, str], logger) -> tuple[int, list[str], bool]:
    """Run `cmd`, each output line into the log as it comes (a long search shows its progress live); returns the
    exit status, the last 200 lines (enough to find a failure's cause, bounded for a long search) and whether
    DVC said it ran a stage."""
    proc = subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    tail: list[str] = []
    ran = False
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            ran = ran or line.startswith(RAN_MARK)
            tail = [*tail[-199:], line]
            logger.info(line)
    return proc.wait(), tail, ran


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=worth_retrying, task_run_name="stage {stage}")
def run_stage(stage: str, project: str, env: dict[str, str] | None = None) -> bool:
    """Reproduce one stage; returns whether DVC ran it (False: it was up to date)."""
    logger = get_run_logger()
    cmd = [dvc_executable(), "repro", "--single-item", stage]
    status, tail, ran = stream(cmd, Path(project), stage_env(env), logger)
    if status != 0:
        raise StageFailed(stage, *failure_cause(tail, status))
    return ran


@task(task_run_name="check params")
def check_params(project: str) -> None:
    """The params file against its schema, before any stage starts (a bad key fails here in one line)."""
    from evopress import params as P

    P.load(Path(project) / "params.yaml")


@task(task_run_name="mlflow parent run")
def open_pipeline_run(project: str, name: str, stages: list[str] | None = None) -> str | None:
    """Open the parent run and one SCHEDULED run per stage: `stages` (`dvc stage list`), else the Layout's
    stages for the params' methods; both in pipeline order."""
    from evopress import params as P

    p = P.load(Path(project) / "params.yaml")
    if not p.tracking.enabled:
        return None
    from evopress import tracking
    from evopress.layout import stage_labels

    stages = list(stages) if stages is not None else stage_labels(list(p.methods))
    flat = P.flatten(P.as_dict(p))
    return tracking.start_pipeline_run(p.tracking, Path(project), flat, name=name, stages=stages)


@task(task_run_name="mlflow close parent run")
def close_pipeline_run(
    project: str,
    run_id: str | None,
    status: str,
    table_md: str | None,
    stages: list[str] = (),
    skipped: list[str] | None = None,
) -> None:
    """End the parent run; its description lists `stages` (dvc.yaml order) with the run behind each. The runs of
    `skipped` stages (DVC found them up to date) close as FINISHED, tagged `evopress.skipped`."""
    if run_id is None:
        return
    from evopress import params as P
    from evopress import tracking

    p = P.load(Path(project) / "params.yaml")
    tracking.end_pipeline_run(p.tracking, Path(project), run_id, status, table_md, list(stages), skipped)
