"""Fused softmax-KL kernels (floor 3): the KD loss and its student gradient in one call.

    loss, grad = mk.kernels.softmax_kl(student, teacher, labels, T=4.0, alpha=0.9)

Same meaning and result as ``mk.kd_loss_and_grad`` with teacher logits (``kind``, ``beta``,
``scale_t2``, ``reduction``, ``ignore_index``, ``mask``, ``unlabeled`` included; for "none" the
gradient of the summed loss): the conventions (which rows count, which get the hard term, the
term weights, the reductions) are ``minikd.losses.conventions``, called here as there. Arguments
are validated by the reference's own checks, so errors are the same. ``out=`` receives the
gradient: a writable array of the student's shape, dtype and kind (NumPy / CuPy) that overlaps no
input, except that it may be the student array itself (in place); ``check_out`` states the rule.

backend: "numpy" (the reference), "numba" (the fused CPU kernel), "cupy" (the fused CUDA kernel,
``softmax_kl.cu``; float32 / float16 / bfloat16; CI runs it on a CPU emulator, a lent GPU for real),
"auto" (CuPy arrays -> "cupy", NumPy arrays -> "numba" when Numba imports, else "numpy").
The kinds each fused kernel computes are ``FUSED_KINDS[backend]`` (both kernels: every divergence
of the reference, "kl", "ce", "reverse_kl", "jsd", "tvd"), without label smoothing; for
another kind ("dkd"), ``label_smoothing`` or a vocabulary map, "auto" runs the reference (and warns
once per kind of thing) and an explicit fused backend is refused. The Numba kernel also takes
bfloat16 logits (``ml_dtypes.bfloat16``) and writes the gradient as bfloat16, or as float32 into an
``out=`` of float32.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ..backend import check_float_array, check_logits, get_namespace, is_cupy_array
from ..checks import UserError
from ..losses import conventions, divergences
from ..losses.divergences import check_beta
from ..losses.kd import KINDS, check_kd_arguments, kd_loss_and_grad

__all__ = ["softmax_kl", "resolve_backend", "check_out", "prepare_rows", "Rows", "sum_of_logs"]

BACKENDS = ("auto", "numpy", "numba", "cupy")


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, x) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if is_cupy_array(x):
            return "cupy"
        return "numba" if _numba_available() else "numpy"
    return backend


# the divergences each fused kernel computes (the one owner of that list); other kinds run on the reference
FUSED_KINDS = {"numba": ("kl", "ce", "reverse_kl", "jsd", "tvd"), "cupy": ("kl", "ce", "reverse_kl", "jsd", "tvd")}
_said_fallback = set()


def _unfused(kind, label_smoothing, vocab, student, teacher, backend="numba"):
    """What the fused kernel of ``backend`` cannot compute in this call (None: it can)."""
    if kind in KINDS and kind not in FUSED_KINDS.get(backend, ()):
        return f"kind={kind!r}"
    if label_smoothing:
        return "label_smoothing"
    if vocab is not None and getattr(student, "shape", (0,))[-1:] != getattr(teacher, "shape", (0,))[-1:]:
        return "vocab"
    return None


def _fallback(what, backend, resolved) -> str:
    """Something the fused kernels lack: "auto" runs the reference and says so once per kind of
    thing; an explicit fused backend is refused."""
    if resolved == "numpy":
        return resolved
    if backend != "auto":
        raise UserError(f"{what}: the {resolved} kernel computes kind {', '.join(FUSED_KINDS[resolved])} without "
                        f"label smoothing, on equal class counts; use backend='numpy' (the reference) or 'auto' "
                        f"(falls back to it)")
    if (what, resolved) not in _said_fallback:
        _said_fallback.add((what, resolved))
        warnings.warn(f"{what} has no fused {resolved} kernel yet: backend='auto' runs the NumPy reference",
                      stacklevel=3)
    return "numpy"


def softmax_kl(student, teacher, labels=None, *, T, alpha, kind="kl", scale_t2=True,
               reduction="batchmean", ignore_index=-100, mask=None, unlabeled="ignore", out=None, backend="auto",
               beta=None, dkd_weights=None, normalizer=None, hard_weight=None, label_smoothing=0.0, vocab=None):
    """Fused KD loss and gradient (see module doc). Returns (loss, grad)."""
    if kind in KINDS:
        check_beta(kind, beta)   # a beta given with another kind is refused on every backend
    if dkd_weights is not None and kind != "dkd":
        raise UserError(f"dkd_weights: only kind='dkd' takes them (kind={kind!r})")
    resolved = resolve_backend(backend, student)
    what = _unfused(kind, label_smoothing, vocab, student, teacher, resolved)
    backend = resolved if what is None else _fallback(what, backend, resolved)
    kw = dict(T=T, alpha=alpha, kind=kind, reduction=reduction, ignore_index=ignore_index, mask=mask,
              unlabeled=unlabeled, normalizer=normalizer, hard_weight=hard_weight)
    if backend == "numpy":
        kw.update(beta=beta, dkd_weights=dkd_weights, label_smoothing=label_smoothing, vocab=vocab)
        check_out(out, student, teacher, labels, mask)
        loss, grad = kd_loss_and_grad(student, teacher, labels, scale_t2=scale_t2, **kw)
        if out is not None:
            out[...] = grad
            grad = out
        return loss, grad
    if backend == "cupy":
        from .cupy_gpu import softmax_kl_cupy  # noqa: PLC0415
        return softmax_kl_cupy(student, teacher, labels, scale_t2=scale_t2, out=out, beta=beta, **kw)
    return _softmax_kl_numba(student, teacher, labels, scale_t2=scale_t2, out=out, beta=beta, **kw)


def _data_ptr(a) -> int:
    return a.data.ptr if is_cupy_array(a) else a.__array_interface__["data"][0]


def check_out(out, student, teacher, labels=None, mask=None, float32_for_bf16=False):
    """Refuse, before any work, an ``out=`` no backend can write safely. Each backend calls this
    first (after the reference's own first checks on student and teacher, so that a bad student
    is reported as the reference reports it). ``out`` must be an array of the student's kind
    (NumPy / CuPy), shape and dtype, writable, and overlap no input: a kernel reads a row of the
    student and teacher while it writes gradient rows, so ``out`` over other rows of the student
    (``out = buf[1:]`` for ``student = buf[:-1]``) or over the teacher would silently give a wrong
    gradient. The one overlap allowed is the student array itself (same data pointer, shape and
    strides: in place). Overlap is judged by address ranges (``may_share_memory``, host-side,
    the same on NumPy and CuPy): a view interleaved with an input (other columns of the same
    buffer) is refused too, though it shares no element."""
    if out is None:
        return
    check_float_array(student, "student", ndim_min=2)
    check_float_array(teacher, "teacher", ndim_min=2)
    if not hasattr(out, "dtype") or not hasattr(out, "shape"):
        raise TypeError(f"out: expected a NumPy or CuPy array, got {type(out).__name__}")
    if is_cupy_array(out) != is_cupy_array(student):
        raise TypeError(f"out: expected a {'CuPy' if is_cupy_array(student) else 'NumPy'} array like the "
                        f"student, got {type(out).__module__}.{type(out).__name__}")
    f32_ok = float32_for_bf16 and student.dtype.name == "bfloat16" and out.dtype == np.float32
    if tuple(out.shape) != tuple(student.shape) or (out.dtype != student.dtype and not f32_ok):
        also = " (or float32)" if float32_for_bf16 and student.dtype.name == "bfloat16" else ""
        raise ValueError(f"out: expected shape {tuple(student.shape)} and dtype {student.dtype}{also}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if not getattr(out.flags, "writeable", True):   # CuPy arrays are always writable
        raise ValueError("out: the array is read-only (flags.writeable is False); pass a writable array")
    xp = get_namespace(out)
    in_place = (_data_ptr(out) == _data_ptr(student) and tuple(out.strides) == tuple(student.strides))
    for name, x in (("student", student), ("teacher", teacher), ("labels", labels), ("mask", mask)):
        if not hasattr(x, "shape") or is_cupy_array(x) != is_cupy_array(out) or (name == "student" and in_place):
            continue   # not an array (refused later), another device (cannot overlap), or exactly in place
        if xp.may_share_memory(out, x):
            also = " (it may be the student array itself, for the gradient in place)" if name == "student" else ""
            raise ValueError(f"out: overlaps the memory of {name}; pass an array that shares no memory "
                             f"with the inputs{also}")


class Rows(NamedTuple):
    """What every fused kernel needs, prepared once (the same for NumPy and CuPy arrays)."""
    s: object            # (N, C) contiguous student rows
    t: object            # (N, C) contiguous teacher rows
    labels: object       # (N,) int64: the label on rows that get the hard term, else -1 (conventions.kernel_labels)
    weights: object      # (N,) d(reduced loss)/d(row loss) (conventions.row_weights): 0 on rows that count nowhere
    valid: object        # (N,) bool
    n_valid: object      # int; on_device: a 0-d device array
    lead: tuple          # the leading shape of the logits
    T: float
    soft_weight: float   # alpha * tau (conventions.term_weights)
    hard_weight: float   # 1 - alpha, or the hard_weight given
    bad_labels: object = None   # on_device: (N,) bool, label outside [0, C) and not ignore_index (unchecked yet)


def prepare_rows(student, teacher, labels, *, T, alpha, kind, scale_t2, reduction, ignore_index, mask,
                 weight_dtype, unlabeled="ignore", on_device=False, normalizer=None, hard_weight=None, beta=None):
    """Validate (with the reference's checks, student values excepted: the kernels check those
    in their first pass) and lay out the rows for a kernel. ``on_device=True`` (CuPy) syncs with
    the host nowhere: the label range becomes ``bad_labels`` for the kernel's flags, and the count
    of valid rows stays a device scalar."""
    xp, T, alpha, roles, _, normalizer, _ = check_kd_arguments(
        student, teacher, labels, T=T, alpha=alpha, kind=kind, teacher_as="logits", reduction=reduction,
        ignore_index=ignore_index, mask=mask, unlabeled=unlabeled, check_student=False,
        check_label_range=not on_device, normalizer=normalizer, hard_weight=hard_weight, beta=beta)
    C = student.shape[-1]
    s = xp.ascontiguousarray(student.reshape(-1, C))
    t = xp.ascontiguousarray(teacher.reshape(-1, C))
    bad_labels = roles.out_of_range if on_device else None   # what row_roles would refuse, unchecked here
    n_valid = normalizer if normalizer is not None else roles.valid.sum() if on_device else int(roles.valid.sum())
    # the kernels' gradient: of the reduced loss, or for "none" of the sum of the row losses
    upstream = xp.ones(s.shape[0], weight_dtype) if reduction == "none" else 1.0
    weights = conventions.row_weights(upstream, roles.valid, reduction, weight_dtype, n_valid=n_valid)
    soft_weight, hard_weight = conventions.term_weights(alpha, T, scale_t2, hard_weight)
    return Rows(s, t, conventions.kernel_labels(roles, C, xp), weights, roles.valid, n_valid,
                tuple(student.shape[:-1]), T, soft_weight, hard_weight, bad_labels)


def gradient_buffer(out, s, xp):
    """Where a kernel writes the (N, C) gradient: ``out`` itself when it is C-contiguous (a view,
    in place over the student allowed), else a new array. Returns (buffer, is_out)."""
    if out is not None and out.flags.c_contiguous:
        return out.reshape(-1, s.shape[1]), True
    return xp.empty_like(s), False


def deliver_gradient(buf, is_out, out, shape):
    """The gradient as the caller asked for it: in ``out`` (copied there unless written there), or
    the buffer in the logits' shape."""
    if out is None:
        return buf.reshape(shape)
    if not is_out:
        out[...] = buf.reshape(out.shape)
    return out


def raise_for_flags(student, teacher, labels, valid, *, T, alpha, kind, reduction, ignore_index, mask, unlabeled,
                    hard_weight=None, beta=None):
    """A kernel flagged rows (bad values, or on the GPU a label out of range): run the reference's
    checks in the reference's order, so that the error raised is the reference's, word for word."""
    check_kd_arguments(student, teacher, labels, T=T, alpha=alpha, kind=kind, teacher_as="logits",
                       reduction=reduction, ignore_index=ignore_index, mask=mask, unlabeled=unlabeled,
                       check_student=False, hard_weight=hard_weight, beta=beta)
    check_logits(student, "student", valid)
    check_logits(teacher, "teacher", valid)
    raise ValueError("student/teacher: invalid values (NaN, +inf or an all -inf row)")


def sum_of_logs(x, C: int) -> float:
    """sum_i log x_i for row statistics in [1/C, C] (Zs/Zt, Zs or Z1), as logs of products of k
    values: C^k stays below 1e290, so no product overflows or underflows, the error is that of k
    multiplications (k u relative, k <= 64), and NumPy takes N/k logs instead of N (its float64 log
    costs about 1.2 ns a value here, more than the multiplications). The products run down the
    columns of a (k, N/k) view (k - 1 vectorized multiplications of rows: 65536 values 75 -> 19 us
    against products along rows of k)."""
    k = int(max(1, min(64, 290 // max(np.log10(C + 1.0), 1e-9))))
    n = (len(x) // k) * k
    head = np.log(np.prod(x[:n].reshape(k, -1), axis=0)).sum() if n else 0.0
    return float(head + np.log(x[n:]).sum())


# below this many elements the serial kernel is as fast or faster (thread start-up costs more than
# the work). Measured on 2 cores, float32: 8x10 serial 32 us / parallel 38 us; 64x100 49 / 47;
# 256x100 99 / 76; 128x1000 307 / 181 (about 30 us of each call is argument checking in NumPy).
SERIAL_BELOW = 1 << 12


def _softmax_kl_numba(student, teacher, labels, *, T, alpha, kind, scale_t2, reduction, ignore_index,
                      mask, unlabeled, out, normalizer=None, hard_weight=None, beta=None):
    from .numba_cpu import KIND_CODES, SHORT_BLOCK_ROWS, SHORT_ROWS_UP_TO, RowStats, get_kernel, \
        hard_power  # noqa: PLC0415
    check_float_array(student, "student", ndim_min=2)   # the reference's first check, its message
    if is_cupy_array(student):
        raise TypeError("student: the Numba kernel takes NumPy arrays, got a CuPy array (use backend='cupy')")
    bf16 = student.dtype.name == "bfloat16"
    if student.dtype not in (np.float32, np.float64) and not bf16:
        raise TypeError(f"student: the Numba kernel takes float32, float64 or bfloat16, got {student.dtype}")
    check_out(out, student, teacher, labels, mask, float32_for_bf16=True)
    if bf16 and teacher.dtype != student.dtype:
        raise TypeError(f"teacher: bfloat16 student logits need bfloat16 teacher logits, got {teacher.dtype}")
    rows = prepare_rows(student, teacher, labels, T=T, alpha=alpha, kind=kind, scale_t2=scale_t2,
                        reduction=reduction, ignore_index=ignore_index, mask=mask, unlabeled=unlabeled,
                        weight_dtype=np.float64, normalizer=normalizer, hard_weight=hard_weight, beta=beta)
    s, t = (rows.s.view(np.uint16), rows.t.view(np.uint16)) if bf16 else (rows.s, rows.t)
    N, C = s.shape
    # in place is safe: a row's student entries are all read before any of its gradient is written
    if bf16 and out is not None and out.dtype == np.float32:   # a float32 gradient of bfloat16 logits
        buf, is_out = (out.reshape(N, C), True) if out.flags.c_contiguous else (np.empty((N, C), np.float32), False)
    else:   # the gradient in the logits' dtype (bfloat16 through its uint16 bits)
        buf, is_out = gradient_buffer(out.view(np.uint16) if bf16 and out is not None else out, s, np)
    stats = RowStats.empty(N)
    flags = np.zeros(N, np.int8)
    fused = divergences._endpoint(kind, beta)   # jsd at beta 0 / 1: forward / reverse KL (the reference's rule)
    parallel = s.size >= SERIAL_BELOW
    n_threads = __import__("numba").get_num_threads() if parallel else 1
    short = C <= SHORT_ROWS_UP_TO and fused in ("kl", "ce") and s.dtype != np.float64   # float32 arithmetic
    if short:   # blocks of rows transposed so that SIMD lanes run across rows
        rows_per_chunk = SHORT_BLOCK_ROWS
    else:       # several chunks of rows per thread balance the load
        rows_per_chunk = max(1, -(-N // (8 * n_threads))) if parallel else max(N, 1)
    proto = np.empty(0, np.float64 if s.dtype == np.float64 else np.float32)   # the compute dtype
    get_kernel(s.dtype, parallel, short)(s, t, rows.labels, rows.weights, 1.0 / rows.T, rows.soft_weight,
                                         rows.hard_weight, KIND_CODES[fused], float(beta or 0.0), hard_power(rows.T),
                                         buf, *stats, flags, rows_per_chunk, proto)
    if flags.any():  # rare
        raise_for_flags(student, teacher, labels, rows.valid, T=T, alpha=alpha, kind=kind, reduction=reduction,
                        ignore_index=ignore_index, mask=mask, unlabeled=unlabeled, hard_weight=hard_weight, beta=beta)
    if buf.dtype == np.uint16:
        buf = buf.view(student.dtype)
    grad = deliver_gradient(buf, is_out, out, student.shape)
    loss_type = np.float32 if bf16 else student.dtype.type
    # row loss = soft (soft_a + log soft_z) + hard (log Z1 - (s_y - ms)); rows without a term
    # hold its neutral statistics (0, 1), so give 0; the logs run over all rows at once in NumPy
    ratio = fused in ("kl", "ce")   # the other kinds leave soft_z = 1 (their D is in soft_a)
    if reduction == "none":
        row_loss = np.zeros(N, np.float64)
        if rows.soft_weight > 0:
            row_loss += rows.soft_weight * (stats.soft_a + np.log(stats.soft_z) if ratio else stats.soft_a)
        if rows.hard_weight > 0:
            row_loss += rows.hard_weight * (np.log(stats.hard_z) - stats.hard_sy)
        return row_loss.astype(loss_type).reshape(rows.lead), grad
    total = 0.0
    if rows.soft_weight > 0:
        total += rows.soft_weight * (stats.soft_a.sum() + (sum_of_logs(stats.soft_z, C) if ratio else 0.0))
    if rows.hard_weight > 0:
        total += rows.hard_weight * (sum_of_logs(stats.hard_z, C) - stats.hard_sy.sum())
    return loss_type(conventions.reduce_total(total, reduction, rows.n_valid)), grad
