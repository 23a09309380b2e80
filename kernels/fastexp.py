"""A vectorizable float32 exp for Numba loops.

Numba has no SVML any more, so ``math.exp`` inside a loop is a scalar libm call and the loop
does not vectorize. This exp is straight-line float32/int32 arithmetic that LLVM vectorizes:

    range reduction  x = n ln2 + r,  n = floor(x log2(e) + 1/2),  |r| <= ln2/2 = 0.3466
                     r = (x - n * LN2_HI) - n * LN2_LO   (Cody-Waite: LN2_HI has 12 zero low bits,
                     so n * LN2_HI is exact for |n| <= 2^11)
    polynomial       e^r ~ sum_{k=0}^{7} r^k / k!   (Horner; truncation r^8/8! <= 5.2e-9 relative)
    scaling          2^n = 2^(n//2) * 2^(n - n//2), each assembled as the float32 bits
                     (k + 127) << 23 (a bit cast, no libm); two factors keep n = -126..128 in range

Domain: arguments below -87.33 (where e^x < 2^-126, the smallest normal float32) return exactly
0 (flush to zero: an absolute error below 1.2e-38), which also makes exp(-inf) = 0 exact; NaN
propagates; arguments above 88.72 return +inf. Measured relative error against float64 exp
over the whole float32 domain [-87.33, 88.72] on 20M points: 7.9e-8 (about 1.3 units in the
last place; ``tests/test_kernels_cpu.py`` asserts <= 1.5e-7). Speed: 20M values in 13 ms on
this project's 2-core AVX-512 machine (memory-bound), NumPy's own SIMD exp 10 ms. In cache
(1000 values, repeated): exp_neg_f32 0.25 ns per value; the first version, with math.floor
(an int64 round trip) and two scaling factors, took 0.66 ns.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.extending import intrinsic

__all__ = ["exp_f32", "exp_neg_f32", "exp2_fast", "exp_f32_array", "exp2_fast_array", "maxnum_nnan", "EXP_MIN",
           "EXP_MAX", "EXP2_MIN", "EXP2_PROPAGATES", "float32_bits", "bf16_to_f32", "f32_to_bf16"]

LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)           # 0x3f318000: ln 2 rounded to 12 significant bits
LN2_LO = np.float32(-2.12194440e-4)        # ln 2 - LN2_HI
EXP_MIN = np.float32(-87.33654)            # ln(2^-126)
EXP_MAX = np.float32(88.72283)              # ln(FLT_MAX)
C2, C3, C4, C5, C6, C7 = (np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24), np.float32(1 / 120),
                          np.float32(1 / 720), np.float32(1 / 5040))
ONE = np.float32(1.0)
HALF = np.float32(0.5)
ZERO = np.float32(0.0)
INF = np.float32(np.inf)

if config.DISABLE_JIT:  # plain Python (NUMBA_DISABLE_JIT=1): the same bits through NumPy
    def _pow2(n):
        return np.array((int(n) + 127) << 23, dtype=np.int32).view(np.float32)[()]

    def _bits_as_float32(bits):
        return np.array(int(bits) & 0xFFFFFFFF, dtype=np.uint32).view(np.float32)[()]

    def float32_bits(x):
        return int(np.array(x, dtype=np.float32).view(np.uint32)[()])

    def maxnum_nnan(a, b):
        return a if a >= b else b
else:
    @intrinsic
    def _bits_as_float32(typingctx, bits):
        """Reinterpret the low 32 bits of an integer as a float32 (an LLVM bitcast)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            v = args[0]
            if v.type.width != 32:
                v = builder.trunc(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(bits), codegen

    @njit(inline="always")
    def _pow2(n):
        return _bits_as_float32((n + 127) << 23)

    @intrinsic
    def float32_bits(typingctx, x):
        """The bits of a float32 as a uint32 (an LLVM bitcast)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(x), codegen

    @intrinsic
    def maxnum_nnan(typingctx, a, b):
        """max(a, b) as LLVM's maxnum with the no-NaN flag: one vmaxps, and a max-reduction loop of
        it vectorizes (Python's max and a compare-and-select do not: without "nnan" LLVM keeps
        them scalar, 0.53 ns a value against 0.04). The result is unspecified where an argument is
        NaN: a caller checks for NaN separately."""
        if not (isinstance(a, types.Float) and a == b):
            return None

        def codegen(context, builder, signature, args):
            from numba.core import cgutils  # noqa: PLC0415
            lt = context.get_value_type(signature.return_type)
            name = "llvm.maxnum.f32" if lt == ir.FloatType() else "llvm.maxnum.f64"
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lt, [lt, lt]), name)
            return builder.call(fn, args, fastmath=("nnan", "nsz"))
        return a(a, b), codegen


@njit(inline="always", fastmath={"contract", "nsz"})
def _poly(xc):
    """e^xc for xc in [EXP_MIN, EXP_MAX]: (p, n) with e^xc = p * 2^n."""
    nf = np.floor(xc * LOG2E + HALF)  # np.floor stays float32 and vectorizes; math.floor is int64
    r = (xc - nf * LN2_HI) - nf * LN2_LO
    p = ONE + r * (ONE + r * (C2 + r * (C3 + r * (C4 + r * (C5 + r * (C6 + r * C7))))))
    return p, np.int32(nf)


@njit(inline="always", fastmath={"contract", "nsz"})
def exp_f32(x):
    """e^x for any float32 x (see the module doc for the domain and the error)."""
    p, n = _poly(min(max(x, EXP_MIN), EXP_MAX))
    n1 = n >> 1  # 2^n as two factors: n = 128 (x near EXP_MAX) has no float32 2^n
    y = p * _pow2(n1) * _pow2(n - n1)
    if x < EXP_MIN:
        y = ZERO
    if x > EXP_MAX:
        y = INF
    if x != x:
        y = x
    return y


@njit(inline="always", fastmath={"contract", "nsz"})
def exp_neg_f32(x):
    """e^x for float32 x <= 0, not NaN (the fused kernel's shifted logits): one scaling factor
    (n >= -126), no overflow or NaN branches; -inf and x < EXP_MIN give exactly 0."""
    p, n = _poly(max(x, EXP_MIN))
    y = p * _pow2(n)
    return y if x >= EXP_MIN else ZERO


# 2^v for the fused kernel's fast rows, v = (x - m) log2(e) / T: the temperature and the change of
# base fold into one multiplication (no Cody-Waite split: the rounding of v is that of the argument
# x/T the natural-base form rounds). v = n + r, n = round(v), |r| <= 1/2; p(r) ~ 2^r of degree 5
# (five multiply-adds), fitted for relative error: truncation 7.5e-8, 2.3e-7 evaluated in float32
# with Horner (measured on 200,001 points; tests assert 3e-7); no branches. Two forms of p 2^n:
E0, E1, E2, E3, E4, E5 = (np.float32(1.0000001192092896), np.float32(0.6931469440460205),
                          np.float32(0.24022120237350464), np.float32(0.05550713464617729),
                          np.float32(0.009675540961325169), np.float32(0.001327645150013268))
EXP2_MIN = np.float32(-126.0)


def _has_avx512() -> bool:
    """Whether the code Numba generates here may use AVX-512 (the host has it and no other CPU is
    named for compilation)."""
    import os  # noqa: PLC0415
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return False
    try:
        from llvmlite import binding  # noqa: PLC0415
        return "+avx512f" in binding.get_host_cpu_features().flatten()
    except Exception:  # noqa: BLE001  (no feature list: take the portable form)
        return False


SCALEF = _has_avx512() and not config.DISABLE_JIT
# whether exp2_fast gives NaN for every non-finite argument (NaN, +-inf: n = rint(v) is v and r = v - n
# NaN), so that a sum of its results is non-finite where an argument was: the AVX-512 form; the
# portable form clamps its argument (-inf gives 2^-126) and a caller checks its inputs itself
EXP2_PROPAGATES = SCALEF


if SCALEF:
    @intrinsic
    def _ldexp_f32(typingctx, p, n):
        """p 2^n as LLVM's ldexp: on AVX-512 one vscalefps for 16 lanes, which also underflows
        gracefully (to subnormals, then 0) where n < -126."""
        if p != types.float32 or not isinstance(n, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            from numba.core import cgutils  # noqa: PLC0415
            f, i32 = ir.FloatType(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, i32]), "llvm.ldexp.f32.i32")
            k = args[1] if args[1].type.width == 32 else builder.trunc(args[1], i32)
            return builder.call(fn, [args[0], k])
        return types.float32(p, n), codegen

    @njit(inline="always", fastmath={"contract", "nsz"})
    def exp2_fast(v):
        """2^v for finite float32 v <= 0 (the AVX-512 form: p(r) 2^n by one vscalefps; below
        -126 the result is subnormal or 0, an absolute error below 1.2e-38; see the comment above)."""
        nf = np.rint(v)
        r = v - nf
        p = E0 + r * (E1 + r * (E2 + r * (E3 + r * (E4 + r * E5))))
        return _ldexp_f32(p, np.int32(nf))
else:
    @njit(inline="always", fastmath={"contract", "nsz"})
    def exp2_fast(v):
        """2^v for finite float32 v <= 0 (the portable form: 2^n assembled as float32 bits):
        2^max(v, -126) (below -126 it returns 2^-126 = 1.2e-38, not 0: an absolute error below
        1.2e-38, and no select)."""
        x = max(v, EXP2_MIN)
        nf = np.floor(x + HALF)
        r = x - nf
        p = E0 + r * (E1 + r * (E2 + r * (E3 + r * (E4 + r * E5))))
        return p * _pow2(np.int32(nf))


@njit(inline="always")
def bf16_to_f32(h):
    """A bfloat16 (its uint16 bits) as float32: the bits shifted into the high half (exact)."""
    return _bits_as_float32(np.uint32(h) << np.uint32(16))


@njit(inline="always")
def f32_to_bf16(x):
    """float32 -> bfloat16 bits, rounded to nearest even (finite x; the gradient is never NaN)."""
    b = np.uint32(float32_bits(x))
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(fastmath={"contract", "nsz"})
def exp2_fast_array(v, out):
    """Element-wise exp2_fast over a float32 array (tests)."""
    for i in range(v.size):
        out[i] = exp2_fast(v[i])
    return out


@njit(fastmath={"contract", "nsz"})
def exp_f32_array(x, out, nonpositive=False):
    """Element-wise exp_f32 (or exp_neg_f32) over a float32 array (for tests and benchmarks)."""
    if nonpositive:
        for i in range(x.size):
            out[i] = exp_neg_f32(x[i])
    else:
        for i in range(x.size):
            out[i] = exp_f32(x[i])
    return out
