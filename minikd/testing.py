"""Hypothesis strategies for testing distillation code (needs the ``test`` extra).

Use them on your own implementation, e.g.::

    from hypothesis import given
    from minikd.testing import kd_cases

    @given(kd_cases())
    def test_mine(case):
        assert abs(my_kd(case.student, case.teacher, case.labels, T=case.T, alpha=case.alpha)
                   - mk.kd_loss(case.student, case.teacher, case.labels, T=case.T,
                                alpha=case.alpha)) < 1e-10

Logits are drawn as small values (|x| <= 4) where some entries are multiplied by 20 (outliers
that saturate a softmax at low T) and some are -inf (padded or masked classes; every row keeps
at least one finite class). Upstream gradients are drawn from a seeded normal generator, so they
are never all ones (softmax's backward of a constant row is exactly 0, a test that cannot fail).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = ["shapes", "logits", "temperatures", "alphas", "betas", "upstreams", "masks", "labels_for",
           "kd_cases", "KDCase"]


def shapes(max_rows: int = 6, max_classes: int = 7, min_classes: int = 1, sequences: bool = True):
    """(N, C) shapes with N >= 1 and C >= min_classes, and (B, S, C) shapes when ``sequences``."""
    flat = st.tuples(st.integers(1, max_rows), st.integers(min_classes, max_classes))
    if not sequences:
        return flat
    seq = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(min_classes, max_classes))
    return st.one_of(flat, seq)


@st.composite
def logits(draw, shape, outliers: bool = True, neg_inf: bool = True, scale: float = 4.0,
           neg_inf_mask=None):
    """float64 logits of ``shape``; outliers x20; -inf entries (never a whole row).

    ``neg_inf_mask``: a boolean array of entries that must be -inf (for a teacher that shares
    the student's padding); more may be added, the row keeps one finite entry.
    """
    shape = tuple(shape)
    x = draw(hnp.arrays(np.float64, shape, elements=st.floats(-scale, scale, width=64)))
    if outliers:
        x = np.where(draw(hnp.arrays(bool, shape)), 20 * x, x)
    mask = np.zeros(shape, dtype=bool) if neg_inf_mask is None else np.array(neg_inf_mask)
    if neg_inf and shape[-1] > 1:
        mask = mask | draw(hnp.arrays(bool, shape, elements=st.sampled_from([False, False, True])))
    rows = mask.reshape(-1, shape[-1])
    fixed = np.zeros_like(rows) if neg_inf_mask is None else np.array(neg_inf_mask).reshape(rows.shape)
    for r in range(rows.shape[0]):
        if rows[r].all():  # keep one finite class, preferring one the caller left finite
            free = np.flatnonzero(~fixed[r])
            rows[r, free[0] if free.size else 0] = False
    return np.where(mask, -np.inf, x)


def temperatures(lo: float = 0.05, hi: float = 50.0):
    """Temperatures in [lo, hi], with the common values 1, 2, 4 drawn often."""
    return st.one_of(st.sampled_from([1.0, 2.0, 4.0]), st.floats(lo, hi))


def alphas():
    """alpha in [0, 1] with the endpoints drawn often."""
    return st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))


def upstreams(shape):
    """A random normal upstream gradient of ``shape`` (seeded, never constant)."""
    return st.integers(0, 2**32 - 1).map(
        lambda seed: np.random.default_rng(seed).standard_normal(tuple(shape)))


def masks(lead_shape):
    """A boolean row mask of the logits' leading shape."""
    return hnp.arrays(bool, tuple(lead_shape))


@st.composite
def labels_for(draw, student, ignore_index: int = -100, allow_ignored: bool = True):
    """Integer labels, each a finite class of its student row; some rows ignore_index."""
    C = student.shape[-1]
    rows = student.reshape(-1, C)
    labels = np.empty(rows.shape[0], dtype=np.int64)
    for r in range(rows.shape[0]):
        finite = np.flatnonzero(np.isfinite(rows[r]))
        labels[r] = finite[draw(st.integers(0, finite.size - 1))]
        if allow_ignored and draw(st.integers(0, 4)) == 0:
            labels[r] = ignore_index
    return labels.reshape(student.shape[:-1])


class KDCase(NamedTuple):
    """One KD problem drawn by ``kd_cases``: the arrays, T, alpha and the loss options."""
    student: np.ndarray
    teacher: np.ndarray
    labels: np.ndarray | None
    mask: np.ndarray | None
    T: float
    alpha: float
    kind: str
    teacher_as: str
    reduction: str
    scale_t2: bool
    unlabeled: str = "ignore"
    beta: float | None = None     # kind="jsd"'s mixture weight

    def options(self, **override) -> dict:
        """The loss options of the case (everything but the arrays), as keyword arguments."""
        kw = dict(T=self.T, alpha=self.alpha, kind=self.kind, teacher_as=self.teacher_as, reduction=self.reduction,
                  scale_t2=self.scale_t2, mask=self.mask, unlabeled=self.unlabeled, beta=self.beta)
        kw.update(override)
        return kw


@st.composite
def kd_cases(draw, max_rows: int = 6, max_classes: int = 7, teacher_forms=("logits", "probs",
             "log_probs"), reductions=("batchmean", "sum", "none"), neg_inf: bool = True,
             unlabeled=("ignore", "soft"), kinds=("kl", "ce")):
    """A consistent KD problem: the teacher is -inf wherever the student is (shared padding).
    Rows labeled ignore_index count nowhere (``unlabeled="ignore"``) or get the soft term alone
    ("soft", the transfer set; then the labels may be absent even for alpha < 1)."""
    shape = draw(shapes(max_rows, max_classes))
    student = draw(logits(shape, neg_inf=neg_inf))
    teacher = draw(logits(shape, neg_inf=neg_inf, neg_inf_mask=np.isneginf(student)))
    T = draw(temperatures())
    alpha = draw(alphas())
    unlabeled_rows = draw(st.sampled_from(unlabeled))
    use_labels = (alpha < 1.0 and unlabeled_rows == "ignore") or draw(st.booleans())
    labels = draw(labels_for(student)) if use_labels else None
    mask = draw(st.one_of(st.none(), masks(shape[:-1])))
    teacher_as = draw(st.sampled_from(teacher_forms))
    if teacher_as != "logits":
        from .softmax import _log_softmax  # soft targets stored at temperature T
        log_q = _log_softmax(teacher, T)
        teacher = np.exp(log_q) if teacher_as == "probs" else log_q
    kind = draw(st.sampled_from(kinds))
    beta = draw(betas()) if kind == "jsd" else None
    return KDCase(student, teacher, labels, mask, T, alpha, kind, teacher_as,
                  draw(st.sampled_from(reductions)), draw(st.booleans()), unlabeled_rows, beta)


def betas():
    """JSD's mixture weight: the endpoints (forward and reverse KL), their neighbours and the interior."""
    return st.one_of(st.sampled_from([0.0, 1e-6, 0.5, 1 - 1e-6, 1.0]), st.floats(0.0, 1.0))
