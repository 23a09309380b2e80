"""Hinton knowledge-distillation loss: soft (temperature) term plus hard cross-entropy.

Shapes: student s and teacher t are (N, C) or (B, S, C), flattened to rows (N = B*S); labels y
are integer (N,) or (B, S); T > 0 the temperature; alpha in [0, 1].

Math (one row i; DESIGN.md "Conventions")
----------------------------------------
    p  = softmax(s / T)         student at temperature T
    q  = softmax(t / T)         teacher at temperature T (or given as probs / log-probs at T)
    p1 = softmax(s)             student at T = 1, for the hard term
    KD_i = KL(q || p) = sum_c q_c (log q_c - log p_c)        kind="kl" (0 when s = t)
    KD_i = H(q, p)    = - sum_c q_c log p_c                  kind="ce" (Hinton's formula)
    CE_i = - log p1_{y_i}
    l_i  = alpha * tau * KD_i + (1 - alpha) * h_i * CE_i,    tau = T**2 (scale_t2=False: tau = 1)

h_i is 1 on rows with a label and 0 on unlabeled rows that count (``unlabeled="soft"``: the
transfer set gets the distillation term alone). alpha weights the *distillation* term, as in the
seed paper. Frameworks that write ``alpha * CE + (1 - alpha) * KD`` use alpha' = 1 - alpha. The two
kinds differ by the teacher's entropy H(q), which does not depend on s, so they have the same
student gradient.

Which rows count (V), which get the hard term, the weights alpha * tau and 1 - alpha, and the
reductions ("batchmean": sum over V / |V|, "sum", "none"; "mean" refused: over N*C elements it is
KL / C) are the conventions module's (``minikd.losses.conventions``), written once for every loss
and every backend.

Derivation of the gradient with respect to the student. d log p_c / d s_k = (delta_ck - p_k)/T
(softmax.py), and sum_c q_c = 1, so
    d KD_i / d s_k = - sum_c q_c (delta_ck - p_k) / T = (p_k - q_k) / T      (both kinds)
    d CE_i / d s_k = p1_k - onehot(y_i)_k
    d l_i / d s    = alpha * tau / T * (p - q) + (1 - alpha) * h_i * (p1 - onehot(y_i))
With T**2 scaling the soft gradient is T * (p - q), which keeps its size comparable to the
hard gradient as T grows (Hinton et al. 2015, section 2); as T -> infinity,
T * (p - q) -> ((s - mean s) - (t - mean t)) / C, the logit-matching limit.

Gradient with respect to teacher logits (used by mutual learning): with q = softmax(t / T),
d q_c / d t_k = q_c (delta_ck - q_k) / T, and for a function F(q) with partials g_c,
dF/dt_k = q_k (g_k - sum_c q_c g_c) / T. For kind="kl", g_c = log q_c - log p_c + 1 (the +1
cancels); for kind="ce", g_c = -log p_c. For teacher log-probabilities u = log q the partial is
q_c * g_c directly.

Numerics
--------
Log-probabilities come from the max-shifted log-softmax (softmax.py), never from log(p + eps).
Classes with q_c = 0 contribute exactly 0 (0 * log 0 = 0): their log q and log p are replaced by
0 before the product, so no NaN arises from 0 * (-inf). A class where the teacher has mass but
the student logit is -inf gives KD = +inf, which is the true value. Rows outside V are zeroed
before any arithmetic, so padding rows may hold anything (even NaN) without effect.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import check_float_array, check_logits, first_bad_row, get_namespace, row_index
from ..checks import UserError
from ..softmax import _log_softmax, _log_softmax_precise, check_temperature
from . import conventions, divergences, dkd, topk
from .conventions import SIMPLEX_TOL

__all__ = ["check_kd_arguments", "KDArguments", "kd_forward", "kd_backward", "kd_loss", "kd_loss_and_grad", "cross_entropy_and_grad",
           "KDCache", "KINDS", "TEACHER_FORMS", "Tempered", "tempered", "soft_term_rows"]

# "kl", "ce", "reverse_kl", "jsd" (with beta), "tvd": minikd.losses.divergences; "dkd" (with
# dkd_weights): minikd.losses.dkd, which splits each row at its label
KINDS = (*divergences.KINDS, "dkd")
DKD_WEIGHTS = (1.0, 8.0)   # (alpha_tckd, beta_nckd): the DKD paper's CIFAR-100 setting
TEACHER_FORMS = ("logits", "probs", "log_probs")


# ---------------------------------------------------------------- validation of the teacher

def _teacher_log_probs(teacher, teacher_as: str, T: float, valid, precise: bool = False):
    """(q, log q) per row from teacher logits / probs / log-probs, rows outside V set to 0 / log;
    log q is -inf where q = 0. ``precise``: logits through ``_log_softmax_precise``."""
    xp = get_namespace(teacher)
    if teacher_as == "logits":
        check_logits(teacher, "teacher", valid)
        log_q = (_log_softmax_precise if precise else _log_softmax)(teacher, T)
        return xp.exp(log_q), log_q
    lead = tuple(teacher.shape[:-1])
    rows = teacher
    if teacher_as == "probs":
        bad_value = (xp.isnan(rows) | (rows < 0) | (rows > 1)).any(axis=-1) & valid
        if bool(bad_value.any()):
            raise ValueError(f"teacher: row {row_index(first_bad_row(bad_value), lead)} is not a "
                             f"probability vector (entries must be in [0, 1])")
        sums = xp.sum(rows, axis=-1)
        bad_sum = (xp.abs(sums - 1) > SIMPLEX_TOL) & valid
        if bool(bad_sum.any()):
            i = first_bad_row(bad_sum)
            raise ValueError(f"teacher: row {row_index(i, lead)} sums to {float(sums[i]):.6g}, "
                             f"expected 1 (teacher_as='probs'; pass logits with "
                             f"teacher_as='logits')")
        q = rows
        log_q = xp.log(xp.where(q > 0, q, 1))
        log_q = xp.where(q > 0, log_q, -xp.inf)
        return q, log_q
    # log_probs
    check_logits(rows, "teacher", valid)
    lse = xp.max(rows, axis=-1) + xp.log(xp.sum(xp.exp(rows - xp.max(rows, axis=-1, keepdims=True)),
                                              axis=-1))
    bad = (xp.abs(lse) > SIMPLEX_TOL) & valid
    if bool(bad.any()):
        i = first_bad_row(bad)
        raise ValueError(f"teacher: row {row_index(i, lead)} has logsumexp {float(lse[i]):.6g}, "
                         f"expected 0 for log-probabilities (pass logits with teacher_as='logits')")
    return xp.exp(rows), rows


# ---------------------------------------------------------------- forward / backward

class KDArguments(NamedTuple):
    """``check_kd_arguments``' result: the namespace, the checked numbers and the rows' roles."""
    xp: object
    T: float
    alpha: float
    roles: object          # conventions.RowRoles
    beta: object           # JSD's mixture weight, else None
    normalizer: object     # batchmean's explicit count, else None
    label_smoothing: float


def check_kd_arguments(student, teacher, labels, *, T, alpha, kind, teacher_as, reduction,
                       ignore_index, mask, unlabeled="ignore", check_student=True, check_label_range=True, beta=None,
                       dkd_weights=None, normalizer=None, hard_weight=None, label_smoothing=0.0):
    """Validate every KD argument once (shared by the reference and the fused kernels, so both
    give the same errors). Returns the checked values: ``KDArguments``."""
    check_float_array(student, "student", ndim_min=2)
    check_float_array(teacher, "teacher", ndim_min=2)
    if tuple(teacher.shape) != tuple(student.shape):
        more = " (different class counts: vocab='truncate' or 'pad' matches them)" if \
            tuple(teacher.shape[:-1]) == tuple(student.shape[:-1]) else ""
        raise ValueError(f"teacher: expected the student's shape {tuple(student.shape)}, "
                         f"got {tuple(teacher.shape)}{more}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher: dtype {teacher.dtype} differs from the student's "
                        f"{student.dtype}; cast one so the reference computes in one dtype")
    xp = get_namespace(student, teacher, labels, mask)
    T = check_temperature(T)
    alpha, _ = conventions.check_weights(alpha, hard_weight)
    label_smoothing = conventions.check_label_smoothing(label_smoothing)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    beta = divergences.check_beta(kind, beta)
    if dkd_weights is not None and kind != "dkd":
        raise UserError(f"dkd_weights: only kind='dkd' takes them (kind={kind!r})")
    if kind == "dkd" and teacher_as != "logits":
        raise UserError(f"teacher_as: kind='dkd' takes teacher logits (it splits them at the label), got {teacher_as!r}")
    if teacher_as not in TEACHER_FORMS:
        raise ValueError(f"teacher_as: expected one of {TEACHER_FORMS}, got {teacher_as!r}")
    conventions.check_reduction(reduction)
    normalizer = conventions.check_normalizer(normalizer, reduction)
    conventions.check_unlabeled(unlabeled)
    if labels is None and (alpha != 1.0 if hard_weight is None else hard_weight != 0) and unlabeled == "ignore":
        raise ValueError(f"labels: required when alpha < 1 (the hard term has weight "
                         f"1 - alpha = {1 - alpha}); pass labels, alpha=1, or unlabeled='soft' "
                         f"(every row gets the distillation term alone)")

    C = student.shape[-1]
    lead = tuple(student.shape[:-1])
    roles = conventions.row_roles(lead, C, labels, mask, ignore_index, unlabeled, xp, check_range=check_label_range)
    if kind == "dkd" and alpha > 0 and bool((roles.valid & ~roles.hard).any()):
        raise UserError("kind='dkd': every row that counts needs a label (DKD splits each row at its target "
                        "class); rows without one (unlabeled='soft', the transfer set) have none")
    if check_student:  # a fused kernel checks the values itself, in its first pass
        check_logits(student, "student", roles.valid)
    return KDArguments(xp, T, alpha, roles, beta, normalizer, label_smoothing)


class Tempered(NamedTuple):
    """Student and teacher at the temperature, as the soft term uses them (``tempered``)."""
    p: object              # (N, C) softmax(s / T)
    q: object              # (N, C) teacher probabilities at T
    log_p: object          # (N, C) log p, 0 where q == 0
    log_q: object          # (N, C) log q, 0 where q == 0
    log_p_full: object     # (N, C) precise log p and log q, -inf where 0 (``precise``), else None
    log_q_full: object


def tempered(s, t, teacher_as: str, T: float, valid, precise: bool) -> Tempered:
    """p, q and their logs at T for rows s, t (N, C) (rows outside V already replaced), the other
    arguments already checked (``check_kd_arguments``); the teacher is checked here
    (``_teacher_log_probs``). ``precise``: logs accurate in every entry, which the kinds of
    ``minikd.losses.divergences`` need (``_log_softmax_precise``). ``kd_forward``'s first step, apart
    so that a caller evaluating several kinds at one T (``minikd diagnose``) computes it once."""
    xp = get_namespace(s)
    q, log_q_all = _teacher_log_probs(t, teacher_as, T, valid, precise)
    log_p_all = (_log_softmax_precise if precise else _log_softmax)(s, T)
    has_mass = q > 0
    return Tempered(xp.exp(log_p_all), q, xp.where(has_mass, log_p_all, 0), xp.where(has_mass, log_q_all, 0),
                    *((log_p_all, log_q_all) if precise else (None, None)))


def soft_term_rows(kind: str, d: Tempered, beta=None, teacher_as: str = "logits"):
    """D_i, the soft term's divergence per row (N,), for the kinds of ``minikd.losses.divergences``
    (not "dkd"): KL(q || p) and H(q, p) on the logs masked where q = 0, the others from
    ``divergences.divergence_rows`` (``d`` computed with ``precise``)."""
    xp = get_namespace(d.p)
    if kind in ("kl", "ce"):
        return xp.sum(d.q * (d.log_q - d.log_p), axis=-1) if kind == "kl" else -xp.sum(d.q * d.log_p, axis=-1)
    return divergences.divergence_rows(kind, d.p, d.log_p_full, d.q, d.log_q_full, beta, teacher_as)


class KDCache(NamedTuple):
    p: object              # (N, C) softmax(s / T)
    q: object              # (N, C) teacher probabilities at T
    log_p: object          # (N, C) log p, 0 where q == 0 (only used against q)
    log_q: object          # (N, C) log q, 0 where q == 0
    p1: object             # (N, C) softmax(s) or None when alpha == 1
    labels: object         # (N,) labels, 0 on rows without the hard term, or None
    valid: object          # (N,) bool: the row counts
    hard: object           # (N,) bool: the row gets the hard term
    T: float
    alpha: float
    tau: float
    soft_weight: float     # alpha * tau   (conventions.term_weights)
    hard_weight: float     # 1 - alpha, or the hard_weight given
    label_smoothing: float
    kind: str
    teacher_as: str
    beta: object           # JSD's mixture weight, else None
    dkd_cache: object      # kind="dkd": the DKD term's cache (minikd.losses.dkd), else None
    topk_cache: object     # a TopK teacher: the top-k term's cache (minikd.losses.topk), else None
    log_p_full: object     # (N, C) precise log p and log q, -inf where 0 (kinds other than kl, ce), else None
    log_q_full: object
    reduction: str
    shape: tuple           # the logits' shape
    normalizer: object = None   # batchmean's count, when given (conventions.check_normalizer)
    classes: tuple = None       # (C_student, C_teacher) as given, when vocab= matched them
    sparse_shape: tuple = None  # a TopK teacher: its values' shape (the teacher gradient's), else None


def kd_forward(student, teacher, labels=None, *, T, alpha, kind="kl", scale_t2=True,
               teacher_as="logits", reduction="batchmean", ignore_index=-100, mask=None, unlabeled="ignore",
               beta=None, dkd_weights=None, normalizer=None, hard_weight=None, label_smoothing=0.0,
               vocab=None):
    """Hinton KD loss (see module doc). Returns (loss, cache).

    Parameters
    ----------
    student : (N, C) or (B, S, C) float array of student logits.
    teacher : same shape; logits, or probabilities / log-probabilities already softened at T.
        It may also be a ``minikd.losses.topk.TopK`` (indices, values): a sparse teacher, its soft
        term the top-k loss of its variant (kind "kl"); its teacher gradient is d loss / d values.
    labels : integer (N,) or (B, S), optional; required unless alpha == 1.
    T : temperature > 0.
    alpha : weight of the distillation term in [0, 1].
    kind : the divergence D of the soft term (``minikd.losses.divergences``): "kl" (KL(q||p), the
        default), "ce" (soft cross-entropy), "reverse_kl" (KL(p||q)), "jsd" (generalized JSD, with
        ``beta`` in [0, 1]) or "tvd" (total variation).
    scale_t2 : multiply the soft term by T**2.
    teacher_as : "logits", "probs" or "log_probs".
    reduction : "batchmean", "sum" or "none".
    ignore_index : the label of a row without one; it counts nowhere (``unlabeled="ignore"``) or gets
        the distillation term alone (``unlabeled="soft"``: the transfer set; with no labels at all,
        every row).
    mask : rows that count nowhere where False.
    unlabeled : "ignore" or "soft" (see ``ignore_index``).
    beta : JSD's mixture weight in [0, 1] (kind "jsd" only).
    dkd_weights : (alpha_tckd, beta_nckd) of kind "dkd" (default (1, 8)).
    normalizer : with "batchmean", the count to divide by instead of the number of rows that count
        (a micro-batch of gradient accumulation divides by the whole batch's count).
    hard_weight : the hard term's weight instead of 1 - alpha (then alpha may be any weight >= 0:
        ``gamma * CE + alpha * KD`` is alpha=alpha, hard_weight=gamma).
    label_smoothing : the hard term's, PyTorch's definition: target (1 - eps) onehot(y) + eps / C.
    vocab : student and teacher with different class counts: None refuses, "truncate" or "pad"
        (``conventions.match_vocab``); the gradients come back on each input's own classes.
    """
    sparse = teacher if isinstance(teacher, topk.TopK) else None
    if sparse is not None:   # a top-k teacher: its soft term is minikd.losses.topk's, a KL form
        if kind != "kl" or teacher_as != "logits" or vocab is not None:
            raise UserError("teacher: a top-k teacher (TopK) takes kind='kl' (its variants are KL forms), no "
                            "teacher_as (TopK.values_as says) and no vocab")
        teacher = student   # the argument checks below see a dense stand-in; the soft term ignores it
    student, teacher, classes = conventions.match_vocab(student, teacher, vocab, teacher_as)
    xp, T, alpha, roles, beta, normalizer, label_smoothing = check_kd_arguments(
        student, teacher, labels, T=T, alpha=alpha, kind=kind, teacher_as=teacher_as,
        reduction=reduction, ignore_index=ignore_index, mask=mask, unlabeled=unlabeled, beta=beta,
        dkd_weights=dkd_weights, normalizer=normalizer, hard_weight=hard_weight, label_smoothing=label_smoothing)
    valid, hard = roles.valid, roles.hard
    C = student.shape[-1]
    lead = tuple(student.shape[:-1])
    s = student.reshape(-1, C)
    t = teacher.reshape(-1, C)
    # Rows outside V count nowhere: replace them by a harmless uniform row before any arithmetic.
    keep = valid[:, None]
    s = xp.where(keep, s, 0)
    t = xp.where(keep, t, 1.0 / C if teacher_as == "probs" else
                 (-xp.log(xp.asarray(C, dtype=t.dtype)) if teacher_as == "log_probs" else 0))
    # the kinds of minikd.losses.divergences need logs accurate in every entry, and unmasked
    precise = kind not in ("kl", "ce")
    soft = tempered(s, t, teacher_as, T, valid, precise)
    p, q, log_p, log_q, log_p_full, log_q_full = soft

    tau = conventions.soft_scale(T, scale_t2)
    soft_weight, hard_weight = conventions.term_weights(alpha, T, scale_t2, hard_weight)
    rows = xp.zeros(s.shape[0], dtype=s.dtype)
    dkd_cache = topk_cache = None
    if sparse is not None and soft_weight > 0.0:   # alpha * tau * D_i of the top-k variant
        topk_rows, topk_cache = topk.topk_forward(
            student.reshape(-1, C), sparse.indices.reshape(-1, sparse.indices.shape[-1]),
            sparse.values.reshape(-1, sparse.values.shape[-1]), T=T, T_gen=sparse.T_gen, teacher_as=sparse.values_as,
            variant=sparse.variant, scale_t2=scale_t2, reduction="none", mask=valid)
        rows = rows + alpha * topk_rows
    elif kind == "dkd" and soft_weight > 0.0 and roles.labels is not None:   # alpha * DKD_i (DKD_i = tau (a TCKD + b NCKD)) on labeled rows
        a_tckd, b_nckd = DKD_WEIGHTS if dkd_weights is None else dkd_weights
        dkd_rows, dkd_cache = dkd.dkd_forward(student.reshape(-1, C), teacher.reshape(-1, C),
                                              xp.where(hard, roles.labels, ignore_index), T=T, alpha_tckd=a_tckd,
                                              beta_nckd=b_nckd, scale_t2=scale_t2, reduction="none",
                                              ignore_index=ignore_index, mask=valid)
        rows = rows + alpha * dkd_rows
    elif soft_weight > 0.0:
        rows = rows + soft_weight * soft_term_rows(kind, soft, beta, teacher_as)
    p1 = None
    labels_safe = None
    if hard_weight > 0.0:
        labels_safe = xp.zeros(s.shape[0], dtype=xp.int64) if roles.labels is None else \
            xp.where(hard, roles.labels, 0)
        log_p1 = _log_softmax(s, 1.0)
        ce_rows = -xp.take_along_axis(log_p1, labels_safe[:, None], axis=-1)[:, 0]
        if label_smoothing > 0.0:   # (1 - eps) CE + eps * mean_c(-log p1_c), PyTorch's label_smoothing
            ce_rows = (1.0 - label_smoothing) * ce_rows - label_smoothing * xp.mean(log_p1, axis=-1)
        rows = rows + hard_weight * xp.where(hard, ce_rows, 0)
        p1 = xp.exp(log_p1)
    rows = xp.where(valid, rows, 0)
    loss = conventions.reduce_rows(rows, valid, reduction, lead, normalizer)
    cache = KDCache(p=p, q=q, log_p=log_p, log_q=log_q, p1=p1, labels=labels_safe, valid=valid, hard=hard,
                    T=T, alpha=alpha, tau=tau, soft_weight=soft_weight, hard_weight=hard_weight,
                    label_smoothing=label_smoothing,
                    kind=kind, teacher_as=teacher_as, beta=beta, dkd_cache=dkd_cache, topk_cache=topk_cache,
                    log_p_full=log_p_full,
                    log_q_full=log_q_full,
                    reduction=reduction, shape=tuple(student.shape), normalizer=normalizer,
                    classes=classes, sparse_shape=None if sparse is None else tuple(sparse.values.shape))
    return loss, cache


def kd_backward(dloss, cache: KDCache, teacher_grad: bool = False):
    """Gradient of the KD loss: d_student, or (d_student, d_teacher) when ``teacher_grad``.

    ``dloss`` is a scalar for "batchmean"/"sum" and an array shaped like the loss for "none".
    The teacher gradient is with respect to the teacher input as given: logits or
    log-probabilities (probabilities on the simplex boundary have no finite derivative of
    q log q, so teacher_as="probs" refuses it).
    """
    out = _kd_backward(dloss, cache, teacher_grad)
    if cache.classes is None:
        return out
    cs, ct = cache.classes
    if not teacher_grad:
        return conventions.unmatch_vocab(out, cs)
    return conventions.unmatch_vocab(out[0], cs), conventions.unmatch_vocab(out[1], ct)


def _kd_backward(dloss, cache: KDCache, teacher_grad: bool):
    c = cache
    xp = get_namespace(c.p)
    w = conventions.row_weights(dloss, c.valid, c.reduction, c.p.dtype, normalizer=c.normalizer)[:, None]
    soft_weight, hard_weight = c.soft_weight, c.hard_weight
    ds = xp.zeros_like(c.p)
    dt_soft = ds_term = None
    if c.topk_cache is not None:   # its teacher gradient is with respect to TopK.values, shaped like them
        ds_term = topk.topk_backward(w[:, 0] * c.alpha, c.topk_cache, teacher_grad=teacher_grad)
        ds_term, dt_soft = ds_term if teacher_grad else (ds_term, None)
    elif c.dkd_cache is not None:   # its rows' upstream: w * alpha (DKD reduces by "none" inside)
        ds_term = dkd.dkd_backward(w[:, 0] * c.alpha, c.dkd_cache, teacher_grad=teacher_grad)
        ds_term, dt_soft = ds_term if teacher_grad else (ds_term, None)
    elif soft_weight > 0.0:
        if c.kind in ("kl", "ce"):
            ds = ds + (soft_weight / c.T) * (c.p - c.q)
        else:
            if teacher_grad and c.teacher_as == "probs":
                raise ValueError("teacher_grad: not defined for teacher_as='probs' (d(q log q)/dq is "
                                 "-inf at q = 0); pass logits or log-probabilities")
            d_s, dt_soft = divergences.divergence_grads(c.kind, c.p, c.log_p_full, c.q, c.log_q_full, c.beta, c.T,
                                                        c.teacher_as, teacher_grad)
            ds = ds + soft_weight * d_s
    if hard_weight > 0.0:
        onehot = xp.zeros_like(c.p1)
        xp.put_along_axis(onehot, c.labels[:, None], 1, axis=-1)
        target = onehot if c.label_smoothing == 0.0 else \
            (1.0 - c.label_smoothing) * onehot + c.label_smoothing / onehot.shape[-1]
        ds = ds + hard_weight * xp.where(c.hard[:, None], c.p1 - target, 0)
    ds = w * ds if ds_term is None else w * ds + ds_term
    ds = ds.reshape(c.shape)
    if not teacher_grad:
        return ds
    if c.teacher_as == "probs":
        raise ValueError("teacher_grad: not defined for teacher_as='probs' (d(q log q)/dq is "
                         "-inf at q = 0); pass logits or log-probabilities")
    if c.sparse_shape is not None:   # d TopK.values (0 when the soft term has no weight)
        return ds, xp.zeros(c.sparse_shape, dtype=c.p.dtype) if dt_soft is None else dt_soft.reshape(c.sparse_shape)
    if c.kind == "dkd":
        return ds, (xp.zeros_like(c.p) if dt_soft is None else dt_soft).reshape(c.shape)
    if c.kind not in ("kl", "ce"):
        dt = xp.zeros_like(c.p) if dt_soft is None else soft_weight * dt_soft
        return ds, (w * dt).reshape(c.shape)
    g = (c.log_q - c.log_p) if c.kind == "kl" else -c.log_p
    if c.teacher_as == "logits":
        dt = c.q * (g - xp.sum(c.q * g, axis=-1, keepdims=True)) / c.T
    else:  # log_probs: d/du_c of F(exp(u)) = q_c * dF/dq_c; the kl "+1" stays here
        dt = c.q * (g + 1.0) if c.kind == "kl" else c.q * g
    dt = (w * soft_weight * dt).reshape(c.shape)
    return ds, dt


def kd_loss(student, teacher, labels=None, **kwargs):
    """The KD loss alone; same arguments as ``kd_forward``."""
    return kd_forward(student, teacher, labels, **kwargs)[0]


def kd_loss_and_grad(student, teacher, labels=None, **kwargs):
    """(loss, d loss / d student); for reduction="none" the gradient of the summed loss."""
    loss, cache = kd_forward(student, teacher, labels, **kwargs)
    xp = get_namespace(student)
    dloss = xp.ones(cache.shape[:-1], dtype=student.dtype) if cache.reduction == "none" else 1.0
    return loss, kd_backward(dloss, cache)


def cross_entropy_and_grad(logits, labels, **kwargs):
    """Hard-label cross-entropy and its gradient: the KD loss with alpha = 0 (one convention
    for reductions, masks and ignore_index). The teacher argument is unused at alpha = 0."""
    return kd_loss_and_grad(logits, logits, labels, T=1.0, alpha=0.0, **kwargs)
