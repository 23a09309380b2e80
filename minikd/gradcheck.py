"""Numerical vector-Jacobian checks, usable on any function (yours too).

For a function f(x_1, ..., x_k) -> y and an upstream gradient g shaped like y, the
vector-Jacobian product with respect to x_j is d <g, f(x)> / d x_j. It is estimated one element
at a time by finite differences of the scalar phi(x) = <g, f(x)>, in float64:

    "central"  (phi(x + h e) - phi(x - h e)) / 2h                                   error O(h^2)
    "central4" (phi(x - 2h e) - 8 phi(x - h e) + 8 phi(x + h e) - phi(x + 2h e)) / 12h   O(h^4)
    "complex"  Im phi(x + i h e) / h      (no cancellation, h = 1e-20; f must accept complex)

and compared with an analytic gradient by

    max_abs = max |a - n|,   max_rel = max_abs / max(max |a|, max |n|, floor)

(a norm-wise relative error: element-wise ratios blow up on entries that are exactly 0). The
floor (default 1e-4) covers gradients that are exactly zero, such as softmax over one class,
where finite differences return rounding noise of order 1e-16 |phi| / h: below the floor the comparison
is absolute, at the floor's scale. ``check_vjp`` also raises the floor to the resolution of
the finite difference itself: each evaluation of phi carries a few roundings of its own size
(we allow k = 8 units of roundoff u), so the estimate is uncertain by about c * k * u * |phi| / h
(c = 1.5 for "central4", the sum of its weights over 12; 1 for "central"), and a gradient can
only be checked to relative error rtol when it is larger than that noise / rtol.
The default step is absolute, so pick it on the scale the function varies on: for a temperature
softmax that scale is T, and ``eps = 1e-3 * min(T, 1)`` is a good choice.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from .backend import to_numpy

__all__ = ["numerical_vjp", "compare", "check_vjp", "GradcheckResult", "random_logits", "relative_error"]


class GradcheckResult(NamedTuple):
    """``compare``'s result: the largest absolute and (norm-wise) relative errors."""
    max_abs: float
    max_rel: float

    def ok(self, rtol: float = 1e-7) -> bool:
        return self.max_rel <= rtol


def random_logits(rng, shape, *, scale=2.0, outliers=0.15, p_inf=0.15, neg_inf_mask=None):
    """Seeded test logits (the one generator of minikd's checks and tests): normal of standard
    deviation ``scale``, a fraction ``outliers`` of entries multiplied by 20 (they saturate a softmax
    at low T), a fraction ``p_inf`` at -inf (padded or masked classes). ``neg_inf_mask``: entries
    that must be -inf as well (a teacher sharing the student's padding). Never a whole row at -inf:
    without a mask class 0 stays finite; with one, a row that would be all -inf keeps class 0."""
    shape = tuple(shape)
    x = rng.standard_normal(shape) * scale
    x = np.where(rng.random(shape) < outliers, 20 * x, x)
    mask = rng.random(shape) < p_inf if neg_inf_mask is None else neg_inf_mask | (rng.random(shape) < p_inf)
    mask[..., 0] = False if neg_inf_mask is None else mask[..., 0] & neg_inf_mask[..., 0]
    rows = mask.reshape(-1, shape[-1])
    rows[rows.all(-1), 0] = False
    return np.where(mask, -np.inf, x)


def relative_error(actual, expected, scale=0.0) -> float:
    """max |actual - expected| / max(max |expected|, scale): the norm-wise relative error the tests
    state their tolerances in. ``scale`` is the natural size of the quantity where ``expected`` may
    cancel to far below it (a KL of nearly equal rows is ~0 while its terms are ~log C)."""
    a, b = np.asarray(to_numpy(actual), np.float64), np.asarray(to_numpy(expected), np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), scale, 1e-300))


def _phi(f, inputs, upstream):
    y = f(*inputs)
    return np.sum(np.asarray(upstream) * np.asarray(y))


def numerical_vjp(f: Callable, inputs: Sequence, upstream, wrt: Sequence[int] | None = None,
                  eps: float = 1e-4, method: str = "central4") -> list:
    """Finite-difference d <upstream, f(*inputs)> / d inputs[j] for j in ``wrt`` (default: all).

    Inputs are copied to float64 (complex128 for ``method="complex"``); the caller's arrays are
    never modified. Entries that are -inf stay -inf (a shifted -inf is -inf) and get gradient 0.
    """
    if method not in ("central", "central4", "complex"):
        raise ValueError(f"method: expected 'central', 'central4' or 'complex', got {method!r}")
    dtype = np.complex128 if method == "complex" else np.float64
    xs = [np.array(to_numpy(x), dtype=dtype) if hasattr(x, "shape") else x for x in inputs]
    upstream = np.asarray(to_numpy(upstream), dtype=np.float64)
    wrt = range(len(xs)) if wrt is None else wrt
    grads = []
    for j in wrt:
        x = xs[j]
        grad = np.zeros(x.shape, dtype=np.float64)
        flat, gflat = x.reshape(-1), grad.reshape(-1)
        for k in range(flat.size):
            x0 = flat[k]
            if not np.isfinite(x0):
                continue
            if method == "complex":
                h = 1e-20
                flat[k] = x0 + 1j * h
                gflat[k] = np.imag(_phi(f, xs, upstream)) / h
            else:
                steps = (1, -1) if method == "central" else (2, 1, -1, -2)
                vals = {}
                for s in steps:
                    flat[k] = x0 + s * eps
                    vals[s] = _phi(f, xs, upstream)
                if method == "central":
                    gflat[k] = (vals[1] - vals[-1]) / (2 * eps)
                else:
                    gflat[k] = (vals[-2] - 8 * vals[-1] + 8 * vals[1] - vals[2]) / (12 * eps)
            flat[k] = x0
        grads.append(grad)
    return grads


def compare(analytic, numeric, floor: float = 1e-4) -> GradcheckResult:
    """Max absolute and norm-wise relative error between two gradients."""
    a = np.asarray(to_numpy(analytic), dtype=np.float64)
    n = np.asarray(to_numpy(numeric), dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"analytic gradient has shape {a.shape}, numerical {n.shape}")
    if a.size == 0:
        return GradcheckResult(0.0, 0.0)
    if not np.array_equal(np.isfinite(a), np.isfinite(n)):
        return GradcheckResult(float("inf"), float("inf"))
    fin = np.isfinite(a)
    err = float(np.max(np.abs(a[fin] - n[fin]), initial=0.0))
    scale = max(float(np.max(np.abs(a[fin]), initial=0.0)), float(np.max(np.abs(n[fin]), initial=0.0)))
    return GradcheckResult(err, float(err / max(scale, floor)))


def check_vjp(f: Callable, inputs: Sequence, upstream, analytic: Sequence,
              wrt: Sequence[int] | None = None, eps: float = 1e-4,
              method: str = "central4", floor: float = 1e-4, rtol: float = 1e-7) -> GradcheckResult:
    """Compare analytic VJPs (one per input in ``wrt``) with finite differences; worst error.

    ``rtol`` only sets how far the floor is raised above the finite-difference noise (see the
    module doc); the pass/fail decision stays with the caller (``result.ok(rtol)``).
    """
    numeric = numerical_vjp(f, inputs, upstream, wrt=wrt, eps=eps, method=method)
    if method != "complex":
        xs = [np.asarray(to_numpy(x), dtype=np.float64) if hasattr(x, "shape") else x for x in inputs]
        phi = abs(float(_phi(f, xs, np.asarray(to_numpy(upstream), dtype=np.float64))))
        c = 1.5 if method == "central4" else 1.0
        floor = max(floor, c * 8 * np.finfo(np.float64).eps / 2 * phi / eps / rtol)
    results = [compare(a, n, floor) for a, n in zip(analytic, numeric, strict=True)]
    return GradcheckResult(max(r.max_abs for r in results), max(r.max_rel for r in results))
