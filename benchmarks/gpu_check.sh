#!/usr/bin/env bash
# The one device run issue 7 needs (prepared in a session without a GPU; see the issue notes).
# On the lent machine (CuPy, PyTorch, Triton present), from the repository root:
#   bash benchmarks/gpu_check.sh            # results under $OUT (or benchmarks/results)
# minikd itself needs only NumPy to import. The tests need pytest and hypothesis; if the machine
# lacks them, fetch wheels here first (pure Python, any platform) and carry the folder `.whl`:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl pytest pluggy iniconfig packaging hypothesis \
#       sortedcontainers attrs ml_dtypes --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ] && ! python -c "import pytest, hypothesis" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import cupy, ml_dtypes; print('cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py tests/test_cuda_source.py 2>&1 | tee "$OUT/gpu_tests.log"
python -m minikd.cli bench --gpu --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
