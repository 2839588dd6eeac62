"""Independent stages at once (`python -m flows.compress run --parallel N`), with DVC still the source of truth.

Why not N `dvc repro` processes: DVC holds its repository lock for the whole of a `dvc repro`, command included,
so a second one in the workspace fails at once ("Unable to acquire lock"). DVC's experiment queue (`dvc exp run
--queue`, `dvc queue start --jobs N`) runs whole pipelines side by side in temporary copies of the workspace, which
parallelises experiments, not the stages of one pipeline, and leaves results to be applied back. One workspace per
method would split one dvc.lock into several.

What this does instead is what DVC documents for a command run by hand: run the stage's command, then
`dvc commit` it. DVC keeps deciding, and recording, everything:
1. the stage graph comes from DVC (`Repo.index.graph`); a stage starts once every stage it depends on is done;
2. `dvc status <stage>` decides whether it runs (up to date: skipped, as `dvc repro` would);
3. its outputs that are not `persist: true` are removed, as `dvc repro` removes them;
4. its command (dvc.yaml's `cmd`, as DVC resolves it) runs with no DVC lock held: this is the part that overlaps;
5. `dvc commit --force <stage>` records its dependencies' and outputs' hashes in dvc.lock.
Every DVC call (steps 2, 3, 5) holds one file lock of this workspace, so DVC never runs twice at once; a
stage's own command can read dvc.lock only between such calls' writes. At the end `dvc status` is clean, exactly
as after `dvc repro`, and a later `dvc repro` finds nothing to do.

Prefect runs each stage as a task on its default thread-pool task runner: a task only waits on its stage's
process, so threads are enough, and retries and logs are Prefect's as in the sequential flow (tasks/stages.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from tasks.stages import StageFailed, dvc_executable, failure_cause, stage_env, stream, worth_retrying

DVC_LOCK = ".evopress-dvc.lock"


@dataclass(frozen=True)
class StagePlan:
    """What the scheduler needs of a stage: its command, the stages it waits for, what to remove first."""

    name: str
    cmd: str
    after: frozenset[str]
    removed_before_run: tuple[str, ...]  # outputs that are not persist: true (paths relative to the project)


def stage_plans(project: Path) -> dict[str, StagePlan]:
    """Every stage of dvc.yaml (foreach expanded) with its upstream stages, in dvc.yaml order."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        graph = repo.index.graph  # edges go from a stage to the stages it depends on
        plans = {}
        for stage in repo.index.stages:
            cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
            removed = tuple(os.path.relpath(o.fs_path, project) for o in stage.outs if not o.persist)
            after = frozenset(s.name for s in graph.successors(stage))
            plans[stage.name] = StagePlan(stage.name, cmd, after, removed)
    return plans


@contextlib.contextmanager
def dvc_turn(project: Path):
    """One DVC call at a time in this workspace (DVC's own lock would make a second one fail, not wait)."""
    fd = os.open(Path(project) / DVC_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def dvc(project: Path, *args: str) -> str:
    with dvc_turn(project):
        res = subprocess.run([dvc_executable(), *args], cwd=project, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {res.stderr.strip().splitlines()[-1:]}")
    return res.stdout


def needs_run(project: Path, stage: str) -> bool:
    """What `dvc repro` asks first: has the stage, its params, dependencies or outputs changed?"""
    return bool(json.loads(dvc(project, "status", "--json", stage) or "{}"))


def remove(project: Path, paths: tuple[str, ...]) -> None:
    for rel in paths:
        path = Path(project) / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=worth_retrying, task_run_name="stage {plan.name}")
def run_stage_beside(plan: StagePlan, project: str, env: dict[str, str] | None = None) -> bool:
    """Run one stage's command outside `dvc repro` (others may run beside it), then `dvc commit` it; returns
    whether it ran (False: `dvc status` found it up to date)."""
    logger = get_run_logger()
    root = Path(project)
    if not needs_run(root, plan.name):
        logger.info(f"Stage '{plan.name}' didn't change, skipping")
        return False
    remove(root, plan.removed_before_run)
    logger.info(f"Running stage '{plan.name}':\n> {plan.cmd}")
    status, tail, _ = stream(["bash", "-c", plan.cmd], root, stage_env(env), logger)
    if status != 0:
        cause, refused = failure_cause(tail, status)
        raise StageFailed(plan.name, cause, refused or status == 2)
    dvc(root, "commit", "--force", plan.name)
    return True
