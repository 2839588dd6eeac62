#!/usr/bin/env bash
# One prepared check for a machine with one GPU (e.g. the device tool's H200), at most 8 minutes:
#   1. the tests that exercise CUDA (tests/test_cuda.py: fitness and search on the GPU agree with the CPU, two Ray
#      actors sharing the GPU find the profile one process finds);
#   2. the depth search at the authors' schedule (k = 8 of 30 blocks, 117 generations of 32 offspring, survivors
#      [2, 1], tokens [2048, 32768]) on the default architecture, with 1 and with 2 Ray actors on the one GPU:
#      tokens/s, wall time and the bare-forward floor for the same tokens -> benchmarks/results/gpu_check.json.
#
# The machine has PyTorch with CUDA, transformers and typer but no network. What it lacks travels as wheels in
# .whl/ (64 MiB per call): `benchmarks/gpu_check.sh --fetch-wheels` on a machine with PyPI puts them there (Ray is
# larger than one call: it is split in two parts, sent by two consecutive calls while the machine stays warm:
# `--stage-part 1`, then the full run with part 2). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh --stage-part 1", carry=[".whl/part1"])
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl/part2"], timeout_s=540)
# Results also go to $OUT when it is set (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RAY=ray==2.60.0
STASH=/tmp/evopress-wheels

if [ "${1:-}" = "--fetch-wheels" ]; then  # here, with PyPI: wheels for the GPU image's Python 3.12
  rm -rf .whl && mkdir -p .whl/all .whl/part1 .whl/part2
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl/all \
    "$RAY" msgpack jsonschema jsonschema-specifications referencing rpds-py || exit 1
  # two parts under the 64 MiB a call carries (one, when everything fits)
  tar -C .whl/all -cf - . | split -b 60m -d - .whl/part
  mv .whl/part00 .whl/part1/
  [ -f .whl/part01 ] && mv .whl/part01 .whl/part2/
  rm -rf .whl/all
  ls -la .whl/part1 .whl/part2
  exit 0
fi

if [ "${1:-}" = "--stage-part" ]; then  # on the GPU machine: keep part 1 until the next call brings part 2
  mkdir -p "$STASH" && cp .whl/part1/* "$STASH"/ && ls -la "$STASH"
  exit 0
fi

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
[ -f .whl/part1/part00 ] && mkdir -p "$STASH" && cp .whl/part1/part00 "$STASH"/  # everything in one call
if [ -f "$STASH/part00" ]; then
  cat "$STASH"/part00 .whl/part2/part01 2>/dev/null | tar -C "$STASH" -xf - && \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STASH"/*.whl && \
    export PYTHONPATH=/tmp/site || log "wheels did not install: Ray runs will fail"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"

log "CUDA tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -15 | tee "$OUTDIR/gpu_tests.txt"

log "depth search at the authors' schedule, 1 and 2 actors"
timeout 300 "$PY" benchmarks/gpu_search.py --out "$OUTDIR/gpu_check.json" --actors 1,2
status=$?
[ "$OUTDIR" != benchmarks/results ] && cp "$OUTDIR/gpu_check.json" benchmarks/results/ 2>/dev/null
log "done (status $status)"
exit $status
