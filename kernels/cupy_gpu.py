"""The CuPy side of the fused GPU kernel: loads ``softmax_kl.cu`` with ``cupy.RawModule`` and
launches it (the algorithms and their numerics are documented in the .cu file).

Which kernel runs is decided by ``plan(N, C, itemsize, aligned)``, a pure function (the tests run
the same plans on the CPU emulator of ``tests/cuda_emu``). Its defaults are the winners of two GPU runs (NVIDIA H200, 2026-11-28; the second's results in
``benchmarks/results/softmax_kl-gpu-NVIDIA-H200.json``; kernel alone, median of 20, L2 flushed):

* C <= 128: ``softmax_kl_rows`` -- a few lanes per row (LANES = 1..32, ELEMS = 4), the row held in
  registers, memory read once and written once, no online rescaling (at C = 10 and 100 the
  register-kept and recomputed forms timed the same, the warp-per-row kernel 1.7-3.7x slower).
* 128 < C <= 1024: ``softmax_kl_rows_recompute`` (32 lanes, ELEMS = 8..32; the gradient's
  exponentials computed again). At (16384, 1000) on the second run: float32 0.096 ms against
  0.157 ms a warp per row; bfloat16 0.108 against 0.117 ms (on the first run, before the
  conventions change, the warp kernel had won in bfloat16: 0.116 against 0.143 ms).
* longer rows, N >= the SM count: ``softmax_kl_block`` -- a block of 512 threads per row, online
  sums, the row read twice (the second time from L2), 16-byte loads when the rows allow. It beat
  every cluster configuration at each such shape, on both runs: float32 (4096, 32000) 0.627 ms
  (59% of the floor) against 0.812 ms for the best cluster (4 x 512), (2048, 128256) 1.267 against
  1.788 ms; bfloat16 0.514 against 0.658 and 0.894 against 1.427 ms; 512 threads beat 1024.
* longer rows, N < the SM count (a block a row would leave SMs idle), 16-byte-aligned rows on
  sm_90 and later: ``softmax_kl_cluster`` with 8 blocks a row (the largest portable size), 1024
  threads (4-byte inputs) or 512 (2-byte). At 64 x 128256: float32 0.085 ms against 0.140 ms for
  the 512-thread block kernel (a non-portable 16 x 512 took 0.072 ms); bfloat16 0.068 against 0.108
  ms. A cluster of CL blocks splits each row, each block keeps its chunk in shared memory
  (cp.async in), the blocks merge their partial sums through distributed shared memory: global
  memory is touched once each way. When 8 blocks cannot hold the row, or for variant "cluster"
  with no size given, CL is the smallest portable size (<= 8) whose chunk fits ``smem_target``
  bytes (two blocks per SM), else the smallest portable one that fits the most a block may opt in
  to (``smem_max``: 227 KB on H100), else 16 (a non-portable size, opted in), else the block
  kernel. The limits and the SM count are read off the device (``device_caps``). A cluster launch
  the device refuses falls back to the block kernel with a warning.

Every kernel family computes every divergence of ``CUPY_KINDS`` (kl, ce, reverse_kl, jsd with beta,
tvd); for reverse_kl, jsd and tvd a second pass over the row (registers, shared memory, or for the
block and warp kernels global memory again) sums the terms that need the row's normalizers.

Inputs float32, float16 or bfloat16 (``ml_dtypes.bfloat16`` arrays); accumulation in float32; the
gradient in the input dtype, into ``out`` if given (it may be the student array). Per-row losses are
summed by a single-block kernel in a fixed order, in float64: the same input gives the same bits.
CuPy compiles RawModule code with NVRTC and ``-ftz=true``: float32 values below 1.2e-38 flush to
zero (gradient entries that small are far inside the stated tolerances, which are relative to
max |grad|).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..backend import check_float_array, is_cupy_array
from ..checks import UserError
from ..losses import conventions, divergences
from . import FUSED_KINDS

__all__ = ["softmax_kl_cupy", "kernel_args", "plan", "Launch", "launch_kernels", "device_caps", "DeviceCaps",
           "SOURCE", "ROWS_UP_TO", "BLOCK_THREADS", "CLUSTER_THREADS", "SMEM_TARGET", "SMEM_MAX", "SMEM_HEAD",
           "VARIANTS", "CUPY_KINDS"]

# the divergences the CUDA kernel computes (every kernel family, every kind: softmax_kl.cu's header)
CUPY_KINDS = FUSED_KINDS["cupy"]   # (their one owner: minikd.kernels.FUSED_KINDS)
_KIND_CODE = {"kl": 0, "ce": 1, "reverse_kl": 2, "jsd": 3, "tvd": 4}   # KIND_* in softmax_kl.cu
_SHARE_BIT = 8                                                          # bit 3 of the kernel's `kind`

SOURCE = Path(__file__).with_name("softmax_kl.cu")
ROWS_UP_TO = 1024            # the largest C of the register kernel (LANES 32 x ELEMS 32)
ROWS_BLOCK_THREADS = 128
BLOCK_THREADS = 512          # the two-pass block kernel (512 beat 1024 at every long shape on the H200)
SUM_THREADS = 1024           # sum_rows: one block, a power of two <= 1024
CLUSTER_THREADS = 512
CLUSTER_SIZES = (1, 2, 4, 8, 16)  # 8 is the portable maximum; 16 needs an opt-in (H100 allows it)
PORTABLE_CLUSTER = 8
SMEM_HEAD = 1280             # as in softmax_kl.cu
SMEM_TARGET = 100 * 1024     # two blocks per SM on H100 (228 KB of shared memory per SM); at most half an SM's
SMEM_MAX = 227 * 1024        # the most dynamic shared memory one block may opt in to (H100; read off the device)
SMS = 132                    # H100 / H200 SMs (read off the device)
FEW_ROWS_CLUSTER = 8         # long rows, N < SMs: a cluster of 8 a row (portable), 1024 / 512 threads for
FEW_ROWS_THREADS = {4: 1024, 2: 512}   # 4- / 2-byte inputs (H200, 64 x 128256: the best portable size)
VARIANTS = ("auto", "rows", "rows_recompute", "warp", "block", "cluster")
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_MODULE = None
_KERNELS = {}       # (device, kernel name) -> cupy.RawKernel
_SMEM_OPT_IN = {}   # (device, kernel name) -> the dynamic shared memory it has been allowed
_CLUSTER_OPT_IN = set()
_CAPS = {}          # device -> DeviceCaps


class DeviceCaps(NamedTuple):
    clusters: bool     # thread-block clusters (compute capability >= 9.0)
    smem_max: int      # the most dynamic shared memory a block may opt in to
    smem_target: int   # a block's share when two blocks are to fit on one SM (at most SMEM_TARGET)
    sms: int = SMS     # streaming multiprocessors: fewer long rows than this take a cluster a row


class Launch(NamedTuple):
    kernel: str        # extern "C" name in softmax_kl.cu
    grid: int          # blocks
    block: int         # threads per block
    shared: int        # dynamic shared memory, bytes
    cluster: int       # blocks per cluster (1: none)


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def plan(N: int, C: int, itemsize: int, aligned: bool, *, dtype: str = "float32", variant: str = "auto",
         threads: int | None = None, cluster: int | None = None, smem_target: int = SMEM_TARGET,
         smem_max: int = SMEM_MAX, clusters: bool = True, sms: int = SMS) -> Launch:
    """The kernel and launch shape for N rows of C classes. ``aligned``: C * itemsize is a multiple
    of 16 and the student, teacher and output pointers are 16-byte aligned. ``variant`` forces a
    kernel family (benchmarks compare them); ``threads`` / ``cluster`` override the defaults.
    The device's side (``DeviceCaps``, H100's by default): ``clusters``, it has thread-block
    clusters; ``smem_max``, the most shared memory a block may have; ``smem_target``, a block's
    share of an SM's when two are to fit; ``sms``, its streaming multiprocessors."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if variant == "cluster" and not clusters:
        raise ValueError("variant 'cluster' needs a GPU with thread-block clusters (compute capability >= 9.0)")
    sfx = _SUFFIX[dtype]
    vec = 16 // itemsize
    few_rows_threads = None   # set when the plan itself chooses a cluster for few long rows
    n_vec = C // vec

    def smem(cl):   # a cluster block's dynamic shared memory: the States, then its student and teacher packs
        return SMEM_HEAD + 2 * 16 * -(-n_vec // cl)
    if variant == "auto":   # the H200's winners (module doc)
        if C <= 128:
            variant = "rows"
        elif C <= ROWS_UP_TO:
            variant = "rows_recompute"
        elif N < sms and clusters and aligned and C % vec == 0:   # a block a row would leave SMs idle
            variant = "cluster"
            if cluster is None and FEW_ROWS_CLUSTER in CLUSTER_SIZES and smem(FEW_ROWS_CLUSTER) <= smem_max:
                cluster = FEW_ROWS_CLUSTER
            few_rows_threads = FEW_ROWS_THREADS.get(itemsize, CLUSTER_THREADS)
        else:
            variant = "block"
    if variant in ("rows", "rows_recompute"):
        if C > ROWS_UP_TO:
            raise ValueError(f"the rows kernel takes C <= {ROWS_UP_TO}, got {C}")
        if C <= 128:
            lanes, elems = _next_pow2(-(-C // 4)), 4
        else:
            lanes, elems = 32, _next_pow2(-(-C // 32))
        # "rows_recompute": the gradient's exponentials computed again (fewer registers), for elems >= 8
        name = "softmax_kl_rows_recompute" if variant == "rows_recompute" and elems >= 8 else "softmax_kl_rows"
        nthreads = threads or ROWS_BLOCK_THREADS
        return Launch(f"{name}_{sfx}_L{lanes}_E{elems}", -(-N * lanes // nthreads), nthreads, 0, 1)
    if variant == "warp":   # the first design (a warp per row, online sums), kept as a benchmark baseline
        nthreads = threads or 128
        return Launch(f"softmax_kl_warp_{sfx}", -(-N // (nthreads // 32)), nthreads, 0, 1)
    if variant == "cluster" and aligned and C % vec == 0:
        smem_target = min(smem_target, smem_max)
        if cluster is None:   # portable sizes first: within the target, then within the limit; then 16
            portable = [cl for cl in CLUSTER_SIZES if cl <= PORTABLE_CLUSTER]
            fits = [cl for cl in portable if smem(cl) <= smem_target] or \
                   [cl for cl in portable if smem(cl) <= smem_max] or \
                   [cl for cl in CLUSTER_SIZES if cl > PORTABLE_CLUSTER and smem(cl) <= smem_max]
            cluster = fits[0] if fits else None
        elif cluster not in CLUSTER_SIZES or smem(cluster) > smem_max:
            raise ValueError(f"cluster: {cluster} blocks cannot hold a row of {C} classes "
                             f"(sizes {CLUSTER_SIZES}, {smem_max} bytes of shared memory each)")
        if cluster is not None:   # else too long for any cluster: the two-pass block kernel
            return Launch(f"softmax_kl_cluster_{sfx}_c{cluster}", N * cluster,
                          threads or few_rows_threads or CLUSTER_THREADS, smem(cluster), cluster)
    vec_ok = aligned and C % vec == 0
    name = f"softmax_kl_block_vec_{sfx}" if vec_ok else f"softmax_kl_block_{sfx}"
    return Launch(name, N, threads or BLOCK_THREADS, 0, 1)


def kernel_args(rows, kind, out, row_loss, flags, beta=None):
    """The launch arguments for prepared rows (``minikd.kernels.prepare_rows``), in the order and C
    types of KERNEL_ARGS in softmax_kl.cu:
    (const T* s, const T* t, const long long* labels, const float* weights, long long N, int C,
     float k, float inv_T, float soft, float hard, int kind, float beta, float beta_c, T* out,
     float* row_loss, signed char* flags);
    ``kind`` carries the divergence's code in bits 0-2 and ``conventions.shares_exponential`` in bit 3.
    JSD at beta = 0 or 1 is sent as the forward / reverse KL (the reference's endpoint rule, decided
    on the float64 beta); beta and 1 - beta are each rounded from float64."""
    N, C = rows.s.shape
    if kind not in CUPY_KINDS:
        raise UserError(f"kind: the CUDA kernel computes {CUPY_KINDS}, got {kind!r}")
    beta = divergences.check_beta(kind, beta)
    code = _KIND_CODE[divergences._endpoint(kind, beta)]
    kind_bits = code | (_SHARE_BIT if conventions.shares_exponential(rows.T) else 0)
    beta, beta_c = (beta, 1.0 - beta) if beta is not None else (0.0, 0.0)
    return (rows.s, rows.t, rows.labels, rows.weights, np.int64(N), np.int32(C), np.float32(np.log2(np.e) / rows.T),
            np.float32(1.0 / rows.T), np.float32(rows.soft_weight), np.float32(rows.hard_weight), np.int32(kind_bits),
            np.float32(beta), np.float32(beta_c), out, row_loss, flags)


ARG_N, ARG_ROW_LOSS = 4, 14   # where kernel_args puts N and the row losses


def _module():
    global _MODULE
    if _MODULE is None:
        import cupy  # noqa: PLC0415
        _MODULE = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",))
    return _MODULE


def _device() -> int:
    import cupy  # noqa: PLC0415
    return cupy.cuda.runtime.getDevice()


def device_caps() -> DeviceCaps:
    """What the plan needs to know of the current device (read once per device): clusters from the
    compute capability; the opt-in shared-memory limit of a block; half of an SM's shared memory,
    less the 1 KB the driver reserves per block, capped at SMEM_TARGET (H100: 100 KB); the SMs."""
    dev = _device()
    if dev not in _CAPS:
        import cupy  # noqa: PLC0415
        rt = cupy.cuda.runtime
        per_sm = rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev)
        reserved = rt.deviceGetAttribute(rt.cudaDevAttrReservedSharedMemoryPerBlock, dev)
        _CAPS[dev] = DeviceCaps(clusters=int(cupy.cuda.Device(dev).compute_capability) >= 90,
                                smem_max=rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                                smem_target=min(SMEM_TARGET, per_sm // 2 - reserved),
                                sms=rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, dev))
    return _CAPS[dev]


def _kernel(launch: Launch):
    """The ``cupy.RawKernel`` of a launch, with the attributes it needs set on its function: dynamic
    shared memory over 48 KB (raised, never lowered: one function serves launches of several sizes)
    and, for a cluster of more than 8 blocks, the non-portable size. The attributes live on the
    device's CUfunction (``kernel.kernel.ptr``); CuPy's RawKernel has no ``ptr`` of its own."""
    key = (_device(), launch.kernel)
    fn = _KERNELS.get(key)
    if fn is None:
        fn = _KERNELS[key] = _module().get_function(launch.kernel)
    if launch.shared > max(48 * 1024, _SMEM_OPT_IN.get(key, 0)):
        fn.max_dynamic_shared_size_bytes = launch.shared
        _SMEM_OPT_IN[key] = launch.shared
    if launch.cluster > PORTABLE_CLUSTER and key not in _CLUSTER_OPT_IN:
        from cupy.cuda import driver  # noqa: PLC0415
        driver.funcSetAttribute(fn.kernel.ptr, getattr(driver, "CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED",
                                                      14), 1)
        _CLUSTER_OPT_IN.add(key)
    return fn


def launch_kernels(args, launch: Launch, *, total=None, fallback=True):
    """Launch the fused kernel (and, given a float64 scalar ``total``, the row-loss sum): the GPU
    work of one call, without the argument checks (benchmarks time this alone). A cluster launch the
    device refuses (a CUDA driver error: no room to co-schedule the cluster, shared memory over the
    limit) falls back to the two-pass block kernel with a warning, unless ``fallback`` is False.
    Any other error (a bug, not the device's limits) is raised."""
    if int(args[ARG_N]) == 0:
        return
    # `cupy.cuda.driver` is an attribute of cupy.cuda (the module is cupy_backends.cuda.api.driver),
    # not an importable submodule: `from cupy.cuda.driver import ...` fails on a real CuPy
    from cupy.cuda import driver  # noqa: PLC0415
    try:
        _kernel(launch)((launch.grid,), (launch.block,), args, shared_mem=launch.shared)
    except driver.CUDADriverError as exc:
        if not (fallback and launch.kernel.startswith("softmax_kl_cluster_")):
            raise
        import warnings  # noqa: PLC0415
        sfx = launch.kernel.split("_")[3]
        block = Launch(f"softmax_kl_block_vec_{sfx}", int(args[ARG_N]), BLOCK_THREADS, 0, 1)
        warnings.warn(f"{launch.kernel} did not launch ({exc}); ran {block.kernel} instead", RuntimeWarning,
                      stacklevel=2)
        _kernel(block)((block.grid,), (block.block,), args)
    if total is not None:
        _kernel(Launch("sum_rows", 1, SUM_THREADS, 0, 1))((1,), (SUM_THREADS,),
                                                          (args[ARG_ROW_LOSS], args[ARG_N], total))


def softmax_kl_cupy(student, teacher, labels, *, T, alpha, kind, scale_t2, reduction, ignore_index, mask,
                    out, unlabeled="ignore", normalizer=None, hard_weight=None, beta=None, **plan_options):
    """The CuPy backend of ``minikd.kernels.softmax_kl``, for every kind of ``CUPY_KINDS`` (``beta``:
    JSD's); ``plan_options`` (variant, threads, cluster, smem_target, ...) go to ``plan`` (tests and
    benchmarks force kernel families with them), over the device's own ``device_caps``."""
    from . import check_out, deliver_gradient, gradient_buffer, prepare_rows, raise_for_flags  # noqa: PLC0415
    check_float_array(student, "student", ndim_min=2)   # the reference's first check, its message
    if not is_cupy_array(student):   # before importing CuPy: a NumPy user may not have it
        raise TypeError(f"student: the CuPy kernel takes CuPy arrays, got {type(student).__module__}."
                        f"{type(student).__name__} (use backend='numba' or 'numpy')")
    import cupy  # noqa: PLC0415

    name = student.dtype.name
    if name not in _SUFFIX:
        raise TypeError(f"student: the CuPy kernel takes float32, float16 or bfloat16, got {student.dtype}")
    check_out(out, student, teacher, labels, mask)
    rows = prepare_rows(student, teacher, labels, T=T, alpha=alpha, kind=kind, scale_t2=scale_t2,
                        reduction=reduction, ignore_index=ignore_index, mask=mask, unlabeled=unlabeled,
                        weight_dtype=cupy.float32, on_device=True, normalizer=normalizer, hard_weight=hard_weight,
                        beta=beta)
    s = rows.s
    N, C = s.shape
    buf, is_out = gradient_buffer(out, s, cupy)
    row_loss = cupy.empty(N, cupy.float32)
    # flag 4: a label out of range (the kernels write 1 / 2 / 3 over it for bad values); all flags
    # are read back with one sync below
    flags = cupy.zeros(N, cupy.int8) if rows.bad_labels is None else rows.bad_labels.astype(cupy.int8) * 4
    args = kernel_args(rows, kind, buf, row_loss, flags, beta)
    aligned = (C * s.dtype.itemsize) % 16 == 0 and all(a.data.ptr % 16 == 0 for a in (s, rows.t, buf))
    total = None if reduction == "none" else cupy.zeros((), cupy.float64)
    plan_options = {**device_caps()._asdict(), **plan_options}
    launch_kernels(args, plan(N, C, s.dtype.itemsize, aligned, dtype=name, **plan_options), total=total)
    if bool(flags.any()):  # the call's one sync; rare
        raise_for_flags(student, teacher, labels, rows.valid, T=T, alpha=alpha, kind=kind, reduction=reduction,
                        ignore_index=ignore_index, mask=mask, unlabeled=unlabeled, hard_weight=hard_weight, beta=beta)
    grad = deliver_gradient(buf, is_out, out, student.shape)
    if reduction == "none":
        return row_loss.astype(student.dtype).reshape(rows.lead), grad
    return conventions.reduce_total(total, reduction, rows.n_valid), grad
