"""Work killed with SIGKILL (no chance to clean up) resumes and loses nothing: a search ends at exactly the profile
of an uninterrupted run, keeping the generations finished before the kill as they were; a level database build ends
with every file identical to an uninterrupted build's, keeping the files written before the kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import prepare_tiny_workspace

EVOPRESS = [str(Path(sys.executable).parent / "evopress")]  # the installed command
GENERATIONS = 100


def search_args(root: Path, out: Path) -> list[str]:
    return [
        *EVOPRESS,
        "search",
        "--method", "depth",
        "--model", str(root / "model"),
        "--data", str(root / "text"),
        "--target", "1",
        "--generations", str(GENERATIONS),
        "--offspring", "2",
        "--survivors", "1,1",
        "--tokens", "32,64",
        "--initially-generated", "2",
        "--initial-tokens", "64",
        "--topk", "0",
        "--dtype", "float32",
        "--out", str(out),
    ]  # fmt: skip


def history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


def test_a_killed_search_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path):
    root = prepare_tiny_workspace(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut, full = tmp_path / "cut", tmp_path / "full"
    proc = subprocess.Popen(
        search_args(root, cut), env=env, start_new_session=True, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    generation = 0
    while generation < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
        try:
            generation = json.loads((cut / "checkpoint.json").read_text())["generation"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the search ended before it could be killed"
    # checkpoint.json is the record (history.csv is rewritten from it and may lag it by the generation being saved)
    before = json.loads((cut / "checkpoint.json").read_text())["history"]
    assert 3 <= len(before) < GENERATIONS

    for out in (cut, full):
        subprocess.run(search_args(root, out), env=env, check=True, capture_output=True)
    resumed, uninterrupted = (
        json.loads((cut / "profile.json").read_text()),
        json.loads((full / "profile.json").read_text()),
    )
    assert resumed["units"] == uninterrupted["units"] and resumed["fitness"] == uninterrupted["fitness"]
    after = json.loads((cut / "checkpoint.json").read_text())["history"]
    assert [r["generation"] for r in after] == list(range(1, GENERATIONS + 1))
    assert after[: len(before)] == before  # the finished generations are kept, not redone
    assert [int(r["generation"]) for r in history(cut)] == list(range(1, GENERATIONS + 1))
    full_history = json.loads((full / "checkpoint.json").read_text())["history"]
    assert [r["fitness"] for r in after] == [r["fitness"] for r in full_history]


def build_args(root: Path, out: Path) -> list[str]:
    return [
        *EVOPRESS, "build-db", "--method", "quantization",
        "--model", str(root / "model"), "--data", str(root / "text"), "--out", str(out),
        "--option", "bits=2,3,4,5,6,7,8", "--option", "n_samples=8", "--option", "group_size=32",
    ]  # fmt: skip


def recorded(db: Path) -> dict:
    try:
        return json.loads((db / "manifest.json").read_text())["files"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def test_a_killed_database_build_resumes_to_the_files_of_an_uninterrupted_one(tmp_path):
    root = prepare_tiny_workspace(tmp_path, hidden=256)  # 2 blocks x 7 linears x 7 bit-widths = 98 files
    # one thread: GPTQ's sums in one order, so the files are equal bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut, full = tmp_path / "cut", tmp_path / "full"
    proc = subprocess.Popen(build_args(root, cut), env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(recorded(cut)) < 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build ended before it could be killed"
    before = recorded(cut)
    assert 10 <= len(before) < 98

    for out in (cut, full):
        subprocess.run(build_args(root, out), env=env, check=True, capture_output=True)
    resumed, uninterrupted = recorded(cut), recorded(full)
    assert len(resumed) == 98 and resumed == uninterrupted  # sizes and sha256 of every file
    assert all(resumed[key] == entry for key, entry in before.items())  # kept, not redone differently
    assert json.loads((cut / "manifest.json").read_text())["complete"]
