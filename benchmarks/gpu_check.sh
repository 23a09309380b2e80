#!/usr/bin/env bash
# The one device run issue 7 needs (prepared without a GPU; see the issue notes). On the lent
# machine (CuPy, PyTorch, Triton present), from the repository root:
#   bash benchmarks/gpu_check.sh            # results under $OUT (or benchmarks/results)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import cupy, ml_dtypes; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)['name'])"
python -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
python -m minikd.cli bench --gpu --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
