"""Temperature softmax, log-softmax and logsumexp over the last axis, each with its backward.

Shapes: x is (..., C) with classes on the last axis; T > 0 is the temperature.

Math
----
    lse(x)_i          = log sum_c exp(x_ic)
    log_softmax(x, T) = x/T - lse(x/T)
    softmax(x, T)     = exp(log_softmax(x, T))               (p below)

Derivation of the backward passes (vector-Jacobian products, never a materialized Jacobian).
With upstream gradient g of the same shape as the output:

    d lse_i / d x_ic            = p_ic                              (T = 1)
      => dx_ic = g_i * p_ic
    d log_softmax_ic / d x_ik   = (delta_ck - p_ik) / T
      => dx_ik = (g_ik - p_ik * sum_c g_ic) / T
    d softmax_ic / d x_ik       = p_ic (delta_ck - p_ik) / T
      => dx_ik = p_ik * (g_ik - sum_c p_ic g_ic) / T

A consequence used as a test: each backward row of log_softmax and softmax sums to zero when
the upstream row is arbitrary (softmax is invariant to adding a constant to a row), so an
all-ones upstream gradient gives zero for softmax and cannot test anything.

Numerics
--------
The row maximum m is subtracted *before* dividing by T: z = (x - m) / T <= 0, so exp(z) never
overflows for any T in [0.01, 1000] and logits up to +-1e4 in float32 (dividing first would
turn 1e4 / 0.01 = 1e6 into exp overflow). The shift carries no gradient: log_softmax(x + a) =
log_softmax(x), so m is treated as a constant. The row sum of exp(z) is in [1, C] because the
largest term is exp(0) = 1, so its log never sees 0. Classes at -inf have z = -inf, exp(z) = 0:
probability exactly 0 and log-probability -inf, with zero gradient. NaN, +inf and all -inf rows
are rejected by ``check_logits`` (a row without any finite class has no distribution).
"""
from __future__ import annotations

from typing import NamedTuple

from .backend import check_logits, get_namespace

__all__ = ["check_temperature", "logsumexp", "logsumexp_forward", "logsumexp_backward",
           "log_softmax", "log_softmax_forward", "log_softmax_backward",
           "softmax", "softmax_forward", "softmax_backward"]


def check_temperature(T) -> float:
    """Refuse a temperature that is not a finite number > 0."""
    try:
        T = float(T)
    except (TypeError, ValueError):
        raise TypeError(f"T: expected a positive number, got {T!r}") from None
    if not (T > 0.0 and T < float("inf")):
        raise ValueError(f"T: the temperature must be finite and > 0, got {T}")
    return T


# ---------------------------------------------------------------- unchecked kernels of the math
# The losses validate their inputs once and then call these directly.

def _shift_scale(x, T: float):
    """z = (x - max_c x) / T; the max shift is a constant for the gradient (see module doc)."""
    xp = get_namespace(x)
    m = xp.max(x, axis=-1, keepdims=True)
    return (x - m) / x.dtype.type(T) if T != 1.0 else x - m


def _log_softmax(x, T: float = 1.0):
    xp = get_namespace(x)
    z = _shift_scale(x, T)
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


def _log_softmax_precise(x, T: float = 1.0):
    """log softmax(x / T) accurate to a few ulps in every entry, the largest included: with z the
    max-shifted scaled logits (z_k = 0 at the row's argmax k), log sum_c e^z_c = log1p(sum_{c != k}
    e^z_c), so for a nearly one-hot row log p_k = -log1p(tiny) keeps its relative accuracy instead
    of rounding log(1 + tiny) to 0 (and every log p_c carries no error of size 1e-16 from that sum).
    Costs an argmax over ``_log_softmax``; used where such entries matter (the reverse KL, JSD and
    TVD terms and their gradients)."""
    xp = get_namespace(x)
    z = _shift_scale(x, T)
    top = xp.argmax(z, axis=-1)[..., None]
    e = xp.exp(z)
    others = xp.where(xp.arange(z.shape[-1]) == top, 0, e)
    return z - xp.log1p(xp.sum(others, axis=-1, keepdims=True))


def _logsumexp(x):
    xp = get_namespace(x)
    m = xp.max(x, axis=-1, keepdims=True)
    return (m + xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------- logsumexp

class LogsumexpCache(NamedTuple):
    p: object          # softmax(x) at T = 1, (..., C)


def logsumexp_forward(x):
    """lse_i = log sum_c exp(x_ic), shape (...,). Returns (lse, cache)."""
    check_logits(x, "x")
    xp = get_namespace(x)
    lse = _logsumexp(x)
    return lse, LogsumexpCache(p=xp.exp(x - lse[..., None]))


def logsumexp_backward(g, cache: LogsumexpCache):
    """dx_ic = g_i * p_ic."""
    return g[..., None] * cache.p


def logsumexp(x):
    """Stable log-sum-exp over the last axis (see module doc)."""
    return logsumexp_forward(x)[0]


# ---------------------------------------------------------------- log_softmax

class LogSoftmaxCache(NamedTuple):
    p: object          # softmax(x, T), (..., C)
    T: float


def log_softmax_forward(x, T: float = 1.0):
    """log_softmax(x, T) = x/T - lse(x/T), shape (..., C). Returns (value, cache)."""
    T = check_temperature(T)
    check_logits(x, "x")
    xp = get_namespace(x)
    y = _log_softmax(x, T)
    return y, LogSoftmaxCache(p=xp.exp(y), T=T)


def log_softmax_backward(g, cache: LogSoftmaxCache):
    """dx = (g - p * sum_c g) / T."""
    xp = get_namespace(g)
    return (g - cache.p * xp.sum(g, axis=-1, keepdims=True)) / cache.T


def log_softmax(x, T: float = 1.0):
    """Temperature log-softmax over the last axis; -inf classes give -inf."""
    return log_softmax_forward(x, T)[0]


# ---------------------------------------------------------------- softmax

class SoftmaxCache(NamedTuple):
    p: object          # softmax(x, T), (..., C)
    T: float


def softmax_forward(x, T: float = 1.0):
    """p = softmax(x / T), shape (..., C). Returns (p, cache)."""
    T = check_temperature(T)
    check_logits(x, "x")
    xp = get_namespace(x)
    p = xp.exp(_log_softmax(x, T))
    return p, SoftmaxCache(p=p, T=T)


def softmax_backward(g, cache: SoftmaxCache):
    """dx = p * (g - sum_c p g) / T."""
    xp = get_namespace(g)
    p = cache.p
    return p * (g - xp.sum(p * g, axis=-1, keepdims=True)) / cache.T


def softmax(x, T: float = 1.0):
    """Temperature softmax over the last axis; -inf classes get probability exactly 0."""
    return softmax_forward(x, T)[0]
