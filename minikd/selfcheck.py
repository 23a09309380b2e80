"""Gradient checks of every op in the package, run by ``minikd gradcheck``.

Each entry draws seeded random float64 inputs with x20 outliers and -inf classes, a random
upstream gradient, and compares the op's hand-derived backward with finite differences
(``minikd.gradcheck``). Ops from later floors add their cases to ``CASES``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .gradcheck import check_vjp
from .losses import kd

# `minikd.softmax` the attribute is the function; the module is reached by its full name
sm = importlib.import_module("minikd.softmax")

__all__ = ["CASES", "run_all", "CheckRow"]


class CheckRow(NamedTuple):
    op: str
    cases: int
    max_abs: float
    max_rel: float

    def ok(self, rtol: float = 1e-7) -> bool:
        return self.max_rel <= rtol


def random_logits(rng, shape, neg_inf_mask=None, p_inf=0.15):
    x = rng.standard_normal(shape) * 2
    x = np.where(rng.random(shape) < 0.15, 20 * x, x)
    mask = rng.random(shape) < p_inf if neg_inf_mask is None else neg_inf_mask | (rng.random(shape) < p_inf)
    mask[..., 0] = False if neg_inf_mask is None else mask[..., 0] & neg_inf_mask[..., 0]
    rows = mask.reshape(-1, shape[-1])
    rows[rows.all(-1), 0] = False
    return np.where(mask, -np.inf, x)


def _softmax_cases(rng) -> Iterator:
    for T in (0.05, 1.0, 3.0, 50.0):
        x = random_logits(rng, (5, 7))
        g = rng.standard_normal(x.shape)
        eps = 1e-3 * min(T, 1)
        _, c = sm.softmax_forward(x, T)
        yield "softmax", lambda x, T=T: sm.softmax(x, T), [x], g, [sm.softmax_backward(g, c)], eps
        y, c = sm.log_softmax_forward(x, T)
        gl = np.where(np.isfinite(y), g, 0)
        yield ("log_softmax", lambda x, T=T, y=y: np.where(np.isfinite(y), sm.log_softmax(x, T), 0),
               [x], gl, [sm.log_softmax_backward(gl, c)], eps)
        _, c = sm.logsumexp_forward(x)
        yield "logsumexp", sm.logsumexp, [x], g[:, 0], [sm.logsumexp_backward(g[:, 0], c)], 1e-3


def _kd_cases(rng) -> Iterator:
    for kind in kd.KINDS:
        for teacher_as in kd.TEACHER_FORMS:
            for reduction in kd.REDUCTIONS:
                for T in (0.05, 1.0, 4.0, 50.0):
                    shape = (2, 3, 6) if reduction == "none" else (6, 6)
                    s = random_logits(rng, shape)
                    t = random_logits(rng, shape, neg_inf_mask=np.isneginf(s))
                    if teacher_as != "logits":
                        t = sm._log_softmax(t, T)
                        t = np.exp(t) if teacher_as == "probs" else t
                    y = rng.integers(0, shape[-1], shape[:-1])
                    y = np.where(np.isneginf(np.take_along_axis(s, y[..., None], -1))[..., 0], 0, y)
                    y.reshape(-1)[0] = -100
                    mask = rng.random(shape[:-1]) < 0.8
                    kw = dict(T=T, alpha=float(rng.uniform(0.2, 0.9)), kind=kind, teacher_as=teacher_as,
                              reduction=reduction, mask=mask)
                    g = rng.standard_normal(shape[:-1]) if reduction == "none" else float(rng.standard_normal())
                    _, c = kd.kd_forward(s, t, y, **kw)
                    eps = 2e-4 * min(T, 1)
                    if teacher_as == "probs":
                        yield ("kd (student)", lambda s, t=t, y=y, kw=kw: kd.kd_loss(s, t, y, **kw), [s], g,
                               [kd.kd_backward(g, c)], eps)
                    else:
                        ds, dt = kd.kd_backward(g, c, teacher_grad=True)
                        yield ("kd (student, teacher)", lambda s, t, y=y, kw=kw: kd.kd_loss(s, t, y, **kw),
                               [s, t], g, [ds, dt], eps)


CASES: list[Callable[[np.random.Generator], Iterator]] = [_softmax_cases, _kd_cases]


def run_all(seed: int = 0, rtol: float = 1e-7) -> list[CheckRow]:
    """Run every registered case; one row per op with its worst errors."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {}
    for make in CASES:
        for op, f, inputs, g, analytic, eps in make(rng):
            res = check_vjp(f, inputs, g, analytic, eps=eps, rtol=rtol)
            rows.setdefault(op, []).append(res)
    return [CheckRow(op, len(r), max(x.max_abs for x in r), max(x.max_rel for x in r))
            for op, r in rows.items()]
