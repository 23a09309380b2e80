"""Fused softmax-divergence on the CPU (Numba): loss statistics and student gradient in one call,
rows in parallel, for every divergence of the reference (kl, ce, reverse_kl, jsd, tvd).

One row: s, t the student and teacher logits, T the temperature, y the label (-1: the soft term
alone), w the row weight, soft = alpha tau and hard = 1 - alpha (``conventions.term_weights``);
zs = (s - ms)/T, zt = (t - mt)/T measured from the row maxima; es = e^zs, et = e^zt, e1 = e^(s - ms);
Zs, Zt, Z1 their sums; p = es/Zs, q = et/Zt, p1 = e1/Z1.

kl / ce, the fast rows (float32 and bfloat16 rows whose values are all finite)
    One pass over the row in blocks of BLOCK values (the block in L1):
      (a) the block maxima bs, bt (maxnum: vectorized) and a finiteness check: the sum of 0 x is 0
          unless some x is NaN or +-inf (then the row leaves for the general path below; not x - x,
          which reassociation may cancel to 0; on AVX-512, where exp2_fast is NaN at every
          non-finite argument, 0 times the sums of (c) instead: ``EXP2_PROPAGATES``), in the
          same loop as the block's exponentials, which are then measured from the running maxima
          and may exceed 1, up to a reach of min(REACH_E T, 41 min(T, 1)) logits: every
          exponential, es^T included, stays below 2^60, and the exponent's rounding (u |s - m| / T
          relative, u = 2^-24) stays within about twice exp2_fast's own error; a block that jumps
          further is recomputed from its maxima. The running maxima start from the maxima of the
          row's first ANCHOR classes (so the row's reads start in the loop that computes: see
          Memory), raised toward the previous fast row's final maxima by at most the reach (rows
          of a batch have maxima alike, and a start near the row's maxima leaves less to redo;
          the start stays within the reach above the row's maxima, so the row's largest class
          keeps es >= e^(-reach/T) >= e^-4 and e^(s - m) >= e^-reach >= e^-41: nothing of weight
          underflows). Rows with C < FUSE_FROM take their maxima first (one block: exact);
      (b) online softmax (Milakov & Gimelshein 2018): where a block raises the running maxima
          (ms, mt) -> (ns, nt), the sums so far are brought to the new maxima,
              Zs *= e^((ms - ns)/T),  Zt *= f = e^((mt - nt)/T),  Z1 *= e^(ms - ns),
              A  <- f (A + Zt delta),  delta = ((ns - ms) - [kl] (nt - mt)) / T
          (A = sum et (zt - zs) for kl, sum et (-zs) for ce: d = zt - zs shifts by delta);
      (c) es = 2^((s - m) k), et = 2^((t - m') k), k = log2(e)/T (``fastexp.exp2_fast``) into row
          buffers, with the block's sums in float32, added to float64 row sums;
      (d) the hard term: e1 = es^T by multiplications where T is an integer 2..8 (no third
          exponential), es itself at T = 1, else e1 = 2^((s - m) log2 e) into a third buffer.
    The maxima each block was measured from are kept, and the gradient pass scales each block
    by its own factor:  grad = cs_j es - ct_j et + ch_j e1 - [c = y] w hard,
        cs_j = w soft e^((ms_j - ms)/T) / (T Zs),  ct_j = w soft e^((mt_j - mt)/T) / (T Zt),
        ch_j = w hard e^(ms_j - ms) / Z1.
    Memory: s and t are read once from memory (a redone block's second read hits L1), the
    gradient is written once (from C = STREAM_FROM on, computed into a scratch block and streamed
    past the caches by non-temporal stores: ``stream``); the row buffers stay in L2 for C up to
    ~64k. From C = FUSE_FROM on, the gradient of row i - 1 is written in row i's first pass: each
    class of a block takes row i - 1's gradient from the buffers, then overwrites them with row
    i's exponentials (``_exps_loop``), so the gradient's stores and the logits' reads from memory
    both spread through the arithmetic instead of waiting at the row's ends
    (``_chunk_fast_rows``). Shorter rows write their gradient right after their first pass.
    Statistics per row (``RowStats``): soft_a = A / Zt, soft_z = Zs / Zt (kl) or Zs (ce),
    hard_z = Z1, hard_sy = s_y - ms, so that
        KL(q || p) = soft_a + log soft_z,  H(q, p) = soft_a + log soft_z,  CE = log hard_z - hard_sy;
    the caller takes the logs for all rows at once (NumPy's SIMD log).

kl / ce, the general rows (float64 rows, and rows with -inf classes, NaN or +inf)
    Three passes, as the reference: maxima and the input checks (NaN / +inf / all -inf rows are
    flagged: BAD_STUDENT, BAD_TEACHER, and the caller raises the reference's error); es, et, e1
    and the sums in float64 (``d = zt - zs`` only where et > 0: 0 e^-inf never makes a NaN);
    the gradient from the buffers.

reverse_kl, jsd(beta), tvd (every row: general maxima, checks and sums, then per kind)
    r = log p - log q = (zs - zt) + log Zt - log Zs (from the logits: exact where e^z underflows)
    reverse_kl  D = sum_{p>0} p r;  dD/ds_k = p_k (r_k - D) / T
                (a teacher class with no mass where the student has some: D = +inf, and the
                gradient of the row is not finite, as the reference's)
    jsd         m = beta q + (1 - beta) p;  with d = r,
                lp = log p - log m = -log1p(beta expm1(-d)),  lq = log q - log m = -log1p((1 - beta) expm1(d))
                (for |d| > 30, where expm1 overflows, the logsumexp forms d - log beta -
                log1p((1 - beta) e^d / beta) and -d - log(1 - beta) - log1p(beta e^-d / (1 - beta)));
                where one side has no mass lp = -log(1 - beta), lq = -log(beta);
                D = beta sum_{q>0} q lq + (1 - beta) sum_{p>0} p lp;
                dD/ds_k = p_k (a_k - sum_c p_c a_c) / T,  a = (1 - beta) lp
                (beta = 0 and 1 are forward and reverse KL: the caller maps them, as the reference)
    tvd         D = (1/2) sum |p - q|;  a = sign(p - q) / 2 (sign(0) = 0), and with P+, P-, P0 the
                student mass where p > q, p < q, p = q:
                dD/ds_k = p_k (P- + P0/2 | -(P+ + P0/2) | (P- - P+)/2) / T for p_k >, <, = q_k
                (sums of masses, no cancellation: the reference's ``_project_sign``)
    The row's D is written to soft_a (soft_z = 1); per-element logs in float64 (libm).

Numerics. float32 rows: exponentials by ``fastexp.exp2_fast`` (relative error <= 2.5e-7; the
general rows by ``exp_neg_f32``, 8e-8); the block sums in float32 and the row sums in float64. A
float32 block sum of n <= BLOCK positive terms has a relative error below (n - 1) u = 6.1e-5
(u = 2^-24) in any order; as compiled (LLVM sums each block in 4 x 16 lanes, then across the
lanes) below (BLOCK/64 + 6) u = 1.3e-6; the short rows' float32 sums of C <= 32 terms below
(C - 1) u = 1.9e-6. Measured on the tests' float32 rows (kl and ce, C = 10 to 5000, T = 0.05 to 50),
the loss is within 9.5e-7 (relative) and the gradient within 4.8e-7 of max |grad| of the float64
reference (tests assert 1e-5).
float64 rows: libm exp and float64 throughout (~1e-15 of the reference). bfloat16 rows are read
through their uint16 bits (bfloat16 -> float32 is exact), computed as float32, and the gradient
is written as bfloat16 (rounded to nearest even) or float32. The per-row statistics are summed by
NumPy after the parallel loop: deterministic, no atomics (for a given thread count, the same bits).

Fastmath policy (one for the package, ``FASTMATH``): contraction, reassociation (vectorized
sums) and reciprocal approximations are allowed; "nnan" and "ninf" are not, because -inf
logits are legal, e^-inf = 0 must hold, and the NaN/+inf checks must see NaN and +inf. The one
exception is the block maximum (``fastexp.maxnum_nnan``), whose NaN case the finiteness check
of the same block catches.

Compilation is cached on disk (``cache=True``): the kernels are module-level functions, one per
variant (parallel or serial driver), so no two share a cache entry; the dtype variants are
Numba's own specializations of the same functions.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .fastexp import EXP2_PROPAGATES, bf16_to_f32, exp2_fast, exp_neg_f32, f32_to_bf16, maxnum_nnan
from .stream import store_fence, stream_row

__all__ = ["FASTMATH", "get_kernel", "RowStats", "BAD_STUDENT", "BAD_TEACHER", "KIND_CODES", "BLOCK",
           "SHORT_ROWS_UP_TO", "SHORT_BLOCK_ROWS", "STREAM_FROM", "hard_power"]

FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
BAD_STUDENT, BAD_TEACHER = 1, 2
KIND_CODES = {"kl": 0, "ce": 1, "reverse_kl": 2, "jsd": 3, "tvd": 4}
BLOCK = 1024               # values per block of the fast rows (8 KB of s and t: in L1; 512 measured
                           # 2-5% slower at C = 700..128256, 2048 no faster)
LOG2E = 1.4426950408889634
SHORT_ROWS_UP_TO = 32      # C at or below this takes the row-transposed kernel (kl / ce; measured faster than
                           # the row kernel up to C = 48, even at 64, slower at 100: 2-core machine, 2026-11-28)
SHORT_BLOCK_ROWS = 128     # rows per transposed block (64..128 measured best)
REACH_E = 4.0             # a block measured from maxima up to REACH_E T below its own is not redone
ANCHOR = 32               # the fused rows' first block is measured from the maxima of this many first classes
FUSE_FROM = 256           # C at or above which a row's gradient is written inside the next row's first pass
STREAM_FROM = 1024         # C at or above which the row kernel streams its gradient past the caches
                           # (``stream``; measured: even at C = 1000, 0.95 of the plain stores' time at
                           # 1500, 0.82-0.92 from 2000 to 128256, 1.13 at 512: 2-core machine, 2026-11-28)


class RowStats(NamedTuple):
    """What the kernel leaves per row for the loss (float64 (N,) each; the neutral values 0 and 1
    on rows without the term): row loss = soft (soft_a + log soft_z) + hard (log hard_z - hard_sy)."""
    soft_a: object    # A / Zt (kl, ce), or D itself (reverse_kl, jsd, tvd)
    soft_z: object    # Zs / Zt (kl), Zs (ce), 1 (the others)
    hard_z: object    # Z1
    hard_sy: object   # s_y - ms

    @classmethod
    def empty(cls, n):
        return cls(*np.empty((4, n), np.float64))


def hard_power(T: float) -> int:
    """How the fast rows get e^(s - ms) for the hard term from es = e^((s - ms)/T): 1 at T = 1 (es
    itself: ``conventions.shares_exponential``), T for an integer T in 2..8 (es^T by at most four
    multiplications: relative error <= T 2.5e-7 + 3 u), 0 otherwise (a third exponential)."""
    if T == 1.0:
        return 1
    if float(T).is_integer() and 2 <= T <= 8:
        return int(T)
    return 0


# ---------------------------------------------------------------- loads, stores and exp by dtype

def _ld(a, c):
    """a[c] as the compute dtype: float64 stays, float32 stays, bfloat16 bits (uint16) -> float32."""
    x = a[c]
    return np.array(np.uint32(x) << np.uint32(16), np.uint32).view(np.float32)[()] if a.dtype == np.uint16 else x


@overload(_ld, inline="always")
def _ld_jit(a, c):
    if a.dtype == types.uint16:
        return lambda a, c: bf16_to_f32(a[c])
    return lambda a, c: a[c]


def _st(o, c, v):
    """o[c] = v, rounded to o's dtype (bfloat16 bits: to nearest even)."""
    o[c] = v


@overload(_st, inline="always")
def _st_jit(o, c, v):
    if o.dtype == types.uint16:
        def st(o, c, v):
            o[c] = f32_to_bf16(np.float32(v))
        return st

    def st(o, c, v):
        o[c] = v
    return st


def _exp(x):
    """e^x for x <= 0: float32 by ``exp_neg_f32`` (vectorizable), float64 by libm."""
    return math.exp(x)


@overload(_exp)
def _exp_jit(x):
    if x == types.float32:
        return lambda x: exp_neg_f32(x)
    return lambda x: math.exp(x)


# ---------------------------------------------------------------- kl / ce: the fast rows

# The fast rows index with unsigned integers (row i, column c0 + c): Numba then emits no
# negative-index wraparound, LLVM sees consecutive addresses and the loops vectorize with plain
# vector loads (a signed c0 + c compiled to gathers); and no row or block is sliced (each slice
# of an array costs two atomic reference counts: ~150 ns a row at C = 100 before this).

def _ld2(a, i, c):
    """a[i, c] as the compute dtype (see ``_ld``)."""
    return _ld(a[i], c)


@overload(_ld2, inline="always")
def _ld2_jit(a, i, c):
    if a.dtype == types.uint16:
        return lambda a, i, c: bf16_to_f32(a[i, c])
    return lambda a, i, c: a[i, c]


def _st2(o, i, c, v):
    """o[i, c] = v (see ``_st``)."""
    _st(o[i], c, v)


@overload(_st2, inline="always")
def _st2_jit(o, i, c, v):
    if o.dtype == types.uint16:
        def st(o, i, c, v):
            o[i, c] = f32_to_bf16(np.float32(v))
        return st

    def st(o, i, c, v):
        o[i, c] = v
    return st


@njit(inline="always")
def _row_hard(hard, y):
    """The hard term's weight on a row whose kernel label is y: -1 (``conventions.kernel_labels``:
    no label, or a row without the hard term) gives the soft term alone."""
    return hard if y >= 0 else 0.0


@njit(inline="always", fastmath=FASTMATH)
def _nonfinite(x, z):
    """One class's term of the finiteness check: 0 where x and z are finite, NaN where either is NaN
    or +-inf (0 x, not x - x, which reassociation may cancel to 0); a row or block is finite where
    the sum of its terms is 0."""
    zero = np.float32(0)
    return x * zero + z * zero


@njit(inline="always", fastmath=FASTMATH)
def _pow_sum(es, e1, c0, n, p):
    """sum es^p over the block [c0, c0 + n) (p in 2..8, by multiplications); es^p into e1 but for p = 2
    and 4 (``_grad_form``)."""
    z = np.float32(0)
    if p == 2:
        for c in range(n):
            e = es[c0 + c]
            z += e * e
    elif p == 4:
        for c in range(n):
            e = es[c0 + c] * es[c0 + c]
            z += e * e
    else:
        for c in range(n):
            e = _ipow(es[c0 + c], p)
            e1[c0 + c] = e
            z += e
    return z


# The gradient's form on a row, gp (``_grad_form``): SOFT_ONLY (-1, no hard term), 0 with e1 from its
# buffer, 1 with e1 = es (``_pending_block`` turns it into SOFT_ONLY with cs + ch as cs), 2 and 4 with
# e1 = es^2, es^4; NOTHING (-2) where no row's gradient is pending. Four loops each in ``_grad_block``
# and ``_block_exps``: the other powers p = 3, 5..8 are written into e1's buffer by the first pass.
NOTHING, SOFT_ONLY = -2, -1


@njit(inline="always")
def _grad_form(p, has_hard):
    """The form of a row's gradient (above) for the hard power p (``hard_power``)."""
    if not has_hard:
        return SOFT_ONLY
    return p if p == 1 or p == 2 or p == 4 else 0


@njit(inline="always", fastmath=FASTMATH)
def _grad_at(es, et, e1, k, cs, ct, ch, gp):
    """One class of a row's gradient from the row buffers: cs es - ct et + ch e1 (gp: the form)."""
    e = es[k]
    if gp == SOFT_ONLY:
        return cs * e - ct * et[k]
    if gp == 0:
        return cs * e - ct * et[k] + ch * e1[k]
    if gp == 2:
        return (cs + ch * e) * e - ct * et[k]
    e2 = e * e    # gp = 4
    return cs * e + ch * (e2 * e2) - ct * et[k]


@njit(inline="always", fastmath=FASTMATH)
def _grad_loop(out, i, off, es, et, e1, c0, n, cs, ct, ch, gp):
    for c in range(n):
        k = c0 + c
        _st2(out, i, k - off, _grad_at(es, et, e1, k, cs, ct, ch, gp))


@njit(inline="always", fastmath=FASTMATH)
def _grad_block(out, i, off, es, et, e1, c0, n, cs, ct, ch, gp):
    """out[i, block - off] = the gradient over the block [c0, c0 + n) (``_grad_at``; each form its own
    loop); off = 0 (into the gradient) or c0 (into a block's scratch row)."""
    if gp == SOFT_ONLY:
        _grad_loop(out, i, off, es, et, e1, c0, n, cs, ct, ch, SOFT_ONLY)
    elif gp == 0:
        _grad_loop(out, i, off, es, et, e1, c0, n, cs, ct, ch, 0)
    elif gp == 2:
        _grad_loop(out, i, off, es, et, e1, c0, n, cs, ct, ch, 2)
    else:
        _grad_loop(out, i, off, es, et, e1, c0, n, cs, ct, ch, 4)


@njit(inline="always", fastmath=FASTMATH)
def _ipow(e, p):
    """e^p for p in 2..8."""
    e2 = e * e
    if p == 2:
        return e2
    if p == 3:
        return e2 * e
    if p == 5:
        return e2 * e2 * e
    if p == 6:
        return e2 * e2 * e2
    if p == 7:
        return e2 * e2 * e2 * e
    e4 = e2 * e2
    return e4 * e4 if p == 8 else e4


@njit(inline="always", fastmath=FASTMATH)
def _factors(m, n, inv_T, p):
    """(e^((m - n)/T), e^(m - n)) for maxima m <= n: 1 where they are equal, the second as the first's
    p-th power where T = p is an integer (``hard_power``)."""
    if m == n:
        return 1.0, 1.0
    f = math.exp((m - n) * inv_T)
    if p == 1:
        return f, f
    return f, (_ipow(f, p) if p >= 2 else math.exp(m - n))


@njit(inline="always", fastmath=FASTMATH)
def _rescale(A, Zs, Zt, Z1, ms, mt, ns, nt, inv_T, kind_ce, p, st):
    """The sums measured from the maxima (ms, mt) brought to (ns, nt) >= them (online softmax):
    Z *= e^((m - n)/T) (Z1: e^(ms - ns)), and A <- f (A + Zt delta), f = e^((mt - nt)/T),
    delta = ((ns - ms) - [kl] (nt - mt)) / T (d = zt - zs, or -zs, shifts by delta). The factors
    are kept in st for ``_set_pending`` (a block measured from (ms, mt) needs the same ones where
    (ns, nt) are the row's maxima)."""
    fs, f1 = _factors(ms, ns, inv_T, p)
    ft, _ = _factors(mt, nt, inv_T, 1)
    st[_RS], st[_RSN], st[_RFS], st[_RF1] = ms, ns, fs, f1
    st[_RT], st[_RTN], st[_RFT] = mt, nt, ft
    A = (A + Zt * ((ns - ms) - (0.0 if kind_ce else (nt - mt))) * inv_T) * ft
    return A, Zs * fs, Zt * ft, Z1 * f1


@njit(inline="always", fastmath=FASTMATH)
def _exps_at(x, z, msx, mtx, kx, kind_ce):
    """One class: (es, et, d) = (2^((x - msx) k), 2^((z - mtx) k), ut - us (kl) or -us (ce)), with
    us = x - msx, ut = z - mtx in logit units (A sums et d)."""
    us = x - msx
    ut = z - mtx
    return exp2_fast(us * kx), exp2_fast(ut * kx), (-us if kind_ce else ut - us)


@njit(inline="always", fastmath=FASTMATH)
def _exps_loop(s, t, i, es, et, c0, n, msx, mtx, kx, kind_ce, with_max, g, gi, off, e1, cs, ct, ch, gp):
    """es = 2^((s - msx) k), et = 2^((t - mtx) k) over the block [c0, c0 + n) of row i; returns the
    block's float32 sums (Zs, Zt, A / inv_T; d = ut - us (kl) or -us (ce) in logit units), and with_max,
    the block's maxima and finiteness check from the same loop (the sum of 0 x: NaN where some x is
    NaN or +-inf; not x - x, which reassociation may cancel to 0; with ``EXP2_PROPAGATES``, 0 times
    the block's sums instead: two multiply-adds a value fewer; the exponents may then be > 0 where the
    block exceeds (msx, mtx): the caller bounds that). Where gp is not NOTHING, each class first takes
    the pending row's gradient from the buffers' old values (``_grad_at``, coefficients cs, ct, ch)
    into g[gi, k - off], then overwrites them."""
    zs_b = np.float32(0)
    zt_b = np.float32(0)
    a_b = np.float32(0)
    bs = np.float32(-np.inf)
    bt = np.float32(-np.inf)
    chk = np.float32(0)
    for c in range(n):
        k = c0 + c
        x = _ld2(s, i, k)
        z = _ld2(t, i, k)
        if with_max:
            bs = maxnum_nnan(bs, x)
            bt = maxnum_nnan(bt, z)
            if not EXP2_PROPAGATES:
                chk += _nonfinite(x, z)
        a, b, d = _exps_at(x, z, msx, mtx, kx, kind_ce)
        if gp != NOTHING:
            _st2(g, gi, k - off, _grad_at(es, et, e1, k, cs, ct, ch, gp))
        es[k] = a
        et[k] = b
        zs_b += a
        zt_b += b
        a_b += b * d
    if with_max and EXP2_PROPAGATES:   # the sums are NaN where some x or z is NaN or +-inf (and +-inf - x is)
        chk = _sums_check(zs_b, zt_b, a_b)
    return zs_b, zt_b, a_b, bs, bt, chk


@njit(inline="always", fastmath=FASTMATH)
def _block_exps(s, t, i, es, et, c0, n, msx, mtx, kx, kind_ce, with_max, g, gi, off, e1, cs, ct, ch, gp):
    """``_exps_loop``, each form of the pending row's gradient its own loop."""
    if gp == NOTHING:
        return _exps_loop(s, t, i, es, et, c0, n, msx, mtx, kx, kind_ce, with_max, g, gi, off, e1, cs, ct, ch,
                          NOTHING)
    if gp == SOFT_ONLY:
        return _exps_loop(s, t, i, es, et, c0, n, msx, mtx, kx, kind_ce, with_max, g, gi, off, e1, cs, ct, ch,
                          SOFT_ONLY)
    if gp == 0:
        return _exps_loop(s, t, i, es, et, c0, n, msx, mtx, kx, kind_ce, with_max, g, gi, off, e1, cs, ct, ch, 0)
    if gp == 2:
        return _exps_loop(s, t, i, es, et, c0, n, msx, mtx, kx, kind_ce, with_max, g, gi, off, e1, cs, ct, ch, 2)
    return _exps_loop(s, t, i, es, et, c0, n, msx, mtx, kx, kind_ce, with_max, g, gi, off, e1, cs, ct, ch, 4)


@njit(inline="always")
def _sums_check(zs_b, zt_b, a_b):
    """0 where the block's sums are finite, else NaN (``EXP2_PROPAGATES``: NaN where an input was
    NaN or +-inf; no "nnan" flag here, so 0 x is not folded to 0)."""
    return np.float32(0) * (zs_b + zt_b + a_b)


@njit(inline="always", fastmath=FASTMATH)
def _block_max(s, t, i, c0, n):
    """The maxima and finiteness check of [c0, c0 + n), alone: a short row's block (measured from its
    maxima), and a fused row's first ANCHOR classes (where its running maxima start)."""
    bs = np.float32(-np.inf)
    bt = np.float32(-np.inf)
    chk = np.float32(0)
    for c in range(n):
        x = _ld2(s, i, c0 + c)
        z = _ld2(t, i, c0 + c)
        bs = maxnum_nnan(bs, x)
        bt = maxnum_nnan(bt, z)
        if not EXP2_PROPAGATES:   # (else the caller checks the sums of the block's exponentials)
            chk += _nonfinite(x, z)
    return bs, bt, chk


# ---------------------------------------------------------------- kl / ce: fast rows

# Row state (float64, ``st``): the row being read, ms, mt, Zs, Zt, Z1, A; then the row whose gradient
# is pending (its first pass done; its gradient is written during the next row's first pass): its
# index, form (``_grad_at``; NOTHING: no row pending), label, w hard, and its blocks written so far;
# then the last rescale's maxima and factors (``_rescale``).
_MS, _MT, _ZS, _ZT, _Z1, _A, _PI, _PG, _PY, _PW, _PD, _RS, _RSN, _RFS, _RF1, _RT, _RTN, _RFT = range(18)


@njit(inline="always")
def _block_span(j, C):
    """(c0, n): block j of a row of C values is [c0, c0 + n), n = BLOCK but for the last block."""
    return np.uint64(j * BLOCK), np.uint64(min(C, j * BLOCK + BLOCK) - j * BLOCK)


@njit(inline="always")
def _pending_block(out, es, et, e1, st, gc, gb, j, C):
    """What the pending row's gradient needs on block j: (c0, n, gp, cs, ct, ch, dst, di, off, lab, yy, v):
    its coefficients (float32; form 1 comes back as SOFT_ONLY with cs + ch as cs), where it goes
    (out[row], or gb's scratch row where streamed: ``dst[di, k - off]``), and whether the row's
    label lies in the block, with the label's entry (the hard term's - w hard rounded once with the
    rest), taken from the buffers before the block's loop overwrites them."""
    c0, n = _block_span(j, C)
    gp = np.int64(st[_PG])
    hard_row = gp >= 0   # a hard term (forms 0, 1, 2, 4): the label's entry is its own
    cs = gc[0, j]
    ct = gc[1, j]
    ch = gc[2, j]
    if gp == 1:          # e1 = es: the soft-only form with cs + ch as cs (the one place that folds it)
        cs = cs + ch
        gp = SOFT_ONLY
    streamed = gb.shape[1] != 0
    dst = gb if streamed else out
    di = np.uint64(0) if streamed else np.uint64(st[_PI])
    off = c0 if streamed else np.uint64(0)
    y = st[_PY]
    lab = hard_row and c0 <= y < c0 + n
    yy = np.uint64(y) if lab else np.uint64(0)
    v = _grad_at(es, et, e1, yy, cs, ct, ch, gp) - np.float32(st[_PW]) if lab else np.float32(0)
    return c0, n, gp, cs, ct, ch, dst, di, off, lab, yy, v


@njit(inline="always")
def _pending_written(out, gb, st, j, c0, n, dst, di, off, lab, yy, v):
    """The pending row's block j has its gradient in dst: the label's entry over it, streamed to out
    where dst is the scratch row; block j counted as written. (The label's entry is stored through
    out or gb by name: stored through dst, the array chosen by a condition and passed on in the
    inlined helpers' tuples, the store was lost (measured, with NUMBA_OPT=0 too; a print beside it
    brought it back).)"""
    ip = np.uint64(st[_PI])
    if gb.shape[1] != 0:
        if lab:
            _st2(gb, np.uint64(0), yy - c0, v)
        stream_row(out, ip, c0, n, gb[0])
    elif lab:
        _st2(out, ip, yy, v)
    st[_PD] = j + 1


@njit(inline="always", fastmath=FASTMATH)
def _pending_from_buffers(out, es, et, e1, st, gc, gb, j, C):
    """The pending row's gradient on block j from the row buffers alone (its own loop, ``_grad_block``)."""
    c0, n, gp, cs, ct, ch, dst, di, off, lab, yy, v = _pending_block(out, es, et, e1, st, gc, gb, j, C)
    _grad_block(dst, di, off, es, et, e1, c0, n, cs, ct, ch, gp)
    _pending_written(out, gb, st, j, c0, n, dst, di, off, lab, yy, v)


@njit(fastmath=FASTMATH, _nrt=False)
def _finish_pending(out, es, et, e1, st, gc, gb, C, nb):
    """The pending row's blocks not yet written, from the row buffers (before anything else overwrites
    them: the end of the chunk, a row that leaves for the general path). Not inlined (rare; see
    ``_pass1_block``)."""
    if np.int64(st[_PG]) == NOTHING:
        return
    for j in range(np.int64(st[_PD]), nb):
        _pending_from_buffers(out, es, et, e1, st, gc, gb, j, C)
    st[_PG] = NOTHING


@njit(inline="always")
def _set_pending(st, gc, bms, bmt, i, y, w, soft, hard_i, inv_T, p):
    """Row i (its first pass done) becomes the pending row: its form and the per-block coefficients of
    the module doc, cs_j = w soft e^((ms_j - ms)/T) / (T Zs), ct_j = w soft e^((mt_j - mt)/T) / (T Zt),
    ch_j = w hard e^(ms_j - ms) / Z1, from the maxima each block was measured from (the factors
    computed only where those change, and taken from the last rescale where it went from them to
    the row's maxima)."""
    ms, mt, Zs, Zt, Z1 = st[_MS], st[_MT], st[_ZS], st[_ZT], st[_Z1]
    gs = w * soft * inv_T
    a_s = gs / Zs
    a_t = gs / Zt
    a_1 = w * hard_i / Z1 if hard_i != 0.0 else 0.0
    fs = ft = f1 = 1.0
    for j in range(bms.shape[0]):
        bs = bms[j]
        bt = bmt[j]
        if j == 0 or bs != bms[j - 1]:   # the maxima change rarely
            if bs == st[_RS] and ms == st[_RSN]:
                fs, f1 = st[_RFS], st[_RF1]
            else:
                fs, f1 = _factors(bs, ms, inv_T, p)
        if j == 0 or bt != bmt[j - 1]:
            if bt == st[_RT] and mt == st[_RTN]:
                ft = st[_RFT]
            else:
                ft, _ = _factors(bt, mt, inv_T, 1)
        gc[0, j] = a_s * fs
        gc[1, j] = a_t * ft
        gc[2, j] = a_1 * f1
    st[_PI] = i
    st[_PG] = _grad_form(p, hard_i != 0.0)
    st[_PY] = y
    st[_PW] = w * hard_i
    st[_PD] = 0


@njit(inline="always", fastmath=FASTMATH)
def _hard_sum(s, i, es, e1, c0, n, ms, l2e, zs_b, p):
    """The block's sum of e1 = e^(s - ms) (step (d)): zs_b itself at p = 1, of es^p at p = 2..8, else of
    a third exponential written into e1."""
    if p == 1:
        return np.float64(zs_b)
    if p >= 2:
        return np.float64(_pow_sum(es, e1, c0, n, p))
    msx = np.float32(ms)
    z1_b = np.float32(0)
    for c in range(n):
        e = exp2_fast((_ld2(s, i, c0 + c) - msx) * l2e)
        e1[c0 + c] = e
        z1_b += e
    return np.float64(z1_b)


@njit(inline="always", fastmath=FASTMATH)
def _short_pass1(s, t, i, es, et, e1, bms, bmt, st, C, kx, l2e, inv_T, kind_ce, p, has_hard, out):
    """The first pass of a short row (C < FUSE_FROM: one block, nothing pending): its maxima first, then
    its exponentials measured from them (exact: nothing to rescale); False where the row holds NaN
    or +-inf."""
    u0 = np.uint64(0)
    n = np.uint64(C)
    bs, bt, chk = _block_max(s, t, i, u0, n)
    if chk != 0:
        return False
    zs_b, zt_b, a_b, _, _, _ = _exps_loop(s, t, i, es, et, u0, n, bs, bt, kx, kind_ce, False,
                                          out, u0, u0, e1, bs, bs, bs, NOTHING)
    if EXP2_PROPAGATES and _sums_check(zs_b, zt_b, a_b) != 0:
        return False
    bms[0] = st[_MS] = np.float64(bs)
    bmt[0] = st[_MT] = np.float64(bt)
    st[_ZS] = np.float64(zs_b)
    st[_ZT] = np.float64(zt_b)
    st[_A] = np.float64(a_b) * inv_T
    st[_Z1] = _hard_sum(s, i, es, e1, u0, n, bs, l2e, zs_b, p) if has_hard else 0.0
    return True


# Not inlined: the fused loops in one function of their own compile in about half the time that they
# take inlined into the row loop (Numba's typing of one large function; 37 -> 21 s a signature with
# _finish_pending, 2-core machine), and a call a block costs nothing measurable from C = 256 on.
@njit(fastmath=FASTMATH, _nrt=False)
def _pass1_block(s, t, i, es, et, e1, bms, bmt, st, j, C, kx, l2e, reach, inv_T, kind_ce, p, has_hard, out, gc, gb):
    """Block j of row i into the row buffers: steps (a)-(d) of the module doc on one block, and the
    pending row's gradient on the block, in the loop that first overwrites the block's buffers (each
    class: the pending row's gradient from the old values, then the new ones); False where the block
    holds NaN or +-inf (nothing of row i is written yet: it goes to the general path)."""
    f32 = np.float32
    c0, n = _block_span(j, C)
    u0 = np.uint64(0)
    ms = st[_MS]
    mt = st[_MT]
    A, Zs, Zt, Z1 = st[_A], st[_ZS], st[_ZT], st[_Z1]
    _, _, gp, cs, ct, ch, dst, di, off, lab, yy, v = _pending_block(out, es, et, e1, st, gc, gb, j, C)
    zs_b, zt_b, a_b, bs, bt, chk = _block_exps(s, t, i, es, et, c0, n, f32(ms), f32(mt), kx, kind_ce, True,
                                               dst, di, off, e1, cs, ct, ch, gp)
    if gp != NOTHING:
        _pending_written(out, gb, st, j, c0, n, dst, di, off, lab, yy, v)
    if chk != 0:
        return False
    ns = max(ms, np.float64(bs))
    nt = max(mt, np.float64(bt))
    if bs > ms + reach or bt > mt + reach:   # too far above the running maxima: the block again from its own
        A, Zs, Zt, Z1 = _rescale(A, Zs, Zt, Z1, ms, mt, ns, nt, inv_T, kind_ce, p, st)
        ms = ns
        mt = nt
        zs_b, zt_b, a_b, _, _, _ = _exps_loop(s, t, i, es, et, c0, n, f32(ms), f32(mt), kx, kind_ce, False,
                                              out, u0, u0, e1, bs, bs, bs, NOTHING)
        if EXP2_PROPAGATES and _sums_check(zs_b, zt_b, a_b) != 0:
            return False
    bms[j] = ms
    bmt[j] = mt
    Zs += np.float64(zs_b)
    Zt += np.float64(zt_b)
    A += np.float64(a_b) * inv_T
    if has_hard:
        Z1 += _hard_sum(s, i, es, e1, c0, n, ms, l2e, zs_b, p)
    if ns > ms or nt > mt:
        A, Zs, Zt, Z1 = _rescale(A, Zs, Zt, Z1, ms, mt, ns, nt, inv_T, kind_ce, p, st)
        ms = ns
        mt = nt
    st[_MS] = ms
    st[_MT] = mt
    st[_A], st[_ZS], st[_ZT], st[_Z1] = A, Zs, Zt, Z1
    return True


@njit(inline="always")
def _row_nowhere(out, i, soft_a, soft_z, hard_z, hard_sy):
    """Row i counts nowhere (weight 0): zero gradient, the neutral statistics; not inspected."""
    oi = out[i]
    for c in range(oi.size):
        _st(oi, c, 0)
    soft_a[i], soft_z[i], hard_z[i], hard_sy[i] = 0.0, 1.0, 1.0, 0.0


@njit(fastmath=FASTMATH, cache=True)
def _chunk_fast(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                flags, r0, r1):
    """Rows [r0, r1) of kl / ce with float32 arithmetic (float32 and bfloat16 rows): the row
    buffers and, where C >= STREAM_FROM, the scratch row of the streamed gradient; then
    ``_chunk_fast_rows``."""
    C = s.shape[1]
    nb = (C + BLOCK - 1) // BLOCK
    gb = np.empty((1, BLOCK if C >= STREAM_FROM else 0), out.dtype)
    _chunk_fast_rows(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                     flags, r0, r1, np.empty(C, np.float32), np.empty(C, np.float32), np.empty(C, np.float32),
                     np.empty(nb), np.empty(nb), np.empty((3, nb), np.float32), np.zeros(18), gb)


# Compiled without Numba's reference counting (``_nrt=False``: it allocates nothing, and its
# caller holds every array). With it, LLVM kept about a dozen reference-count updates of the
# arrays in the row loop (the row buffers, ``out`` in the inlined helpers): each an atomic add, a
# locked instruction, which on x86 waits until the store buffer has drained, so every row waited
# for its gradient's stores to reach the cache. Measured on the 2-core machine, one thread:
# C = 100 12.6 -> 8.3 ms for 65536 rows, in cache 187 -> 125 ns a row; C = 1000 8.8 -> 7.4 ms.
#
# One set of row buffers (two sets, with rows interleaved block by block, take twice the L1 the
# exponentials' stores need: at C = 1000 the stores then miss L1 behind the logits' loads; one set
# measured 0.80-0.95 of two's time over C = 100..128256).
#
# The gradient of row i - 1 inside row i's first pass (C >= FUSE_FROM). Each row used to read its
# logits in a loop of maxima alone, compute, and write its gradient in a burst at its end: the
# reads and the stores each waited on memory while the arithmetic did not run (C = 1000, one
# thread: 0.94 ns a value from memory against 0.57 in cache). Now the first block's exponentials
# are measured from the maxima of the row's first ANCHOR classes, so the reads happen in the loop
# that computes, and the stores spread through it. Two threads, the kernel alone, median of 21
# calls alternating in one process (2-core machine, 2026-11-28), new over old: C = 1000 0.76-0.78,
# 400 0.82-0.97, 32000 0.93-0.96, 128256 0.96-1.02 (noisy). Shorter rows lose by it (fused over not,
# C = 100 1.17, 200 1.08: the fused loop carries the maxima's reductions, and a row's fixed costs are
# a large part of a short row), so they keep the old order, in a path of their own (``_short_pass1``;
# no pending row, no running maxima): C = 100 0.82-0.87 of the time it took inside _pass1_block.
@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _chunk_fast_rows(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                     flags, r0, r1, es, et, e1, bms, bmt, gc, st, gb):
    """Rows [r0, r1) of kl / ce with float32 arithmetic (float32 and bfloat16 rows): finite rows by
    the two passes above (from C = FUSE_FROM, the second, the gradient, inside the next row's
    first), the others by _row_general. es, et, e1: (C,) float32 row buffers; bms, bmt: (blocks,)
    float64; gc: (3, blocks) float32, the pending row's coefficients; st: (18,) float64; gb: the
    streamed gradient's (1, BLOCK) scratch row, or (1, 0) for plain stores."""
    C = s.shape[1]
    nb = bms.shape[0]   # the row's blocks (_chunk_fast sized bms)
    f32 = np.float32
    kind_ce = kind == 1
    kx = f32(inv_T * LOG2E)
    l2e = f32(LOG2E)
    reach = min(REACH_E / inv_T, 41.0 * min(1.0 / inv_T, 1.0))
    fused = C >= FUSE_FROM
    st[_PI] = 0
    st[_PG] = NOTHING
    prev_ms = -np.inf   # the last fast row's final maxima (none yet)
    prev_mt = -np.inf
    for i in range(r0, r1):
        w = weights[i]
        y = labels[i]
        hard_i = _row_hard(hard, y)
        if w == 0.0:   # a row that counts nowhere (it touches no buffer: a pending row stays pending)
            _row_nowhere(out, i, soft_a, soft_z, hard_z, hard_sy)
            continue
        ui = np.uint64(i)
        if fused:   # the running maxima start from the first classes', raised toward the previous row's
            bs, bt, _ = _block_max(s, t, ui, np.uint64(0), np.uint64(min(C, ANCHOR)))
            st[_MS] = max(np.float64(bs), min(prev_ms, np.float64(bs) + reach))   # (see the module doc)
            st[_MT] = max(np.float64(bt), min(prev_mt, np.float64(bt) + reach))
            st[_ZS] = st[_ZT] = st[_Z1] = st[_A] = 0.0
            ok = True
            for j in range(nb):
                ok = _pass1_block(s, t, ui, es, et, e1, bms, bmt, st, j, C, kx, l2e, reach, inv_T, kind_ce, p,
                                  hard_i != 0.0, out, gc, gb)
                if not ok:
                    break
        else:
            ok = _short_pass1(s, t, ui, es, et, e1, bms, bmt, st, C, kx, l2e, inv_T, kind_ce, p, hard_i != 0.0, out)
        if not ok:     # NaN or +-inf somewhere in the row: the general path (it flags bad rows)
            _finish_pending(out, es, et, e1, st, gc, gb, C, nb)
            flag, a_, z_, h_, sy_ = _row_general(s[i], t[i], out[i], es, et, e1, y, w, soft, hard_i, inv_T,
                                                 kind, beta, p == 1)
            flags[i] = flag
            soft_a[i], soft_z[i], hard_z[i], hard_sy[i] = a_, z_, h_, sy_
            continue
        Zs, Zt, Z1, A, ms = st[_ZS], st[_ZT], st[_Z1], st[_A], st[_MS]
        prev_ms = ms
        prev_mt = st[_MT]
        soft_a[i] = A / Zt
        soft_z[i] = Zs if kind_ce else Zs / Zt
        hard_z[i] = Z1 if hard_i != 0.0 else 1.0
        hard_sy[i] = np.float64(_ld2(s, ui, np.uint64(y))) - ms if hard_i != 0.0 else 0.0   # before any write
        _set_pending(st, gc, bms, bmt, i, y, w, soft, hard_i, inv_T, p)
        if not fused:   # a short row's gradient right away (one block)
            _pending_from_buffers(out, es, et, e1, st, gc, gb, 0, C)
            st[_PG] = NOTHING
    _finish_pending(out, es, et, e1, st, gc, gb, C, nb)
    store_fence()      # the streamed stores are visible before the chunk reports completion


# ---------------------------------------------------------------- every kind: the general rows

@njit(fastmath=FASTMATH, cache=True)
def _row_checks(si, ti):
    """(ms, mt, flag): the row maxima (float64) and the input checks (NaN and +inf fail x < inf;
    an all -inf row has no maximum)."""
    C = si.size
    ms = -np.inf
    mt = -np.inf
    bad_s = 0
    bad_t = 0
    for c in range(C):
        sc = np.float64(_ld(si, c))
        tc = np.float64(_ld(ti, c))
        ms = max(ms, sc)
        mt = max(mt, tc)
        bad_s += 0 if sc < np.inf else 1
        bad_t += 0 if tc < np.inf else 1
    flag = (BAD_STUDENT if (bad_s or ms == -np.inf) else 0) + (BAD_TEACHER if (bad_t or mt == -np.inf) else 0)
    return ms, mt, flag


@njit(fastmath=FASTMATH, cache=True)
def _row_exps(si, ti, es, et, e1, ms, mt, inv_T, share_hard, need_hard):
    """es, et (and e1 unless shared) into the buffers; returns (Zs, Zt, Z1) in float64."""
    C = si.size
    dt = es.dtype.type
    msx = dt(ms)
    mtx = dt(mt)
    inv_T_x = dt(inv_T)
    Zs = 0.0
    Zt = 0.0
    Z1 = 0.0
    for c in range(C):
        a = _exp((dt(_ld(si, c)) - msx) * inv_T_x)
        b = _exp((dt(_ld(ti, c)) - mtx) * inv_T_x)
        es[c] = a
        et[c] = b
        Zs += np.float64(a)
        Zt += np.float64(b)
    if need_hard and not share_hard:
        for c in range(C):
            e = _exp(dt(_ld(si, c)) - msx)
            e1[c] = e
            Z1 += np.float64(e)
    elif need_hard:
        Z1 = Zs
    return Zs, Zt, Z1


@njit(fastmath=FASTMATH, cache=True)
def _row_general(si, ti, oi, es, et, e1, y, w, soft, hard, inv_T, kind, beta, share_hard):
    """One row of any kind with the three-pass algorithm (see the module doc). Returns
    (flag, soft_a, soft_z, hard_z, hard_sy); a flagged row's gradient is zeros."""
    C = si.size
    dt = es.dtype.type
    ms, mt, flag = _row_checks(si, ti)
    if flag:
        for c in range(C):
            _st(oi, c, 0)
        return flag, 0.0, 1.0, 1.0, 0.0
    need_hard = hard != 0.0
    Zs, Zt, Z1 = _row_exps(si, ti, es, et, e1, ms, mt, inv_T, share_hard, need_hard)
    hard_z = Z1 if need_hard else 1.0
    hard_sy = np.float64(_ld(si, y)) - ms if need_hard else 0.0   # read before any write (in place)
    msx = dt(ms)
    mtx = dt(mt)
    inv_T_x = dt(inv_T)
    ws = w * soft * inv_T   # d(w soft D)/ds = ws * (the bracket below)
    if kind <= 1:           # kl, ce: A = sum_{et > 0} et d
        A = 0.0
        for c in range(C):
            zs = (dt(_ld(si, c)) - msx) * inv_T_x
            zt = (dt(_ld(ti, c)) - mtx) * inv_T_x
            b = et[c]
            d = -zs if kind == 1 else zt - zs
            A += np.float64(b * d) if b > 0 else 0.0
        soft_a = A / Zt
        soft_z = Zs if kind == 1 else Zs / Zt
        a_s = dt(ws / Zs)
        a_t = dt(ws / Zt)
        a_1 = dt(w * hard / Z1) if need_hard else dt(0)
        if need_hard:
            for c in range(C):
                _st(oi, c, a_s * es[c] - a_t * et[c] + a_1 * (es[c] if share_hard else e1[c]))
            _st(oi, y, a_s * es[y] - a_t * et[y] + a_1 * (es[y] if share_hard else e1[y]) - dt(w * hard))
        else:
            for c in range(C):
                _st(oi, c, a_s * es[c] - a_t * et[c])
        return 0, soft_a, soft_z, hard_z, hard_sy
    # reverse_kl, jsd, tvd: float64 per element, from the logits
    L = math.log(Zt) - math.log(Zs)   # r = log p - log q = (zs - zt) + L
    inv_Zs = 1.0 / Zs
    inv_Zt = 1.0 / Zt
    D = 0.0
    S = 0.0     # reverse_kl, jsd: sum_c p_c a_c
    Pp = 0.0    # tvd: the masses P+, P-, P0
    Pm = 0.0
    P0 = 0.0
    for c in range(C):
        pc = np.float64(es[c]) * inv_Zs
        qc = np.float64(et[c]) * inv_Zt
        if kind == 4:
            D += abs(pc - qc)
            if pc > qc:
                Pp += pc
            elif pc < qc:
                Pm += pc
            else:
                P0 += pc
            continue
        if pc <= 0.0 and (kind == 2 or qc <= 0.0):
            continue    # no mass on either side that counts here
        zs = (np.float64(_ld(si, c)) - ms) * inv_T
        zt = (np.float64(_ld(ti, c)) - mt) * inv_T
        if kind == 2:
            r = (zs - zt) + L    # +inf where the teacher has no mass (zt = -inf)
            D += pc * r
            S += pc * r
        else:
            lp, lq = _jsd_log_ratios(pc, qc, zs, zt, L, beta)
            D += beta * qc * lq + (1.0 - beta) * pc * lp
            S += pc * (1.0 - beta) * lp
    if kind == 4:
        D *= 0.5
    S = D if kind == 2 else S
    for c in range(C):
        pc = np.float64(es[c]) * inv_Zs
        g = 0.0
        if pc > 0.0:
            if kind == 4:
                qc = np.float64(et[c]) * inv_Zt
                br = Pm + 0.5 * P0 if pc > qc else -(Pp + 0.5 * P0) if pc < qc else 0.5 * (Pm - Pp)
            else:
                zs = (np.float64(_ld(si, c)) - ms) * inv_T
                zt = (np.float64(_ld(ti, c)) - mt) * inv_T
                if kind == 2:
                    a = (zs - zt) + L
                else:
                    qc = np.float64(et[c]) * inv_Zt
                    a = (1.0 - beta) * _jsd_log_ratios(pc, qc, zs, zt, L, beta)[0]
                br = a - S
            g = ws * pc * br
        if need_hard:
            g += w * hard * (np.float64(es[c] if share_hard else e1[c]) / Z1)
            if c == y:
                g -= w * hard
        _st(oi, c, g)
    return 0, D, 1.0, hard_z, hard_sy


@njit(fastmath=FASTMATH, cache=True)
def _jsd_log_ratios(pc, qc, zs, zt, L, beta):
    """(log p - log m, log q - log m) of one class (see the module doc); 0 where that side has no
    mass. zs, zt the scaled shifted logits, L = log Zt - log Zs."""
    if pc > 0.0 and qc > 0.0:
        d = (zs - zt) + L
        if abs(d) < 30.0:
            return -math.log1p(beta * math.expm1(-d)), -math.log1p((1.0 - beta) * math.expm1(d))
        if d > 0.0:   # p >> q
            return -math.log(1.0 - beta) - math.log1p(beta * math.exp(-d) / (1.0 - beta)), \
                -d - math.log(1.0 - beta) - math.log1p(beta * math.exp(-d) / (1.0 - beta))
        return d - math.log(beta) - math.log1p((1.0 - beta) * math.exp(d) / beta), \
            -math.log(beta) - math.log1p((1.0 - beta) * math.exp(d) / beta)
    if pc > 0.0:
        return -math.log(1.0 - beta), 0.0
    if qc > 0.0:
        return 0.0, -math.log(beta)
    return 0.0, 0.0


def _fast_chunk(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                flags, r0, r1, proto):
    """_chunk_fast where the arithmetic is float32 (float32 and bfloat16 rows); returns whether it
    ran (float64 rows never take it: they are computed in float64 by _row_general)."""
    return False


@overload(_fast_chunk)
def _fast_chunk_jit(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                    flags, r0, r1, proto):
    if proto.dtype != types.float32:
        return lambda s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, \
            hard_sy, flags, r0, r1, proto: False

    def run(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy, flags,
            r0, r1, proto):
        _chunk_fast(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                    flags, r0, r1)
        return True
    return run


# ---------------------------------------------------------------- the drivers (rows in chunks)

@njit(fastmath=FASTMATH, cache=True)
def _chunk(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy, flags,
           r0, r1, proto):
    """Rows [r0, r1) with buffers of the compute dtype (proto's: float32 for float32 and bfloat16
    rows, float64 for float64 rows): kl / ce in float32 by _chunk_fast, the others row by row."""
    if kind <= 1 and _fast_chunk(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z,
                                 hard_sy, flags, r0, r1, proto):
        return
    C = s.shape[1]
    es = np.empty(C, proto.dtype)
    et = np.empty(C, proto.dtype)
    e1 = np.empty(C, proto.dtype)
    for i in range(r0, r1):
        w = weights[i]
        y = labels[i]
        hard_i = _row_hard(hard, y)
        if w == 0.0:   # a row that counts nowhere
            _row_nowhere(out, i, soft_a, soft_z, hard_z, hard_sy)
            continue
        flag, a_, z_, h_, sy_ = _row_general(s[i], t[i], out[i], es, et, e1, y, w, soft, hard_i, inv_T, kind, beta,
                                             p == 1)
        flags[i] = flag
        soft_a[i] = a_
        soft_z[i] = z_
        hard_z[i] = h_
        hard_sy[i] = sy_


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _rows_parallel(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                   flags, rows_per_chunk, proto):
    N = s.shape[0]
    n_chunks = (N + rows_per_chunk - 1) // rows_per_chunk
    for k in prange(n_chunks):
        _chunk(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy, flags,
               k * rows_per_chunk, min(N, (k + 1) * rows_per_chunk), proto)


@njit(fastmath=FASTMATH, cache=True)
def _rows_serial(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                 flags, rows_per_chunk, proto):
    _chunk(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy, flags,
           0, s.shape[0], proto)


# ---------------------------------------------------------------- kl / ce: short rows

@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _short_block(s, t, labels, weights, inv_T, soft_coef, hard_coef, kind, p, out, soft_a, soft_z, hard_z, hard_sy,
                 flags, r0, nr, sT, tT, es, et, e1, rb, ms, mt, chk, Zs, Zt, Z1, A, w_, y_, done, cs, ct, ch, wh):
    """One block of R rows of the short-row kernel (kl / ce, float32 arithmetic: float32 and
    bfloat16 rows). The block is transposed into (C, R) buffers so that every loop runs along the
    R rows of one class, contiguous and full width (a loop over 10 classes would leave most of a
    vector idle), then the fast rows' algorithm on each column (one block per row, so no online
    maxima): the maxima and the finiteness check (the sum of 0 x, as ``_block_max``), es, et by
    ``exp2_fast`` with their float32 sums, e1 as es^p (``hard_power``; es at p = 1, a third
    exponential at p = 0), the gradient's coefficients in float64 along the rows, the gradient
    into es, the label's entry, and the transpose back. Rows that count nowhere (weight 0, past
    the end) are zeros in the buffers: their coefficients are 0 and their gradient exactly 0, and
    their values are not inspected. A row with -inf, NaN or +inf (its check is not 0) goes to
    ``_row_general`` (which flags NaN and +inf) and is left out of the block from there."""
    N, C = s.shape
    R = sT.shape[1]
    f32 = np.float32
    zero = f32(0)
    kx = f32(inv_T * LOG2E)
    l2e = f32(LOG2E)
    kind_ce = kind == 1
    has_hard = hard_coef != 0.0
    last = N - 1
    for r in range(R):          # the rows' weights and labels; past the end: weight 0
        i = min(r0 + r, last)
        w_[r] = weights[i] if r < nr else 0.0
        y_[r] = labels[i] if r < nr else -1
        done[r] = 0
        ms[r] = -np.inf
        mt[r] = -np.inf
        chk[r] = zero
        Zs[r] = Zt[r] = Z1[r] = A[r] = zero
    for r in range(R):          # transpose in (unsigned indices: no wraparound, no row slices)
        live = w_[r] != 0.0
        i = np.uint64(min(r0 + r, last))
        for c in range(C):
            sT[c, r] = _ld2(s, i, np.uint64(c)) if live else zero
            tT[c, r] = _ld2(t, i, np.uint64(c)) if live else zero
    for c in range(C):          # maxima and the finiteness check, along the rows
        for r in range(R):
            x = sT[c, r]
            z = tT[c, r]
            ms[r] = maxnum_nnan(ms[r], x)
            mt[r] = maxnum_nnan(mt[r], z)
            chk[r] += _nonfinite(x, z)
    bad = zero
    for r in range(R):
        bad += chk[r]
    if bad != 0:                # rare: rows with -inf, NaN or +inf, each by the general path
        for r in range(R):
            if chk[r] != 0:
                i = r0 + r
                y = y_[r]
                flag, a_, z_, h_, sy_ = _row_general(s[i], t[i], out[i], rb[0], rb[1], rb[2], y, w_[r], soft_coef,
                                                     _row_hard(hard_coef, y), inv_T, kind, 0.0, p == 1)
                flags[i] = flag
                soft_a[i], soft_z[i], hard_z[i], hard_sy[i] = a_, z_, h_, sy_
                done[r] = 1
                w_[r] = 0.0
                ms[r] = mt[r] = zero
                for c in range(C):
                    sT[c, r] = tT[c, r] = zero
    for c in range(C):          # es, et and their sums along the rows; A in logit units
        for r in range(R):
            a, b, d = _exps_at(sT[c, r], tT[c, r], ms[r], mt[r], kx, kind_ce)
            es[c, r] = a
            et[c, r] = b
            Zs[r] += a
            Zt[r] += b
            A[r] += b * d
    if has_hard and p == 0:     # the hard term's own exponential
        for c in range(C):
            for r in range(R):
                e = exp2_fast((sT[c, r] - ms[r]) * l2e)
                e1[c, r] = e
                Z1[r] += e
    elif has_hard and p == 1:
        for r in range(R):
            Z1[r] = Zs[r]
    elif has_hard:
        for c in range(C):
            for r in range(R):
                Z1[r] += _ipow(es[c, r], p)
    for r in range(R):          # the coefficients (float64; no row has a zero sum: its maximum gives 1)
        w = w_[r]
        hr = _row_hard(hard_coef, y_[r])
        zs = np.float64(Zs[r])
        zt = np.float64(Zt[r])
        z1 = np.float64(Z1[r]) if hr != 0.0 else 1.0
        gs = w * soft_coef * inv_T
        cs[r] = f32(gs / zs)
        ct[r] = f32(gs / zt)
        ch[r] = f32(w * hr / z1)
        wh[r] = f32(w * hr)
    for r in range(nr):         # the statistics (rows that count nowhere: the neutral values)
        if done[r]:
            continue
        i = r0 + r
        live = w_[r] != 0.0
        hard_live = live and y_[r] >= 0 and has_hard
        zs = np.float64(Zs[r])
        zt = np.float64(Zt[r])
        soft_a[i] = np.float64(A[r]) * inv_T / zt if live else 0.0
        soft_z[i] = (zs if kind_ce else zs / zt) if live else 1.0
        hard_z[i] = np.float64(Z1[r]) if hard_live else 1.0
        hard_sy[i] = np.float64(sT[max(y_[r], 0), r]) - np.float64(ms[r]) if hard_live else 0.0
    if not has_hard:            # the gradient into es, along the rows
        for c in range(C):
            for r in range(R):
                es[c, r] = cs[r] * es[c, r] - ct[r] * et[c, r]
    elif p == 0:
        for c in range(C):
            for r in range(R):
                es[c, r] = cs[r] * es[c, r] - ct[r] * et[c, r] + ch[r] * e1[c, r]
    elif p == 1:
        for c in range(C):
            for r in range(R):
                es[c, r] = (cs[r] + ch[r]) * es[c, r] - ct[r] * et[c, r]
    else:
        for c in range(C):
            for r in range(R):
                e = es[c, r]
                es[c, r] = cs[r] * e + ch[r] * _ipow(e, p) - ct[r] * et[c, r]
    for r in range(nr):         # minus w hard at the label (rows with a hard term)
        if wh[r] != 0:
            es[y_[r], r] -= wh[r]
    for r in range(nr):         # transpose out
        if done[r]:
            continue
        i = np.uint64(r0 + r)
        for c in range(C):
            _st2(out, i, np.uint64(c), es[c, r])


@njit(fastmath=FASTMATH, cache=True)
def _short_group(s, t, labels, weights, inv_T, soft_coef, hard_coef, kind, p, out, soft_a, soft_z, hard_z, hard_sy,
                 flags, R, b0, b1):
    """Blocks [b0, b1) of R rows with one set of buffers (float32: the short rows' arithmetic)."""
    N, C = s.shape
    f32 = np.float32
    sT = np.empty((C, R), f32)
    tT = np.empty((C, R), f32)
    es = np.empty((C, R), f32)
    et = np.empty((C, R), f32)
    e1 = np.empty((C, R), f32)
    rb = np.empty((3, C), f32)      # the general path's row buffers
    ms = np.empty(R, f32)           # (one array each: rows of a 2-d array would be typed
    mt = np.empty(R, f32)           # non-contiguous, and no loop over them would vectorize)
    chk = np.empty(R, f32)
    Zs = np.empty(R, f32)           # float32 sums of at most SHORT_ROWS_UP_TO terms: (C - 1) u <= 1.9e-6
    Zt = np.empty(R, f32)
    Z1 = np.empty(R, f32)
    A = np.empty(R, f32)
    cs = np.empty(R, f32)
    ct = np.empty(R, f32)
    ch = np.empty(R, f32)
    wh = np.empty(R, f32)
    w_ = np.empty(R)
    y_ = np.empty(R, np.int64)
    done = np.empty(R, np.int8)
    for b in range(b0, b1):
        _short_block(s, t, labels, weights, inv_T, soft_coef, hard_coef, kind, p, out, soft_a, soft_z, hard_z,
                     hard_sy, flags, b * R, min(N, b * R + R) - b * R, sT, tT, es, et, e1, rb, ms, mt, chk,
                     Zs, Zt, Z1, A, w_, y_, done, cs, ct, ch, wh)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _short_parallel(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                    flags, rows_per_block, proto):
    N = s.shape[0]
    R = rows_per_block
    n_blocks = (N + R - 1) // R
    n_groups = min(n_blocks, 64)   # groups of consecutive blocks: buffers allocated once per group
    for g in prange(n_groups):
        _short_group(s, t, labels, weights, inv_T, soft, hard, kind, p, out, soft_a, soft_z, hard_z, hard_sy,
                     flags, R, g * n_blocks // n_groups, (g + 1) * n_blocks // n_groups)


@njit(fastmath=FASTMATH, cache=True)
def _short_serial(s, t, labels, weights, inv_T, soft, hard, kind, beta, p, out, soft_a, soft_z, hard_z, hard_sy,
                  flags, rows_per_block, proto):
    R = rows_per_block
    _short_group(s, t, labels, weights, inv_T, soft, hard, kind, p, out, soft_a, soft_z, hard_z, hard_sy, flags,
                 R, 0, (s.shape[0] + R - 1) // R)


_DRIVERS = {(False, False): _rows_serial, (True, False): _rows_parallel,
            (False, True): _short_serial, (True, True): _short_parallel}


def get_kernel(dtype, parallel: bool, short: bool = False):
    """The driver for rows (``short``: the row-transposed kernel for C <= SHORT_ROWS_UP_TO, kl and
    ce). Every driver takes (s, t, labels, weights, inv_T, soft, hard, kind code, beta, hard power,
    out, soft_a, soft_z, hard_z, hard_sy, flags, rows per chunk, proto); dtype is the inputs'
    (float32, float64, or uint16 for bfloat16 bits)."""
    return _DRIVERS[bool(parallel), bool(short)]
