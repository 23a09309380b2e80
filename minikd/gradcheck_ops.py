"""The gradient checks of every op in the package: what ``minikd gradcheck`` runs.

Each entry draws seeded random float64 inputs with x20 outliers and -inf classes, a random
upstream gradient, and compares the op's hand-derived backward with finite differences through
``minikd.gradcheck.check_vjp`` (the generic tool, usable on any function). Ops from later floors
add their cases to ``CASES``. (``minikd verify`` is ``minikd.torch_parity``: the losses against
PyTorch autograd; ``minikd.testing`` holds hypothesis strategies for tests.)
"""
from __future__ import annotations

import importlib
import itertools
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .gradcheck import check_vjp, random_logits
from .losses import conventions, kd

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
        beta = 0.3 if kind == "jsd" else None   # JSD's endpoints are the two KLs (tests/test_divergences.py)
        # DKD splits rows at their labels: teacher logits, and no unlabeled rows that count
        forms = ("logits",) if kind == "dkd" else kd.TEACHER_FORMS
        for teacher_as in forms:
            for reduction, unlabeled in itertools.product(conventions.KD_REDUCTIONS, conventions.UNLABELED):
                if kind == "dkd" and unlabeled == "soft":
                    continue
                for T in (0.05, 1.0, 4.0, 50.0):
                    shape = (2, 3, 6) if reduction == "none" else (6, 6)
                    s = random_logits(rng, shape)
                    # the reverse KL is +inf where the student has mass and the teacher none: no extra -inf
                    t = random_logits(rng, shape, neg_inf_mask=np.isneginf(s), p_inf=0.0 if kind == "reverse_kl" else 0.15)
                    if teacher_as != "logits":
                        t = sm._log_softmax(t, T)
                        t = np.exp(t) if teacher_as == "probs" else t
                    y = rng.integers(0, shape[-1], shape[:-1])
                    y = np.where(np.isneginf(np.take_along_axis(s, y[..., None], -1))[..., 0], 0, y)
                    y.reshape(-1)[0] = -100          # a row without a label (and more, at random)
                    y[rng.random(y.shape) < 0.2] = -100
                    mask = rng.random(shape[:-1]) < 0.8
                    kw = dict(T=T, alpha=float(rng.uniform(0.2, 0.9)), kind=kind, teacher_as=teacher_as,
                              reduction=reduction, mask=mask, unlabeled=unlabeled, beta=beta)
                    g = rng.standard_normal(shape[:-1]) if reduction == "none" else float(rng.standard_normal())
                    value, c = kd.kd_forward(s, t, y, **kw)
                    if not np.all(np.isfinite(value)):
                        continue   # the reverse KL of a teacher probability that underflowed to 0: +inf
                    gap = np.abs(c.p - c.q)[(c.p + c.q > 0) & c.valid[:, None]]
                    if kind == "tvd" and gap.size and gap.min() < 1e-3:
                        continue   # TVD's kink at p_c = q_c is within a finite difference's reach
                    eps = 2e-4 * min(T, 1)
                    name = "kd" if kind in ("kl", "ce") else kind
                    if teacher_as == "probs":
                        yield (f"{name} (student)", lambda s, t=t, y=y, kw=kw: kd.kd_loss(s, t, y, **kw), [s], g,
                               [kd.kd_backward(g, c)], eps)
                    else:
                        ds, dt = kd.kd_backward(g, c, teacher_grad=True)
                        yield (f"{name} (student, teacher)", lambda s, t, y=y, kw=kw: kd.kd_loss(s, t, y, **kw),
                               [s, t], g, [ds, dt], eps)


def _topk_cases(rng) -> Iterator:
    """A top-k teacher through kd_forward (k = 3 of 6): every variant and values form, gradients with
    respect to the student and to the values. Log-probabilities get a tail >= 0.2 (values + log 0.8),
    so that a finite-difference step of the values stays a valid teacher (sum exp(v) <= 1)."""
    from .losses import topk  # noqa: PLC0415
    for variant in topk.VARIANTS:
        for values_as, T_gen in (("logits", None), ("log_probs", None), ("log_probs", 2.5)):
            for T in (0.5, 1.0, 4.0):
                s = random_logits(rng, (5, 6), p_inf=0.0)
                t = random_logits(rng, (5, 6), p_inf=0.0)
                idx, v = topk.topk_from_dense(t, 3, T if T_gen is None else T_gen)
                v = np.take_along_axis(t, idx, -1) if values_as == "logits" else v + np.log(0.8)
                y = rng.integers(0, 6, 5)
                y[0] = -100
                kw = dict(T=T, alpha=float(rng.uniform(0.2, 0.9)), unlabeled="soft")
                g = float(rng.standard_normal())
                _, c = kd.kd_forward(s, topk.TopK(idx, v, values_as, T_gen, variant), y, **kw)
                a = 1 / T if values_as == "logits" else (T_gen or T) / T    # q is a function of a v
                yield ("topk (student, teacher)",
                       lambda s, v, idx=idx, va=values_as, tg=T_gen, vr=variant, y=y, kw=kw:
                       kd.kd_loss(s, topk.TopK(idx, v, va, tg, vr), y, **kw),
                       [s, v], g, list(kd.kd_backward(g, c, teacher_grad=True)), 2e-4 * min(T, 1, 1 / a))


def _feature_relational_mutual_cases(rng) -> Iterator:
    from .losses import feature, mutual, relational  # noqa: PLC0415
    for reduction in conventions.HINT_REDUCTIONS:
        s, t = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 3, 5))
        g = float(rng.standard_normal())
        _, c = feature.hint_forward(s, t, reduction=reduction)
        yield ("hint", lambda s, t, r=reduction: feature.hint_loss(s, t, reduction=r), [s, t], g,
               list(feature.hint_backward(g, c, teacher_grad=True)), 1e-4)
    for loss in relational.LOSSES:
        for reduction in conventions.RKD_REDUCTIONS:
            E, F = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
            g = float(rng.standard_normal())
            for name, (fwd, bwd) in relational.RKD_TERMS.items():
                _, c = fwd(E, F, loss=loss, reduction=reduction)
                yield (name, lambda e, F=F, fwd=fwd, lo=loss, r=reduction: fwd(e, F, loss=lo, reduction=r)[0],
                       [E], g, [bwd(g, c)], 1e-5)
    for mode, reduction in itertools.product(mutual.MODES, conventions.MUTUAL_REDUCTIONS):
        zs = [random_logits(rng, (5, 6), p_inf=0.0) for _ in range(3)]
        y = rng.integers(0, 6, 5)
        y[1] = -100
        kw = dict(T=2.0, reduction=reduction)
        _, c = mutual.mutual_forward(zs, y, mode=mode, **kw)
        if mode == "joint":
            g = float(rng.standard_normal())
            yield ("mutual (joint)", lambda *z, kw=kw, y=y: mutual.mutual_loss(list(z), y, mode="joint", **kw), zs, g,
                   mutual.mutual_backward(g, c), 1e-4)
        else:
            d = rng.standard_normal(3)
            grads = mutual.mutual_backward(d, c)
            for i in range(3):
                yield ("mutual (detached)",
                       lambda z, i=i, zs=zs, kw=kw, y=y: mutual.mutual_loss(
                           [z if k == i else zs[k] for k in range(3)], y, mode="detached", **kw)[i],
                       [zs[i]], d[i], [grads[i]], 1e-4)


def _nn_cases(rng) -> Iterator:
    from . import nn  # noqa: PLC0415
    layers = [
        ("nn.Linear", nn.Linear(5, 3, dtype="float64", seed=rng), (4, 5)),
        ("nn.Conv1d", nn.Conv1d(2, 3, 3, stride=2, padding=1, dtype="float64", seed=rng), (2, 2, 7)),
        ("nn.Conv2d", nn.Conv2d(2, 3, 3, padding=1, dtype="float64", seed=rng), (2, 2, 4, 4)),
        ("nn.AvgPool2d", nn.AvgPool2d(2), (2, 2, 4, 4)),
        ("nn.GlobalAvgPool", nn.GlobalAvgPool(), (2, 3, 5)),
        ("nn.BatchNorm1d", nn.BatchNorm1d(3, dtype="float64"), (6, 3)),
        ("nn.BatchNorm2d", nn.BatchNorm2d(2, dtype="float64"), (3, 2, 3, 3)),
        ("nn.GELU", nn.GELU(), (4, 6)),
        ("nn.Tanh", nn.Tanh(), (4, 6)),
    ]
    for name, layer, shape in layers:
        for k, v in layer.params.items():
            layer.params[k] = v + 0.3 * rng.standard_normal(v.shape)
        x = rng.standard_normal(shape)
        y, c = layer.forward(x)
        g = rng.standard_normal(y.shape)
        layer.zero_grad()
        dx = layer.backward(g, c)
        keys = list(layer.params)
        grads = [dx] + [layer.grads[k].copy() for k in keys]

        def f(x, *ps, layer=layer, keys=keys):
            for k, p in zip(keys, ps):
                layer.params[k] = p
            return layer.forward(x)[0]
        yield name, f, [x] + [layer.params[k].copy() for k in keys], g, grads, 1e-5
    # max pooling and ReLU away from their kinks: distinct values, none near 0
    x = rng.permutation(np.arange(1, 2 * 2 * 36 + 1, dtype=float)).reshape(2, 2, 6, 6) * 0.1
    for name, layer in (("nn.MaxPool2d", nn.MaxPool2d(2)), ("nn.ReLU", nn.ReLU()), ("nn.LeakyReLU", nn.LeakyReLU(0.1))):
        xx = x - 7.35 if name != "nn.MaxPool2d" else x  # no entry within 0.05 of the kink at 0
        y, c = layer.forward(xx)
        g = rng.standard_normal(y.shape)
        yield name, lambda x, layer=layer: layer.forward(x)[0], [xx], g, [layer.backward(g, c)], 1e-5


CASES: list[Callable[[np.random.Generator], Iterator]] = [_softmax_cases, _kd_cases, _topk_cases,
                                                           _feature_relational_mutual_cases, _nn_cases]


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
