"""A ``numba.cuda`` twin of the long-row (one block per row) algorithm of ``softmax_kl.cu``.

It exists to test, without a GPU, the parts of the CUDA kernel that are easy to get wrong: the
online max/sum updates with their rescaling of B, the merge of partial states, the -inf and
empty-state guards, the block-stride indexing and the second (gradient) pass. Run it under
``NUMBA_ENABLE_CUDASIM=1`` (the CUDA simulator) or on a GPU with numba-cuda. It merges the
threads' states through shared memory in a fixed tree (the .cu file uses warp shuffles, then
shared memory: the same merge, in another order). float32 throughout, like the .cu file.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

__all__ = ["softmax_kl_rows_twin", "THREADS"]

THREADS = 32   # power of two (the tree merge halves it)
LOG2E = 1.4426950408889634
NEG_INF = -math.inf


@cuda.jit(device=True, inline=True)
def _rescale(m_old, m_new, k):
    return 0.0 if m_old == NEG_INF else 2.0 ** ((m_old - m_new) * k)


@cuda.jit(device=True)
def _add(st, s, t, k, inv_T, kind):
    """st = [ms, mt, Zs, Z1, Zt, B, bad_s, bad_t] (a local float32 array)."""
    if math.isnan(s) or s == math.inf:
        st[6] = 1.0
    if math.isnan(t) or t == math.inf:
        st[7] = 1.0
    if s > st[0]:
        f = _rescale(st[0], s, k)
        f1 = _rescale(st[0], s, LOG2E)
        if st[4] > 0.0:
            st[5] += st[4] * (s - st[0]) * inv_T
        st[2] *= f
        st[3] *= f1
        st[0] = s
    if t > st[1]:
        f = _rescale(st[1], t, k)
        if st[4] > 0.0 and kind == 0:
            st[5] -= st[4] * (t - st[1]) * inv_T
        st[5] *= f
        st[4] *= f
        st[1] = t
    if s > NEG_INF:
        st[2] += 2.0 ** ((s - st[0]) * k)
        st[3] += 2.0 ** ((s - st[0]) * LOG2E)
    if t > NEG_INF:
        e = 2.0 ** ((t - st[1]) * k)
        sd = NEG_INF if s == NEG_INF else s - st[0]
        d = ((t - st[1]) - sd) * inv_T if kind == 0 else -sd * inv_T
        st[4] += e
        st[5] += e * d


@cuda.jit(device=True)
def _shift_to(ms, mt, Zs, Z1, Zt, B, new_ms, new_mt, k, inv_T, kind):
    f = _rescale(mt, new_mt, k)
    if Zt > 0.0:
        shift = (new_ms - ms) - ((new_mt - mt) if kind == 0 else 0.0)
        B = f * (B + Zt * shift * inv_T)
    else:
        B = 0.0
    return Zs * _rescale(ms, new_ms, k), Z1 * _rescale(ms, new_ms, LOG2E), Zt * f, B


@cuda.jit
def _kernel(s, t, labels, weights, k, inv_T, soft, hard, kind, out, row_loss, flags):
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    C = s.shape[1]
    sh = cuda.shared.array((8, THREADS), float32)
    w = weights[row]
    if w == 0.0:
        for c in range(tid, C, THREADS):
            out[row, c] = 0.0
        if tid == 0:
            row_loss[row] = 0.0
        return
    st = cuda.local.array(8, float32)
    st[0] = NEG_INF
    st[1] = NEG_INF
    for j in range(2, 8):
        st[j] = 0.0
    for c in range(tid, C, THREADS):
        _add(st, s[row, c], t[row, c], k, inv_T, kind)
    for j in range(8):
        sh[j, tid] = st[j]
    y = labels[row]
    s_y = s[row, y]   # read before the barriers, as the .cu file does (out may be s there)
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:   # fixed tree merge of partial states
        if tid < stride:
            o = tid + stride
            ms = max(sh[0, tid], sh[0, o])
            mt = max(sh[1, tid], sh[1, o])
            a = _shift_to(sh[0, tid], sh[1, tid], sh[2, tid], sh[3, tid], sh[4, tid], sh[5, tid], ms, mt, k, inv_T, kind)
            b = _shift_to(sh[0, o], sh[1, o], sh[2, o], sh[3, o], sh[4, o], sh[5, o], ms, mt, k, inv_T, kind)
            sh[0, tid] = ms
            sh[1, tid] = mt
            sh[2, tid] = a[0] + b[0]
            sh[3, tid] = a[1] + b[1]
            sh[4, tid] = a[2] + b[2]
            sh[5, tid] = a[3] + b[3]
            sh[6, tid] = max(sh[6, tid], sh[6, o])
            sh[7, tid] = max(sh[7, tid], sh[7, o])
        cuda.syncthreads()
        stride //= 2
    ms, mt, Zs, Z1, Zt, B = sh[0, 0], sh[1, 0], sh[2, 0], sh[3, 0], sh[4, 0], sh[5, 0]
    flag = (1 if (sh[6, 0] > 0 or ms == NEG_INF) else 0) + (2 if (sh[7, 0] > 0 or mt == NEG_INF) else 0)
    if tid == 0:
        flags[row] = flag
        loss = 0.0
        if flag == 0:
            if soft != 0.0:
                kd = B / Zt - math.log(Zt) + math.log(Zs) if kind == 0 else B / Zt + math.log(Zs)
                loss += soft * kd
            if hard != 0.0:
                loss += hard * (math.log(Z1) - (s_y - ms))
        row_loss[row] = loss
    if flag != 0:
        for c in range(tid, C, THREADS):
            out[row, c] = 0.0
        return
    cs = w * soft * inv_T / Zs
    ct = w * soft * inv_T / Zt
    ch = w * hard / Z1
    for c in range(tid, C, THREADS):
        g = cs * 2.0 ** ((s[row, c] - ms) * k) - ct * 2.0 ** ((t[row, c] - mt) * k)
        if hard != 0.0:
            g += ch * 2.0 ** ((s[row, c] - ms) * LOG2E) - (w * hard if c == y else 0.0)
        out[row, c] = g


def softmax_kl_rows_twin(s, t, labels, weights, T, soft, hard, kind_ce):
    """Run the twin on float32 host arrays; returns (grad, row_loss, flags)."""
    N, C = s.shape
    out = np.zeros_like(s)
    row_loss = np.zeros(N, np.float32)
    flags = np.zeros(N, np.int32)
    _kernel[N, THREADS](s, t, labels, weights.astype(np.float32), np.float32(LOG2E / T), np.float32(1.0 / T),
                        np.float32(soft), np.float32(hard), int32(1 if kind_ce else 0), out, row_loss, flags)
    return out, row_loss, flags
