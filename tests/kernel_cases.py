"""Inputs and tolerances shared by the tests of the CUDA kernels (on a GPU, test_kernels_gpu.py;
on the CPU emulator, test_kernels_emulated.py).

Tolerances: float32 loss 1e-5 relative to the size of its terms and gradient 1e-5 of max |grad|;
float16 / bfloat16 inputs are rounded to their dtype before the float64 reference sees them, the
loss (float32 arithmetic) to 1e-5, the gradient (rounded once to the dtype on output) to 2e-3
(float16) / 1e-2 (bfloat16) of max |grad|. A row whose loss is +inf (reverse KL where the student
has mass and the teacher none) has no gradient: the reference gives NaN / -inf there, the kernel NaN
in every entry; such rows are checked for that and left out of the comparison.
"""
import numpy as np

import minikd as mk
from minikd.gradcheck import random_logits
from minikd.kernels import prepare_rows

GRAD_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
# (T, alpha, unlabeled): "soft" gives the ignored row of make() the soft term alone (the transfer set)
SETTINGS = ((0.05, 0.5, "soft"), (1.0, 0.9, "soft"), (50.0, 1.0, "ignore"), (4.0, 0.0, "soft"), (2.0, 0.7, "ignore"))


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


# pytest filter: a planned cluster kernel that did not launch (the CuPy launcher falls back to the
# block kernel with a RuntimeWarning, and the result would still be right) fails the test
NO_FALLBACK = "error:softmax_kl_cluster.*did not launch:RuntimeWarning"


def make(N, C, seed, dtype, *, teacher_only_inf=0.0, unlabeled_fraction=0.0):
    """A KD problem from minikd.gradcheck.random_logits: logits of scale 3 with 1% x20 outliers
    (student), 3% -inf classes shared by student and teacher (never a whole row, never the label),
    optionally a fraction ``teacher_only_inf`` the teacher alone rules out; row 1 labeled -100 and
    optionally a fraction ``unlabeled_fraction`` more; a 10% row mask. Returns (s, t, y, mask)."""
    rng = np.random.default_rng(seed)
    s = random_logits(rng, (N, C), scale=3.0, outliers=0.01, p_inf=0.03)
    t = random_logits(rng, (N, C), scale=3.0, outliers=0.0, p_inf=teacher_only_inf, neg_inf_mask=np.isneginf(s))
    y = rng.integers(0, C, N)
    y = np.where(np.isneginf(np.take_along_axis(s, y[:, None], 1))[:, 0], 0, y)
    if N > 1:
        y[1] = -100
    y[rng.random(N) < unlabeled_fraction] = -100
    mask = rng.random(N) < 0.9
    s, t = s.astype(np_dtype(dtype)), t.astype(np_dtype(dtype))
    return s, t, y, mask


def check(loss, grad, s, t, y, dtype, **kw):
    """The kernel's (loss, grad), as NumPy arrays, against the float64 reference on the same inputs
    (``kw``: the loss options, ``unlabeled`` and ``beta`` included)."""
    ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
    ref = np.asarray(ref, np.float64)
    loss, grad = np.asarray(loss, np.float64), np.asarray(grad).astype(np.float64)
    C = s.shape[-1]
    infinite = np.isinf(ref)   # +inf where the reference says so, and only there
    assert (np.isinf(loss) == infinite).all() and (loss[infinite] == ref[infinite]).all(), (loss, ref)
    finite = ~infinite
    scale = np.abs(ref[finite]).max(initial=0.0) + kw["alpha"] * kw["T"] ** 2 * np.log(C)
    finfo = __import__("ml_dtypes").finfo if dtype == "bfloat16" else np.finfo
    rounding = float(finfo(np_dtype(dtype)).eps) * np.abs(ref[finite]) if np.ndim(ref) else 0.0
    assert (np.abs(loss[finite] - ref[finite]) <= 1e-5 * scale + rounding).all(), (loss, ref)
    grad, gref = grad.reshape(-1, C), gref.reshape(-1, C)
    gone = ~np.isfinite(gref).all(axis=1)   # rows without a gradient: NaN in every entry
    assert np.isnan(grad[gone]).all() and np.isfinite(grad[~gone]).all()
    grad, gref = grad[~gone], gref[~gone]
    floor = max(float(finfo(np_dtype(dtype)).smallest_subnormal), float(np.finfo(np.float32).tiny))
    err = np.abs(grad - gref).max(initial=0.0)
    assert err <= GRAD_TOL[dtype] * np.abs(gref).max(initial=0.0) + floor, (err, np.abs(gref).max())


def prepared(s, t, y, *, T=1.0, alpha=0.5, kind="kl", reduction="batchmean", mask=None, unlabeled="ignore",
             weight_dtype=np.float32, on_device=False, beta=None):
    """``prepare_rows`` with the tests' usual options: the rows a launcher hands to ``kernel_args``."""
    return prepare_rows(s, t, y, T=T, alpha=alpha, kind=kind, scale_t2=True, reduction=reduction, ignore_index=-100,
                        mask=mask, unlabeled=unlabeled, weight_dtype=weight_dtype, on_device=on_device, beta=beta)


# ---------------------------------------------------------------- the divergences besides kl and ce

# (kind, beta): JSD at its endpoints (forward / reverse KL) and inside
DIVERGENCES = (("reverse_kl", None), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0), ("tvd", None))
# (T, alpha); alpha = 0 (no soft term) once
DIVERGENCE_SETTINGS = ((1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (2.5, 0.5), (2.5, 1.0))


def make_divergences(N, C, seed, dtype, *, Ts=(1.0, 2.5)):
    """make()'s problem (outliers, shared -inf classes, row 1 labeled -100, a mask) with a third of
    the rows more without a label, 2% more -inf classes in the student alone (never its label or
    its maximum) and, in rows 2, 5, 8, ..., 3% in the teacher alone (never its maximum; those rows
    never masked): there reverse KL (and JSD at beta = 1) is +inf, on the other rows finite. The
    teacher is then moved off TVD's near-ties at each T in ``Ts`` (``away_from_ties``)."""
    s, t, y, mask = make(N, C, seed, dtype, unlabeled_fraction=0.3)
    rng = np.random.default_rng([seed, 16])
    cols = np.arange(C)
    keep_s = (cols == y[:, None]) | (cols == np.argmax(s, axis=1)[:, None])
    s[(rng.random((N, C)) < 0.02) & ~keep_s] = -np.inf
    rows = (np.arange(N) % 3 == 2)[:, None]
    t[(rng.random((N, C)) < 0.03) & rows & (cols != np.argmax(t, axis=1)[:, None])] = -np.inf
    mask[2::3] = True
    return s, away_from_ties(s, t, Ts), y, mask


def away_from_ties(s, t, Ts, band=1e-4):
    """The teacher with each class where p and q are nearly equal (|log p - log q| < ``band`` at a
    temperature of ``Ts``, both sides with mass) moved off: TVD's gradient jumps there (sign(p - q)),
    and a float32 kernel cannot tell the side of a tie closer than its rounding (~1e-6) the way
    the float64 reference does. Exact ties (d = 0: a row with one class, p = q = 0, or constructed
    ones) are left: float32 sees them exactly as well."""
    t = t.copy()
    for _ in range(20):
        near = np.zeros(t.shape, bool)
        for T in Ts:
            log_p = mk.log_softmax(s.astype(np.float64), T)
            log_q = mk.log_softmax(t.astype(np.float64), T)
            both = np.isfinite(log_p) & np.isfinite(log_q)
            d = np.where(both, log_p, 0) - np.where(both, log_q, 0)
            near |= both & (np.abs(d) < band) & (d != 0)
        if not near.any():
            return t
        # raise or lower the teacher logit (q up or down) by a few thousandths of T, at least by
        # a step of its dtype
        t64 = np.where(near, t.astype(np.float64), 0.0)
        step = np.maximum(3e-3 * max(Ts), 4 * np.abs(t64) * float(_eps(t.dtype)))
        moved = (t64 + np.where(d > 0, -step, step)).astype(t.dtype)
        t = np.where(near, moved, t)
    raise AssertionError("could not move the teacher off the near-ties")


def _eps(dtype):
    finfo = __import__("ml_dtypes").finfo if dtype.name == "bfloat16" else np.finfo
    return finfo(dtype).eps
