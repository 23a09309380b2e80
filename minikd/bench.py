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


def torch_eager(s, t, y, T, alpha):
    import torch  # noqa: PLC0415
    F = torch.nn.functional
    S = torch.from_numpy(s).requires_grad_(True)
    Tt, Y = torch.from_numpy(t), torch.from_numpy(y)

    def run():
        S.grad = None
        kl = F.kl_div(F.log_softmax(S / T, -1), F.log_softmax(Tt / T, -1), log_target=True, reduction="batchmean")
        loss = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(S, Y)
        loss.backward()
        return loss
    return run


def add_arguments(ap):
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark: CuPy kernel, PyTorch eager and "
                    "torch.compile, float32 and bfloat16, full-size shapes (needs CuPy and a CUDA GPU)")
    ap.add_argument("--out", default="benchmarks/results", help="where the JSON and PNG go (default benchmarks/results)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args):
    if getattr(args, "gpu", False):
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
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"({r['N']},{r['C']})" for r in rows]
    x = np.arange(len(rows))
    for i, (key, name) in enumerate([("floor_ms", "memory floor"), ("numba_ms", "Numba kernel"),
                                     ("numpy_ms", "NumPy reference"), ("torch_eager_ms", "PyTorch eager")]):
        if key in rows[0]:
            ax.bar(x + (i - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=name)
    ax.set_xticks(x, labels)
    ax.set(yscale="log", ylabel="ms per call (median)", title=f"softmax-KL loss + gradient, float32, {machine}")
    ax.legend()
    fig.savefig(out_dir / f"softmax_kl-{machine}.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out_dir}/softmax_kl-{machine}.json and .png")
    return 0


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- GPU

def _gpu_time_ms(fn, repeats, flush):
    """Median of CUDA-event timings; the L2 cache is flushed (a large write) before each repeat."""
    import cupy  # noqa: PLC0415
    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        flush()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def run_gpu(args):
    """Full-size shapes, float32 and bfloat16: the CuPy kernel, PyTorch eager forward+backward and
    torch.compile(dynamic=False), against 12 (float32) / 6 (bfloat16) bytes per element over the
    device-to-device copy bandwidth measured in the same run. Correctness is checked first."""
    import cupy  # noqa: PLC0415
    import ml_dtypes  # noqa: PLC0415
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        torch = None
    repeats = 5 if args.quick else 20
    flush_buf = cupy.empty(256 << 20, cupy.uint8)

    def flush():
        flush_buf.fill(0)
    a = cupy.ones(1 << 28, cupy.float32)   # 1 GiB
    b = cupy.empty_like(a)
    copy_ms = _gpu_time_ms(lambda: cupy.copyto(b, a), repeats, flush)
    bw = 2 * a.nbytes / (copy_ms * 1e-3)
    del a, b
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    machine = "gpu-" + "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
    print(f"{name}: device copy bandwidth {bw / 1e12:.2f} TB/s")
    T, alpha = 4.0, 0.9
    rows = []
    for dtype in ("float32", "bfloat16"):
        npdt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        bytes_per = 12 if dtype == "float32" else 6
        for N, C in SHAPES:
            rng = np.random.default_rng(0)
            s = cupy.asarray((rng.standard_normal((N, C)) * 3).astype(npdt))
            t = cupy.asarray((rng.standard_normal((N, C)) * 3).astype(npdt))
            y = cupy.asarray(rng.integers(0, C, N))
            k = min(N, 64)
            ref_l, ref_g = kd_loss_and_grad(cupy.asnumpy(s[:k]).astype(np.float64), cupy.asnumpy(t[:k]).astype(np.float64),
                                            cupy.asnumpy(y[:k]), T=T, alpha=alpha)
            kl, kg = softmax_kl(s[:k], t[:k], y[:k], T=T, alpha=alpha, backend="cupy")
            tol = 1e-5 if dtype == "float32" else 1e-2
            assert abs(float(kl) - ref_l) <= 1e-5 * abs(ref_l)
            assert np.abs(cupy.asnumpy(kg).astype(np.float64) - ref_g).max() <= tol * np.abs(ref_g).max()
            out = cupy.empty_like(s)
            r = {"N": N, "C": C, "dtype": dtype, "floor_ms": 1e3 * bytes_per * s.size / bw}
            r["cupy_ms"] = _gpu_time_ms(lambda: softmax_kl(s, t, y, T=T, alpha=alpha, out=out, backend="cupy"),
                                        repeats, flush)
            if torch is not None:
                S = torch.as_tensor(s.view(cupy.uint16) if dtype == "bfloat16" else s, device="cuda")
                if dtype == "bfloat16":
                    S = S.view(torch.bfloat16)
                Tt = torch.as_tensor(t.view(cupy.uint16) if dtype == "bfloat16" else t, device="cuda")
                if dtype == "bfloat16":
                    Tt = Tt.view(torch.bfloat16)
                Y = torch.as_tensor(y, device="cuda")
                S = S.clone().requires_grad_(True)
                F = torch.nn.functional

                def loss_fn(S, Tt, Y):
                    kl = F.kl_div(F.log_softmax(S.float() / T, -1), F.log_softmax(Tt.float() / T, -1),
                                  log_target=True, reduction="batchmean")
                    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(S.float(), Y)

                def eager():
                    S.grad = None
                    loss_fn(S, Tt, Y).backward()
                compiled_fn = torch.compile(loss_fn, dynamic=False)

                def compiled():
                    S.grad = None
                    compiled_fn(S, Tt, Y).backward()
                r["torch_eager_ms"] = _gpu_time_ms(eager, repeats, flush)
                r["torch_compile_ms"] = _gpu_time_ms(compiled, repeats, flush)
            r["cupy_pct_floor"] = 100 * r["floor_ms"] / r["cupy_ms"]
            rows.append(r)
            print(f"{dtype:>9} ({N}, {C}): floor {r['floor_ms']:.3f} ms, cupy {r['cupy_ms']:.3f} ms "
                  f"({r['cupy_pct_floor']:.0f}% of floor), eager {r.get('torch_eager_ms', float('nan')):.3f}, "
                  f"compile {r.get('torch_compile_ms', float('nan')):.3f}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "device": name, "copy_bandwidth_TBps": bw / 1e12, "T": T, "alpha": alpha,
              "rows": rows, "date": time.strftime("%Y-%m-%d")}
    (out_dir / f"softmax_kl-{machine}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out_dir}/softmax_kl-{machine}.json")
    return 0
