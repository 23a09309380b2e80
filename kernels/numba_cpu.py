"""Fused softmax-KL on the CPU (Numba): loss and student gradient in one call, rows in parallel.

Per row (s, t the student and teacher logits, T the temperature, y the label):
    pass A  ms = max s,  mt = max t; also counts NaN/+inf entries (the input checks, in-kernel)
    pass B  es = e^((s - ms)/T),  et = e^((t - mt)/T),  e1 = e^(s - ms)  (kept in a row buffer)
            Zs = sum es,  Zt = sum et,  Z1 = sum e1,  A = sum_{et > 0} et (zt - zs)
            KL(q||p)  = A / Zt + log(Zs / Zt)              (zs, zt the scaled shifted logits)
            H(q, p)   = -sum_{et > 0} et zs / Zt + log Zs  (kind="ce")
            CE        = log Z1 - (s_y - ms)
            (the kernel stores per row, in ``RowStats``: soft_a = A / Zt, soft_z = Zs / Zt or Zs,
            hard_z = Z1, hard_sy = s_y - ms; the caller takes the logs over all rows with NumPy's
            SIMD log)
    pass C  grad = w (soft / T (es / Zs - et / Zt) + hard_i (e1 / Z1 - onehot(y)))
            soft = alpha tau, hard = 1 - alpha (conventions.term_weights); hard_i = hard on rows
            with a label (y >= 0), 0 on rows that get the soft term alone (y = -1).
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

from typing import NamedTuple

from .fastexp import exp_neg_f32

__all__ = ["FASTMATH", "get_kernel", "RowStats", "BAD_STUDENT", "BAD_TEACHER"]

FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
BAD_STUDENT, BAD_TEACHER = 1, 2


class RowStats(NamedTuple):
    """What the kernel leaves per row for the loss (float64 (N,) each; the neutral values 0 and 1
    on rows without the term): row loss = soft (soft_a + log soft_z) + hard (log hard_z - hard_sy)."""
    soft_a: object    # A / Zt
    soft_z: object    # Zs / Zt (kind "kl") or Zs (kind "ce")
    hard_z: object    # Z1
    hard_sy: object   # s_y - ms

    @classmethod
    def empty(cls, n):
        return cls(*np.empty((4, n), np.float64))


@njit(inline="always")
def _exp64(x):
    return math.exp(x)


def _make(exp, parallel):
    # no cache=True: closures made by this factory share one name and source line, and Numba's
    # on-disk cache would hand the serial variant to a parallel call (seen: a 2x slowdown)
    @njit(parallel=parallel, fastmath=FASTMATH)
    def kernel(s, t, labels, weights, inv_T, soft_coef, hard_coef, kind_ce, share_hard,
               out, soft_a, soft_z, hard_z, hard_sy, flags, rows_per_chunk):
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
                soft_a[i] = 0.0    # the neutral statistics: a row that counts nowhere gives 0
                soft_z[i] = 1.0
                hard_z[i] = 1.0
                hard_sy[i] = 0.0
                y = labels[i]
                hard_i = hard_coef if y >= 0 else 0.0   # -1: the soft term alone
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
                if hard_i != 0.0 and not share_hard:
                    for c in range(C):
                        e = exp(s[i, c] - msx)
                        e1[c] = e
                        Z1 += np.float64(e)
                elif hard_i != 0.0:
                    Z1 = Zs
                # the logs are taken by NumPy over all rows at once (a SIMD log), not here: for
                # C = 10 three scalar libm logs per row cost more than the row itself
                soft_a[i] = A / Zt
                soft_z[i] = Zs if kind_ce else Zs / Zt
                if hard_i != 0.0:
                    hard_z[i] = Z1
                    hard_sy[i] = np.float64(s[i, y]) - ms
                # pass C: the gradient from the buffers, per-row coefficients
                gs = w * soft_coef * inv_T
                a_s = dt(gs / Zs)
                a_t = dt(gs / Zt)
                if hard_i != 0.0:
                    a_1 = dt(w * hard_i / Z1)
                    for c in range(C):
                        out[i, c] = a_s * es[c] - a_t * et[c] + a_1 * e1[c]
                    out[i, y] -= dt(w * hard_i)
                else:
                    for c in range(C):
                        out[i, c] = a_s * es[c] - a_t * et[c]
    return kernel


def _make_short(exp, parallel):
    """The same computation for short rows (C up to SHORT_ROWS_UP_TO), with SIMD lanes across rows.

    A loop over 10 classes leaves most of a vector idle and runs scalar remainders, so a block of
    R rows is first transposed into (C, R) buffers; every later loop runs along the R rows of one
    class, contiguous and full width: the maxima, the exponentials, the sums and the gradient.
    The gradient is transposed back at the end. Rows that count nowhere are copied as zeros
    (their statistics stay finite and their coefficients are 0, so their gradient is exactly 0).
    Rows with the soft term alone (label -1) get a hard coefficient of 0 (their Z1 is computed with
    the block's and not used).
    """
    @njit(fastmath=FASTMATH)
    def _short_block(s, t, labels, weights, inv_T, inv_T_x, soft_coef, hard_coef, kind_ce, share_hard, out,
                     soft_a, soft_z, hard_z, hard_sy,
                     flags, r0, nr, sT, tT, es, et, e1, ms, mt, bad_s, bad_t, Zs, Zt, Z1, A, a_s, a_t, a_1):
        """One block of R rows of the short-row kernel (the buffers belong to the caller's group)."""
        C = s.shape[1]
        R = sT.shape[1]
        dt = s.dtype.type
        for r in range(R):
            ms[r] = -np.inf
            mt[r] = -np.inf
            bad_s[r] = 0
            bad_t[r] = 0
            Zs[r] = 0.0
            Zt[r] = 0.0
            Z1[r] = 0.0
            A[r] = 0.0
        for r in range(R):   # transpose in; rows past the end and rows of weight 0 become zeros
            live = r < nr and weights[r0 + r] != 0.0
            for c in range(C):
                sT[c, r] = s[r0 + r, c] if live else dt(0)
                tT[c, r] = t[r0 + r, c] if live else dt(0)
        for c in range(C):   # pass A along the rows
            for r in range(R):
                sc = sT[c, r]
                tc = tT[c, r]
                ms[r] = max(ms[r], sc)
                mt[r] = max(mt[r], tc)
                bad_s[r] += 0 if sc < np.inf else 1
                bad_t[r] += 0 if tc < np.inf else 1
        for r in range(nr):
            flag = (BAD_STUDENT if (bad_s[r] or ms[r] == -np.inf) else 0) + \
                (BAD_TEACHER if (bad_t[r] or mt[r] == -np.inf) else 0)
            if flag:  # the caller raises; keep the arithmetic below finite
                flags[r0 + r] = flag
                ms[r] = 0
                mt[r] = 0
                for c in range(C):
                    sT[c, r] = 0
                    tT[c, r] = 0
        for c in range(C):   # pass B along the rows
            for r in range(R):
                zs = (sT[c, r] - ms[r]) * inv_T_x
                zt = (tT[c, r] - mt[r]) * inv_T_x
                a = exp(zs)
                e = exp(zt)
                es[c, r] = a
                et[c, r] = e
                Zs[r] += np.float64(a)
                Zt[r] += np.float64(e)
                d = -zs if kind_ce else zt - zs
                A[r] += np.float64(e * d) if e > 0 else 0.0
        if hard_coef != 0.0 and not share_hard:
            for c in range(C):
                for r in range(R):
                    e = exp(sT[c, r] - ms[r])
                    e1[c, r] = e
                    Z1[r] += np.float64(e)
        elif hard_coef != 0.0:
            for r in range(R):
                Z1[r] = Zs[r]
        for r in range(R):
            i = r0 + r
            w = weights[i] if (r < nr and flags[i] == 0) else 0.0
            y = labels[i] if r < nr else -1
            hard_r = hard_coef if y >= 0 else 0.0   # -1: the soft term alone
            gs = w * soft_coef * inv_T
            a_s[r] = dt(gs / Zs[r])
            a_t[r] = dt(gs / Zt[r])
            a_1[r] = dt(w * hard_r / Z1[r]) if hard_r != 0.0 else dt(0)
            if r < nr:
                soft_a[i] = A[r] / Zt[r] if w != 0.0 else 0.0
                soft_z[i] = (Zs[r] if kind_ce else Zs[r] / Zt[r]) if w != 0.0 else 1.0
                hard_z[i] = Z1[r] if (hard_r != 0.0 and w != 0.0) else 1.0
                hard_sy[i] = np.float64(sT[y, r]) - ms[r] if (hard_r != 0.0 and w != 0.0) else 0.0
        if hard_coef != 0.0:   # pass C along the rows, into es (no longer needed)
            for c in range(C):
                for r in range(R):
                    es[c, r] = a_s[r] * es[c, r] - a_t[r] * et[c, r] + a_1[r] * e1[c, r]
        else:                  # (e1 was never filled: 0 * garbage could be NaN)
            for c in range(C):
                for r in range(R):
                    es[c, r] = a_s[r] * es[c, r] - a_t[r] * et[c, r]
        for r in range(nr):  # transpose out, minus the one-hot of the label
            i = r0 + r
            for c in range(C):
                out[i, c] = es[c, r]
            if a_1[r] != 0:   # only rows with a label and weight have a hard coefficient
                out[i, labels[i]] -= dt(weights[i] * hard_coef)

    @njit(parallel=parallel, fastmath=FASTMATH)
    def kernel(s, t, labels, weights, inv_T, soft_coef, hard_coef, kind_ce, share_hard,
               out, soft_a, soft_z, hard_z, hard_sy, flags, rows_per_block):
        N, C = s.shape
        dt = s.dtype.type
        inv_T_x = dt(inv_T)
        R = rows_per_block
        n_blocks = (N + R - 1) // R
        # groups of consecutive blocks: buffers are allocated once per group, not per block
        n_groups = min(n_blocks, 64)
        for g in prange(n_groups):
            sT = np.empty((C, R), s.dtype)
            tT = np.empty((C, R), s.dtype)
            es = np.empty((C, R), s.dtype)
            et = np.empty((C, R), s.dtype)
            e1 = es if share_hard else np.empty((C, R), s.dtype)
            ms = np.empty(R, s.dtype)
            mt = np.empty(R, s.dtype)
            bad_s = np.empty(R, np.int32)
            bad_t = np.empty(R, np.int32)
            Zs = np.empty(R)
            Zt = np.empty(R)
            Z1 = np.empty(R)
            A = np.empty(R)
            a_s = np.empty(R, s.dtype)
            a_t = np.empty(R, s.dtype)
            a_1 = np.empty(R, s.dtype)
            for b in range(g * n_blocks // n_groups, (g + 1) * n_blocks // n_groups):
                _short_block(s, t, labels, weights, inv_T, inv_T_x, soft_coef, hard_coef, kind_ce, share_hard,
                             out, soft_a, soft_z, hard_z, hard_sy, flags, b * R, min(N, b * R + R) - b * R,
                             sT, tT, es, et, e1, ms, mt, bad_s, bad_t, Zs, Zt, Z1, A, a_s, a_t, a_1)
    return kernel


_KERNELS = {}
SHORT_ROWS_UP_TO = 16      # C at or below this takes the row-transposed kernel (measured: faster
                           # at C = 10 (2.1 vs 3.0 ms at 65536 rows), even at 32, slower at 64)
SHORT_BLOCK_ROWS = 128     # rows per transposed block (64..128 measured best)


def get_kernel(dtype, parallel: bool, short: bool = False):
    """The compiled kernel for float32 (vectorized exp) or float64 (libm exp) inputs."""
    key = (np.dtype(dtype).name, parallel, short)
    if key not in _KERNELS:
        exp = exp_neg_f32 if key[0] == "float32" else _exp64
        _KERNELS[key] = (_make_short if short else _make)(exp, parallel)
    return _KERNELS[key]
