"""The CuPy side of the fused GPU kernel: loads ``softmax_kl.cu`` with ``cupy.RawModule`` and
launches it (the algorithm and its numerics are documented in the .cu file).

Launch shapes: C <= WARP_ROWS_UP_TO classes -> one warp per row (4 rows per 128-thread block);
longer rows -> one block of BLOCK_THREADS threads per row, with 16-byte vector loads when the row
length in bytes is a multiple of 16. Inputs float32, float16 or bfloat16 (``ml_dtypes.bfloat16``
arrays); accumulation in float32; the gradient in the input dtype, into ``out`` if given (it may
be the student array). Per-row losses are summed by a single-block kernel in a fixed order, in
float64: the same input gives the same bits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["softmax_kl_cupy", "kernel_args", "SOURCE", "WARP_ROWS_UP_TO", "BLOCK_THREADS"]

SOURCE = Path(__file__).with_name("softmax_kl.cu")
WARP_ROWS_UP_TO = 2048
BLOCK_THREADS = 1024
_MODULE = None
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _module():
    global _MODULE
    if _MODULE is None:
        import cupy  # noqa: PLC0415
        _MODULE = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",))
    return _MODULE


def kernel_args(s, t, labels, weights, T, soft, hard, kind, out, row_loss, flags):
    """The launch arguments, in the order and C types of KERNEL_ARGS in softmax_kl.cu:
    (const T* s, const T* t, const long long* labels, const float* weights, long long N, int C,
     float k, float inv_T, float soft, float hard, int kind, T* out, float* row_loss, signed char* flags)."""
    N, C = s.shape
    return (s, t, labels, weights, np.int64(N), np.int32(C), np.float32(np.log2(np.e) / T), np.float32(1.0 / T),
            np.float32(soft), np.float32(hard), np.int32(1 if kind == "ce" else 0), out, row_loss, flags)


def softmax_kl_cupy(student, teacher, labels, *, T, alpha, kind, scale_t2, reduction, ignore_index, mask,
                    out):
    import cupy  # noqa: PLC0415

    from ..backend import check_logits  # noqa: PLC0415
    from . import prepare_rows  # noqa: PLC0415
    name = student.dtype.name
    if name not in _SUFFIX:
        raise TypeError(f"student: the CuPy kernel takes float32, float16 or bfloat16, got {student.dtype}")
    rows = prepare_rows(student, teacher, labels, T=T, alpha=alpha, kind=kind, scale_t2=scale_t2,
                        reduction=reduction, ignore_index=ignore_index, mask=mask, weight_dtype=cupy.float32)
    s, t, lab, weights, valid, n_valid, lead, T, alpha, tau = rows
    N, C = s.shape
    buf = out.reshape(-1, C) if out is not None and out.flags.c_contiguous else cupy.empty_like(s)
    row_loss = cupy.empty(N, cupy.float32)
    flags = cupy.zeros(N, cupy.int8)
    mod = _module()
    args = kernel_args(s, t, lab, weights, T, alpha * tau, 1.0 - alpha, kind, buf, row_loss, flags)
    if N:
        if C <= WARP_ROWS_UP_TO:
            mod.get_function(f"softmax_kl_warp_{_SUFFIX[name]}")(((N + 3) // 4,), (128,), args)
        else:
            vec = 16 // s.dtype.itemsize
            aligned = C % vec == 0 and all(a.data.ptr % 16 == 0 for a in (s, t, buf))
            kernel = f"softmax_kl_block_vec_{_SUFFIX[name]}" if aligned else f"softmax_kl_block_{_SUFFIX[name]}"
            mod.get_function(kernel)((N,), (BLOCK_THREADS,), args)
    if bool(flags.any()):  # rare: let the reference's checks raise their exact message
        check_logits(student, "student", valid)
        check_logits(teacher, "teacher", valid)
        raise ValueError("student/teacher: invalid values (NaN, +inf or an all -inf row)")
    if out is not None:
        if buf.data.ptr != out.data.ptr:
            out[...] = buf.reshape(out.shape)
        grad = out
    else:
        grad = buf.reshape(student.shape)
    if reduction == "none":
        return row_loss.astype(student.dtype).reshape(lead), grad
    total = cupy.zeros((), cupy.float64)
    mod.get_function("sum_rows")((1,), (1024,), (row_loss, np.int64(N), total))
    loss = total / max(n_valid, 1) if reduction == "batchmean" else total
    return loss, grad
