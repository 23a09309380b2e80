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
The fused kernels compute kind "kl" and "ce" without label smoothing (``FUSED_KINDS``); for
"reverse_kl", "jsd", "tvd", "dkd" or ``label_smoothing``, "auto" runs the reference (and warns once per kind) and an explicit fused backend is refused.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ..backend import check_float_array, check_logits, get_namespace, is_cupy_array
from ..losses import conventions
from ..checks import UserError
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


# the divergences the fused kernels compute; the others (reverse_kl, jsd, tvd) run on the reference
FUSED_KINDS = ("kl", "ce")
_said_fallback = set()


def _unfused(kind, label_smoothing, vocab, student, teacher, backend=None):
    """What the fused kernels cannot compute in this call (None: they can)."""
    fused = FUSED_KINDS
    if backend == "cupy":   # the CUDA kernel has more kinds (cupy_gpu.CUPY_KINDS)
        from .cupy_gpu import CUPY_KINDS  # noqa: PLC0415
        fused = CUPY_KINDS
    if kind in KINDS and kind not in fused:
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
        raise UserError(f"{what}: the fused kernels compute kind {' and '.join(FUSED_KINDS)} without label "
                        f"smoothing, on equal class counts; use backend='numpy' (the reference) or 'auto' (falls "
                        f"back to it)")
    if what not in _said_fallback:
        _said_fallback.add(what)
        warnings.warn(f"{what} has no fused kernel yet: backend='auto' runs the NumPy reference", stacklevel=3)
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
    return _softmax_kl_numba(student, teacher, labels, scale_t2=scale_t2, out=out, **kw)


def _data_ptr(a) -> int:
    return a.data.ptr if is_cupy_array(a) else a.__array_interface__["data"][0]


def check_out(out, student, teacher, labels=None, mask=None):
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
    if tuple(out.shape) != tuple(student.shape) or out.dtype != student.dtype:
        raise ValueError(f"out: expected shape {tuple(student.shape)} and dtype {student.dtype}, "
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
    consecutive values: C^k stays below 1e290, so no product overflows or underflows, the error is
    that of k multiplications (k u relative, k <= 64), and NumPy takes N/k logs instead of N (its
    float64 log costs about 1.2 ns a value here, more than the multiplications)."""
    k = int(max(1, min(64, 290 // max(np.log10(C + 1.0), 1e-9))))
    n = (len(x) // k) * k
    head = np.log(np.prod(x[:n].reshape(-1, k), axis=1)).sum() if n else 0.0
    return float(head + np.log(x[n:]).sum())


# below this many elements the serial kernel is as fast or faster (thread start-up costs more than
# the work). Measured on 2 cores, float32: 8x10 serial 32 us / parallel 38 us; 64x100 49 / 47;
# 256x100 99 / 76; 128x1000 307 / 181 (about 30 us of each call is argument checking in NumPy).
SERIAL_BELOW = 1 << 12


def _softmax_kl_numba(student, teacher, labels, *, T, alpha, kind, scale_t2, reduction, ignore_index,
                      mask, unlabeled, out, normalizer=None, hard_weight=None):
    from .numba_cpu import SHORT_BLOCK_ROWS, SHORT_ROWS_UP_TO, RowStats, get_kernel  # noqa: PLC0415
    check_float_array(student, "student", ndim_min=2)   # the reference's first check, its message
    if is_cupy_array(student):
        raise TypeError("student: the Numba kernel takes NumPy arrays, got a CuPy array (use backend='cupy')")
    if student.dtype not in (np.float32, np.float64):
        raise TypeError(f"student: the Numba kernel takes float32 or float64, got {student.dtype}")
    check_out(out, student, teacher, labels, mask)
    rows = prepare_rows(student, teacher, labels, T=T, alpha=alpha, kind=kind, scale_t2=scale_t2,
                        reduction=reduction, ignore_index=ignore_index, mask=mask, unlabeled=unlabeled,
                        weight_dtype=np.float64, normalizer=normalizer, hard_weight=hard_weight)
    s, t = rows.s, rows.t
    N, C = s.shape
    # in place is safe: a row's student entries are read (passes A, B) before any is written (C)
    buf, is_out = gradient_buffer(out, s, np)
    stats = RowStats.empty(N)
    flags = np.zeros(N, np.int8)
    parallel = s.size >= SERIAL_BELOW
    n_threads = __import__("numba").get_num_threads() if parallel else 1
    short = C <= SHORT_ROWS_UP_TO
    if short:   # blocks of rows transposed so that SIMD lanes run across rows
        rows_per_chunk = SHORT_BLOCK_ROWS
    else:       # several chunks of rows per thread balance the load
        rows_per_chunk = max(1, -(-N // (8 * n_threads))) if parallel else max(N, 1)
    get_kernel(s.dtype, parallel, short)(s, t, rows.labels, rows.weights, 1.0 / rows.T, rows.soft_weight,
                                         rows.hard_weight, kind == "ce", conventions.shares_exponential(rows.T),
                                         buf, *stats, flags, rows_per_chunk)
    if flags.any():  # rare
        raise_for_flags(student, teacher, labels, rows.valid, T=T, alpha=alpha, kind=kind, reduction=reduction,
                        ignore_index=ignore_index, mask=mask, unlabeled=unlabeled, hard_weight=hard_weight)
    grad = deliver_gradient(buf, is_out, out, student.shape)
    # row loss = soft (A/Zt + log(Zs/Zt or Zs)) + hard (log Z1 - (s_y - ms)); rows without a term
    # hold its neutral statistics (0, 1), so give 0; the logs run over all rows at once in NumPy
    if reduction == "none":
        row_loss = np.zeros(N, np.float64)
        if rows.soft_weight > 0:
            row_loss += rows.soft_weight * (stats.soft_a + np.log(stats.soft_z))
        if rows.hard_weight > 0:
            row_loss += rows.hard_weight * (np.log(stats.hard_z) - stats.hard_sy)
        return row_loss.astype(student.dtype).reshape(rows.lead), grad
    total = 0.0
    if rows.soft_weight > 0:
        total += rows.soft_weight * (stats.soft_a.sum() + sum_of_logs(stats.soft_z, C))
    if rows.hard_weight > 0:
        total += rows.hard_weight * (sum_of_logs(stats.hard_z, C) - stats.hard_sy.sum())
    return student.dtype.type(conventions.reduce_total(total, reduction, rows.n_valid)), grad
