"""Benchmark the fused softmax-KL (loss + student gradient) against the NumPy reference, PyTorch
eager, torch.compile and the memory-bandwidth floor: 12 bytes per float32 element (read s, read t,
write grad) over the copy bandwidth measured with as many threads as the kernel runs (Numba's prange
copy, with plain and with streaming stores, the faster; measured before and after the timings, the
better of the two; NumPy's single-thread copy reported beside it). Every implementation is given as
% of that floor.
The Numba kernel is also timed on bfloat16 logits (6 bytes an element: half the floor) and on the
other divergences (reverse_kl, jsd at beta 0.5, tvd), each checked against the reference first.

    python benchmarks/softmax_kl.py                    # CPU: the Numba kernel (results in bench-out/)
    python benchmarks/softmax_kl.py --gpu              # GPU: the CuPy kernel (softmax_kl_gpu.py)
    python benchmarks/softmax_kl.py --plot RESULT.json # redraw a result's PNG
    python benchmarks/softmax_kl.py --out benchmarks/results   # replace the committed results

CPU shapes keep the issue's C and scale the rows down so one call stays below ~1 s. Correctness is
checked against the float64 reference before anything is timed; each time is the median of
repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from harness import ALPHA, CPU_ROWS, SHAPES, T, add_out_argument, copy_bandwidth, cpu_machine, median_time, \
    parallel_copy_bandwidth, torch_kd_loss
from minikd import kd_loss_and_grad
from minikd.kernels import softmax_kl


def torch_eager(s, t, y, compile=False):
    """PyTorch's forward + backward of the same loss, as a callable; ``compile``: through torch.compile."""
    import torch  # noqa: PLC0415
    loss_fn = torch_kd_loss(torch, T, ALPHA)
    loss_fn = torch.compile(loss_fn) if compile else loss_fn
    S = torch.from_numpy(s).requires_grad_(True)
    Tt, Y = torch.from_numpy(t), torch.from_numpy(y)

    def run():
        S.grad = None
        loss = loss_fn(S, Tt, Y)
        loss.backward()
        return loss
    return run


def torch_compiled(s, t, y):
    """(run, compile seconds): torch.compile of the same loss, its first call (the compilation) timed apart."""
    run = torch_eager(s, t, y, compile=True)
    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


# the divergences other than forward KL, timed on the Numba kernel (jsd at the symmetric beta)
OTHER_KINDS = (("reverse_kl", None), ("jsd", 0.5), ("tvd", None))


def _bfloat16():
    """ml_dtypes.bfloat16, or None without ml_dtypes (the bfloat16 timings are then skipped)."""
    try:
        import ml_dtypes  # noqa: PLC0415
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def _positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return n


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CPU 3 instead of 7, GPU 5 instead of 20)")
    ap.add_argument("--repeats", type=_positive_int, metavar="N",
                    help="timed repeats per measurement (after a warm-up; overrides the defaults and --quick)")
    ap.add_argument("--no-compile", action="store_true", help="CPU: skip torch.compile (minutes of compilation)")
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark: CuPy kernel, PyTorch eager and "
                    "torch.compile, float32 and bfloat16, full-size shapes (needs CuPy and a CUDA GPU)")
    add_out_argument(ap)
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of a results JSON (CPU or GPU) next to it")
    ap.add_argument("--compile-budget", type=float, default=240.0, metavar="S",
                    help="GPU: seconds of torch.compile timing in all; later shapes skip it (default 240)")
    return ap


def gpu_missing() -> str | None:
    """Why the GPU benchmark cannot run here (one line), or None when CuPy sees a GPU."""
    try:
        import cupy  # noqa: PLC0415
    except ImportError:
        return "CuPy is not installed: pip install -e '.[cuda]' (CUDA 12 driver) or -e '.[cuda13]' (CUDA 13)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001  (CuPy raises its own runtime error without a driver)
        return f"CuPy finds no usable CUDA driver or GPU ({' '.join(str(exc).split())})"
    return None if count else "CuPy finds no CUDA GPU"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plot:
        print(f"wrote {plot_results(args.plot)}")
        return 0
    if args.gpu:
        missing = gpu_missing()
        if missing:
            print(f"softmax_kl.py --gpu: error: {missing}", file=sys.stderr)
            return 2
        from softmax_kl_gpu import run_gpu  # noqa: PLC0415  (CuPy only here)
        return run_gpu(args)
    return run_cpu(args)


def run_cpu(args):
    repeats = args.repeats or (3 if args.quick else 7)
    fewer = max(min(3, repeats), repeats // 2)   # for the slow implementations
    try:
        import torch  # noqa: PLC0415
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch = None
    # the floor is measured before and after the timings, and the faster copy counts: on a shared
    # machine a copy timed while a neighbour loads the memory would lower the floor and flatter
    # every implementation measured against it
    copies = [(copy_bandwidth(), *parallel_copy_bandwidth())]
    machine = cpu_machine()
    cases = []
    for _, C in SHAPES:
        N = CPU_ROWS[C]
        rng = np.random.default_rng(0)
        s = (rng.standard_normal((N, C)) * 3).astype(np.float32)
        t = (rng.standard_normal((N, C)) * 3).astype(np.float32)
        y = rng.integers(0, C, N)
        # correctness first: the kernel against the float64 reference on the first rows (a call of
        # their own, so both batch means divide by the same count)
        k = min(N, 256)
        ref_l, ref_g = kd_loss_and_grad(s[:k].astype(np.float64), t[:k].astype(np.float64), y[:k], T=T, alpha=ALPHA)
        kl, kg = softmax_kl(s[:k], t[:k], y[:k], T=T, alpha=ALPHA, backend="numba")
        assert abs(kl - ref_l) <= 1e-5 * abs(ref_l) and np.abs(kg - ref_g).max() <= 1e-5 * np.abs(ref_g).max()
        cases.append((s, t, y, {"N": N, "C": C, "dtype": "float32"}))
    # one implementation at a time over all shapes: PyTorch's OpenMP workers spin after each call
    # and would steal the cores from whatever is timed right after them
    for s, t, y, r in cases:
        out = np.empty_like(s)
        r["numba_ms"] = 1e3 * median_time(lambda: softmax_kl(s, t, y, T=T, alpha=ALPHA, out=out, backend="numba"),
                                          repeats)
    bf16 = _bfloat16()
    for s, t, y, r in cases:   # bfloat16 logits (6 bytes an element: their own floor), a bfloat16 gradient
        if bf16 is None:
            break
        sb, tb = s.astype(bf16), t.astype(bf16)
        k = min(len(s), 256)
        ref_l, ref_g = kd_loss_and_grad(sb[:k].astype(np.float64), tb[:k].astype(np.float64), y[:k], T=T, alpha=ALPHA)
        kl, kg = softmax_kl(sb[:k], tb[:k], y[:k], T=T, alpha=ALPHA, backend="numba")
        assert abs(kl - ref_l) <= 1e-5 * abs(ref_l)
        assert np.abs(kg.astype(np.float64) - ref_g).max() <= 1e-2 * np.abs(ref_g).max()
        out = np.empty_like(sb)
        r["numba_bf16_ms"] = 1e3 * median_time(lambda: softmax_kl(sb, tb, y, T=T, alpha=ALPHA, out=out,
                                                                   backend="numba"), repeats)
    for s, t, y, r in cases:   # the other divergences (the general path: float64 logs per element)
        out = np.empty_like(s)
        for kind, beta in OTHER_KINDS:
            kw = dict(T=T, alpha=ALPHA, kind=kind, beta=beta)
            k = min(len(s), 64)
            ref_l, ref_g = kd_loss_and_grad(s[:k].astype(np.float64), t[:k].astype(np.float64), y[:k], **kw)
            kl, kg = softmax_kl(s[:k], t[:k], y[:k], backend="numba", **kw)
            assert abs(kl - ref_l) <= 1e-5 * abs(ref_l) and np.abs(kg - ref_g).max() <= 1e-5 * np.abs(ref_g).max()
            ms = 1e3 * median_time(lambda: softmax_kl(s, t, y, out=out, backend="numba", **kw), fewer)
            r[f"numba_{kind}_ms"] = ms
    for s, t, y, r in cases:
        r["numpy_ms"] = 1e3 * median_time(lambda: kd_loss_and_grad(s, t, y, T=T, alpha=ALPHA), fewer)
    if torch is not None:
        for s, t, y, r in cases:
            r["torch_eager_ms"] = 1e3 * median_time(torch_eager(s, t, y), repeats)
        if not args.no_compile:
            for s, t, y, r in cases:
                try:
                    run, r["torch_compile_s"] = torch_compiled(s, t, y)
                    r["torch_compile_ms"] = 1e3 * median_time(run, repeats)
                except Exception as e:  # noqa: BLE001  (no C++ compiler, an inductor failure: say so)
                    r["torch_compile_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    copies.append((copy_bandwidth(), *parallel_copy_bandwidth()))
    bw1 = max(c[0] for c in copies)
    bw, threads, each = max(copies, key=lambda c: c[1])[1:]
    print(f"machine {machine}; copy bandwidth {bw / 1e9:.2f} GB/s on {threads} threads (the floor: the faster "
          f"of plain stores {each['plain'] / 1e9:.2f} and streaming stores {each['streamed'] / 1e9:.2f}; before "
          f"and after the timings: {', '.join(f'{c[1] / 1e9:.2f}' for c in copies)}), {bw1 / 1e9:.2f} GB/s on one"
          + (f"; torch threads {torch_threads}" if torch else ""))
    rows = [r for *_, r in cases]
    for r in rows:   # 12 bytes an element (6 in bfloat16) at the floor's bandwidth
        r["floor_ms"] = 1e3 * 12 * r["N"] * r["C"] / bw
        r["floor_1thread_ms"] = 1e3 * 12 * r["N"] * r["C"] / bw1
        if "numba_bf16_ms" in r:
            r["bf16_floor_ms"] = r["floor_ms"] / 2
            r["numba_bf16_pct_floor"] = 100 * r["bf16_floor_ms"] / r["numba_bf16_ms"]
        for kind, _ in OTHER_KINDS:
            if f"numba_{kind}_ms" in r:
                r[f"numba_{kind}_pct_floor"] = 100 * r["floor_ms"] / r[f"numba_{kind}_ms"]
    impls = [("numba_ms", "numba"), ("numpy_ms", "numpy"), ("torch_eager_ms", "eager"), ("torch_compile_ms", "compile")]
    print(f"{'shape':>16} {'floor ms':>9} {'1-thr ms':>9} " + "".join(f"{n + ' ms':>11}" for _, n in impls) +
          "".join(f"{n + ' %':>10}" for _, n in impls) + f"{'compile s':>10}")
    for r in rows:
        for key, name in impls:
            if key in r:
                r[f"{name}_pct_floor"] = 100 * r["floor_ms"] / r[key]
        print(f"{f'({r[chr(78)]}, {r[chr(67)]})':>16} {r['floor_ms']:>9.2f} {r['floor_1thread_ms']:>9.2f} "
              + "".join(f"{r.get(k, float('nan')):>11.2f}" for k, _ in impls)
              + "".join(f"{r.get(n + '_pct_floor', float('nan')):>9.1f}%" for _, n in impls)
              + f"{r.get('torch_compile_s', float('nan')):>10.1f}")
    print("the Numba kernel, other inputs and kinds (ms, % of their floor):")
    for r in rows:
        others = [("bfloat16", "numba_bf16")] + [(kind, f"numba_{kind}") for kind, _ in OTHER_KINDS]
        print(f"{f'({r[chr(78)]}, {r[chr(67)]})':>16} " + "  ".join(
            f"{name} {r[key + '_ms']:.2f} ({r[key + '_pct_floor']:.1f}%)" for name, key in others if key + "_ms" in r))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "processor": platform.processor(), "copy_bandwidth_GBps": bw / 1e9,
              "copy_threads": threads, "copy_bandwidth_1thread_GBps": bw1 / 1e9,
              "copy_bandwidth_plain_GBps": each["plain"] / 1e9, "copy_bandwidth_streamed_GBps": each["streamed"] / 1e9,
              "copy_bandwidth_runs_GBps": [c[1] / 1e9 for c in copies],
              "T": T, "alpha": ALPHA, "rows": rows, "date": time.strftime("%Y-%m-%d")}
    json_path = out_dir / f"softmax_kl-{machine}.json"
    json_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {plot_results(json_path)} and its JSON")
    return 0


def plot_results(json_path) -> Path:
    """Draw the PNG of a results JSON (CPU or GPU) next to it; returns the PNG's path."""
    from plots import benchmark_cpu, benchmark_gpu  # noqa: PLC0415  (matplotlib only here)
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    png = json_path.with_suffix(".png")
    (benchmark_gpu if "device" in result else benchmark_cpu)(result, png)
    return png


if __name__ == "__main__":
    sys.exit(main())
