"""The conventions every loss in minikd follows, each written once (DESIGN.md "Conventions").

The reference losses (``kd``, ``feature``, ``relational``, ``mutual``), both fused-kernel backends
(``minikd.kernels``: Numba and CuPy), the tests' helpers and the pipeline call these functions; none
of them re-derives a reduction, a row weight or a term weight.

Reductions: one meaning for every loss; each loss accepts the ones that make sense for it
------------------------------------------------------------------------------------------
    "sum"        the sum of the loss's terms
    "batchmean"  that sum / the number of rows that count (no row counts: the loss is 0)
    "mean"       that sum / the number of terms
    "none"       one loss per row, 0 on rows that count nowhere, shaped like the leading axes

    loss            its terms                         accepts
    KD (kd)         l_i, one per row                  batchmean (default), sum, none;
                                                      "mean" is refused: over the N*C elements it is KL / C
    top-k KD (topk) l_i, one per row                  as KD
    hint (feature)  (r_nk - h_nk)^2, N*K of them      batchmean (default), mean (= MSE), sum
    RKD distance    h(x_ab), N^2 pairs                mean (default, the authors' code), sum
    RKD angle       h(x_abc), N^3 triples             mean (default, the authors' code), sum
    mutual          its KD and CE terms               batchmean (default), sum

Rows of an (N, C) problem ((B, S, C) logits are flattened to rows)
------------------------------------------------------------------
A row counts nowhere when ``mask`` is False there, or when its label is ``ignore_index`` and
``unlabeled="ignore"`` (the default). With ``unlabeled="soft"`` a row whose label is
``ignore_index`` gets the distillation term alone: Hinton's transfer set, unlabeled inputs labeled
only by the teacher. Without labels every row counts and none has the hard term (the KD loss then
asks for alpha = 1 or ``unlabeled="soft"``). Every other row gets both terms:

    l_i = alpha * tau * D_i + (1 - alpha) * h_i * CE_i,     h_i = 1 if row i has a label, else 0
    tau = T**2 (scale_t2, default) or 1

so alpha weights the distillation term (Hinton et al. 2015; frameworks writing
``alpha * CE + (1 - alpha) * KD`` use 1 - alpha), and "batchmean" divides the sum over the rows
that count -- labeled and unlabeled alike -- by their number. Backward, the reduced loss
L = sum_i l_i / divisor has the per-row upstream weight w_i = dL/dl_i = dloss * [i counts] / divisor
("none": w_i = dloss_i [i counts]).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import first_bad_row, get_namespace, row_index

__all__ = ["SIMPLEX_TOL", "REDUCTIONS", "UNLABELED", "KD_REDUCTIONS", "HINT_REDUCTIONS", "RKD_REDUCTIONS", "MUTUAL_REDUCTIONS",
           "RowRoles", "check_reduction", "check_alpha", "check_unlabeled",
           "soft_scale", "term_weights", "check_weights", "check_label_smoothing", "shares_exponential", "row_roles", "divisor", "check_normalizer", "reduce_rows",
           "reduce_total", "row_weights", "kernel_labels", "VOCAB", "match_vocab", "unmatch_vocab"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
UNLABELED = ("ignore", "soft")
# what each loss accepts (the table above), its default first
KD_REDUCTIONS = ("batchmean", "sum", "none")
HINT_REDUCTIONS = ("batchmean", "mean", "sum")
RKD_REDUCTIONS = ("mean", "sum")
MUTUAL_REDUCTIONS = ("batchmean", "sum")
# Tolerance on the row sums of given probabilities (and logsumexp of given log-probabilities):
# loose enough for float32/float16 soft targets written to disk, tight enough to catch logits.
SIMPLEX_TOL = 1e-3


# ---------------------------------------------------------------- reductions

def check_reduction(reduction: str, accepted=KD_REDUCTIONS, loss: str = "the KD loss") -> str:
    """Refuse a reduction the loss does not accept; "mean" on KD with the reason."""
    if reduction == "mean" and "mean" not in accepted:
        raise ValueError(
            f"reduction='mean' divides by N*C (every element), which for {loss} is the KL divergence "
            f"divided by the number of classes, not the KL divergence; use 'batchmean' (sum over the "
            f"rows that count / their number), 'sum' or 'none'")
    if reduction not in accepted:
        raise ValueError(f"reduction: expected one of {accepted} ({loss}), got {reduction!r}")
    return reduction


def divisor(reduction: str, n_rows, n_terms=None):
    """What the sum of a loss's terms is divided by: 1 ("sum"), the number of rows that count
    (at least 1, "batchmean"), the number of terms ("mean"). ``n_rows`` may be a 0-d device array
    (CuPy: the count is never read back to the host)."""
    if reduction == "sum":
        return 1.0
    if reduction == "batchmean":
        return get_namespace(n_rows).maximum(n_rows, 1) if hasattr(n_rows, "shape") else max(n_rows, 1)
    if reduction == "mean":
        return max(int(n_terms), 1)
    raise ValueError(f"divisor: no single divisor for reduction={reduction!r}")


def reduce_total(total, reduction: str, n_rows, n_terms=None):
    """A summed loss, reduced: total / divisor."""
    return total / divisor(reduction, n_rows, n_terms)


def check_normalizer(normalizer, reduction: str):
    """An explicit count that replaces "batchmean"'s number of rows that count (``num_items_in_batch``
    in Hugging Face's trainers): with gradient accumulation, each micro-batch divides by the count of
    the whole batch, so the micro-batch losses sum to the full batch's loss. None: count the rows."""
    if normalizer is None:
        return None
    if reduction != "batchmean":
        raise ValueError(f"normalizer: replaces batchmean's count of rows; reduction={reduction!r} has none")
    try:
        value = float(normalizer)
    except (TypeError, ValueError):
        raise ValueError(f"normalizer: expected a count >= 1, got {normalizer!r}") from None
    if not (value >= 1 and value < float("inf")):
        raise ValueError(f"normalizer: expected a count >= 1, got {normalizer!r}")
    return value


def reduce_rows(rows, valid, reduction: str, lead_shape, normalizer=None):
    """Per-row losses (already 0 on rows that count nowhere), reduced (``normalizer``: the count
    "batchmean" divides by, instead of the number of rows that count)."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    xp = get_namespace(rows)
    return reduce_total(xp.sum(rows), reduction, int(valid.sum()) if normalizer is None else normalizer)


def row_weights(dloss, valid, reduction: str, dtype, n_valid=None, normalizer=None):
    """w_i = d(reduced loss) / d l_i times the upstream dloss, (N,): 0 on rows that count nowhere.
    ``n_valid`` (int or 0-d device array) saves counting ``valid`` again; ``normalizer`` replaces
    the count (``check_normalizer``)."""
    xp = get_namespace(valid)
    w = valid.astype(dtype)
    if reduction == "none":
        dloss = xp.asarray(dloss, dtype=dtype)
        if dloss.size != w.size:
            raise ValueError(f"dloss: reduction='none' needs an upstream gradient shaped like the "
                             f"loss ({w.size} rows), got shape {tuple(dloss.shape)}")
        return w * dloss.reshape(-1)
    if hasattr(dloss, "shape") and getattr(dloss, "size", 1) != 1:
        raise ValueError(f"dloss: reduction={reduction!r} gives a scalar loss; its upstream gradient is a "
                         f"scalar, got shape {tuple(dloss.shape)}")
    count = normalizer if normalizer is not None else valid.sum() if n_valid is None else n_valid
    d = divisor(reduction, count)   # on the device for CuPy
    return (w * (float(dloss) / d)).astype(dtype, copy=False)


# ---------------------------------------------------------------- the terms and their weights

def check_alpha(alpha) -> float:
    """alpha, the weight of the distillation term, a number in [0, 1]."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha: expected a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha}")
    return alpha


def check_unlabeled(unlabeled: str) -> str:
    if unlabeled not in UNLABELED:
        raise ValueError(f"unlabeled: expected one of {UNLABELED} ('soft': rows without a label get the "
                         f"distillation term alone), got {unlabeled!r}")
    return unlabeled


def soft_scale(T: float, scale_t2: bool = True) -> float:
    """tau, the factor of the distillation term: T**2 (Hinton et al.: keeps its gradient, which
    scales as 1/T**2 through p - q at high T, comparable to the hard term's) or 1."""
    return T * T if scale_t2 else 1.0


def term_weights(alpha: float, T: float, scale_t2: bool = True, hard_weight=None):
    """(soft, hard): the weights of D_i and CE_i in a row's loss, alpha * tau and 1 - alpha, or
    ``hard_weight`` when given: ``gamma * CE + alpha * KD`` codebases (weights that need not sum
    to one) are alpha=alpha, hard_weight=gamma."""
    return alpha * soft_scale(T, scale_t2), 1.0 - alpha if hard_weight is None else hard_weight


def check_weights(alpha, hard_weight=None):
    """(alpha, hard_weight): alpha in [0, 1] (the hard term then weighs 1 - alpha), or with an
    explicit ``hard_weight`` both any finite numbers >= 0."""
    if hard_weight is None:
        return check_alpha(alpha), None
    out = []
    for name, v in (("alpha", alpha), ("hard_weight", hard_weight)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected a number >= 0, got {v!r}") from None
        if not (v >= 0 and v < float("inf")):
            raise ValueError(f"{name}: expected a finite number >= 0 (with hard_weight given), got {v}")
        out.append(v)
    return tuple(out)


def check_label_smoothing(epsilon) -> float:
    """The hard term's label smoothing, PyTorch's definition: the target is (1 - epsilon) onehot(y)
    + epsilon / C on every class; epsilon in [0, 1)."""
    try:
        epsilon = float(epsilon)
    except (TypeError, ValueError):
        raise TypeError(f"label_smoothing: expected a number in [0, 1), got {epsilon!r}") from None
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {epsilon}")
    return epsilon


def shares_exponential(T: float) -> bool:
    """At T = 1 the hard term's softmax(s) is the tempered softmax(s / T): a kernel may compute the
    exponentials once for both (bitwise the same values)."""
    return T == 1.0


# ---------------------------------------------------------------- which rows get which terms

class RowRoles(NamedTuple):
    valid: object        # (N,) bool: the row counts (gets at least one term)
    hard: object         # (N,) bool: the row gets the hard term (has a label and counts)
    labels: object       # (N,) the labels, flattened, or None
    lead: tuple          # the leading shape of the logits
    out_of_range: object = None   # (N,) bool: a label outside [0, C) and not ignore_index (mask or not)


def row_roles(lead_shape, n_classes, labels=None, mask=None, ignore_index=-100, unlabeled="ignore", xp=None,
              check_range=True) -> RowRoles:
    """Which rows count and which get the hard term (module doc). Validates labels (integer, shaped
    like the leading axes, in [0, C) or ignore_index) and mask (boolean, shaped like the leading
    axes). ``check_range=False`` leaves the label range to the caller (the CuPy kernel folds it
    into its row flags, which saves a device-to-host sync; on a flag it calls this again to raise)."""
    check_unlabeled(unlabeled)
    n = 1
    for d in lead_shape:
        n *= d
    labels_flat = out_of_range = None
    if labels is None:   # every row counts, none has a label (the KD loss asks for alpha = 1 or "soft")
        has_label = xp.zeros(n, dtype=bool)
        valid = xp.ones(n, dtype=bool)
    else:
        if not hasattr(labels, "dtype") or labels.dtype.kind not in "iu":
            raise TypeError(f"labels: expected an integer array, got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != tuple(lead_shape):
            raise ValueError(f"labels: expected shape {tuple(lead_shape)} (the logits' leading "
                             f"axes), got {tuple(labels.shape)}")
        labels_flat = labels.reshape(-1)
        has_label = labels_flat != ignore_index
        out_of_range = has_label & ((labels_flat < 0) | (labels_flat >= n_classes))
        if check_range and bool(out_of_range.any()):
            i = first_bad_row(out_of_range)
            raise ValueError(f"labels: row {row_index(i, lead_shape)} has label "
                             f"{int(labels_flat[i])}, expected 0..{n_classes - 1} or "
                             f"ignore_index={ignore_index}")
        valid = xp.ones(n, dtype=bool) if unlabeled == "soft" else has_label
    if mask is not None:
        if not hasattr(mask, "dtype") or mask.dtype != bool:
            raise TypeError(f"mask: expected a boolean array, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(lead_shape):
            raise ValueError(f"mask: expected shape {tuple(lead_shape)}, got {tuple(mask.shape)}")
        valid = valid & mask.reshape(-1)
    return RowRoles(valid, valid & has_label, labels_flat, tuple(lead_shape), out_of_range)


VOCAB = ("truncate", "pad")


def match_vocab(student, teacher, vocab=None, teacher_as="logits"):
    """Student and teacher logits whose class counts differ (a tokenizer with added tokens, a
    padded embedding), brought to one count. ``vocab``: None refuses the mismatch; "truncate"
    keeps the first min(C_s, C_t) classes of both (the extra classes count nowhere, and the
    student's get gradient 0); "pad" extends the shorter with -inf logits (probability exactly 0:
    a student missing a class the teacher has mass on gives KL = +inf, the true value). Liger-Kernel
    pads with zero logits instead: e^0 gives each padded class a share of the mass, so the padded
    side is no longer the model's distribution. Teacher probabilities are padded with 0 and
    log-probabilities with -inf. Returns (student, teacher, (C_s, C_t)), the last None when nothing
    was matched (then the inputs, unchecked, are returned as given)."""
    if vocab is None or not (hasattr(student, "shape") and hasattr(teacher, "shape")):
        return student, teacher, None
    cs, ct = student.shape[-1], teacher.shape[-1]
    if cs == ct:
        return student, teacher, None
    if vocab not in VOCAB:
        raise ValueError(f"vocab: expected None (refuse), 'truncate' or 'pad', got {vocab!r}")
    if tuple(student.shape[:-1]) != tuple(teacher.shape[:-1]):
        return student, teacher, None   # a shape mismatch beyond the class axis: refused later
    xp = get_namespace(student, teacher)
    if vocab == "truncate":
        c = min(cs, ct)
        return student[..., :c], teacher[..., :c], (cs, ct)

    def pad(x, c, fill):
        extra = xp.full(tuple(x.shape[:-1]) + (c - x.shape[-1],), fill, dtype=x.dtype)
        return xp.concatenate([x, extra], axis=-1)
    c = max(cs, ct)
    fill_t = 0.0 if teacher_as == "probs" else -xp.inf
    return (pad(student, c, -xp.inf) if cs < c else student), (pad(teacher, c, fill_t) if ct < c else teacher), \
        (cs, ct)


def unmatch_vocab(grad, classes):
    """A gradient over the matched classes, back on an input's own ``classes``: padded classes
    dropped, truncated ones 0."""
    c = grad.shape[-1]
    if c == classes:
        return grad
    if c > classes:
        return grad[..., :classes]
    xp = get_namespace(grad)
    return xp.concatenate([grad, xp.zeros(tuple(grad.shape[:-1]) + (classes - c,), dtype=grad.dtype)], axis=-1)


def kernel_labels(roles: RowRoles, n_classes: int, xp):
    """The labels a fused kernel reads, int64 (N,): the label on rows that get the hard term, -1 on
    every other row (no hard term; rows that count nowhere also have weight 0). Labels out of range
    (unchecked on the device) become -1 too: their rows are flagged and raise."""
    n = roles.valid.shape[0]
    if roles.labels is None:
        return xp.full(n, -1, dtype=xp.int64)
    use = roles.hard & (roles.labels >= 0) & (roles.labels < n_classes)
    return xp.where(use, roles.labels, -1).astype(xp.int64, copy=False)
