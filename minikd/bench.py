"""Benchmark the fused softmax-KL (loss + student gradient) against the reference, PyTorch eager,
and the memory-bandwidth floor: 12 bytes per float32 element (read s, read t, write grad) over
the measured copy bandwidth of this machine.

    minikd bench                  # or: python benchmarks/softmax_kl.py
    minikd bench --quick          # fewer repeats

CPU shapes keep the issue's C and scale the rows down so one call stays below ~1 s.

Correctness is checked against the float64 reference before anything is timed; each time is the
median of repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from .losses import kd_loss_and_grad
from .kernels import softmax_kl

# the shapes; on the CPU the rows are scaled down so that one call stays below ~1 s
SHAPES = [(65536, 10), (65536, 100), (16384, 1000), (4096, 32000), (2048, 128256)]
CPU_ROWS = {10: 65536, 100: 65536, 1000: 4096, 32000: 256, 128256: 64}


def median_time(fn, repeats):
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


def torch_kd_loss(torch, T, alpha):
    """The same KD loss as a PyTorch user writes it (computed in float32 whatever the input dtype):
    the comparison both benchmarks time, forward + backward."""
    F = torch.nn.functional

    def loss_fn(S, Tt, Y):
        kl = F.kl_div(F.log_softmax(S.float() / T, -1), F.log_softmax(Tt.float() / T, -1), log_target=True,
                      reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(S.float(), Y)
    return loss_fn


def torch_eager(s, t, y, T, alpha):
    import torch  # noqa: PLC0415
    loss_fn = torch_kd_loss(torch, T, alpha)
    S = torch.from_numpy(s).requires_grad_(True)
    Tt, Y = torch.from_numpy(t), torch.from_numpy(y)

    def run():
        S.grad = None
        loss = loss_fn(S, Tt, Y)
        loss.backward()
        return loss
    return run


def add_arguments(ap):
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark: CuPy kernel, PyTorch eager and "
                    "torch.compile, float32 and bfloat16, full-size shapes (needs CuPy and a CUDA GPU)")
    ap.add_argument("--out", default="benchmarks/results", help="where the JSON and PNG go (default benchmarks/results)")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of a results JSON (CPU or GPU) next to it")
    ap.add_argument("--compile-budget", type=float, default=240.0, metavar="S",
                    help="GPU: seconds of torch.compile timing in all; later shapes skip it (default 240)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args):
    if getattr(args, "plot", None):
        print(f"wrote {plot_results(args.plot)}")
        return 0
    if getattr(args, "gpu", False):
        from .bench_gpu import run_gpu  # noqa: PLC0415
        return run_gpu(args)
    return run_cpu(args)


def run_cpu(args):
    repeats = 3 if args.quick else 7
    try:
        import torch  # noqa: PLC0415
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch = None
    bw = copy_bandwidth()
    machine = f"cpu-{platform.machine()}-{__import__('os').cpu_count()}cores"
    print(f"machine {machine}; copy bandwidth {bw / 1e9:.2f} GB/s" +
          (f"; torch threads {torch_threads}" if torch else ""))
    print(f"{'shape':>16} {'floor ms':>9} {'numpy ms':>9} {'numba ms':>9} {'torch ms':>9} "
          f"{'numba %floor':>12} {'vs numpy':>9} {'vs torch':>9}")
    T, alpha = 4.0, 0.9
    cases = []
    for _, C in SHAPES:
        N = CPU_ROWS[C]
        rng = np.random.default_rng(0)
        s = (rng.standard_normal((N, C)) * 3).astype(np.float32)
        t = (rng.standard_normal((N, C)) * 3).astype(np.float32)
        y = rng.integers(0, C, N)
        # correctness first: the kernel against the float64 reference on a slice
        k = min(N, 256)
        ref_l, ref_g = kd_loss_and_grad(s[:k].astype(np.float64), t[:k].astype(np.float64), y[:k], T=T, alpha=alpha)
        kl, kg = softmax_kl(s[:k], t[:k], y[:k], T=T, alpha=alpha, backend="numba")
        assert abs(kl - ref_l) <= 1e-5 * abs(ref_l) and np.abs(kg - ref_g).max() <= 1e-5 * np.abs(ref_g).max()
        cases.append((s, t, y, {"N": N, "C": C, "dtype": "float32", "floor_ms": 1e3 * 12 * s.size / bw}))
    # one implementation at a time over all shapes: PyTorch's OpenMP workers spin after each call
    # and would steal the cores from whatever is timed right after them
    for s, t, y, r in cases:
        out = np.empty_like(s)
        r["numba_ms"] = 1e3 * median_time(lambda: softmax_kl(s, t, y, T=T, alpha=alpha, out=out, backend="numba"),
                                          repeats)
    for s, t, y, r in cases:
        r["numpy_ms"] = 1e3 * median_time(lambda: kd_loss_and_grad(s, t, y, T=T, alpha=alpha), max(3, repeats // 2))
    if torch is not None:
        for s, t, y, r in cases:
            r["torch_eager_ms"] = 1e3 * median_time(torch_eager(s, t, y, T, alpha), repeats)
    rows = [r for *_, r in cases]
    for r in rows:
        N, C = r["N"], r["C"]
        r["numba_pct_floor"] = 100 * r["floor_ms"] / r["numba_ms"]
        print(f"{f'({N}, {C})':>16} {r['floor_ms']:>9.2f} {r['numpy_ms']:>9.2f} {r['numba_ms']:>9.2f} "
              f"{r.get('torch_eager_ms', float('nan')):>9.2f} {r['numba_pct_floor']:>11.1f}% "
              f"{r['numpy_ms'] / r['numba_ms']:>8.1f}x {r.get('torch_eager_ms', float('nan')) / r['numba_ms']:>8.1f}x")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "processor": platform.processor(), "copy_bandwidth_GBps": bw / 1e9,
              "T": T, "alpha": alpha, "rows": rows, "date": time.strftime("%Y-%m-%d")}
    (out_dir / f"softmax_kl-{machine}.json").write_text(json.dumps(result, indent=1))
    from .plots import benchmark_cpu  # noqa: PLC0415
    benchmark_cpu(result, out_dir / f"softmax_kl-{machine}.png")
    print(f"wrote {out_dir}/softmax_kl-{machine}.json and .png")
    return 0


def plot_results(json_path) -> Path:
    """Draw the PNG of a results JSON (CPU or GPU) next to it; returns the PNG's path."""
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    png = json_path.with_suffix(".png")
    from .plots import benchmark_cpu, benchmark_gpu  # noqa: PLC0415
    (benchmark_gpu if "device" in result else benchmark_cpu)(result, png)
    return png


if __name__ == "__main__":
    main()
