"""Decoupled knowledge distillation, DKD (Zhao, Cui, Song, Qiu, Liang, CVPR 2022).

Shapes: student s and teacher t are logits (N, C) or (B, S, C), flattened to rows (N = B*S); labels
y are integer (N,) or (B, S) and required (DKD splits each row at its target class); T > 0 the
temperature; alpha_tckd, beta_nckd >= 0 the weights of the two terms.

Math (one row i with label y; DESIGN.md "Conventions")
-------------------------------------------------------
    z = s / T,  w = t / T                       scaled logits
    p = softmax(z),  q = softmax(w)             student and teacher at temperature T
    b_p = (p_y, 1 - p_y),  b_q = (q_y, 1 - q_y) the binary target / non-target distributions
    p^_c = exp(z_c) / sum_{k != y} exp(z_k)     c != y: the non-target distributions, the target
    q^_c = exp(w_c) / sum_{k != y} exp(w_k)     class excluded (p^_y = q^_y = 0 by definition)
    TCKD = KL(b_q || b_p) = q_y log(q_y / p_y) + (1 - q_y) log((1 - q_y) / (1 - p_y))
    NCKD = KL(q^ || p^)   = sum_{c != y} q^_c log(q^_c / p^_c)
    l_i  = tau * (alpha_tckd * TCKD + beta_nckd * NCKD),    tau = T**2 (scale_t2=False: 1)

Since p_c = (1 - p_y) p^_c for c != y, classical KD splits as KL(q || p) = TCKD + (1 - q_y) NCKD
(the paper's Eq. 4); DKD drops the teacher-confidence factor (1 - q_y) that suppresses NCKD on
well-predicted rows, and weights the two terms freely (the paper: alpha = 1, beta = 8 on CIFAR-100).

Rows: a row whose label is ``ignore_index``, or where ``mask`` is False, counts nowhere (there is no
target to decouple: the conventions module's ``unlabeled="ignore"``). Reductions are KD's:
"batchmean" (sum over the rows that count / their number), "sum", "none" ("mean" refused).

Derivation of the gradient with respect to the student (z = s / T, so d/ds = (1/T) d/dz)
--------------------------------------------------------------------------------------
Write A = lse(z) and A^ = lse_{c != y}(z) (log-sum-exp over the non-target classes). Then
log p_y = z_y - A, log(1 - p_y) = A^ - A, log p^_c = z_c - A^, and dA/dz_k = p_k, dA^/dz_k = p^_k
(0 for k = y), so
    d log p_y / dz_k       = delta_ky - p_k
    d log(1 - p_y) / dz_k  = p^_k - p_k
    d log p^_c / dz_k      = delta_ck - p^_k                     (c, k != y; 0 for k = y)
TCKD: with q_y + (1 - q_y) = 1,
    d TCKD / dz_k = -q_y (delta_ky - p_k) - (1 - q_y)(p^_k - p_k) = p_k - q_y delta_ky - (1 - q_y) p^_k
and p_k = (1 - p_y) p^_k + p_y delta_ky turns this into
    d TCKD / dz = (p_y - q_y) (e_y - p^)            (e_y the one-hot row of the label)
NCKD: d NCKD / dz_k = -sum_{c != y} q^_c (delta_ck - p^_k) = r_q p^_k - q^_k, where r_q = sum q^ is 1
when the teacher has non-target mass and 0 when it has none (then NCKD = 0 for every student), so
    d NCKD / dz = r_q p^ - q^                      (0 at the target class)
    d l_i / ds  = tau / T * (alpha_tckd (p_y - q_y)(e_y - p^) + beta_nckd (r_q p^ - q^))
Each row of the gradient sums to 0 (e_y - p^ and p^ - q^ both do), as it must: the loss is
invariant to adding a constant to a row of s.

Derivation of the gradient with respect to the teacher (w = t / T)
-----------------------------------------------------------------
b_q is the softmax of the two logits (w_y, B^), B^ = lse_{c != y}(w), with dB^/dw_k = q^_k. For a
function F(b_q) with partials G_j the softmax VJP gives dF/dw_y-part = b0 (G0 - Gbar), dF/dB^ =
b1 (G1 - Gbar) with b0 = q_y, b1 = 1 - q_y, Gbar = b0 G0 + b1 G1, so b0 (G0 - Gbar) = b0 b1 (G0 - G1)
= -b1 (G1 - Gbar). TCKD has G_j = log b_q,j - log b_p,j + 1 (the +1 cancels), so with
g0 = log q_y - log p_y and g1 = log(1 - q_y) - log(1 - p_y):
    d TCKD / dw = q_y (1 - q_y) (g0 - g1) (e_y - q^)
NCKD is KD's KL over the non-target classes, a function of q^ = softmax over c != y of w, so with
h_c = log q^_c - log p^_c (the +1 cancels again):
    d NCKD / dw_k = q^_k (h_k - sum_c q^_c h_c)     (0 at the target class)
    d l_i / dt    = tau / T * (alpha_tckd q_y (1 - q_y)(g0 - g1)(e_y - q^) + beta_nckd q^ (h - q^.h))

Numerics
--------
Every log-probability comes from max-shifted logits, never from log(p). The binary distribution is
the logistic sigmoid of the margin m = z_y - A^ (the target's scaled logit against the log-sum-exp of
the others): A = logaddexp(z_y, A^), so
    log p_y = -softplus(-m),   log(1 - p_y) = A^ - A = -softplus(m),   softplus(x) = max(x, 0) + log1p(exp(-|x|))
which is log(1 - p_y) as the log of the sum of the non-target exponentials minus the full
log-sum-exp, evaluated so that both logs keep their relative precision at any margin: with a target
far above the rest, 1 - p_y may be 1e-400 and its log, -921, is still exact, where log(1 - p_y) or
log(sum of the p_c) would be log 0; and log p_y = -2e-22 is not rounded to 0 (as z_y - A would be),
so TCKD of a confident row keeps its relative precision. A^ is the log-sum-exp of the non-target
logits shifted by their own maximum (the target set to -inf: excluded exactly), and the non-target
log-probabilities are those shifted logits minus it, accurate however far the target stands above
them. The probabilities p_y and 1 - p_y (q_y, 1 - q_y) are the exponentials of those logs, never 1
minus the other; p_y - q_y is formed as (1 - q_y) - (1 - p_y) when p_y + q_y > 1, so it keeps its
relative precision when both are close to 1.

Edge cases, each the true value or the convention of KD:
- -inf classes (padding) have probability 0 and 0 * log 0 = 0: terms with q_y = 0, 1 - q_y = 0 or
  q^_c = 0 contribute exactly 0 (their logs are replaced by 0 before the product).
- C = 2: the non-target distribution has one class, p^ = q^ = (1), NCKD = 0 and DKD is TCKD alone.
  C = 1 (or a row whose non-target classes are all -inf in both): 1 - p_y = 1 - q_y = 0, the loss
  and the gradient are 0.
- The teacher has no non-target mass (every c != y at -inf) while the student has: q_y = 1, NCKD = 0
  (no class carries teacher mass) and its gradient is 0 (r_q = 0 above).
- A label whose class is -inf in the student while the teacher gives it mass: p_y = 0 and
  TCKD = +inf, the true value (returned, not refused, like KD's teacher mass on a student -inf
  class); likewise NCKD = +inf where the teacher has non-target mass on a class the student puts
  at -inf. The student gradient returned for such a row is the formula above evaluated at p_y = 0
  (finite); the teacher gradient of an infinite row is not finite. Do not train on either.
- Rows outside V are replaced by harmless rows before any arithmetic, so they may hold anything.

Differences from mdistiller (megvii-research/mdistiller, mdistiller/distillers/DKD.py, the
authors' code), which writes the same two terms as follows:
- Target exclusion: it builds a "gt mask" (one-hot of the label) and an "other mask" (its
  complement) and forms NCKD's softmaxes of z - 1000 * gt_mask and w - 1000 * gt_mask: the target
  is pushed down by 1000 in *scaled* units rather than removed. Its leftover weight in p^ is
  exp(z_y - 1000 - A^), below float64 rounding (2^-53, a gap of 37) while the scaled gap
  z_y - max_{c != y} z_c = (s_y - max_{c != y} s_c) / T stays under about 960; as it nears 1000 the
  target leaks into the "non-target" distribution, and above 1000 it dominates it (NCKD becomes a
  KL between mostly-target distributions). In logit units the gap is about 1000 T: logit gaps of
  4000 at T = 4, but only 100 at T = 0.1. Here the target is excluded exactly at any gap.
- TCKD: it sums the softmax probabilities over the two masks ("cat_mask") and takes torch.log of
  the sums, so log(1 - p_y) is log 0 = -inf once every non-target probability underflows (scaled
  gap above ~745 in float64, ~104 in float32), giving inf or NaN; here it is computed in log space.
- -inf classes: F.kl_div's target * input is 0 * (-inf) = NaN at a padded class (both softmaxes 0,
  the student's log -inf), so a padded vocabulary makes its loss NaN; here such classes count 0.
- Reduction: it sums over the batch and divides by the batch size (target.shape[0]): every row
  counts, there is no ignore_index or mask. Here "batchmean" divides by the rows that count (the
  same when all do), and "sum" / "none" exist.
- Its DKD term is always multiplied by T**2 (here ``scale_t2``); its cross-entropy term
  (CE_WEIGHT * F.cross_entropy) and its warmup factor min(epoch / WARMUP, 1) are applied outside
  the loss, in the distiller: here too they are the caller's (``cross_entropy_and_grad`` for the
  hard term; scale the loss and dloss by the warmup factor).
- Its teacher runs under torch.no_grad; the teacher gradient here is for mutual/online settings
  and for checking. Autograd through its formulation would give NaN there: the masked target's
  teacher probability exp(w_y - 1000 - ...) is exactly 0 and F.kl_div's d(q log q)/dq = log q + 1
  is -inf at it (giving the teacher as log-probabilities, log_target=True, avoids it). Its alpha and beta are ``alpha_tckd`` and ``beta_nckd`` (defaults 1 and 8, its
  CIFAR-100 setting; its T there is 4).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import checks
from ..backend import check_logits, get_namespace
from ..softmax import _logsumexp, _shift_scale
from . import conventions
from .kd import check_kd_arguments

__all__ = ["dkd_forward", "dkd_backward", "dkd_loss", "dkd_loss_and_grad", "check_dkd_arguments", "DKDCache"]


def check_dkd_arguments(student, teacher, labels, *, T, alpha_tckd, beta_nckd, reduction, ignore_index, mask):
    """Validate every DKD argument once: KD's checks (shapes, dtypes, T, reduction, labels, mask,
    student values) plus the teacher's values, the labels' presence and the two weights.
    Returns (xp, T, alpha_tckd, beta_nckd, the rows' roles: ``conventions.RowRoles``)."""
    if labels is None:
        raise ValueError("labels: required by DKD (each row is split at its target class); rows without "
                         "one carry ignore_index and count nowhere")
    alpha_tckd = checks.number("alpha_tckd", alpha_tckd, minimum=0.0)
    beta_nckd = checks.number("beta_nckd", beta_nckd, minimum=0.0)
    xp, T, _, roles, *_ = check_kd_arguments(
        student, teacher, labels, T=T, alpha=1.0, kind="kl", teacher_as="logits", reduction=reduction,
        ignore_index=ignore_index, mask=mask, unlabeled="ignore")
    check_logits(teacher, "teacher", roles.valid)
    return xp, T, alpha_tckd, beta_nckd, roles


def _softplus(x):
    """log(1 + exp(x)) without overflow or cancellation: max(x, 0) + log1p(exp(-|x|)); +-inf allowed."""
    xp = get_namespace(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def _decouple(x, onehot, labels, T: float):
    """The binary and non-target halves of one side, in log space, for rows x (N, C):
    (log p_y, log(1 - p_y), log p^ (N, C) with -inf at the target, has_rest (N,) bool)."""
    xp = get_namespace(x)
    # rows with no finite non-target class (C = 1, or all padding) have 1 - p_y = 0 and no p^;
    # they are computed on a stand-in row and set afterwards (a max of -inf would give NaN)
    has_rest = xp.any(~onehot & (x > -xp.inf), axis=-1)
    rest = has_rest[:, None]
    x_rest = xp.where(rest, xp.where(onehot, -xp.inf, x), 0)
    m_rest = xp.max(x_rest, axis=-1)
    z_rest = _shift_scale(x_rest, T)                       # (x_c - max_{k != y} x_k) / T
    lse_rest = _logsumexp(z_rest)                          # in [0, log(C - 1)]
    log_hat = xp.where(rest & ~onehot, z_rest - lse_rest[:, None], -xp.inf)
    # the margin m = z_y - A^; b_p = (sigmoid(m), sigmoid(-m)); +inf without a non-target class
    x_y = xp.take_along_axis(x, labels[:, None], axis=-1)[:, 0]
    margin = xp.where(has_rest, (x_y - m_rest) / x.dtype.type(T) - lse_rest, xp.inf)
    return -_softplus(-margin), -_softplus(margin), log_hat, has_rest


class DKDCache(NamedTuple):
    py: object             # (N,) p_y
    qy: object             # (N,) q_y
    dpq: object            # (N,) p_y - q_y (formed for precision near 1)
    q_bin: object          # (N,) q_y (1 - q_y)
    g: object              # (N,) g0 - g1 (0 where q_y or 1 - q_y is 0)
    p_hat: object          # (N, C) p^, 0 at the target
    q_hat: object          # (N, C) q^, 0 at the target
    h: object              # (N, C) log q^ - log p^, 0 where q^ == 0
    r_q: object            # (N,) 1 where the teacher has non-target mass, else 0
    onehot: object         # (N, C) bool, e_y (False on rows outside V)
    valid: object          # (N,) bool: the row counts
    T: float
    tau: float
    alpha_tckd: float
    beta_nckd: float
    reduction: str
    shape: tuple           # the logits' shape


def dkd_forward(student, teacher, labels, *, T, alpha_tckd=1.0, beta_nckd=8.0, scale_t2=True,
                reduction="batchmean", ignore_index=-100, mask=None):
    """DKD loss (see module doc). Returns (loss, cache).

    Parameters
    ----------
    student, teacher : (N, C) or (B, S, C) float logits of one dtype.
    labels : integer (N,) or (B, S): the target class of each row; ``ignore_index`` rows count nowhere.
    T : temperature > 0.
    alpha_tckd, beta_nckd : weights >= 0 of TCKD and NCKD.
    scale_t2 : multiply the loss by T**2.
    reduction : "batchmean", "sum" or "none".
    ignore_index : the label of a row that counts nowhere.
    mask : boolean, shaped like the labels; rows where False count nowhere.
    """
    xp, T, alpha_tckd, beta_nckd, roles = check_dkd_arguments(
        student, teacher, labels, T=T, alpha_tckd=alpha_tckd, beta_nckd=beta_nckd, reduction=reduction,
        ignore_index=ignore_index, mask=mask)
    valid = roles.valid
    C = student.shape[-1]
    lead = tuple(student.shape[:-1])
    keep = valid[:, None]
    # rows outside V count nowhere: a harmless zero row labeled 0 before any arithmetic
    s = xp.where(keep, student.reshape(-1, C), 0)
    t = xp.where(keep, teacher.reshape(-1, C), 0)
    labels_safe = xp.where(valid, roles.labels, 0)
    onehot = xp.arange(C)[None, :] == labels_safe[:, None]

    lp0, lp1, log_ph, _ = _decouple(s, onehot, labels_safe, T)
    lq0, lq1, log_qh, t_rest = _decouple(t, onehot, labels_safe, T)
    py, omp, qy, omq = xp.exp(lp0), xp.exp(lp1), xp.exp(lq0), xp.exp(lq1)
    p_hat, q_hat = xp.exp(log_ph), xp.exp(log_qh)
    # 0 * log 0 = 0: a log ratio is replaced by 0 where the teacher's probability is 0
    on0, on1, has_mass = qy > 0, omq > 0, q_hat > 0
    g0 = xp.where(on0, lq0, 0) - xp.where(on0, lp0, 0)
    g1 = xp.where(on1, lq1, 0) - xp.where(on1, lp1, 0)
    h = xp.where(has_mass, log_qh, 0) - xp.where(has_mass, log_ph, 0)

    tau = conventions.soft_scale(T, scale_t2)
    rows = xp.zeros(s.shape[0], dtype=s.dtype)
    if alpha_tckd > 0.0:
        rows = rows + (alpha_tckd * tau) * (qy * g0 + omq * g1)
    if beta_nckd > 0.0:
        rows = rows + (beta_nckd * tau) * xp.sum(q_hat * h, axis=-1)
    rows = xp.where(valid, rows, 0)
    loss = conventions.reduce_rows(rows, valid, reduction, lead)

    dpq = xp.where(py + qy > 1, omq - omp, py - qy)
    cache = DKDCache(py=py, qy=qy, dpq=dpq, q_bin=qy * omq, g=g0 - g1, p_hat=p_hat, q_hat=q_hat, h=h,
                     r_q=t_rest.astype(s.dtype), onehot=onehot & keep, valid=valid, T=T, tau=tau,
                     alpha_tckd=alpha_tckd, beta_nckd=beta_nckd, reduction=reduction, shape=tuple(student.shape))
    return loss, cache


def dkd_backward(dloss, cache: DKDCache, teacher_grad: bool = False):
    """Gradient of the DKD loss: d_student, or (d_student, d_teacher) when ``teacher_grad``.

    ``dloss`` is a scalar for "batchmean"/"sum" and an array shaped like the loss for "none".
    """
    c = cache
    xp = get_namespace(c.p_hat)
    w = conventions.row_weights(dloss, c.valid, c.reduction, c.p_hat.dtype)[:, None] * (c.tau / c.T)
    e_y = c.onehot.astype(c.p_hat.dtype)
    ds = xp.zeros_like(c.p_hat)
    if c.alpha_tckd > 0.0:
        ds = ds + c.alpha_tckd * c.dpq[:, None] * (e_y - c.p_hat)
    if c.beta_nckd > 0.0:
        ds = ds + c.beta_nckd * (c.r_q[:, None] * c.p_hat - c.q_hat)
    ds = (w * ds).reshape(c.shape)
    if not teacher_grad:
        return ds
    dt = xp.zeros_like(c.q_hat)
    if c.alpha_tckd > 0.0:
        dt = dt + c.alpha_tckd * (c.q_bin * c.g)[:, None] * (e_y - c.q_hat)
    if c.beta_nckd > 0.0:
        dt = dt + c.beta_nckd * c.q_hat * (c.h - xp.sum(c.q_hat * c.h, axis=-1, keepdims=True))
    dt = (w * dt).reshape(c.shape)
    return ds, dt


def dkd_loss(student, teacher, labels, **kwargs):
    """The DKD loss alone; same arguments as ``dkd_forward``."""
    return dkd_forward(student, teacher, labels, **kwargs)[0]


def dkd_loss_and_grad(student, teacher, labels, **kwargs):
    """(loss, d loss / d student); for reduction="none" the gradient of the summed loss."""
    loss, cache = dkd_forward(student, teacher, labels, **kwargs)
    xp = get_namespace(student)
    dloss = xp.ones(cache.shape[:-1], dtype=student.dtype) if cache.reduction == "none" else 1.0
    return loss, dkd_backward(dloss, cache)
