"""What every benchmark script here shares: the shapes, the timer, the memory floor's copy bandwidth,
the PyTorch formulation of the KD loss, and where results go.

Benchmarks are scripts, never tests, and ``minikd`` never imports them. Results go to
``--out`` (default ``bench-out/``, ignored by git); committed results are written only when asked:
``--out benchmarks/results``.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

# the shapes; on the CPU the rows are scaled down so that one call stays below ~1 s
SHAPES = [(65536, 10), (65536, 100), (16384, 1000), (4096, 32000), (2048, 128256)]
CPU_ROWS = {10: 65536, 100: 65536, 1000: 8192, 32000: 512, 128256: 128}   # issue 16's CPU shapes
DEFAULT_OUT = "bench-out"
T, ALPHA = 4.0, 0.9


def add_out_argument(ap):
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"where the JSON and PNG go (default {DEFAULT_OUT}/; "
                    "pass benchmarks/results to replace the committed results)")


def cpu_machine() -> str:
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def median_time(fn, repeats):
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(repeats=7, nbytes=512 << 20):
    """Bytes moved per second by np.copyto (read + write) on a buffer far larger than the caches."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    t = median_time(lambda: np.copyto(b, a), repeats)
    return 2 * a.nbytes / t


def parallel_copy_bandwidth(repeats=7, nbytes=512 << 20):
    """(bytes per second, threads): a copy (read + write) by Numba's prange on as many threads as the
    fused kernel runs (``numba.get_num_threads()``), on a buffer far larger than the caches: the floor a
    multi-threaded kernel is measured against (the single-thread ``copy_bandwidth`` beside it)."""
    import numba  # noqa: PLC0415

    @numba.njit(parallel=True, cache=False)
    def pcopy(a, b):
        for i in numba.prange(a.size):
            b[i] = a[i]
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    t = median_time(lambda: pcopy(a, b), repeats)
    assert np.array_equal(a, b)
    return 2 * a.nbytes / t, numba.get_num_threads()


def torch_kd_loss(torch, T, alpha):
    """The same KD loss as a PyTorch user writes it (computed in float32 whatever the input dtype):
    the comparison both kernel benchmarks time, forward + backward."""
    F = torch.nn.functional

    def loss_fn(S, Tt, Y):
        kl = F.kl_div(F.log_softmax(S.float() / T, -1), F.log_softmax(Tt.float() / T, -1), log_target=True,
                      reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(S.float(), Y)
    return loss_fn
