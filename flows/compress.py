"""The main flow: run the DVC stage graph in order, with retries, a progress artifact and a results table.

    python -m flows.compress run                  # the whole pipeline now (what `make run` does)
    python -m flows.compress run --parallel 2     # independent stages (e.g. two methods' searches) at once
    python -m flows.compress serve --cron "0 3 * * 0"   # recompress every Sunday 03:00 (long-running process)
    python -m flows.compress deploy --pool evopress-gpu --cron "0 3 * * 0"   # a deployment on a work pool

Works with no Prefect server (a temporary local one starts with the flow) and against a server
(`prefect config set PREFECT_API_URL=...`). DVC decides what to run: an unchanged stage is skipped in a second,
a stage killed mid-way resumes (databases and searches persist their partial work) and its task retries.

One workspace, one flow: a lock file (`.evopress.lock`) is held for the whole run; a second flow started in the
same workspace refuses at once with a clear message (or waits, with `--wait SECONDS`). DVC's own repo lock would
stop a second `dvc repro` too, but mid-way and less clearly.

GPU hosts: create a process work pool and start one worker per GPU, each seeing one device and owning its own clone
of the project (one workspace per worker, because of the lock above):

    prefect work-pool create evopress-gpu --type process
    python -m flows.compress deploy --pool evopress-gpu --cron "0 3 * * 0"
    (cd clone0 && CUDA_VISIBLE_DEVICES=0 prefect worker start --pool evopress-gpu --limit 1) &
    (cd clone1 && CUDA_VISIBLE_DEVICES=1 prefect worker start --pool evopress-gpu --limit 1) &
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
import time
from pathlib import Path

# A busy machine starts the temporary local Prefect server slower than the default 20 s allow.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# No telemetry from the temporary server (hosts without internet log an error for each attempt).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact  # noqa: E402

from tasks.stages import check_params, close_pipeline_run, list_stages, open_pipeline_run, run_stage  # noqa: E402

LOCK_FILE = ".evopress.lock"
PROJECT = Path(__file__).resolve().parents[1]


class WorkspaceBusy(RuntimeError):
    pass


@contextlib.contextmanager
def workspace_lock(project: Path, wait: float = 0.0):
    """Hold an exclusive lock on the workspace; refuse (or wait up to `wait` seconds) if another flow holds it."""
    path = project / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = path.read_text().strip() or "unknown"
                    raise WorkspaceBusy(
                        f"another evopress flow is running in {project} ({holder}); "
                        "wait for it to finish or start this one with --wait SECONDS"
                    ) from None
                time.sleep(2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock (also when the process dies)


def results_table(project: Path) -> tuple[list[dict], str]:
    from evopress.layout import Layout
    from evopress.report import load_metrics, markdown, table_rows

    rows = table_rows(load_metrics(Layout(project).metrics))
    return rows, markdown(rows)


def run_in_order(root: Path, stages: list[str], env: dict, progress) -> tuple[list[str], list[str]]:
    """`dvc repro` of each stage in dvc.yaml order, one at a time (the default); returns (ran, skipped)."""
    ran, skipped = [], []
    for i, stage in enumerate(stages):
        t0 = time.monotonic()
        (ran if run_stage(stage, str(root), env) else skipped).append(stage)
        print(f"[{i + 1}/{len(stages)}] {stage}: {time.monotonic() - t0:.0f} s")
        update_progress_artifact(progress, 100.0 * (i + 1) / len(stages))
    return ran, skipped


def run_side_by_side(root: Path, env: dict, parallel: int, progress) -> tuple[list[str], list[str], dict]:
    """Up to `parallel` stages at once, each as soon as the stages it depends on are done (tasks/parallel_stages.py:
    the stage's command, then `dvc commit`); returns (ran, skipped) in the order they finished, and each stage's
    (start, end) in seconds since the first started. A failed stage fails the flow once the others running finish
    (their commits complete, so dvc.lock records everything that was done)."""
    from prefect.futures import as_completed

    from tasks.parallel_stages import run_stage_beside, stage_plans

    plans = stage_plans(root)
    done: set[str] = set()
    ran, skipped, running, spans = [], [], {}, {}
    t0 = time.monotonic()
    while len(done) < len(plans):
        for name, plan in plans.items():
            if name not in done and name not in running and plan.after <= done and len(running) < parallel:
                spans[name] = [time.monotonic() - t0, None]
                running[name] = run_stage_beside.submit(plan, str(root), env)
        finished = next(as_completed(list(running.values())))
        name = next(n for n, f in running.items() if f is finished)
        del running[name]
        spans[name][1] = time.monotonic() - t0
        try:
            (ran if finished.result() else skipped).append(name)
        except BaseException:
            for other in running.values():
                other.wait()
            raise
        done.add(name)
        print(f"[{len(done)}/{len(plans)}] {name}: {spans[name][1] - spans[name][0]:.0f} s")
        update_progress_artifact(progress, 100.0 * len(done) / len(plans))
    return ran, skipped, spans


@flow(name="evopress-compress", log_prints=True)
def compress(project: str = str(PROJECT), wait: float = 0.0, lock: bool = True, parallel: int = 1) -> dict:
    """Reproduce every DVC stage (one at a time, or up to `parallel` independent ones at once); end with the
    results table.

    `lock=False`: the caller already holds the workspace lock (`main` takes it before Prefect starts)."""
    root = Path(project).resolve()
    with workspace_lock(root, wait) if lock else contextlib.nullcontext():
        check_params(str(root))
        stages = list_stages(root)
        print(f"{len(stages)} stages: {', '.join(stages)}")
        name = f"pipeline {time.strftime('%Y-%m-%d %H:%M')}"
        run_id = open_pipeline_run(str(root), name=name, stages=stages)  # and a scheduled run per stage
        env = {"EVOPRESS_MLFLOW_PARENT_RUN": run_id} if run_id else {}
        progress = create_progress_artifact(0.0, key="evopress-progress", description="stages done, %")
        ran, skipped, status, table_md, spans = [], [], "FAILED", None, {}
        try:
            if parallel > 1:
                ran, skipped, spans = run_side_by_side(root, env, parallel, progress)
            else:
                ran, skipped = run_in_order(root, stages, env, progress)
            rows, table_md = results_table(root)
            create_table_artifact(
                rows, key="evopress-results", description="held-out results of every profile"
            )
            status = "FINISHED"
        finally:
            close_pipeline_run(str(root), run_id, status, table_md, stages, skipped)
    print(table_md)
    if run_id:
        from evopress import params as P
        from evopress import tracking

        uri, _ = tracking.uris(P.load(root / "params.yaml").tracking, root)
        print(f"MLflow runs (parent {run_id}): mlflow ui --backend-store-uri {uri}")
    return {"ran": ran, "table": rows, "mlflow_run": run_id, "spans": spans}


def recompress_deployment(cron: str, project: str):
    """The flow as a deployment on a cron schedule (served by `serve`); a bad cron string is a one-line error."""
    try:
        return compress.to_deployment(name="evopress-recompress", cron=cron, parameters={"project": project})
    except ValueError as err:
        raise SystemExit(
            f"error: invalid cron schedule {cron!r} ({err}); e.g. '0 3 * * 0' = Sundays 03:00"
        ) from None


LOG_FILE = ".evopress-flow.log"


def quiet_tracebacks(project: Path) -> Path:
    """Prefect's console shows each failure with its traceback (dozens of lines, several times); keep them in
    `<project>/.evopress-flow.log` and show one line per record on the console."""
    from prefect.logging.configuration import setup_logging

    setup_logging()  # Prefect sets its handlers up lazily; make them now so they can be filtered
    log_path = project / LOG_FILE
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("", "prefect"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_strip_traceback)
    # first among prefect's handlers: it formats the traceback before a console filter drops it
    logging.getLogger("prefect").handlers.insert(0, file_handler)
    return log_path


def _strip_traceback(record: logging.LogRecord) -> bool:
    """Drop the traceback from a console record (the file handler, added after, formats its own copy first)."""
    if record.exc_info or record.exc_text:
        record.exc_info, record.exc_text = None, None
    return True


def preflight(project: Path) -> None:
    """What can fail before Prefect starts fails here, in one line: the params file against its schema."""
    from evopress import params as P

    P.load(project / "params.yaml")


def run_now(project: str, wait: float, debug: bool, parallel: int = 1) -> None:
    """`run`: lock the workspace and check the params before Prefect starts, so a second flow or a bad
    params.yaml is one line (exit 2); a failure inside the flow prints its cause in one line (exit 1), the
    traceback only with --debug (always in the log file)."""
    from evopress.errors import UserError

    root = Path(project).resolve()
    try:
        with workspace_lock(root, wait):
            preflight(root)
            log_path = None if debug else quiet_tracebacks(root)
            try:
                compress(project=str(root), wait=wait, lock=False, parallel=parallel)
            except Exception as err:
                if debug or isinstance(err, UserError):
                    raise
                first = " ".join(str(err).split()) or type(err).__name__
                print(
                    f"error: {first} (traceback: {log_path}; rerun with --debug to print it)", file=sys.stderr
                )
                # A stage that refused its input exits 2 like the command itself; a crash exits 1.
                raise SystemExit(2 if getattr(err, "bad_input", False) else 1) from None
    except (WorkspaceBusy, UserError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.compress", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline now")
    run.add_argument("--project", default=str(PROJECT))
    run.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another flow's lock")
    run.add_argument("--debug", action="store_true", help="print Prefect's tracebacks on the console too")
    run.add_argument(
        "--parallel", type=int, default=1, help="independent stages run at once (1: in order, with dvc repro)"
    )
    serve = sub.add_parser("serve", help="serve the flow on a cron schedule (blocks)")
    serve.add_argument("--cron", default="0 3 * * 0")
    serve.add_argument("--project", default=str(PROJECT))
    deploy = sub.add_parser("deploy", help="create a deployment on a process work pool (needs a server)")
    deploy.add_argument("--pool", required=True)
    deploy.add_argument("--cron", default=None)
    args = parser.parse_args()
    if args.command == "run":
        if args.parallel < 1:
            parser.error(f"--parallel {args.parallel}: must be >= 1")
        run_now(args.project, args.wait, args.debug, args.parallel)
    elif args.command == "serve":
        from prefect import serve

        serve(recompress_deployment(args.cron, args.project))
    else:
        flow_ = compress.from_source(source=str(PROJECT), entrypoint="flows/compress.py:compress")
        flow_.deploy(name="evopress-gpu", work_pool_name=args.pool, cron=args.cron)


if __name__ == "__main__":
    main()
