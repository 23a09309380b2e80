"""GPU benchmark of the fused softmax-KL kernel (``python benchmarks/softmax_kl.py --gpu``): every
shape of ``harness.SHAPES`` (and ``GPU_EXTRA_SHAPES``) in float32 and bfloat16, against the memory
floor (12 / 6 bytes an element over the device copy bandwidth measured in the same run), PyTorch
eager and torch.compile.

Columns of each result row:
  kernel_ms        the fused kernel and the row-loss sum, launched on prepared buffers: the GPU work
                   of one call (the issue's targets are on this number)
  call_ms          ``mk.kernels.softmax_kl(...)`` whole: argument checks, buffers, and the host sync
                   that reads the row flags
  variants         every kernel the plan can take for the shape (kernel family, cluster size, block
                   width), kernel only, each checked against the reference first: which one the
                   plan should pick is decided by these numbers
  kinds            the other divergences (reverse_kl, jsd at beta 0.5, tvd: a second pass over the
                   row) on the plan's kernel, kernel only, each checked against the reference first
  torch_eager_ms / torch_compile_ms   forward + backward of the same loss (compile within a budget)

Times are medians of CUDA-event timings with L2 flushed (a 256 MB write) before each repeat. The
JSON is rewritten after every shape, so a run cut short keeps what it measured; the PNG is drawn
at the end.
"""
from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

import numpy as np

from harness import ALPHA, SHAPES, T, torch_kd_loss
from minikd import kd_loss_and_grad
from minikd.kernels import prepare_rows, softmax_kl
from minikd.kernels import cupy_gpu   # by module: tests narrow its constants for the emulator

# beyond the shapes: few long rows, where one block a row leaves most SMs idle (there the
# cluster kernels, which lose at 2048 and 4096 rows, won by 1.6x on the H200)
GPU_EXTRA_SHAPES = [(64, 128256)]
VARIANT_THREADS = (256, 512, 1024)   # block widths tried for the cluster kernel
BLOCK_VARIANT_THREADS = (512, 1024)  # and for the two-pass block kernel
COPY_BYTES = 1 << 30                 # the copy-bandwidth buffer
FLUSH_BYTES = 256 << 20              # written before each repeat: more than any L2
TORCH_DEVICE = "cuda"                # (the emulator test runs the PyTorch lines on "cpu")
KINDS = (("reverse_kl", None), ("jsd", 0.5), ("tvd", None))   # timed besides kl


def _time_ms(fn, repeats, flush):
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


def _variants(N, C, itemsize, aligned, dtype):
    """(label, Launch) for every kernel the plan can run on this shape; the default first."""
    caps = cupy_gpu.device_caps()
    here = functools.partial(cupy_gpu.plan, N, C, itemsize, aligned, dtype=dtype, **caps._asdict())   # this shape, this GPU
    out = [("default", here())]
    if C <= cupy_gpu.ROWS_UP_TO:
        out += [("rows 256 threads", here(threads=256)), ("rows, recompute", here(variant="rows_recompute")),
                ("warp per row", here(variant="warp"))]
    else:
        for cl in cupy_gpu.CLUSTER_SIZES if caps.clusters else ():
            for threads in VARIANT_THREADS:
                try:
                    lc = here(variant="cluster", cluster=cl, threads=threads)
                except ValueError:
                    continue
                if lc.kernel.startswith("softmax_kl_cluster_") and lc.cluster == cl:
                    out.append((f"cluster {cl} x {threads}", lc))
        out += [(f"block {threads}", here(variant="block", threads=threads)) for threads in BLOCK_VARIANT_THREADS]
    return out


def run_gpu(args):
    import cupy  # noqa: PLC0415
    import ml_dtypes  # noqa: PLC0415
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        torch = None
    repeats = args.repeats or (5 if args.quick else 20)
    flush_buf = cupy.empty(FLUSH_BYTES, cupy.uint8)

    def flush():
        flush_buf.fill(0)
    a = cupy.ones(COPY_BYTES // 4, cupy.float32)
    b = cupy.empty_like(a)
    copy_ms = _time_ms(lambda: cupy.copyto(b, a), repeats, flush)
    bw = 2 * a.nbytes / (copy_ms * 1e-3)
    a = b = None   # free the 1 GiB buffers
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    machine = "gpu-" + "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
    print(f"{name}: device copy bandwidth {bw / 1e12:.2f} TB/s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"softmax_kl-{machine}.json"
    result = {"machine": machine, "device": name, "copy_bandwidth_TBps": bw / 1e12, "T": T, "alpha": ALPHA,
              "device_caps": cupy_gpu.device_caps()._asdict(),
              "repeats": repeats, "date": time.strftime("%Y-%m-%d"), "rows": []}
    compile_left = args.compile_budget
    for dtype in ("float32", "bfloat16"):
        npdt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        bytes_per = 3 * np.dtype(npdt).itemsize   # read s and t, write the gradient
        for N, C in SHAPES + GPU_EXTRA_SHAPES:
            rng = np.random.default_rng(0)
            s = cupy.asarray((rng.standard_normal((N, C), np.float32) * 3).astype(npdt))
            t = cupy.asarray((rng.standard_normal((N, C), np.float32) * 3).astype(npdt))
            y = cupy.asarray(rng.integers(0, C, N))
            r = {"N": N, "C": C, "dtype": dtype, "floor_ms": 1e3 * bytes_per * s.size / bw}
            # the reference on the first rows, for every variant
            k = min(N, 64)
            ref_l, ref_g = kd_loss_and_grad(cupy.asnumpy(s[:k]).astype(np.float64),
                                            cupy.asnumpy(t[:k]).astype(np.float64), cupy.asnumpy(y[:k]), T=T,
                                            alpha=ALPHA)
            # batchmean over all N rows: each row's gradient carries 1/N, the reference's over k rows 1/k
            ref_g_of_n = ref_g * (k / N)
            tol = 1e-5 if dtype == "float32" else 1e-2
            kl, kg = softmax_kl(s[:k], t[:k], y[:k], T=T, alpha=ALPHA, backend="cupy")
            assert abs(float(kl) - ref_l) <= 1e-5 * abs(ref_l), (float(kl), ref_l)
            assert np.abs(cupy.asnumpy(kg).astype(np.float64) - ref_g).max() <= tol * np.abs(ref_g).max()
            # prepared buffers: what launch_kernels needs
            rows = prepare_rows(s, t, y, T=T, alpha=ALPHA, kind="kl", scale_t2=True, reduction="batchmean",
                                ignore_index=-100, mask=None, weight_dtype=cupy.float32)
            out = cupy.empty_like(s)
            row_loss = cupy.empty(N, cupy.float32)
            flags = cupy.zeros(N, cupy.int8)
            total = cupy.zeros((), cupy.float64)
            kargs = cupy_gpu.kernel_args(rows, "kl", out, row_loss, flags)
            aligned = (C * s.dtype.itemsize) % 16 == 0 and all(x.data.ptr % 16 == 0 for x in (s, t, out))
            r["variants"] = []
            for label, launch in _variants(N, C, s.dtype.itemsize, aligned, dtype):
                v = {"label": label, "kernel": launch.kernel, "grid": launch.grid, "block": launch.block,
                     "shared": launch.shared, "cluster": launch.cluster}
                try:
                    out.fill(0)
                    cupy_gpu.launch_kernels(kargs, launch, total=total, fallback=False)
                    g = cupy.asnumpy(out[:k]).astype(np.float64)
                    v["max_err_of_max_grad"] = float(np.abs(g - ref_g_of_n).max() / np.abs(ref_g_of_n).max())
                    v["ok"] = v["max_err_of_max_grad"] <= tol and not bool(flags.any())
                    v["ms"] = _time_ms(lambda: cupy_gpu.launch_kernels(kargs, launch, total=total, fallback=False), repeats,
                                       flush)
                    v["pct_floor"] = 100 * r["floor_ms"] / v["ms"]
                except Exception as exc:  # noqa: BLE001  (a launch the device refuses: record it, go on)
                    v["error"] = f"{type(exc).__name__}: {exc}"
                r["variants"].append(v)
            r["kinds"] = []
            for kind, beta in KINDS:   # the plan's kernel (the first variant) on the other divergences
                launch = _variants(N, C, s.dtype.itemsize, aligned, dtype)[0][1]
                v = {"kind": kind, "beta": beta, "kernel": launch.kernel}
                try:
                    kind_rows = prepare_rows(s, t, y, T=T, alpha=ALPHA, kind=kind, scale_t2=True, reduction="batchmean",
                                             ignore_index=-100, mask=None, weight_dtype=cupy.float32, beta=beta)
                    kind_args = cupy_gpu.kernel_args(kind_rows, kind, out, row_loss, flags, beta)
                    out.fill(0)
                    cupy_gpu.launch_kernels(kind_args, launch, total=total, fallback=False)
                    _, kind_ref = kd_loss_and_grad(cupy.asnumpy(s[:k]).astype(np.float64),
                                                   cupy.asnumpy(t[:k]).astype(np.float64), cupy.asnumpy(y[:k]), T=T,
                                                   alpha=ALPHA, kind=kind, beta=beta)
                    kind_ref *= k / N
                    g = cupy.asnumpy(out[:k]).astype(np.float64)
                    v["max_err_of_max_grad"] = float(np.abs(g - kind_ref).max() / np.abs(kind_ref).max())
                    v["ok"] = v["max_err_of_max_grad"] <= tol and not bool(flags.any())
                    v["ms"] = _time_ms(lambda: cupy_gpu.launch_kernels(kind_args, launch, total=total, fallback=False),
                                       repeats, flush)
                    v["pct_floor"] = 100 * r["floor_ms"] / v["ms"]
                except Exception as exc:  # noqa: BLE001  (record it, go on)
                    v["error"] = f"{type(exc).__name__}: {exc}"
                r["kinds"].append(v)
                kind_rows = kind_args = None
            r["kernel"] = r["variants"][0]["kernel"]
            r["kernel_ms"] = r["variants"][0].get("ms", float("nan"))
            r["kernel_pct_floor"] = 100 * r["floor_ms"] / r["kernel_ms"]
            timed = [v for v in r["variants"] if v.get("ok")]
            best = min(timed, key=lambda v: v["ms"]) if timed else None
            r["best_variant"] = best and best["label"]
            r["call_ms"] = _time_ms(lambda: softmax_kl(s, t, y, T=T, alpha=ALPHA, out=out, backend="cupy"), repeats,
                                    flush)
            if torch is not None:
                S = torch.as_tensor(s.view(cupy.uint16) if dtype == "bfloat16" else s, device=TORCH_DEVICE)
                Tt = torch.as_tensor(t.view(cupy.uint16) if dtype == "bfloat16" else t, device=TORCH_DEVICE)
                if dtype == "bfloat16":   # CuPy's bfloat16 goes to torch as its bits
                    S, Tt = S.view(torch.bfloat16), Tt.view(torch.bfloat16)
                Y = torch.as_tensor(y, device=TORCH_DEVICE)
                S = S.clone().requires_grad_(True)
                loss_fn = torch_kd_loss(torch, T, ALPHA)
                tl = loss_fn(S[:k], Tt[:k], Y[:k]).detach()   # the same loss on the same rows as the reference
                assert abs(float(tl) - ref_l) <= 1e-3 * abs(ref_l), (float(tl), ref_l)

                def eager():
                    S.grad = None
                    loss_fn(S, Tt, Y).backward()
                r["torch_eager_ms"] = _time_ms(eager, repeats, flush)
                if compile_left > 0:
                    t0 = time.perf_counter()
                    # a fresh cache per shape: past dynamo's recompile limit (8) torch.compile silently
                    # runs eager (the H200 run's bfloat16 (4096, 32000) and (2048, 128256) "compile" lines)
                    torch._dynamo.reset()
                    compiled_fn = torch.compile(loss_fn, dynamic=False)

                    def compiled():
                        S.grad = None
                        compiled_fn(S, Tt, Y).backward()
                    r["torch_compile_ms"] = _time_ms(compiled, repeats, flush)
                    compile_left -= time.perf_counter() - t0
                    del compiled_fn
                del S, Tt, Y
                if TORCH_DEVICE == "cuda":
                    torch.cuda.empty_cache()
            result["rows"].append(r)
            json_path.write_text(json.dumps(result, indent=1))
            print(f"{dtype:>9} ({N}, {C}): floor {r['floor_ms']:.4f} ms | kernel {r['kernel_ms']:.4f} ms "
                  f"({r['kernel_pct_floor']:.0f}% of floor, {r['kernel']}) best {r['best_variant']} | call "
                  f"{r['call_ms']:.4f} | eager {r.get('torch_eager_ms', float('nan')):.4f} | compile "
                  f"{r.get('torch_compile_ms', float('nan')):.4f}", flush=True)
            for v in r["variants"]:
                print(f"      {v['label']:<20} {v['kernel']:<30} "
                      + (f"{v['ms']:.4f} ms {v['pct_floor']:5.1f}% ok={v['ok']}" if "ms" in v else v.get("error", "")),
                      flush=True)
            for v in r["kinds"]:
                print(f"      kind {v['kind']:<15} {v['kernel']:<30} "
                      + (f"{v['ms']:.4f} ms {v['pct_floor']:5.1f}% ok={v['ok']}" if "ms" in v else v.get("error", "")),
                      flush=True)
            s = t = y = out = rows = kargs = None   # free this shape's device memory
            cupy.get_default_memory_pool().free_all_blocks()
    try:
        from plots import benchmark_gpu  # noqa: PLC0415 (matplotlib: maybe missing on a device machine)
        benchmark_gpu(result, out_dir / f"softmax_kl-{machine}.png")
        print(f"wrote {json_path} and .png")
    except ImportError as exc:   # a device machine without matplotlib: the JSON is what matters
        print(f"wrote {json_path}; no PNG ({exc}): draw it elsewhere with "
              f"`python benchmarks/softmax_kl.py --plot {json_path}`")
    return 0
