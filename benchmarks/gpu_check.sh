#!/usr/bin/env bash
# The prepared device run: the GPU tests, then the GPU benchmark (first run: NVIDIA H200, 2026-11-28).
# On the lent machine (CuPy, PyTorch, Triton present), from the repository root:
#   bash benchmarks/gpu_check.sh            # results under $OUT (or bench-out/)
# Steps, each with its own time limit so that one stuck step cannot spend the device budget:
#   1. tests/test_kernels_gpu.py: every kernel family, option and dtype
#      against the float64 reference, in place, repeatability, errors  (~2 min, NVRTC compile included)
#   2. benchmarks/softmax_kl.py --gpu: every shape in float32 and bfloat16, every kernel variant, the whole call,
#      PyTorch eager and torch.compile (within --compile-budget)  (~5 min); the JSON is rewritten after
#      each shape, so a cut-short run keeps what it measured.
# minikd itself needs only NumPy to import; run from the checkout without installing, minikd.kernels is
# the top-level kernels/ folder (minikd/__init__.py finds it). The tests need pytest, hypothesis and ml_dtypes: the lent
# machines' image has them (with cupy-cuda13x 14.2 and PyTorch, under its `python3`; the device tool's
# KINDS.md). Only if a machine lacks them, fetch wheels here first and carry the folder `.whl`:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl pytest pluggy iniconfig packaging hypothesis \
#       sortedcontainers attrs ml_dtypes --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp
set -uo pipefail
# `python3`: on the lent machines a plain `python` may be absent or another interpreter than the one
# holding CuPy and PyTorch; PYTHON overrides
PY=${PYTHON:-python3}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if [ -d .whl ] && ! "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import cupy, ml_dtypes; print('cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TEST_LIMIT:-200} "$PY" -m pytest -q --maxfail=10 -rf -p no:cacheprovider tests/test_kernels_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.log"
timeout ${BENCH_LIMIT:-330} "$PY" benchmarks/softmax_kl.py --gpu --compile-budget ${COMPILE_BUDGET:-120} --out "$OUT" \
    2>&1 | tee "$OUT/gpu_bench.log"
