"""Fused softmax-KL on the CPU (Numba): loss and student gradient in one call, rows in parallel.

Per row (s, t the student and teacher logits, T the temperature, y the label):
    pass A  ms = max s,  mt = max t; also counts NaN/+inf entries (the input checks, in-kernel)
    pass B  es = e^((s - ms)/T),  et = e^((t - mt)/T),  e1 = e^(s - ms)  (kept in a row buffer)
            Zs = sum es,  Zt = sum et,  Z1 = sum e1,  A = sum_{et > 0} et (zt - zs)
            KL(q||p)  = A / Zt + log(Zs / Zt)              (zs, zt the scaled shifted logits)
            H(q, p)   = -sum_{et > 0} et zs / Zt + log Zs  (kind="ce")
            CE        = log Z1 - (s_y - ms)
            (the kernel stores A / Zt, Zs / Zt or Zs, Z1, s_y - ms per row; the caller takes the
            logs over all rows with NumPy's SIMD log)
    pass C  grad = w (alpha tau / T (es / Zs - et / Zt) + (1 - alpha)(e1 / Z1 - onehot(y)))
It reads s and t from memory once in pass A; pass B re-reads the row, which is then in cache
(C = 32k float32 rows are 128 KB), and pass C reads the row buffers, not the inputs: the
memory traffic is the 12 bytes per element of the floor plus cache traffic. When T = 1 the hard
softmax reuses es. The derivation is that of ``minikd.losses.kd``, which this is tested against.

Numerics. float32 inputs: exponentials by the vectorizable ``fastexp.exp_neg_f32`` (relative error
<= 8e-8, flush to zero below e^-87.3), all sums and the loss terms (zt - zs) in float64, the
gradient formed in float32 from per-row float64 coefficients (a few units in the last place).
float64 inputs: libm exp and float64 throughout (agrees with the reference to ~1e-15).
Per-row losses are formed and summed by NumPy after the parallel loop: deterministic, no atomics.

Fastmath policy (one for the package, ``FASTMATH``): contraction, reassociation (vectorized
sums) and reciprocal approximations are allowed; "nnan" and "ninf" are not, because -inf
logits are legal, e^-inf = 0 must hold, and the NaN/+inf checks must see NaN and +inf.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .fastexp import exp_neg_f32

__all__ = ["FASTMATH", "get_kernel", "BAD_STUDENT", "BAD_TEACHER"]

FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
BAD_STUDENT, BAD_TEACHER = 1, 2


@njit(inline="always")
def _exp64(x):
    return math.exp(x)


def _make(exp, parallel):
    # no cache=True: closures made by this factory share one name and source line, and Numba's
    # on-disk cache would hand the serial variant to a parallel call (seen: a 2x slowdown)
    @njit(parallel=parallel, fastmath=FASTMATH)
    def kernel(s, t, labels, weights, inv_T, soft_coef, hard_coef, kind_ce, share_hard,
               out, stats, flags, rows_per_chunk):
        N, C = s.shape
        dt = s.dtype.type
        inv_T_x = dt(inv_T)
        n_chunks = (N + rows_per_chunk - 1) // rows_per_chunk
        for k in prange(n_chunks):
            es = np.empty(C, s.dtype)
            et = np.empty(C, s.dtype)
            e1 = es if share_hard else np.empty(C, s.dtype)
            for i in range(k * rows_per_chunk, min(N, (k + 1) * rows_per_chunk)):
                w = weights[i]
                stats[i, 0] = 0.0  # (A / Zt, log argument of the soft term, Z1, s_y - ms): see below
                stats[i, 1] = 1.0
                stats[i, 2] = 1.0
                stats[i, 3] = 0.0
                if w == 0.0:  # a row that counts nowhere: zero gradient, not inspected
                    for c in range(C):
                        out[i, c] = 0
                    continue
                # pass A: maxima and the input checks (NaN and +inf fail "x < inf")
                ms = -np.inf
                mt = -np.inf
                bad_s = 0
                bad_t = 0
                for c in range(C):
                    sc = s[i, c]
                    tc = t[i, c]
                    ms = max(ms, sc)
                    mt = max(mt, tc)
                    bad_s += 0 if sc < np.inf else 1
                    bad_t += 0 if tc < np.inf else 1
                if bad_s or ms == -np.inf or bad_t or mt == -np.inf:
                    flags[i] = (BAD_STUDENT if (bad_s or ms == -np.inf) else 0) + \
                        (BAD_TEACHER if (bad_t or mt == -np.inf) else 0)
                    for c in range(C):
                        out[i, c] = 0
                    continue
                msx = dt(ms)
                mtx = dt(mt)
                # pass B: exponentials into the row buffers, float64 sums
                Zs = 0.0
                Zt = 0.0
                Z1 = 0.0
                A = 0.0
                for c in range(C):
                    zs = (s[i, c] - msx) * inv_T_x
                    zt = (t[i, c] - mtx) * inv_T_x
                    a = exp(zs)
                    b = exp(zt)
                    es[c] = a
                    et[c] = b
                    Zs += np.float64(a)
                    Zt += np.float64(b)
                    d = -zs if kind_ce else zt - zs
                    A += np.float64(b * d) if b > 0 else 0.0
                if hard_coef != 0.0 and not share_hard:
                    for c in range(C):
                        e = exp(s[i, c] - msx)
                        e1[c] = e
                        Z1 += np.float64(e)
                elif hard_coef != 0.0:
                    Z1 = Zs
                # the logs are taken by NumPy over all rows at once (a SIMD log), not here: for
                # C = 10 three scalar libm logs per row cost more than the row itself
                y = labels[i]
                stats[i, 0] = A / Zt
                stats[i, 1] = Zs if kind_ce else Zs / Zt
                stats[i, 2] = Z1 if hard_coef != 0.0 else 1.0
                stats[i, 3] = np.float64(s[i, y]) - ms if hard_coef != 0.0 else 0.0
                # pass C: the gradient from the buffers, per-row coefficients
                gs = w * soft_coef * inv_T
                a_s = dt(gs / Zs)
                a_t = dt(gs / Zt)
                if hard_coef != 0.0:
                    a_1 = dt(w * hard_coef / Z1)
                    for c in range(C):
                        out[i, c] = a_s * es[c] - a_t * et[c] + a_1 * e1[c]
                    out[i, y] -= dt(w * hard_coef)
                else:
                    for c in range(C):
                        out[i, c] = a_s * es[c] - a_t * et[c]
    return kernel


_KERNELS = {}


def get_kernel(dtype, parallel: bool):
    """The compiled kernel for float32 (vectorized exp) or float64 (libm exp) inputs."""
    key = (np.dtype(dtype).name, parallel)
    if key not in _KERNELS:
        exp = exp_neg_f32 if key[0] == "float32" else _exp64
        _KERNELS[key] = _make(exp, parallel)
    return _KERNELS[key]
