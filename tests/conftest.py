import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# the benchmark scripts (benchmarks/, outside the package) import each other by file name, as they
# do when run as scripts; the tests of their harness import them the same way
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

# "ci" (the default) keeps the suite within minutes on 2 cores and draws the same examples on every
# run (derandomized: a submission's CI cannot fail on a case no one has seen); "thorough" draws
# 1000 fresh random examples per property for a long local search.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# MINIKD_EMULATED_GPU=1 python -m pytest tests/test_kernels_gpu.py runs the GPU tests on the CPU
# emulator of tests/cuda_emu through the stand-in cupy of tests/fake_cupy.py (about 8 minutes;
# blocks narrowed to 64 threads, since every emulated CUDA thread is an OS thread).
if os.environ.get("MINIKD_EMULATED_GPU"):
    sys.path.insert(0, os.path.dirname(__file__))
    import fake_cupy

    _fake = fake_cupy.make_module()
    sys.modules.update({"cupy": _fake, "cupy.cuda": _fake.cuda})   # not cupy.cuda.driver: see fake_cupy.install
    import minikd.kernels.cupy_gpu as _gpu

    _gpu.BLOCK_THREADS = _gpu.CLUSTER_THREADS = 64
    _gpu.FEW_ROWS_THREADS = {4: 64, 2: 64}
