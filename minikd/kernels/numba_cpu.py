"""Fused softmax-KL on the CPU (Numba): loss and student gradient in one call, rows in parallel.

Per row (s, t the student and teacher logits, T the temperature, y the label):
    pass 1  ms = max s,  mt = max t
    pass 2  zs = (s - ms)/T,  zt = (t - mt)/T,  z1 = s - ms
            Zs = sum e^zs,  Zt = sum e^zt,  Z1 = sum e^z1,  A = sum_{t > -inf} e^zt (zt - zs)
            KL(q||p)  = A / Zt - log Zt + log Zs
            H(q, p)   = -sum_{t > -inf} e^zt zs / Zt + log Zs      (kind="ce")
            CE        = log Z1 - z1[y]
    pass 3  grad_c = w (alpha tau / T (e^zs_c / Zs - e^zt_c / Zt) + (1 - alpha)(e^z1_c / Z1 - [c = y]))
It reads s and t twice and writes the gradient once. The same derivation as
``minikd.losses.kd`` (which this kernel is tested against): p - q, rescaled.

Numerics: every element is converted to float64 and every sum is a float64 accumulation in
a fixed order, so a float32 input gives a loss whose error is dominated by the float32 rounding
of the inputs (relative ~1e-7 of the terms), and a gradient rounded once to float32 at the end
(error <= 2^-24 |grad| per entry beyond the float64 work). The per-row losses are summed by
NumPy after the parallel loop: deterministic, no atomics.

Fastmath policy (one for the package, ``FASTMATH``): contraction, reassociation and reciprocal
approximations are allowed; "nnan" and "ninf" are not, because -inf logits are legal and
exp(-inf) = 0 must hold.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["FASTMATH", "softmax_kl_rows"]

FASTMATH = {"contract", "reassoc", "arcp", "nsz"}


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def softmax_kl_rows(s, t, labels, weights, inv_T, soft_coef, hard_coef, kind_ce, out, row_loss):
    """s, t, out: (N, C); labels (N,) int64 (ignored where hard_coef == 0); weights (N,) float64:
    the d(reduced loss)/d(row loss) of each row, 0 for rows that count nowhere. Writes the
    gradient into out and alpha tau KD + (1 - alpha) CE per row into row_loss (0 where weight 0)."""
    N, C = s.shape
    for i in prange(N):
        w = weights[i]
        if w == 0.0:
            for c in range(C):
                out[i, c] = 0.0
            row_loss[i] = 0.0
            continue
        ms = -np.inf
        mt = -np.inf
        for c in range(C):
            sc = np.float64(s[i, c])
            tc = np.float64(t[i, c])
            if sc > ms:
                ms = sc
            if tc > mt:
                mt = tc
        Zs = 0.0
        Zt = 0.0
        Z1 = 0.0
        A = 0.0
        for c in range(C):
            zs = (np.float64(s[i, c]) - ms) * inv_T
            tc = np.float64(t[i, c])
            Zs += math.exp(zs)
            if hard_coef != 0.0:
                Z1 += math.exp(np.float64(s[i, c]) - ms)
            if tc > -np.inf:
                zt = (tc - mt) * inv_T
                et = math.exp(zt)
                Zt += et
                A += et * (-zs if kind_ce else zt - zs)
        loss = 0.0
        if soft_coef != 0.0:
            kd = A / Zt + math.log(Zs) if kind_ce else A / Zt - math.log(Zt) + math.log(Zs)
            loss += soft_coef * kd
        if hard_coef != 0.0:
            loss += hard_coef * (math.log(Z1) - (np.float64(s[i, labels[i]]) - ms))
        row_loss[i] = loss
        g_soft = w * soft_coef * inv_T
        g_hard = w * hard_coef
        rZs = 1.0 / Zs
        rZt = 1.0 / Zt
        rZ1 = 1.0 / Z1 if hard_coef != 0.0 else 0.0
        for c in range(C):
            sc = np.float64(s[i, c])
            tc = np.float64(t[i, c])
            p = math.exp((sc - ms) * inv_T) * rZs
            q = math.exp((tc - mt) * inv_T) * rZt if tc > -np.inf else 0.0
            g = g_soft * (p - q)
            if hard_coef != 0.0:
                g += g_hard * (math.exp(sc - ms) * rZ1 - (1.0 if c == labels[i] else 0.0))
            out[i, c] = g
