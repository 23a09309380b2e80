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
    """(bytes per second, threads, {"plain": ..., "streamed": ...}): a copy (read + write) by Numba's
    prange on as many threads as the fused kernel runs (``numba.get_num_threads()``), on a buffer far
    larger than the caches, twice: with plain stores, and with the non-temporal stores the fused
    kernel streams its gradient with (``minikd.kernels.stream``; no read for ownership). The faster
    of the two is the floor a multi-threaded kernel is measured against (the single-thread
    ``copy_bandwidth`` beside it): a kernel that streams must be measured against a copy that may
    stream too. The two runs alternate, median of ``repeats`` each."""
    import numba  # noqa: PLC0415
    from minikd.kernels.stream import store_fence, stream_row  # noqa: PLC0415

    @numba.njit(parallel=True, cache=False)
    def plain(a, b):
        for i in numba.prange(a.size):
            b[i] = a[i]

    @numba.njit(parallel=True, cache=False)
    def streamed(a2, b2):   # rows of 1 MiB, each by stream_row, a fence after each thread's rows
        per = -(-a2.shape[0] // numba.get_num_threads())
        for k in numba.prange(numba.get_num_threads()):
            for i in range(k * per, min(a2.shape[0], (k + 1) * per)):
                stream_row(b2, np.uint64(i), 0, a2.shape[1], a2[i])
            store_fence()
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    a2, b2 = a.reshape(-1, 1 << 18), b.reshape(-1, 1 << 18)
    times = {"plain": [], "streamed": []}
    runs = {"plain": lambda: plain(a, b), "streamed": lambda: streamed(a2, b2)}
    for name, fn in runs.items():   # compile and warm up; each copies exactly
        b[:] = 0
        fn()
        assert np.array_equal(a, b), name
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    each = {name: 2 * a.nbytes / statistics.median(ts) for name, ts in times.items()}
    return max(each.values()), numba.get_num_threads(), each


def torch_kd_loss(torch, T, alpha):
    """The same KD loss as a PyTorch user writes it (computed in float32 whatever the input dtype):
    the comparison both kernel benchmarks time, forward + backward."""
    F = torch.nn.functional

    def loss_fn(S, Tt, Y):
        kl = F.kl_div(F.log_softmax(S.float() / T, -1), F.log_softmax(Tt.float() / T, -1), log_target=True,
                      reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(S.float(), Y)
    return loss_fn
