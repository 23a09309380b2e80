"""Relational knowledge distillation (Park et al., CVPR 2019): distance and angle terms.

Shapes: student embeddings E (N, D_s), teacher embeddings F (N, D_t); D_s and D_t may differ
(distances and angles do not depend on the dimension). The teacher side is a constant.

Distance
--------
    d_ab = sqrt(max(|e_a - e_b|^2, eps)) for a != b, d_aa = 0        (eps = 1e-12, as the
    mu   = mean of d_ab over the N(N-1) distinct pairs                 authors' pdist clamps)
    psi_ab = d_ab / mu,   x_ab = psi^s_ab - psi^t_ab
    L = (1/N^2) sum_{a,b} h(x_ab)      (all N*N pairs, the N zero diagonal terms included, as in
                                        the authors' code; reduction="sum" drops the 1/N^2)
h is the Huber loss with delta 1 (smooth L1; loss="huber") or x^2 (loss="squared": with
reduction="sum" the seed's squared Frobenius norm ||psi^s - psi^t||_F^2).
|e_a - e_b|^2 comes from the Gram matrix G = E E^T: D2_ab = G_aa + G_bb - 2 G_ab, computed on
centered embeddings (E minus its mean: no change to any value, and the least cancellation).

Gradient. With g_ab = h'(x_ab)/N^2 (h' = clip(x, -1, 1) for Huber, 2x for squared):
    dL/d psi_ab = g_ab;  psi depends on every d through mu, so with S = sum g_cd psi_cd,
    dL/d d_ab   = (g_ab - S / P) / mu,    P = N(N-1), a != b
    dL/d D2_ab  = dL/d d_ab / (2 d_ab)  where D2_ab > eps, else 0 (the clamp is flat)
    dL/dE       = 2 (diag(M 1) - M) E,  M = W + W^T,  W_ab = dL/d D2_ab
Coincident points sit on the clamp: d = 1e-6 and zero gradient, as in the reference.

Angle
-----
For an anchor a and points b, c, with v_ab = e_b - e_a and n_ab = |v_ab|:
    cos_abc = <v_ab, v_ac> / (n_ab n_ac) = (G_bc - G_ab - G_ac + G_aa) / (n_ab n_ac)
    L = (1/N^3) sum_{a,b,c} h(cos^s_abc - cos^t_abc)     (all N^3 triples, as the authors' code)
Triples with b = a or c = a, and pairs of points that coincide (n_ab^2 <= 64 u (G_aa + G_bb),
u the unit roundoff: the direction is undefined), have cos = 0 and zero gradient; the authors'
F.normalize gives the same 0 value for an exactly zero difference.

Gradient, per anchor a, with Gm = g + g^T (g_bc = h'(x_abc)/N^3, the pair (b, c) appears twice):
    dL/dv_ab = sum_c beta_bc v_ac - gamma_b v_ab,   beta_bc = Gm_bc / (n_ab n_ac),
                                                    gamma_b = sum_c Gm_bc cos_abc / n_ab^2
    and v_ab = e_b - e_a sends +dL/dv_ab to e_b and -dL/dv_ab to e_a.
Everything is linear in E, so the anchors accumulate an N x N coefficient matrix Omega and the
gradient is Omega E, computed once. Memory: G, one anchor's N x N cosines, Omega: O(N^2 + N D),
never an N x N x D tensor (N = 512, D = 256: a few MB instead of 512 MB for the differences).
Time O(N^3 + N^2 D).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import check_float_array, get_namespace
from . import conventions

__all__ = ["rkd_distance_forward", "rkd_distance_backward", "rkd_angle_forward", "rkd_angle_backward",
           "rkd_distance", "rkd_angle"]

EPS = 1e-12
LOSSES = ("huber", "squared")


def _check(student_emb, teacher_emb, loss, reduction):
    check_float_array(student_emb, "student_emb", ndim_min=2)
    check_float_array(teacher_emb, "teacher_emb", ndim_min=2)
    if student_emb.ndim != 2 or teacher_emb.ndim != 2:
        raise ValueError(f"student_emb, teacher_emb: expected (N, D) embeddings, got "
                         f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}")
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"teacher_emb: expected {student_emb.shape[0]} rows like the student, got "
                         f"{teacher_emb.shape[0]}")
    if student_emb.shape[0] < 2:
        raise ValueError("student_emb: relational losses need at least 2 samples in the batch")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    conventions.check_reduction(reduction, conventions.RKD_REDUCTIONS, "the RKD losses")


def _h(x, loss, xp):
    if loss == "squared":
        return x * x
    ax = xp.abs(x)
    return xp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _dh(x, loss, xp):
    return 2.0 * x if loss == "squared" else xp.clip(x, -1.0, 1.0)


def _center(E):
    """E minus its row mean. Both losses are translation invariant, so this changes no value and
    (its Jacobian I - 11^T/N applied to a translation-invariant gradient) no gradient, but the Gram
    identity D2 = G_aa + G_bb - 2 G_ab loses u * |e|^2 / |e_a - e_b|^2 of relative accuracy to
    cancellation, and centering makes |e| as small as the point cloud allows."""
    return E - E.mean(axis=0, keepdims=True)


def _gram_d2(E):
    xp = get_namespace(E)
    G = E @ E.T
    sq = xp.diagonal(G)
    return G, sq[:, None] + sq[None, :] - 2.0 * G


# ---------------------------------------------------------------- distance

def _distance_matrix(E):
    """(psi, d, mu, D2, off-diagonal mask) with the authors' clamp and zero diagonal."""
    xp = get_namespace(E)
    N = E.shape[0]
    _, D2 = _gram_d2(E)
    d = xp.sqrt(xp.maximum(D2, EPS))
    off = ~xp.eye(N, dtype=bool)
    d = xp.where(off, d, 0.0)
    mu = xp.sum(d) / (N * (N - 1))
    return d / mu, d, mu, D2, off


class RKDDistanceCache(NamedTuple):
    E: object          # centered student embeddings
    x: object
    psi: object
    d: object
    mu: object
    D2: object
    off: object
    scale: float
    loss: str


def rkd_distance_forward(student_emb, teacher_emb, *, loss="huber", reduction="mean"):
    """RKD distance loss (see module doc). Returns (loss, cache)."""
    _check(student_emb, teacher_emb, loss, reduction)
    xp = get_namespace(student_emb, teacher_emb)
    N = student_emb.shape[0]
    student_emb = _center(student_emb)
    psi_s, d, mu, D2, off = _distance_matrix(student_emb)
    psi_t = _distance_matrix(_center(teacher_emb))[0]
    x = psi_s - psi_t
    scale = 1.0 / conventions.divisor(reduction, N, N * N)   # "mean": all N^2 pairs, the diagonal's too
    return xp.sum(_h(x, loss, xp)) * scale, RKDDistanceCache(student_emb, x, psi_s, d, mu, D2, off, scale, loss)


def rkd_distance_backward(dloss, cache: RKDDistanceCache):
    """d loss / d student_emb."""
    c = cache
    xp = get_namespace(c.E)
    N = c.E.shape[0]
    g = xp.where(c.off, _dh(c.x, c.loss, xp), 0.0) * (c.scale * float(dloss))
    S = xp.sum(g * c.psi)
    dd = xp.where(c.off, (g - S / (N * (N - 1))) / c.mu, 0.0)
    W = xp.where(c.off & (c.D2 > EPS), dd / (2.0 * xp.where(c.d > 0, c.d, 1.0)), 0.0)
    M = W + W.T
    return _center(2.0 * (xp.sum(M, axis=1)[:, None] * c.E - M @ c.E))


def rkd_distance(student_emb, teacher_emb, *, loss="huber", reduction="mean"):
    """The RKD distance loss alone; same arguments as ``rkd_distance_forward``."""
    return rkd_distance_forward(student_emb, teacher_emb, loss=loss, reduction=reduction)[0]


# ---------------------------------------------------------------- angle

def _anchor_cosines(G, D2, a, tol):
    """cos_a (N, N) for anchor a from the Gram matrix; (cos, inverse norms, live mask)."""
    xp = get_namespace(G)
    n2 = D2[a]                                     # |e_b - e_a|^2 for every b
    sq = xp.diagonal(G)
    live = n2 > tol * (sq[a] + sq)                 # b == a and coincident points are not
    inv_n = xp.where(live, 1.0 / xp.sqrt(xp.where(live, n2, 1.0)), 0.0)
    K = G - G[a][:, None] - G[a][None, :] + G[a, a]
    return K * inv_n[:, None] * inv_n[None, :], inv_n, live


class RKDAngleCache(NamedTuple):
    E: object          # centered embeddings
    F: object
    loss: str
    scale: float


def _angle_terms(E, F, loss, scale, want_grad, dloss=1.0):
    """Loss (and the coefficient matrix Omega) anchor by anchor: O(N^2) memory."""
    xp = get_namespace(E)
    N = E.shape[0]
    tol = 64 * float(np.finfo(E.dtype).eps) / 2   # coincident points: |e_b - e_a|^2 below this relative size
    Gs, D2s = _gram_d2(E)
    Gt, D2t = _gram_d2(F)
    total = 0.0
    Omega = xp.zeros((N, N), dtype=E.dtype) if want_grad else None
    for a in range(N):
        cs, inv_n, _ = _anchor_cosines(Gs, D2s, a, tol)
        ct = _anchor_cosines(Gt, D2t, a, tol)[0]
        x = cs - ct
        total = total + xp.sum(_h(x, loss, xp))
        if not want_grad:
            continue
        g = _dh(x, loss, xp) * (scale * dloss)
        Gm = g + g.T
        beta = Gm * inv_n[:, None] * inv_n[None, :]            # (b, c)
        gamma = xp.sum(Gm * cs, axis=1) * inv_n * inv_n          # (b,)
        # dL/dv_ab = sum_c beta_bc (e_c - e_a) - gamma_b (e_b - e_a) as coefficients R[b, x] on e_x
        R = beta.copy()
        R[xp.arange(N), xp.arange(N)] -= gamma
        R[:, a] += gamma - xp.sum(beta, axis=1)
        Omega += R                                  # +dL/dv_ab goes to e_b
        Omega[a] -= xp.sum(R, axis=0)               # -dL/dv_ab goes to e_a
    return total * scale, Omega


def rkd_angle_forward(student_emb, teacher_emb, *, loss="huber", reduction="mean"):
    """RKD angle loss (see module doc). Returns (loss, cache); memory O(N^2 + N D)."""
    _check(student_emb, teacher_emb, loss, reduction)
    N = student_emb.shape[0]
    scale = 1.0 / conventions.divisor(reduction, N, N**3)    # "mean": all N^3 triples
    E, F = _center(student_emb), _center(teacher_emb)
    value, _ = _angle_terms(E, F, loss, scale, want_grad=False)
    return value, RKDAngleCache(E, F, loss, scale)


def rkd_angle_backward(dloss, cache: RKDAngleCache):
    """d loss / d student_emb: the anchors' coefficient matrix Omega times E (recomputed from
    the cached embeddings: the N^3 cosines are never stored)."""
    _, Omega = _angle_terms(cache.E, cache.F, cache.loss, cache.scale, want_grad=True, dloss=float(dloss))
    return _center(Omega @ cache.E)


def rkd_angle(student_emb, teacher_emb, *, loss="huber", reduction="mean"):
    """The RKD angle loss alone; same arguments as ``rkd_angle_forward``."""
    return rkd_angle_forward(student_emb, teacher_emb, loss=loss, reduction=reduction)[0]


# (forward, backward) by name: the training loop, the gradient checks and the PyTorch comparison
# take the relational terms from here
RKD_TERMS = {"rkd_distance": (rkd_distance_forward, rkd_distance_backward),
             "rkd_angle": (rkd_angle_forward, rkd_angle_backward)}
