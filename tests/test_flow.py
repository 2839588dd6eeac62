"""The flow's own guards, without running the pipeline: one flow per workspace, and the recompression schedule."""

from __future__ import annotations

import threading
import time

import pytest

from flows.compress import WorkspaceBusy, recompress_deployment, workspace_lock


def test_a_second_flow_in_the_same_workspace_refuses_clearly(tmp_path):
    with workspace_lock(tmp_path):
        with pytest.raises(WorkspaceBusy, match="another evopress flow is running") as err:
            with workspace_lock(tmp_path):
                pass
        assert "--wait" in str(err.value) and "\n" not in str(err.value)
    with workspace_lock(tmp_path):  # released when the first one ends
        pass


def test_a_second_flow_with_wait_runs_after_the_first(tmp_path):
    order = []
    ready = threading.Event()

    def first():
        with workspace_lock(tmp_path):
            ready.set()
            time.sleep(1.0)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    ready.wait()
    with workspace_lock(tmp_path, wait=30):
        order.append("second started")
    thread.join()
    assert order == ["first done", "second started"]


def test_the_recompression_deployment_runs_the_flow_on_its_cron(tmp_path):
    deployment = recompress_deployment("0 3 * * 0", str(tmp_path))
    assert deployment.name == "evopress-recompress"
    assert deployment.parameters == {"project": str(tmp_path)}
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 0"]


def test_a_bad_cron_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="invalid cron schedule 'every sunday'"):
        recompress_deployment("every sunday", str(tmp_path))


def test_a_failed_stage_is_named_by_its_own_error_line_and_refused_input_is_not_retried():
    from prefect.states import Failed

    from tasks.stages import StageFailed, failure_cause, worth_retrying

    out = [
        "Running stage 'search@depth':",
        "> evopress search --method depth ...",
        "error: --target 40: the model has 30 blocks; allowed: 1..29",
        "ERROR: failed to reproduce 'search@depth': failed to run: evopress search ..., exited with 2",
    ]
    cause, refused = failure_cause(out, 255)
    assert cause == out[2] and refused
    assert failure_cause(out[:2] + out[3:], 255) == (out[3], True)
    killed = ["ERROR: failed to reproduce 'search@depth': failed to run: evopress search ..., exited with -9"]
    assert failure_cause(killed, 255) == (killed[0], False)
    assert failure_cause([], 3) == ("dvc repro exited with status 3", False)
    assert str(StageFailed("evaluate", "error: x", True)) == "stage evaluate failed: error: x"
    assert not worth_retrying(None, None, Failed(data=StageFailed("s", "error: x", bad_input=True)))
    assert worth_retrying(None, None, Failed(data=StageFailed("s", "killed", bad_input=False)))
    assert worth_retrying(None, None, Failed(data=OSError("disk full")))
