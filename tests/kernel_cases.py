"""Inputs and tolerances shared by the tests of the CUDA kernels (on a GPU, test_kernels_gpu.py;
on the CPU emulator, test_kernels_emulated.py).

Tolerances: float32 loss 1e-5 relative to the size of its terms and gradient 1e-5 of max |grad|;
float16 / bfloat16 inputs are rounded to their dtype before the float64 reference sees them, the
loss (float32 arithmetic) to 1e-5, the gradient (rounded once to the dtype on output) to 2e-3
(float16) / 1e-2 (bfloat16) of max |grad|.
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
    (``kw``: the loss options, ``unlabeled`` included)."""
    ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
    loss, grad = np.asarray(loss, np.float64), np.asarray(grad).astype(np.float64)
    C = s.shape[-1]
    scale = np.abs(ref).max() + kw["alpha"] * kw["T"] ** 2 * np.log(C)
    finfo = __import__("ml_dtypes").finfo if dtype == "bfloat16" else np.finfo
    rounding = float(finfo(np_dtype(dtype)).eps) * np.abs(ref) if np.ndim(ref) else 0.0
    assert (np.abs(loss - ref) <= 1e-5 * scale + rounding).all(), (loss, ref)
    floor = max(float(finfo(np_dtype(dtype)).smallest_subnormal), float(np.finfo(np.float32).tiny))
    err = np.abs(grad - gref).max()
    assert err <= GRAD_TOL[dtype] * np.abs(gref).max() + floor, (err, np.abs(gref).max())


def prepared(s, t, y, *, T=1.0, alpha=0.5, kind="kl", reduction="batchmean", mask=None, unlabeled="ignore",
             weight_dtype=np.float32, on_device=False):
    """``prepare_rows`` with the tests' usual options: the rows a launcher hands to ``kernel_args``."""
    return prepare_rows(s, t, y, T=T, alpha=alpha, kind=kind, scale_t2=True, reduction=reduction, ignore_index=-100,
                        mask=mask, unlabeled=unlabeled, weight_dtype=weight_dtype, on_device=on_device)
