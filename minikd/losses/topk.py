"""Distillation from a top-k (sparse) teacher: the teacher known only on k classes per row.

Shapes: student logits s are (N, C) or (B, S, C), flattened to rows (N = B*S); the teacher is a
pair ``indices`` (N, k) integer class ids and ``values`` (N, k) float ((B, S, k) for sequences),
1 <= k <= C, no id twice in a row. S_i is row i's support (its k ids), T > 0 the loss temperature,
T_gen the temperature the values were captured at. labels (N,) only mark rows that count nowhere
(``ignore_index``); the hard cross-entropy term is the KD loss's business (``minikd.losses.kd``).

Student (every variant): the full-vocabulary distribution at T,
    log p = log_softmax(s / T)                      (N, C), p = exp(log p)
    P_i   = sum_{j in S_i} p_j                      the student's mass on the support
    p_t   = 1 - P_i = sum_{c not in S_i} p_c        the student's tail

Teacher on its support at T: q (N, k), Q_i = sum_j q_j, and a tail mass q_t
--------------------------------------------------------------------------
    teacher_as="logits"    values are raw (T = 1) logits at the support ids; they are divided
                           by T. The teacher's normalizer over all C classes is unknown, so q is
                           the softmax over the support:  log q = log_softmax(v / T),  Q = 1,
                           q_t = 0. T_gen does not apply (logits carry no temperature) and is
                           refused unless None.
    teacher_as="log_probs" values u are log-probabilities at T_gen (T_gen=None means T_gen = T),
                           sum_j exp(u_j) <= 1 (the rest is the teacher's tail).
      T_gen == T           used as given: log q = u, Q = sum_j exp(u_j) <= 1,
                           q_t = 1 - Q = -expm1(logsumexp_j u_j) (0 below k * eps of the dtype: the
                           rounding residue of a support holding all the mass; exactly 0 when k = C).
      T_gen != T           u = t / T_gen - lse(t / T_gen) for the teacher's logits t, so
                           log q_T = u * T_gen / T + const; the constant needs the unseen classes, so
                           the rescaled values are renormalized over the support:
                               log q = log_softmax(u * T_gen / T),   Q = 1,   q_t = 0.
                           This equals teacher_as="logits" on the same support (the teacher's tail
                           mass is only known at the temperature it was captured at). Note the
                           consequence: T_gen == T keeps the absolute mass and the tail, any other
                           T_gen does not; the "gather" and "tail" variants differ between the two.
Log-probabilities (and logits) may be -inf: probability 0 at that id (a teacher with fewer than k
finite classes, vocabulary padding); 0 * log 0 = 0. NaN, +inf and a row entirely -inf are refused.

The three variants (``variant=``), per row i, D_i then l_i = tau * D_i (tau = T**2, or 1)
-----------------------------------------------------------------------------------------
1. "gather": the student's full softmax gathered at the support, the teacher's missing mass dropped:
       D_i = sum_{j in S} q_j (log q_j - log p_j)
   Not a divergence when Q < 1 (log-probs at T_gen = T): D_i = Q (KL(q/Q || p) + log Q) >= Q log Q
   >= -1/e, and it can be negative (q_j = 0.5 on a support where p_j = 1 gives 0.5 log 0.5). With
   Q = 1 (logits, or T_gen != T) it is KL(q || p) with q supported on S, >= 0.
2. "renormalized": both sides renormalized over the support, p~ = p_S / P, q~ = q / Q:
       D_i = KL(q~ || p~) = sum_{j in S} q~_j (log q~_j - log p~_j),   log p~ = log_softmax(s_S / T)
   >= 0, zero when p~ = q~ (e.g. student = teacher). Only the support's logits enter.
3. "tail": k + 1 outcomes, the support and one tail bucket holding the rest of the mass:
       D_i = sum_{j in S} q_j (log q_j - log p_j) + q_t (log q_t - log p_t)
   >= 0 (a KL divergence between distributions over k + 1 outcomes when Q + q_t = 1), zero when the
   student has the teacher's support probabilities and tail (student = teacher, log-probs captured
   at T_gen = T). With q_t = 0 (logits, T_gen != T) it equals "gather".
With k = C every variant is the dense KL(q || p) of ``kd_loss(alpha=1)``: P = 1, p_t = q_t = 0.

Derivation of the gradient with respect to the student (full vocabulary, (N, C))
------------------------------------------------------------------------------
d log p_c / d s_k = (delta_ck - p_k) / T (softmax.py); q and q_t do not depend on s. Write q^ for
q scattered into C classes (0 off the support) and [k not in S] for the tail indicator.
1. gather:  dD/ds_k = - sum_j q_j (delta_jk - p_k) / T = (Q p_k - q^_k) / T.
   Off the support the gradient is Q p_k / T: the student is pushed off the classes the teacher
   did not list.
2. renormalized:  log p~_j = s_j / T - lse_{l in S}(s_l / T), so for j in S
   d log p~_j / d s_k = [k in S] (delta_jk - p~_k) / T, and with sum_j q~_j = 1
       dD/ds_k = - sum_j q~_j [k in S] (delta_jk - p~_k) / T = [k in S] (p~_k - q~_k) / T:
   the dense KD gradient on the support, 0 off it (the off-support logits do not enter the loss).
3. tail:  log p_t = lse_{c not in S}(s_c / T) - lse_c(s_c / T), so
       d log p_t / d s_k = ([k not in S] r_k - p_k) / T,   r_k = p_k / p_t = softmax of s / T over the
   classes off the support (the tail's own distribution). Hence
       dD/ds_k = ((Q + q_t) p_k - q^_k - q_t [k not in S] r_k) / T
   which, with Q + q_t = 1, is (p_k - q_k) / T on the support and r_k (p_t - q_t) / T off it: the
   tail bucket's gradient (p_t - q_t) / T, shared among the tail classes in the student's proportions.
Every gradient row sums to zero (adding a constant to a student row changes nothing). The reduced
loss has per-row upstream weights w_i (``conventions.row_weights``): ds_i = w_i * tau * dD_i/ds_i.

Derivation of the gradient with respect to the teacher's values v (N, k)
-----------------------------------------------------------------------
(For on-policy and mutual training, where the values come from a model being trained.) The student
does not depend on v; write g_j = log q_j - log p_j on the support (renormalized: log q~_j -
log p~_j), 0 where q_j = 0, D_S = sum_j q_j g_j, and g_t = log q_t - log p_t. Two kinds of teacher:
a. Normalized over the support, q = softmax(a v): a = 1/T (logits), T_gen/T (log-probs at
   T_gen != T); the renormalized variant's q~ = q / Q = softmax(v) is one too, with a = 1 (log-probs
   at T_gen = T). dq_j/dv_m = a q_j (delta_jm - q_m), and with dD/dq_j = g_j + 1 and sum_j q_j = 1:
       dD/dv_m = a sum_j q_j (delta_jm - q_m)(g_j + 1) = a q_m (g_m - D_S)
   (the tail variant has q_t = 0 here, so D = D_S: the same as "gather"). Rows sum to 0.
b. Log-probabilities used as given (T_gen = T; "gather" and "tail"): q = exp(v), dq_j/dv_m = delta_jm q_m,
   and the tail q_t = 1 - sum_j exp(v_j) has dq_t/dv_m = -q_m. So
       gather:  dD/dv_m = q_m (g_m + 1)
       tail:    dD/dv_m = q_m (g_m + 1) - q_m (g_t + 1) = q_m (g_m - g_t)
   (with k = C, gather's is the dense KD gradient for teacher log-probabilities, q (log q - log p + 1)).
   Where q_t is below the k * eps cut it is the constant 0 (it is rounding residue, not mass), and
   the tail's gradient is gather's; as a true tail q_t -> 0 the exact derivative grows as -log q_t.
The reduced loss: dv_i = w_i * tau * dD_i/dv_i; rows that count nowhere get 0. Where the loss is
+inf (the student has no mass where the teacher has some) there is no finite gradient (NaN or inf).
Numerics: a q (g - D_S) of a nearly one-hot teacher is, at its dominant class, a difference of
numbers near each other; that entry is recomputed as minus the sum of the others (the row sums to
0), as in ``minikd.losses.divergences``.

Numerics
--------
log p comes from the max-shifted log-softmax (softmax.py): z = (s - max s) / T, log p = z - lse(z).
The tail's log p_t is never log(1 - P) (which loses every digit as P -> 1 and gives log 0 = -inf for
a tail below 1e-16): it is the logsumexp of z off the support, with its own max shift, minus lse(z),
accurate for a tail as small as exp(-1000); r is the softmax of z off the support, from the same
shifted exponentials (so it keeps full relative precision however small p_t is). A tail with no
finite class (k = C, or every off-support student logit -inf) has p_t = 0 and r = 0; then the loss
is +inf if q_t > 0 (the true value). The teacher's tail q_t = -expm1(lse(u)) is exact to the
rounding of lse(u) (about k ulps), hence the k * eps cut. Terms with q_j = 0 (or q_t = 0) are
exactly 0; a support class where the teacher has mass and the student logit is -inf gives +inf,
the true value. Rows that count nowhere are replaced by harmless values before any
arithmetic, so padding rows may hold anything (NaN logits, ids out of range).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import check_float_array, check_logits, first_bad_row, get_namespace, row_index
from ..softmax import _log_softmax, _logsumexp, _shift_scale, check_temperature
from . import conventions
from .conventions import SIMPLEX_TOL
from .divergences import _balance, _project, _quiet

__all__ = ["TopK", "topk_forward", "topk_backward", "topk_loss", "topk_loss_and_grad", "topk_from_dense",
           "TopkCache", "VARIANTS", "TOPK_TEACHER_FORMS"]

VARIANTS = ("gather", "renormalized", "tail")
TOPK_TEACHER_FORMS = ("log_probs", "logits")


# ---------------------------------------------------------------- validation

def _check_support(indices, values, student, valid, lead):
    """indices: integer, shaped like values, lead + (k,), 1 <= k <= C, ids in [0, C), distinct per row."""
    xp = get_namespace(indices)
    C = student.shape[-1]
    if not hasattr(indices, "dtype") or indices.dtype.kind not in "iu":
        raise TypeError(f"indices: expected an integer array of class ids, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    check_float_array(values, "values", ndim_min=1)
    if values.dtype != student.dtype:
        raise TypeError(f"values: dtype {values.dtype} differs from the student's {student.dtype}; "
                        f"cast one so the reference computes in one dtype")
    if tuple(indices.shape) != tuple(values.shape):
        raise ValueError(f"indices: shape {tuple(indices.shape)} differs from the values' "
                         f"{tuple(values.shape)}; both are (N, k) (or (B, S, k))")
    if tuple(indices.shape[:-1]) != lead:
        raise ValueError(f"indices: expected shape {lead + ('k',)} (the student's leading axes, then k), "
                         f"got {tuple(indices.shape)}")
    k = indices.shape[-1]
    if k < 1:
        raise ValueError(f"indices: k must be >= 1 (no teacher class per row), got shape {tuple(indices.shape)}")
    if k > C:
        raise ValueError(f"indices: k = {k} ids per row, but the student has only C = {C} classes")
    rows = indices.reshape(-1, k)
    out = ((rows < 0) | (rows >= C)).any(axis=-1) & valid
    if bool(out.any()):
        i = first_bad_row(out)
        bad = rows[i][(rows[i] < 0) | (rows[i] >= C)]
        raise ValueError(f"indices: row {row_index(i, lead)} has class id {int(bad[0])}, expected 0..{C - 1}")
    if k > 1:
        srt = xp.sort(rows, axis=-1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=-1) & valid
        if bool(dup.any()):
            i = first_bad_row(dup)
            same = srt[i][1:][srt[i][1:] == srt[i][:-1]]
            raise ValueError(f"indices: row {row_index(i, lead)} lists class {int(same[0])} twice; "
                             f"the k ids of a row must be distinct")


def _check_options(T, T_gen, teacher_as, variant, reduction):
    T = check_temperature(T)
    if teacher_as not in TOPK_TEACHER_FORMS:
        raise ValueError(f"teacher_as: expected one of {TOPK_TEACHER_FORMS} (top-k probabilities are "
                         f"passed as log-probabilities), got {teacher_as!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if T_gen is not None:
        if teacher_as == "logits":
            raise ValueError("T_gen: applies to teacher_as='log_probs' only; logits are raw (T = 1) values, "
                             "divided by T at loss time; pass T_gen=None")
        try:
            T_gen = check_temperature(T_gen)
        except (TypeError, ValueError) as e:
            raise type(e)(f"T_gen: the temperature the log-probabilities were captured at must be a finite "
                          f"number > 0, got {T_gen!r}") from None
    conventions.check_reduction(reduction, conventions.KD_REDUCTIONS, "the top-k KD loss")
    return T, T_gen


# ---------------------------------------------------------------- the teacher at T

def _teacher(v, teacher_as, T, T_gen, k, C, valid, lead):
    """(q, log q) on the support (N, k), and the tail mass q_t (N,) (module doc)."""
    xp = get_namespace(v)
    check_logits(v.reshape(lead + (k,)), "values", valid)
    zero_tail = xp.zeros(v.shape[0], dtype=v.dtype)
    if teacher_as == "logits":
        log_q = _log_softmax(v, T)
        return xp.exp(log_q), log_q, zero_tail
    lse = _logsumexp(v)
    bad = (lse > SIMPLEX_TOL) & valid
    if bool(bad.any()):
        i = first_bad_row(bad)
        raise ValueError(f"values: row {row_index(i, lead)} has logsumexp {float(lse[i]):.6g} > 0: its "
                         f"probabilities sum to more than 1 (teacher_as='log_probs'; pass logits with "
                         f"teacher_as='logits')")
    if k == C:
        bad = (xp.abs(lse) > SIMPLEX_TOL) & valid
        if bool(bad.any()):
            i = first_bad_row(bad)
            raise ValueError(f"values: row {row_index(i, lead)} covers all C = {C} classes but has logsumexp "
                             f"{float(lse[i]):.6g}, expected 0 for log-probabilities")
    if T_gen is not None and T_gen != T:     # rescale to T, renormalize over the support
        log_q = _log_softmax(v, T / T_gen)   # log_softmax(u * T_gen / T)
        return xp.exp(log_q), log_q, zero_tail
    q_t = -xp.expm1(xp.minimum(lse, 0))
    residue = k * float(xp.finfo(v.dtype).eps)
    q_t = xp.where((q_t > residue) & (k < C), q_t, 0).astype(v.dtype, copy=False)
    return xp.exp(v), v, q_t


# ---------------------------------------------------------------- forward / backward

class TopK(NamedTuple):
    """A top-k teacher as ``kd_forward``'s teacher argument (the soft term is then this module's
    loss of ``variant``, the hard term KD's cross-entropy): ``indices`` (N, k), ``values`` (N, k)
    as ``values_as`` ("log_probs" at ``T_gen``, or "logits")."""
    indices: object
    values: object
    values_as: str = "log_probs"
    T_gen: object = None
    variant: str = "gather"


class TopkCache(NamedTuple):
    variant: str
    indices: object        # (N, k) support ids (rows that count nowhere: 0..k-1)
    prob: object           # gather/tail: (N, C) p = softmax(s / T); renormalized: (N, k) p~
    q: object              # (N, k) teacher probabilities on the support (renormalized: q~)
    q_tail: object         # (N,) teacher tail mass q_t (0 unless log-probs at T_gen = T)
    tail_share: object     # tail: (N, C) r = softmax of s / T over the classes off the support; else None
    log_ratio: object      # (N, k) g = log q - log p on the support (renormalized: log q~ - log p~); 0 where q = 0
    tail_log_ratio: object  # (N,) g_t = log q_t - log p_t where q_t > 0, else 0
    teacher_scale: object  # a where the teacher is softmax(a v) over the support; None where q = exp(v)
    values_shape: tuple    # the values' shape (the teacher gradient's)
    valid: object          # (N,) bool: the row counts
    T: float
    tau: float             # T**2 or 1
    reduction: str
    shape: tuple           # the student's shape


def topk_forward(student, indices, values, labels=None, *, T, T_gen=None, teacher_as="log_probs",
                 variant="gather", scale_t2=True, reduction="batchmean", ignore_index=-100, mask=None):
    """Top-k (sparse) teacher distillation loss (see module doc). Returns (loss, cache).

    Parameters
    ----------
    student : (N, C) or (B, S, C) float array of student logits (the full vocabulary).
    indices : integer (N, k) or (B, S, k): the teacher's class ids per row, distinct, in [0, C).
    values : float (N, k) or (B, S, k), the student's dtype: the teacher's log-probabilities at T_gen
        (``teacher_as="log_probs"``) or raw logits (``"logits"``) at those ids; -inf allowed.
    labels : integer (N,) or (B, S), optional: rows labeled ``ignore_index`` count nowhere (no hard term here).
    T : loss temperature > 0.
    T_gen : the log-probabilities' temperature (None: T).
    teacher_as : "log_probs" or "logits": what ``values`` hold.
    variant : "gather", "renormalized" or "tail".
    scale_t2 : multiply by T**2.
    reduction : "batchmean", "sum" or "none".
    ignore_index : the label of a row that counts nowhere.
    mask : rows that count nowhere where False.
    """
    T, T_gen = _check_options(T, T_gen, teacher_as, variant, reduction)
    check_float_array(student, "student", ndim_min=2)
    xp = get_namespace(student, indices, values, labels, mask)
    C = student.shape[-1]
    lead = tuple(student.shape[:-1])
    roles = conventions.row_roles(lead, C, labels, mask, ignore_index, "ignore", xp)
    valid = roles.valid
    _check_support(indices, values, student, valid, lead)
    check_logits(student, "student", valid)
    k = indices.shape[-1]

    # Rows outside V count nowhere: harmless stand-ins before any arithmetic.
    keep = valid[:, None]
    s = xp.where(keep, student.reshape(-1, C), 0)
    idx = xp.where(keep, indices.reshape(-1, k).astype(xp.int64), xp.arange(k, dtype=xp.int64)[None, :])
    v = xp.where(keep, values.reshape(-1, k),
                 0 if teacher_as == "logits" else -xp.log(xp.asarray(k, dtype=values.dtype)))
    q, log_q, q_t = _teacher(v, teacher_as, T, T_gen, k, C, valid, lead)
    has_mass = q > 0
    log_q0 = xp.where(has_mass, log_q, 0)
    tau = conventions.soft_scale(T, scale_t2)

    tail_share = None
    tail_ratio = xp.zeros(v.shape[0], dtype=v.dtype)
    # the teacher as a function of v (module doc, teacher gradient): softmax(a v) over the support, or exp(v)
    a = 1.0 / T if teacher_as == "logits" else (T_gen / T if T_gen is not None and T_gen != T else None)
    if variant == "renormalized":
        s_S = xp.take_along_axis(s, idx, axis=-1)
        bad = xp.isneginf(s_S).all(axis=-1) & valid
        if bool(bad.any()):
            raise ValueError(f"student: row {row_index(first_bad_row(bad), lead)} is -inf at every id of the "
                             f"teacher's support; the renormalized student p / P is undefined (0 / 0)")
        log_pr = _log_softmax(s_S, T)
        q = q / xp.sum(q, axis=-1, keepdims=True)        # q~; Q = 1 already except log-probs at T_gen = T
        log_q0 = xp.where(has_mass, _log_softmax(log_q, 1.0), 0)
        ratio = log_q0 - xp.where(has_mass, log_pr, 0)
        d_rows = xp.sum(q * ratio, axis=-1)
        prob = xp.exp(log_pr)
        a = 1.0 if a is None else a                      # q~ = softmax(v) for log-probs at T_gen = T
    else:
        z = _shift_scale(s, T)                               # (s - max s) / T <= 0
        lse_z = xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))
        log_p = z - lse_z                                    # = _log_softmax(s, T)
        log_p_S = xp.where(has_mass, xp.take_along_axis(log_p, idx, axis=-1), 0)
        ratio = log_q0 - log_p_S
        d_rows = xp.sum(q * ratio, axis=-1)
        prob = xp.exp(log_p)
        if variant == "tail":
            # log p_t = lse_{c not in S} z_c - lse_c z_c with its own max shift, and r = the softmax of z off
            # the support from the same shifted exponentials (not from log p, whose size R/T would cost
            # relative precision); an empty tail (no finite class off S) gives p_t = 0, r = 0
            on_support = xp.zeros(s.shape, dtype=bool)
            xp.put_along_axis(on_support, idx, True, axis=-1)
            z_off = xp.where(on_support, -xp.inf, z)
            m_off = xp.max(z_off, axis=-1, keepdims=True)
            empty = xp.isneginf(m_off)
            e_off = xp.exp(z_off - xp.where(empty, 0, m_off))
            sum_off = xp.where(empty, 1, xp.sum(e_off, axis=-1, keepdims=True))
            tail_share = e_off / sum_off                                                    # r
            log_pt = xp.where(empty, -xp.inf, m_off + xp.log(sum_off) - lse_z)[:, 0]
            has_tail = q_t > 0                               # 0 * log 0 = 0; q_t > 0 = p_t gives +inf
            tail_ratio = xp.log(xp.where(has_tail, q_t, 1)) - xp.where(has_tail, log_pt, 0)
            d_rows = d_rows + q_t * tail_ratio
    rows = xp.where(valid, tau * d_rows, 0)
    loss = conventions.reduce_rows(rows, valid, reduction, lead)
    cache = TopkCache(variant=variant, indices=idx, prob=prob, q=q, q_tail=q_t, tail_share=tail_share,
                      log_ratio=xp.where(has_mass, ratio, 0), tail_log_ratio=tail_ratio, teacher_scale=a,
                      values_shape=tuple(values.shape), valid=valid, T=T, tau=tau, reduction=reduction,
                      shape=tuple(student.shape))
    return loss, cache


def topk_backward(dloss, cache: TopkCache, teacher_grad: bool = False):
    """Gradient of the top-k loss with respect to the student logits, the student's shape, or
    (d_student, d_values) when ``teacher_grad``: d_values shaped like the values, with respect to
    them as given (logits, or log-probabilities) (module doc).

    ``dloss`` is a scalar for "batchmean"/"sum" and an array shaped like the loss for "none"."""
    c = cache
    xp = get_namespace(c.prob)
    dtype = c.prob.dtype
    w_rows = conventions.row_weights(dloss, c.valid, c.reduction, dtype)[:, None]
    ds = (_student_grad(xp, c, dtype) * (w_rows * (c.tau / c.T))).reshape(c.shape)
    if not teacher_grad:
        return ds
    dv = xp.where(c.valid[:, None], _values_grad(xp, c) * (w_rows * c.tau), 0)
    return ds, dv.reshape(c.values_shape)


def _values_grad(xp, c):
    """dD/dv per row, (N, k) (module doc, the teacher's gradient)."""
    g = c.log_ratio
    if c.teacher_scale is not None:           # q = softmax(a v) over the support
        return c.teacher_scale * _balance(xp, _project(xp, c.q, g), c.q)
    g_t = xp.where(c.q_tail > 0, c.tail_log_ratio, -1.0)[:, None] if c.variant == "tail" else -1.0
    with _quiet(xp):                          # q_t > 0 = p_t: +inf loss, no finite gradient
        return xp.where(c.q > 0, c.q * (g - g_t), 0)


def _student_grad(xp, c, dtype):
    """dD/ds per row times T, (N, C) (module doc, the student's gradient)."""
    N = c.valid.shape[0]
    C = c.shape[-1]
    if c.variant == "renormalized":
        ds = xp.zeros((N, C), dtype=dtype)
        xp.put_along_axis(ds, c.indices, c.prob - c.q, axis=-1)
        return ds
    Q = xp.sum(c.q, axis=-1, keepdims=True)
    q_hat = xp.zeros((N, C), dtype=dtype)
    xp.put_along_axis(q_hat, c.indices, c.q, axis=-1)
    if c.variant == "gather":
        return Q * c.prob - q_hat
    qt = c.q_tail[:, None]
    return (Q + qt) * c.prob - q_hat - qt * c.tail_share


def topk_loss(student, indices, values, labels=None, **kwargs):
    """The top-k loss alone; same arguments as ``topk_forward``."""
    return topk_forward(student, indices, values, labels, **kwargs)[0]


def topk_loss_and_grad(student, indices, values, labels=None, *, teacher_grad=False, **kwargs):
    """(loss, d loss / d student), or (loss, (d student, d values)) when ``teacher_grad``; for
    reduction="none" the gradient of the summed loss."""
    loss, cache = topk_forward(student, indices, values, labels, **kwargs)
    xp = get_namespace(student)
    dloss = xp.ones(cache.shape[:-1], dtype=student.dtype) if cache.reduction == "none" else 1.0
    return loss, topk_backward(dloss, cache, teacher_grad)


def topk_from_dense(teacher_logits, k, T_gen=1.0):
    """A top-k teacher from dense logits: (indices, values), the k most probable classes of each row
    (most probable first; ties by lower id) and their log-probabilities at T_gen, log_softmax(t / T_gen),
    over all C classes (so exp(values) sums to <= 1: the rest is the tail). Shapes (N, k) or (B, S, k).
    A row with fewer than k finite logits gets -inf values (probability 0) at its last ids."""
    check_logits(teacher_logits, "teacher_logits")
    T_gen = check_temperature(T_gen)
    C = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) and not (hasattr(k, "dtype") and k.dtype.kind in "iu"):
        raise TypeError(f"k: expected an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= C:
        raise ValueError(f"k: expected 1 <= k <= C = {C}, got {k}")
    xp = get_namespace(teacher_logits)
    log_q = _log_softmax(teacher_logits, T_gen)
    idx = xp.argsort(-log_q, axis=-1, kind="stable")[..., :k].astype(xp.int64, copy=False)
    return idx, xp.take_along_axis(log_q, idx, axis=-1)
