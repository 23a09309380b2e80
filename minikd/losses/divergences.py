"""The soft term's divergences D(p, q), each with its gradient with respect to the student's and the
teacher's logits (floor 2). ``kd_forward(kind=...)`` calls these; reductions, masks, labels, the
temperature's T^2 and the term weights stay the conventions module's.

One row: p = softmax(s / T) the student, q = softmax(t / T) the teacher (or the given
probabilities / log-probabilities at T), all logs exact for -inf classes (0 log 0 = 0).

    kind          D(p, q)                                                    who calls it that
    "kl"          KL(q || p) = sum_c q_c (log q_c - log p_c)                 forward KL, Hinton
    "ce"          H(q, p)    = -sum_c q_c log p_c                            soft cross-entropy
    "reverse_kl"  KL(p || q) = sum_c p_c (log p_c - log q_c)                 reverse KL (MiniLLM)
    "jsd"         beta KL(q || m) + (1 - beta) KL(p || m),                   generalized JSD (TRL's
                  m = beta q + (1 - beta) p                                  generalized_jsd_loss,
                  beta = 0: KL(q || p); beta = 1: KL(p || q) (endpoint rule)  Liger-Kernel's JSD)
    "tvd"         (1/2) sum_c |p_c - q_c|                                    total variation

JSD's interior formula is not continuous at the endpoints: as beta -> 0 or 1 it tends to 0 (m
tends to p or q), not to a KL; TRL and Liger switch to the forward / reverse KL at exactly beta = 0
and 1, and so does minikd. beta = 1/2 is the symmetric Jensen-Shannon divergence, bounded by log 2.
JSD(beta) of (p, q) equals JSD(1 - beta) of (q, p).

Gradients (derivation)
----------------------
For F(p, q) with partials a_c = dF/dp_c and b_c = dF/dq_c, the softmax's Jacobian
dp_c/ds_k = p_c (delta_ck - p_k) / T gives

    dF/ds_k = p_k (a_k - sum_c p_c a_c) / T,        dF/dt_k = q_k (b_k - sum_c q_c b_c) / T

(for teacher log-probabilities u = log q given directly: dF/du_k = q_k b_k). Per kind:

    kl          a = -q/p            -> dF/ds = (p - q) / T;   b = log q - log p + 1
    ce          a = -q/p            -> dF/ds = (p - q) / T;   b = -log p
    reverse_kl  a = log p - log q + 1, so dF/ds_k = p_k (r_k - D) / T with r = log p - log q;
                b = -p/q            -> dF/dt = (q - p) / T
    jsd         a = (1 - beta)(log p - log m),  b = beta (log q - log m)
                (from D = beta sum q log q + (1 - beta) sum p log p - sum m log m, dm/dp = 1 - beta,
                dm/dq = beta: the +1 of each derivative cancels against m's)
    tvd         a = sign(p - q) / 2,  b = -a, with the subgradient sign(0) = 0 (at p = q the
                gradient is 0: TVD has a kink there and 0 is in its subdifferential)

The +1 terms of a and b cancel inside the projections (sum_c p_c = 1), so they are dropped.

Numerics
--------
Logs come from ``softmax._log_softmax_precise`` (log1p of the other classes' mass: the largest
entry of a nearly one-hot row keeps its relative accuracy). JSD needs log p - log m and
log q - log m, which cancel where p ~ q: they are computed from d = log p - log q as
-log1p(beta expm1(-d)) and -log1p((1 - beta) expm1(d)) (``_jsd_log_ratios``), exact for -inf
classes (-log(1 - beta), -log beta where the other side has no mass) and for beta near 0 or 1.
Every logit gradient above sums to 0 over the classes; where both sides are nearly one-hot its
largest entry is a difference of two numbers near 1 (q_k - p_k): that entry is recomputed as minus
the sum of the others (``_balance``), which are small and exact, so the gradient keeps its
relative accuracy at the dominant class too.
"""
from __future__ import annotations

import math

from ..backend import get_namespace
from ..checks import UserError

__all__ = ["KINDS", "check_beta", "divergence_rows", "divergence_grads"]

KINDS = ("kl", "ce", "reverse_kl", "jsd", "tvd")


def check_beta(kind: str, beta):
    """beta: JSD's mixture weight in [0, 1], required by kind="jsd" and refused by the others."""
    if kind != "jsd":
        if beta is not None:
            raise UserError(f"beta: only kind='jsd' takes it (kind={kind!r})")
        return None
    if beta is None:
        raise UserError("beta: kind='jsd' needs beta in [0, 1] (0: forward KL, 1: reverse KL, 0.5: symmetric JSD)")
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise UserError(f"beta: expected a number in [0, 1], got {beta!r}") from None
    if not 0.0 <= beta <= 1.0:
        raise UserError(f"beta: expected a number in [0, 1], got {beta}")
    return beta


def _endpoint(kind, beta):
    """JSD at beta = 0 is the forward KL, at beta = 1 the reverse KL (TRL's and Liger's rule)."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "kl" if beta == 0.0 else "reverse_kl"
    return kind


def _xlogy(xp, x, log_y):
    """x * log_y with 0 * anything = 0 (0 log 0 = 0, and no NaN from 0 * -inf)."""
    return xp.where(x > 0, x * xp.where(x > 0, log_y, 0), 0)


def _log_mixture(xp, log_p, log_q, beta):
    """log(beta q + (1 - beta) p), exact for -inf classes and beta near 0 or 1."""
    return xp.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))


def _jsd_log_ratios(xp, p, log_p, q, log_q, beta):
    """(log p - log m, log q - log m), m = beta q + (1 - beta) p, each accurate where p ~ q (where a
    difference of logs of m would cancel): with d = log p - log q,
        log q - log m = -log1p((1 - beta) expm1(d)),   log p - log m = -log1p(beta expm1(-d));
    where one side has no mass they are -log(beta) and -log(1 - beta); where |d| > 30 (no
    cancellation, and expm1 could overflow) the logaddexp form. 0 where that side has no mass."""
    both = (p > 0) & (q > 0)
    d = xp.where(both, log_p, 0) - xp.where(both, log_q, 0)
    near = xp.abs(d) < 30
    dn = xp.where(near, d, 0)
    log_m = _log_mixture(xp, xp.where(p > 0, log_p, -xp.inf), xp.where(q > 0, log_q, -xp.inf), beta)
    q_far = xp.where(q > 0, log_q, 0) - xp.where(q > 0, log_m, 0)
    p_far = xp.where(p > 0, log_p, 0) - xp.where(p > 0, log_m, 0)
    lq_m = xp.where(near & both, -xp.log1p((1.0 - beta) * xp.expm1(dn)), q_far)
    lp_m = xp.where(near & both, -xp.log1p(beta * xp.expm1(-dn)), p_far)
    return xp.where(p > 0, lp_m, 0), xp.where(q > 0, lq_m, 0)


def _x_minus_log1p(xp, x):
    """x - log1p(x) >= 0 for x > -1, accurate for small x (series x^2/2 - x^3/3 + ...; 17 terms
    reach 1e-17 for |x| < 0.1), direct elsewhere (there it is >= 0.0048: no cancellation)."""
    small = xp.abs(x) < 0.1
    xs = xp.where(small, x, 0)
    series = xp.zeros_like(xs)
    power = xs * xs
    for n in range(2, 19):
        series = series + (power / n if n % 2 == 0 else -power / n)
        power = power * xs
    with _quiet(xp):   # x = +inf (a side without mass): +inf - inf is not used (masked by the caller)
        direct = x - xp.log1p(xp.where(small, 0, x))
    return xp.where(small, series, direct)


def _jsd_rows_normalized(xp, p, log_p, q, log_q, beta):
    """JSD(beta) when p and q each sum to 1 exactly (softmaxes of logits), as a sum of terms >= 0:
    with y = (1 - beta) expm1(d), x = beta expm1(-d), d = log p - log q, f(z) = z - log1p(z),
        D = beta sum_{q>0} q f(y) + (1 - beta) sum_{p>0} p f(x) + beta (1 - beta) (P0 + Q0)
    (P0, Q0: the mass p puts where q has none and the reverse), since sum_{q>0} q y =
    (1 - beta)(sum_{q>0} p - 1) = -(1 - beta) P0 and likewise for x. The terms of the defining
    form are O(beta) each and cancel to O(beta^2) for beta near 0 (or 1); these do not. Classes
    with |d| >= 30 take q f(y) = q (log q - log m) + (1 - beta)(p - q) (y could overflow)."""
    lp_m, lq_m = _jsd_log_ratios(xp, p, log_p, q, log_q, beta)
    both = (p > 0) & (q > 0)
    d = xp.where(both, log_p, 0) - xp.where(both, log_q, 0)
    near = both & (xp.abs(d) < 30)
    dn = xp.where(near, d, 0)
    q_term = xp.where(near, q * _x_minus_log1p(xp, (1.0 - beta) * xp.expm1(dn)), q * lq_m + (1.0 - beta) * (p - q))
    p_term = xp.where(near, p * _x_minus_log1p(xp, beta * xp.expm1(-dn)), p * lp_m + beta * (q - p))
    q_term = xp.where(q > 0, q_term, 0)
    p_term = xp.where(p > 0, p_term, 0)
    p0 = xp.sum(xp.where(q > 0, 0, p), axis=-1)
    q0 = xp.sum(xp.where(p > 0, 0, q), axis=-1)
    return beta * xp.sum(q_term, axis=-1) + (1.0 - beta) * xp.sum(p_term, axis=-1) + beta * (1.0 - beta) * (p0 + q0)


def divergence_rows(kind, p, log_p, q, log_q, beta=None, teacher_as="logits"):
    """D(p, q) per row (see the module doc); p, q (N, C) and their full logs (-inf where 0).
    ``teacher_as``: how q was given; only a softmax of logits sums to 1 exactly, which TVD's
    accurate dominant entry needs."""
    xp = get_namespace(p)
    kind = _endpoint(kind, beta)
    if kind == "kl":
        return xp.sum(_xlogy(xp, q, log_q) - _xlogy(xp, q, log_p), axis=-1)
    if kind == "ce":
        return -xp.sum(_xlogy(xp, q, log_p), axis=-1)
    if kind == "reverse_kl":
        return xp.sum(_xlogy(xp, p, log_p) - _xlogy(xp, p, log_q), axis=-1)
    if kind == "jsd":
        if teacher_as == "logits":
            return _jsd_rows_normalized(xp, p, log_p, q, log_q, beta)
        lp_m, lq_m = _jsd_log_ratios(xp, p, log_p, q, log_q, beta)
        return beta * xp.sum(q * lq_m, axis=-1) + (1.0 - beta) * xp.sum(p * lp_m, axis=-1)
    if kind == "tvd":   # p_k - q_k at the dominant class as minus the others' (see Numerics)
        diff = _balance(xp, p - q, p) if teacher_as == "logits" else p - q
        return 0.5 * xp.sum(xp.abs(diff), axis=-1)
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def _masked_diff(xp, w, a, b):
    """a - b where w > 0, else 0 (no -inf - -inf where both sides have no mass)."""
    return xp.where(w > 0, a, 0) - xp.where(w > 0, b, 0)


def _project(xp, w, a):
    """w_k (a_k - sum_c w_c a_c): the softmax's Jacobian applied to partials a (0 where w = 0)."""
    a = xp.where(w > 0, a, 0)
    return w * (a - xp.sum(w * a, axis=-1, keepdims=True))


def _project_sign(xp, w, a):
    """``_project`` for a in {-1/2, 0, 1/2} (TVD), w summing to 1, without cancellation: with
    P+, P-, P0 the mass of w where a is 1/2, -1/2, 0, a_k - sum_c w_c a_c = P- + P0/2 (a_k = 1/2),
    -(P+ + P0/2) (a_k = -1/2), (P- - P+)/2 (a_k = 0): sums of masses, not 1/2 minus nearly 1/2."""
    def mass(sel):
        return xp.sum(xp.where(sel, w, 0), axis=-1, keepdims=True)
    plus, minus, zero = mass(a > 0), mass(a < 0), mass(a == 0)
    return w * xp.where(a > 0, minus + zero / 2, xp.where(a < 0, -(plus + zero / 2), (minus - plus) / 2))


def _balance(xp, d, weights):
    """Rows of d sum to 0; recompute each row's entry at its largest weight as minus the sum of the
    others (see Numerics)."""
    top = xp.arange(d.shape[-1]) == xp.argmax(weights, axis=-1)[:, None]
    return xp.where(top, -xp.sum(xp.where(top, 0, d), axis=-1, keepdims=True), d)


def divergence_grads(kind, p, log_p, q, log_q, beta, T, teacher_as="logits", teacher_grad=True):
    """(dD/ds, dD/dt) per row, (N, C) each (dD/dt None unless ``teacher_grad``): with respect to
    the student logits and to the teacher input as given (logits, or log-probabilities)."""
    xp = get_namespace(p)
    kind = _endpoint(kind, beta)
    if kind == "reverse_kl":   # +inf loss where p > 0 = q: no finite gradient (NaN there, quietly)
        with _quiet(xp):
            return _grads(xp, kind, p, log_p, q, log_q, beta, T, teacher_as, teacher_grad)
    return _grads(xp, kind, p, log_p, q, log_q, beta, T, teacher_as, teacher_grad)


def _quiet(xp):
    import numpy as np  # noqa: PLC0415  (errstate is NumPy's; CuPy does not warn)
    return np.errstate(invalid="ignore")


def _grads(xp, kind, p, log_p, q, log_q, beta, T, teacher_as, teacher_grad):
    if kind in ("kl", "ce"):
        ds = p - q
        b = _masked_diff(xp, q, log_q, log_p) if kind == "kl" else -xp.where(q > 0, log_p, 0)
    elif kind == "reverse_kl":
        ds = _project(xp, p, _masked_diff(xp, p, log_p, log_q))
        b = None   # dF/dt = (q - p) / T directly; for log-probabilities dF/du = q * (-p/q) = -p
    elif kind == "jsd":
        lp_m, lq_m = _jsd_log_ratios(xp, p, log_p, q, log_q, beta)
        ds = _project(xp, p, (1.0 - beta) * lp_m)
        b = beta * lq_m
    elif kind == "tvd":
        a = 0.5 * xp.sign(p - q)
        ds = _project_sign(xp, p, a)
        b = -a
    else:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    ds = _balance(xp, ds, p) / T
    if not teacher_grad:
        return ds, None
    if teacher_as == "logits":
        dt = (q - p) if kind == "reverse_kl" else _project_sign(xp, q, b) if kind == "tvd" else _project(xp, q, b)
        dt = _balance(xp, dt, q) / T
    else:   # log-probabilities u = log q: dF/du_k = q_k b_k (no projection: u is not normalized)
        dt = -p if kind == "reverse_kl" else xp.where(q > 0, q * b, 0)
        if kind == "kl":
            dt = dt + q   # the +1 of b that the projection would cancel
    return ds, dt
