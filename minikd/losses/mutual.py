"""Deep mutual learning (Zhang et al., CVPR 2018): a cohort of M models teaching each other.

Shapes: M logit arrays z_1..z_M, each (N, C) (or (B, S, C)); labels (N,) optional.
p_i = softmax(z_i / T); tau = T**2 (scale_t2) or 1; c = 1/(M-1) (average_peers, M > 1) or 1.

mode="detached" (how the DML authors train): model i has its own loss with its peers constant,
    L_i = CE_i + c * tau * sum_{j != i} KL(p_j || p_i)
    dL_i/dz_i = (softmax(z_i) - onehot(y)) + c * tau / T * sum_{j != i} (p_i - p_j)
and no gradient reaches the peers. ``mutual_forward`` returns the M losses.

mode="joint" (the seed's objective): one loss over the whole cohort,
    L = sum_i CE_i + c * tau * sum_i sum_{j != i} KL(p_i || p_j)
symmetric in the models (each unordered pair contributes KL(p_i||p_j) + KL(p_j||p_i)), with a
gradient for every model: each pair term is ``kd`` with z_j as student and z_i as teacher, and
``kd_backward(teacher_grad=True)`` supplies the teacher side.

Every KL and CE here is ``minikd.losses.kd`` (one implementation of the conventions:
batchmean over valid rows or sum, ignore_index, -inf classes); CE_i is absent without labels.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from . import conventions
from .kd import kd_backward, kd_forward

__all__ = ["mutual_forward", "mutual_backward", "mutual_loss"]

MODES = ("detached", "joint")


class MutualCache(NamedTuple):
    mode: str
    pairs: list          # (i, j, kd cache) with model i the kd student, j the kd teacher
    ce: list             # per model: kd cache of its CE term (alpha = 0), or None
    M: int
    coef: float
    shape: tuple
    dtype: object
    xp: object           # the array namespace of the logits


def mutual_forward(logits_list, labels=None, *, T=1.0, mode="detached", average_peers=True,
                   scale_t2=True, ignore_index=-100, reduction="batchmean"):
    """Returns (losses (M,) for "detached" or a scalar for "joint", cache). ``reduction``
    ("batchmean" or "sum", the conventions module's meaning) applies to every KL and CE term."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    conventions.check_reduction(reduction, conventions.MUTUAL_REDUCTIONS, "mutual learning")
    logits_list = list(logits_list)
    M = len(logits_list)
    if M < 1:
        raise ValueError("logits_list: expected at least one model's logits")
    shape = tuple(logits_list[0].shape)
    for k, z in enumerate(logits_list):
        if tuple(z.shape) != shape:
            raise ValueError(f"logits_list[{k}]: expected shape {shape} like model 0, got {tuple(z.shape)}")
    xp = get_namespace(*logits_list)
    coef = 1.0 / (M - 1) if (average_peers and M > 1) else 1.0
    kw = dict(T=T, alpha=1.0, scale_t2=scale_t2, kind="kl", ignore_index=ignore_index, reduction=reduction)
    ce, ce_loss = [], []
    for z in logits_list:
        if labels is None:
            ce.append(None)
            ce_loss.append(0.0)
        else:
            value, c = kd_forward(z, z, labels, T=1.0, alpha=0.0, ignore_index=ignore_index, reduction=reduction)
            ce.append(c)
            ce_loss.append(value)
    pairs, losses = [], []
    for i in range(M):
        total = ce_loss[i]
        for j in range(M):
            if i == j:
                continue
            # detached: KL(p_j || p_i) for model i (student i, teacher j);
            # joint: the term KL(p_i || p_j) is kd with student j and teacher i, recorded as (j, i)
            s, t = (i, j) if mode == "detached" else (j, i)
            value, c = kd_forward(logits_list[s], logits_list[t], labels, **kw)
            pairs.append((s, t, c))
            total = total + coef * value
        losses.append(total)
    value = xp.asarray(losses) if mode == "detached" else sum(losses)
    return value, MutualCache(mode, pairs, ce, M, coef, shape, logits_list[0].dtype, xp)


def mutual_backward(dloss, cache: MutualCache):
    """Gradients for every model's logits (a list of M arrays).

    "detached": dloss has M entries (the upstream of each model's own loss); model i's gradient
    is that of L_i alone. "joint": dloss is a scalar; every pair term reaches both models.
    """
    c = cache
    xp, shape, dtype = c.xp, c.shape, c.dtype
    if c.mode == "detached":
        d = [float(v) for v in (dloss if hasattr(dloss, "__len__") else [dloss] * c.M)]
        if len(d) != c.M:
            raise ValueError(f"dloss: expected {c.M} upstream values (one per model), got {len(d)}")
    else:
        d = [float(dloss)] * c.M
    grads = [xp.zeros(shape, dtype=dtype) for _ in range(c.M)]   # a lone model without labels: 0
    for i in range(c.M):
        if c.ce[i] is not None:
            grads[i] = grads[i] + kd_backward(d[i], c.ce[i])
    for s, t, kc in c.pairs:
        if c.mode == "detached":  # model s's loss, peer t constant
            grads[s] = grads[s] + kd_backward(d[s] * c.coef, kc)
        else:
            gs, gt = kd_backward(d[s] * c.coef, kc, teacher_grad=True)
            grads[s] = grads[s] + gs
            grads[t] = grads[t] + gt
    return grads


def mutual_loss(logits_list, labels=None, **kwargs):
    """The mutual-learning loss(es) alone; same arguments as ``mutual_forward``."""
    return mutual_forward(logits_list, labels, **kwargs)[0]
