"""FitNets hint loss (Romero et al. 2015): squared L2 between teacher features and the student's
features after a trainable regressor (the regressor is an ``nn.Linear`` or 1x1 ``nn.Conv``
owned by the pipeline; this loss sees its output).

Shapes: r (regressed student features) and h (teacher features) are (N, D) or (N, C, *S).

    per sample  l_n = sum_k (r_nk - h_nk)^2          (no 1/2, so that "mean" equals MSE)
    "batchmean" L = (1/N) sum_n l_n                    (the seed's formula: sum over features, mean over batch)
    "mean"      L = (1/(N K)) sum_n l_n               (every term: what framework MSE losses do)
    "sum"       L = sum_n l_n
(the reductions' one meaning for every loss is ``conventions``'s: sum of the terms, over the rows,
over the terms)
    gradient    dL/dr = c * 2 (r - h),  dL/dh = -dL/dr,  c = 1/N, 1/(N K) or 1

Several tapped layers are several calls, weighted by the caller. Zero exactly when r = h.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import check_float_array, get_namespace
from . import conventions

__all__ = ["hint_forward", "hint_backward", "hint_loss"]


class HintCache(NamedTuple):
    diff: object        # r - h
    scale: float        # c


def hint_forward(student_feat, teacher_feat, *, reduction: str = "batchmean"):
    """Squared L2 hint loss (see module doc). Returns (loss, cache)."""
    check_float_array(student_feat, "student_feat", ndim_min=2)
    check_float_array(teacher_feat, "teacher_feat", ndim_min=2)
    if tuple(student_feat.shape) != tuple(teacher_feat.shape):
        raise ValueError(f"teacher_feat: expected the (regressed) student features' shape "
                         f"{tuple(student_feat.shape)}, got {tuple(teacher_feat.shape)}; "
                         f"map the student features with a regressor first")
    conventions.check_reduction(reduction, conventions.HINT_REDUCTIONS, "the hint loss")
    xp = get_namespace(student_feat, teacher_feat)
    diff = student_feat - teacher_feat
    scale = 1.0 / conventions.divisor(reduction, student_feat.shape[0], student_feat.size)
    return xp.sum(diff * diff) * scale, HintCache(diff, scale)


def hint_backward(dloss, cache: HintCache, teacher_grad: bool = False):
    """d loss / d student_feat (and d / d teacher_feat when ``teacher_grad``)."""
    g = (2.0 * cache.scale * float(dloss)) * cache.diff
    return (g, -g) if teacher_grad else g


def hint_loss(student_feat, teacher_feat, *, reduction: str = "batchmean"):
    """The hint loss alone; same arguments as ``hint_forward``."""
    return hint_forward(student_feat, teacher_feat, reduction=reduction)[0]
