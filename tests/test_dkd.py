"""Decoupled KD (minikd.losses.dkd): gradient properties for the student and the teacher, invariants,
the KD decomposition, values worked by hand, edge cases, rows and reductions like KD's, every error,
and parity with mdistiller's formulation in PyTorch float64."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minikd.gradcheck import check_vjp, relative_error
from minikd.losses import dkd_backward, dkd_forward, dkd_loss, dkd_loss_and_grad, kd_backward, kd_forward, kd_loss
from minikd.testing import labels_for, logits, masks, shapes, temperatures, upstreams
from minikd.torch_parity import reference_dkd_terms

RTOL = 1e-7
U = np.finfo(np.float64).eps / 2


@st.composite
def dkd_cases(draw, max_rows=5, max_classes=7, min_classes=2, neg_inf=True, reductions=("batchmean", "sum", "none")):
    """A DKD problem: the teacher is -inf wherever the student is (shared padding) and perhaps elsewhere
    (also at the label, or at every non-target class); some rows ignore_index; an optional mask. The
    degenerate draws (no row counts, both weights 0; C = 1 has its own test) are kept rare."""
    shape = draw(shapes(max_rows, max_classes, min_classes))
    student = draw(logits(shape, neg_inf=neg_inf))
    teacher = draw(logits(shape, neg_inf=neg_inf, neg_inf_mask=np.isneginf(student)))
    labels = draw(labels_for(student, allow_ignored=False))
    # about one row in five without a label (drawn from a seed: hypothesis' integers lean to their minimum)
    unlabeled = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(labels.shape) < 0.2
    labels = np.where(unlabeled, -100, labels)
    kw = dict(T=draw(temperatures()),
              alpha_tckd=draw(st.one_of(st.sampled_from([1.0, 1.0, 2.5, 0.0]), st.floats(0.05, 4.0))),
              beta_nckd=draw(st.one_of(st.sampled_from([8.0, 8.0, 1.0, 0.0]), st.floats(0.05, 10.0))),
              scale_t2=draw(st.booleans()), reduction=draw(st.sampled_from(reductions)),
              mask=draw(st.one_of(st.none(), st.none(), masks(shape[:-1]))))
    return student, teacher, labels, kw


@st.composite
def dkd_with_upstream(draw, **kw):
    s, t, y, opts = draw(dkd_cases(**kw))
    g = draw(upstreams(s.shape[:-1])) if opts["reduction"] == "none" else draw(upstreams(())).item()
    return s, t, y, opts, g


def spread(x):
    """Per row, max - min over the finite logits."""
    fin = np.isfinite(x)
    hi = np.max(np.where(fin, x, -np.inf), axis=-1)
    lo = np.min(np.where(fin, x, np.inf), axis=-1)
    return (hi - lo).reshape(-1)


def floor_of(s, t, y, opts, g, eps):
    """Finite-difference noise floor (see tests/test_kd.py): each row sums terms of the size of its
    log-probabilities, (spread of s + spread of t) / T + log C, weighted by tau (alpha + beta), that
    cancel to a small KL; rounding noise scales with them, not with the loss."""
    _, cache = dkd_forward(s, t, y, **opts)
    n = max(1, int(cache.valid.sum()))
    w = np.abs(np.asarray(g)).reshape(-1) if opts["reduction"] == "none" else np.full(cache.valid.size, abs(g))
    if opts["reduction"] == "batchmean":
        w = w / n
    w = w * cache.valid
    T = opts["T"]
    size = (spread(s) + spread(t)) / T + np.log(s.shape[-1]) + 1
    M = cache.tau * (opts["alpha_tckd"] + opts["beta_nckd"]) * float(np.sum(w * size))
    return max(1e-4, 1.5 * 8 * U * M / eps / RTOL)


# ---------------------------------------------------------------- gradients (float64, central differences)

@given(dkd_with_upstream())
def test_student_gradient(case):
    s, t, y, opts, g = case
    _, cache = dkd_forward(s, t, y, **opts)
    ds = dkd_backward(g, cache)
    eps = 1e-3 * min(opts["T"], 1)
    res = check_vjp(lambda x: dkd_loss(x, t, y, **opts), [s], g, [ds], eps=eps,
                    floor=floor_of(s, t, y, opts, g, eps))
    assert res.max_rel <= RTOL, res


@given(dkd_with_upstream())
def test_teacher_gradient(case):
    s, t, y, opts, g = case
    _, cache = dkd_forward(s, t, y, **opts)
    ds, dt = dkd_backward(g, cache, teacher_grad=True)
    np.testing.assert_array_equal(ds, dkd_backward(g, cache))
    eps = 2e-4 * min(opts["T"], 1)
    res = check_vjp(lambda x: dkd_loss(s, x, y, **opts), [t], g, [dt], eps=eps,
                    floor=floor_of(s, t, y, opts, g, eps))
    assert res.max_rel <= RTOL, res


# ---------------------------------------------------------------- invariants

@given(dkd_cases())
def test_invariants(case):
    s, t, y, opts = case
    opts = {**opts, "reduction": "none"}
    rows, cache = dkd_forward(s, t, y, **opts)
    valid = cache.valid.reshape(rows.shape)
    assert rows.shape == s.shape[:-1] and np.all(rows[~valid] == 0)
    tau = cache.tau
    # the size of each row's terms (its log-probabilities), which cancel to a small KL
    size = tau * (opts["alpha_tckd"] + opts["beta_nckd"]) * (1 + (spread(s) + spread(t)).reshape(rows.shape)
                                                             / opts["T"])
    # both terms are KL divergences: loss >= 0 up to rounding
    assert np.all(rows >= -1e-12 * size)
    # gradient rows sum to zero (student and teacher); rows that do not count get exactly zero
    g = np.random.default_rng(0).standard_normal(rows.shape)
    ds, dt = dkd_backward(g, cache, teacher_grad=True)
    for d in (ds, dt):
        scale = 1 + np.abs(d).max(initial=0) * s.shape[-1]
        np.testing.assert_allclose(d.sum(-1), 0.0, atol=1e-12 * scale)
        assert np.all(d[~valid] == 0) and np.all(np.isfinite(d))
    # adding a constant to a row of the student, and another to the teacher's, changes nothing
    shift = np.linspace(-30, 30, rows.size).reshape(rows.shape + (1,))
    rows2 = dkd_loss(s + shift, t - 2 * shift, y, **opts)
    assert np.all(np.abs(rows2 - rows) <= 1e-12 * size + 1e-9 * np.abs(rows))


@given(dkd_cases(reductions=("none",)))
def test_kd_splits_into_tckd_and_nckd(case):
    """The paper's Eq. 4: KL(q || p) = TCKD + (1 - q_y) NCKD, values and student gradients, against
    minikd's KD loss (an independent implementation of the conventions)."""
    s, t, y, opts = case
    opts = {**opts, "alpha_tckd": 1.0, "beta_nckd": 0.0}
    tckd, ct = dkd_forward(s, t, y, **opts)
    nckd, cn = dkd_forward(s, t, y, **{**opts, "alpha_tckd": 0.0, "beta_nckd": 1.0})
    kd, ck = kd_forward(s, t, y, T=opts["T"], alpha=1.0, scale_t2=opts["scale_t2"], reduction="none",
                        mask=opts["mask"])
    np.testing.assert_array_equal(ct.valid, ck.valid)        # the same rows count
    w = (1 - ct.qy).reshape(kd.shape)
    size = ct.tau * (1 + (spread(s) + spread(t)).reshape(kd.shape) / opts["T"])
    assert np.all(np.abs(kd - (tckd + w * nckd)) <= 1e-12 * size)
    g = np.random.default_rng(1).standard_normal(kd.shape)
    expect = dkd_backward(g, ct) + w[..., None] * dkd_backward(g, cn)
    np.testing.assert_allclose(kd_backward(g, ck), expect, atol=1e-13 * (1 + np.abs(expect).max(initial=0)))


def test_zero_at_student_equals_teacher():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((6, 7)) * 10
    s[1, 3] = -np.inf
    y = np.array([0, 1, 2, 0, 4, 6])
    loss, cache = dkd_forward(s, s.copy(), y, T=3.0)
    ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
    assert abs(loss) < 1e-13 and np.abs(ds).max() < 1e-14 and np.abs(dt).max() < 1e-14


# ---------------------------------------------------------------- values by hand

def test_worked_example():
    """p = (1/2, 1/4, 1/4), q = (1/4, 1/4, 1/2), y = 0: b_p = (1/2, 1/2), b_q = (1/4, 3/4), p^ = (1/2, 1/2),
    q^ = (1/3, 2/3).  TCKD = 1/4 log(1/2) + 3/4 log(3/2) = 3/4 log 3 - log 2;
    NCKD = 1/3 log(2/3) + 2/3 log(4/3) = 5/3 log 2 - log 3; with alpha = 1, beta = 8:
    loss = 37/3 log 2 - 29/4 log 3.  Student: (p_y - q_y)(e_y - p^) + 8 (p^ - q^)
    = 1/4 (1, -1/2, -1/2) + 8 (0, 1/6, -1/6) = (1/4, 29/24, -35/24).  Teacher: q_y (1 - q_y)(g0 - g1)(e_y - q^)
    with g0 - g1 = log(1/2) - log(3/2) = -log 3, plus 8 q^ (h - q^.h) with h = (log 2/3, log 4/3):
    8 (-2/9 log 2, 2/9 log 2); together (-3/16 log 3, 1/16 log 3 - 16/9 log 2, 1/8 log 3 + 16/9 log 2)."""
    l2, l3 = np.log(2), np.log(3)
    loss_1 = 37 / 3 * l2 - 29 / 4 * l3
    ds_1 = np.array([1 / 4, 29 / 24, -35 / 24])
    dt_1 = np.array([-3 / 16 * l3, l3 / 16 - 16 / 9 * l2, l3 / 8 + 16 / 9 * l2])
    for T in (1.0, 2.0):   # logits scaled by T: the same p and q; loss x T^2, gradients x T^2 / T
        s, t = T * np.log([[2.0, 1, 1]]), T * np.log([[1.0, 1, 2]])
        loss, cache = dkd_forward(s, t, np.array([0]), T=T, alpha_tckd=1.0, beta_nckd=8.0)
        ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
        assert abs(loss - T**2 * loss_1) <= 1e-14 * T**2
        np.testing.assert_allclose(ds[0], T * ds_1, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(dt[0], T * dt_1, rtol=1e-13, atol=1e-15)
    # the terms alone, without T^2 scaling, and the target in another column
    s, t = np.log([[1.0, 2, 1]]), np.log([[1.0, 1, 2]])
    y = np.array([1])   # p = (1/4, 1/2, 1/4), q = (1/4, 1/4, 1/2): b_q = (1/4, 3/4), q^ = (1/3, _, 2/3)
    assert abs(dkd_loss(s, t, y, T=1.0, alpha_tckd=1.0, beta_nckd=0.0, scale_t2=False) - (0.75 * l3 - l2)) < 1e-15
    assert abs(dkd_loss(s, t, y, T=1.0, alpha_tckd=0.0, beta_nckd=1.0, scale_t2=False) - (5 / 3 * l2 - l3)) < 1e-15


def test_two_classes_is_tckd_alone():
    """C = 2: the non-target distribution is one class (NCKD = 0); TCKD is the binary KL of
    sigmoid((s_y - s_o) / T) against the teacher's, and the gradient is tau/T alpha (p_y - q_y)(1, -1)."""
    a, b, T, alpha = 1.3, -0.4, 2.5, 0.6
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p, q = sig(a / T), sig(b / T)
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    s, t = np.array([[0.0, a]]), np.array([[0.0, b]])
    for beta in (0.0, 8.0):
        loss, cache = dkd_forward(s, t, np.array([1]), T=T, alpha_tckd=alpha, beta_nckd=beta)
        assert abs(loss - alpha * T**2 * kl) <= 1e-14
        d = alpha * T * (p - q)
        np.testing.assert_allclose(dkd_backward(1.0, cache), [[-d, d]], rtol=1e-13)
    assert dkd_loss(s, t, np.array([1]), T=T, alpha_tckd=0.0, beta_nckd=1.0) == 0


def test_one_class_is_zero():
    loss, cache = dkd_forward(np.array([[3.0], [-1.0]]), np.array([[1.0], [2.0]]), np.array([0, 0]), T=2.0)
    ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
    assert loss == 0 and not ds.any() and not dt.any()


def test_teacher_without_non_target_mass():
    """Teacher logits -inf at every non-target class: q_y = 1, NCKD = 0 with a zero gradient, and
    TCKD = -log p_y with gradient (p_y - 1)(e_y - p^)."""
    s = np.array([[1.0, 2.0, 3.0]])
    t = np.array([[0.5, -np.inf, -np.inf]])
    p = np.exp(s[0]) / np.exp(s[0]).sum()
    p_hat = np.array([0, p[1], p[2]]) / (1 - p[0])
    loss, cache = dkd_forward(s, t, np.array([0]), T=1.0, alpha_tckd=1.0, beta_nckd=8.0)
    assert abs(loss + np.log(p[0])) <= 1e-14 * abs(np.log(p[0]))
    np.testing.assert_allclose(dkd_backward(1.0, cache), [(p[0] - 1) * (np.eye(3)[0] - p_hat)], rtol=1e-14)
    ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
    assert not dt.any()
    assert dkd_loss(s, t, np.array([0]), T=1.0, alpha_tckd=0.0, beta_nckd=8.0) == 0


def test_neg_inf_classes():
    """Shared padding counts 0; the teacher's mass where the student has none gives the true +inf."""
    s = np.array([[1.0, -np.inf, 0.5, 2.0]])
    t = np.array([[0.2, -np.inf, 0.1, -1.0]])
    y = np.array([2])
    loss, cache = dkd_forward(s, t, y, T=2.0)
    ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
    assert np.isfinite(loss) and ds[0, 1] == 0 and dt[0, 1] == 0
    ref = dkd_loss(s[:, [0, 2, 3]], t[:, [0, 2, 3]], np.array([1]), T=2.0)
    assert abs(loss - ref) <= 1e-14 * ref
    # the label's class is -inf in the student, the teacher gives it mass: TCKD = +inf (the true value)
    s_y = np.array([[-np.inf, 1.0, 0.0]])
    t_y = np.array([[0.0, 1.0, 0.0]])
    loss, cache = dkd_forward(s_y, t_y, np.array([0]), T=1.0)
    assert loss == np.inf
    assert np.all(np.isfinite(dkd_backward(1.0, cache)))           # the formula at p_y = 0
    assert np.isfinite(dkd_loss(s_y, t_y, np.array([0]), T=1.0, alpha_tckd=0.0))   # NCKD alone is finite
    # ... and when the teacher does not either, both terms are finite
    assert np.isfinite(dkd_loss(s_y, np.array([[-np.inf, 1.0, 0.0]]), np.array([0]), T=1.0))
    # a non-target class the student puts at -inf and the teacher does not: NCKD = +inf
    assert dkd_loss(np.array([[0.0, -np.inf, 1.0]]), np.array([[0.0, 0.0, 1.0]]), np.array([0]), T=1.0,
                    alpha_tckd=0.0) == np.inf


def test_log_of_one_minus_p_y_never_underflows():
    """s = (800, 0, 0), t = (0, 0, 0), y = 0: 1 - p_y = 2 e^-800 underflows float64, yet
    TCKD = 1/3 log(1/3) + 2/3 log((2/3) / (2 e^-800)) = 1600/3 - log 3 exactly (log p_y = -2e^-800 = -0),
    NCKD = 0 (p^ = q^ = (1/2, 1/2)), student gradient (p_y - q_y)(e_y - p^) = 2/3 (1, -1/2, -1/2)."""
    s, t, y = np.array([[800.0, 0, 0]]), np.zeros((1, 3)), np.array([0])
    loss, cache = dkd_forward(s, t, y, T=1.0, alpha_tckd=1.0, beta_nckd=8.0)
    ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
    assert abs(loss - (1600 / 3 - np.log(3))) <= 1e-15 * loss
    np.testing.assert_allclose(ds, [[2 / 3, -1 / 3, -1 / 3]], rtol=1e-15)
    # teacher: q_y (1 - q_y)(g0 - g1)(e_y - q^) with g0 - g1 = log(1/3) - log(2/3) - 800 + log 2
    np.testing.assert_allclose(dt, 2 / 9 * (-800 - np.log(3) + np.log(3)) * np.array([[1, -0.5, -0.5]]), rtol=1e-14)


def test_confident_rows_keep_their_gradient():
    """p_y = 1 - 2e^-50 and q_y = 1 - 2e^-60 are both 1 in float64, yet p_y - q_y = -2(e^-50 - e^-60)
    is not 0: it is formed from 1 - q_y and 1 - p_y, each the exponential of an exact log."""
    s, t, y = np.array([[50.0, 0, 0]]), np.array([[60.0, 0, 0]]), np.array([0])
    loss, cache = dkd_forward(s, t, y, T=1.0, alpha_tckd=1.0, beta_nckd=0.0)
    d = -2 * (np.exp(-50) - np.exp(-60))
    np.testing.assert_allclose(dkd_backward(1.0, cache), d * np.array([[1, -0.5, -0.5]]), rtol=1e-9)
    # TCKD = q_y log(q_y / p_y) + (1 - q_y) log((1 - q_y) / (1 - p_y)) ~ 2e^-50 - 2e^-60 (1 + 10)
    assert abs(loss - 2 * (np.exp(-50) - 11 * np.exp(-60))) <= 1e-9 * loss


def test_target_excluded_exactly_at_any_gap():
    """The non-target distributions do not depend on the target's logit, however large: NCKD of
    (G, 0, 1) against (H, 1, 0) equals KL(softmax(1, 0) || softmax(0, 1)) for every G, H."""
    a, b = np.exp([0.0, 1]) / np.exp([0.0, 1]).sum(), np.exp([1.0, 0]) / np.exp([1.0, 0]).sum()
    ref = np.sum(b * np.log(b / a))
    for G, H, T in ((0.0, 5.0, 1.0), (2000.0, 1990.0, 1.0), (150.0, -40.0, 0.1), (-3000.0, 5000.0, 1.0)):
        s, t = np.array([[G, 0, T]]), np.array([[H, T, 0]])
        nckd = dkd_loss(s, t, np.array([0]), T=T, alpha_tckd=0.0, beta_nckd=1.0, scale_t2=False)
        assert abs(nckd - ref) <= 1e-14 * ref, (G, H, T)


def test_float32_stays_float32():
    rng = np.random.default_rng(6)
    s = (rng.standard_normal((8, 10)) * 1e4).astype(np.float32)
    t = (rng.standard_normal((8, 10)) * 1e4).astype(np.float32)
    y = rng.integers(0, 10, 8)
    for T in (0.01, 1000.0):
        loss, cache = dkd_forward(s, t, y, T=T)
        ds, dt = dkd_backward(np.float32(1.0), cache, teacher_grad=True)
        assert loss.dtype == ds.dtype == dt.dtype == np.float32
        assert np.isfinite(loss) and np.all(np.isfinite(ds)) and np.all(np.isfinite(dt))
        ref, cref = dkd_forward(s.astype(np.float64), t.astype(np.float64), y, T=T)
        dsr, dtr = dkd_backward(1.0, cref, teacher_grad=True)
        assert relative_error(loss, ref) <= 1e-4
        assert relative_error(ds, dsr) <= 1e-4 and relative_error(dt, dtr) <= 1e-4


def test_inputs_not_mutated():
    rng = np.random.default_rng(5)
    s, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    s0, t0 = s.copy(), t.copy()
    _, cache = dkd_forward(s, t, np.array([0, 1, 2]), T=2.0)
    dkd_backward(1.0, cache, teacher_grad=True)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(t, t0)


# ---------------------------------------------------------------- rows and reductions: KD's conventions

def test_reductions_masks_and_sequences_like_kd():
    rng = np.random.default_rng(4)
    s, t = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    y = rng.integers(0, 5, (2, 3))
    y[0, 1] = -100
    mask = np.ones((2, 3), dtype=bool)
    mask[1, 2] = False
    kw = dict(T=2.0, alpha_tckd=0.7, beta_nckd=3.0, mask=mask)
    rows = dkd_loss(s, t, y, reduction="none", **kw)
    assert rows.shape == (2, 3) and rows[0, 1] == 0 and rows[1, 2] == 0 and np.all(rows[mask & (y != -100)] > 0)
    # the same rows count as in KD
    kd_rows = kd_loss(s, t, y, T=2.0, alpha=1.0, reduction="none", mask=mask)
    np.testing.assert_array_equal(rows != 0, kd_rows != 0)
    assert abs(dkd_loss(s, t, y, reduction="sum", **kw) - rows.sum()) <= 1e-15 * rows.sum()
    assert abs(dkd_loss(s, t, y, **kw) - rows.sum() / 4) <= 1e-15 * rows.sum()
    flat = dkd_loss(s.reshape(6, 5), t.reshape(6, 5), y.reshape(6), **{**kw, "mask": mask.reshape(6)})
    assert abs(dkd_loss(s, t, y, **kw) - flat) <= 1e-15 * flat
    _, g = dkd_loss_and_grad(s, t, y, **kw)
    assert g.shape == s.shape and not g[0, 1].any() and not g[1, 2].any()
    # "none" with ones upstream is the gradient of the sum; "batchmean" is that / 4
    _, g_none = dkd_loss_and_grad(s, t, y, reduction="none", **kw)
    _, g_sum = dkd_loss_and_grad(s, t, y, reduction="sum", **kw)
    np.testing.assert_allclose(g_none, g_sum, rtol=1e-15)
    np.testing.assert_allclose(g, g_sum / 4, rtol=1e-15)
    # another ignore_index
    y2 = np.where(y == -100, 7, y)
    assert abs(dkd_loss(s, t, y2, ignore_index=7, **kw) - flat) <= 1e-15 * flat


def test_padding_rows_may_hold_anything():
    s = np.array([[1.0, 2.0, 0.0], [np.nan, np.inf, 0.0], [-np.inf] * 3])
    t = np.array([[0.0, 1.0, 0.5], [np.nan, -np.inf, 0.0], [np.inf] * 3])
    y, m = np.array([1, -100, 0]), np.array([True, True, False])
    loss, cache = dkd_forward(s, t, y, T=2.0, mask=m)
    ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
    assert np.isfinite(loss) and np.all(np.isfinite(ds)) and np.all(np.isfinite(dt))
    assert not ds[1:].any() and not dt[1:].any()
    assert loss == dkd_loss(s[:1], t[:1], y[:1], T=2.0)


def test_no_valid_rows_gives_zero():
    s = np.zeros((2, 3))
    loss, g = dkd_loss_and_grad(s, s, np.array([-100, -100]), T=1.0)
    assert loss == 0 and not g.any()


# ---------------------------------------------------------------- errors

S, TT, Y = np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 1])


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: dkd_loss(S, TT, None, T=1), ValueError, "labels: required by DKD"),
    (lambda: dkd_loss(S, TT, Y, T=1, reduction="mean"), ValueError, "divides by N\\*C"),
    (lambda: dkd_loss(S, TT, Y, T=1, reduction="avg"), ValueError, "reduction: expected"),
    (lambda: dkd_loss(S, TT, np.array([0, 3]), T=1), ValueError,
     "labels: row 1 has label 3, expected 0..2 or ignore_index=-100"),
    (lambda: dkd_loss(S, TT, np.array([0.0, 1.0]), T=1), TypeError, "labels: expected an integer"),
    (lambda: dkd_loss(S, TT, np.array([0]), T=1), ValueError, "labels: expected shape \\(2,\\)"),
    (lambda: dkd_loss(S, np.zeros((2, 4)), Y, T=1), ValueError, "teacher: expected the student's shape"),
    (lambda: dkd_loss(S, TT.astype(np.float32), Y, T=1), TypeError, "teacher: dtype float32"),
    (lambda: dkd_loss(S, TT, Y, T=0), ValueError, "T: the temperature"),
    (lambda: dkd_loss(S, TT, Y, T=1, alpha_tckd=-1.0), ValueError, "alpha_tckd: expected a finite number >= 0"),
    (lambda: dkd_loss(S, TT, Y, T=1, beta_nckd=float("nan")), ValueError, "beta_nckd: expected a finite number"),
    (lambda: dkd_loss(S, TT, Y, T=1, beta_nckd="8"), ValueError, "beta_nckd: expected a finite number >= 0, got '8'"),
    (lambda: dkd_loss(S, TT, Y, T=1, beta_nckd=None), ValueError, "beta_nckd: expected a finite number"),
    (lambda: dkd_loss(np.array([[0.0, np.nan, 1]] * 2), TT, Y, T=1), ValueError, "student: row 0 contains NaN"),
    (lambda: dkd_loss(S, np.array([[0.0, 1, 2], [-np.inf] * 3]), Y, T=1), ValueError,
     "teacher: row 1 is entirely -inf"),
    (lambda: dkd_loss(S, np.array([[0.0, np.inf, 2], [0.0] * 3]), Y, T=1), ValueError,
     "teacher: row 0 contains \\+inf"),
    (lambda: dkd_loss(S, TT, Y, T=1, mask=np.array([1, 0])), TypeError, "mask: expected a boolean"),
    (lambda: dkd_loss(np.zeros(3), np.zeros(3), np.array(0), T=1), ValueError, "student: expected at least 2"),
    (lambda: dkd_backward(np.ones(3), dkd_forward(S, TT, Y, T=1, reduction="none")[1]),
     ValueError, "dloss: reduction='none' needs"),
    (lambda: dkd_backward(np.ones(2), dkd_forward(S, TT, Y, T=1)[1]), ValueError, "dloss: reduction='batchmean'"),
])
def test_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# ---------------------------------------------------------------- PyTorch: mdistiller's formulation

@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(2, 12), st.sampled_from([0.1, 1.0, 4.0]),
       st.one_of(st.sampled_from([1.0, 4.0]), st.floats(0.3, 10.0)),
       st.sampled_from([(1.0, 8.0), (1.0, 0.0), (0.0, 1.0)]) | st.tuples(st.floats(0, 3), st.floats(0, 10)))
def test_matches_mdistiller_in_torch(seed, n, C, scale, T, weights):
    """Values and both gradients (torch autograd, float64) where the -1000 masking does not matter:
    scaled logit gaps far below 1000 (the target's leftover weight exp(gap - 1000) under 1e-200)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, C)) * scale
    t = rng.standard_normal((n, C)) * scale
    out = rng.random((n, C)) < 0.15
    s = np.where(out, 20 * s, s)
    y = rng.integers(0, C, n)
    assume(max(spread(s).max(), spread(t).max()) / T < 500)
    alpha, beta = weights
    S = torch.tensor(s, requires_grad=True)
    tckd, nckd = reference_dkd_terms(torch, S, torch.tensor(t), torch.tensor(y), T)   # teacher constant
    L = alpha * tckd + beta * nckd
    L.backward()
    Tt = torch.tensor(t, requires_grad=True)   # the teacher gradient: the log_target form (see above)
    tckd_l, nckd_l = reference_dkd_terms(torch, torch.tensor(s), Tt, torch.tensor(y), T, log_target=True)
    L_l = alpha * tckd_l + beta * nckd_l
    L_l.backward()
    loss, cache = dkd_forward(s, t, y, T=T, alpha_tckd=alpha, beta_nckd=beta)   # batchmean: every row counts
    ds, dt = dkd_backward(1.0, cache, teacher_grad=True)
    # natural scales: a KL of nearly equal rows cancels far below its terms (log-probabilities ~ spread/T)
    tau = T * T * (alpha + beta)
    size = tau * float(np.mean(1 + (spread(s) + spread(t)) / T))
    assert relative_error(loss, L.item(), 1e-3 * size) <= 1e-10
    assert relative_error(loss, L_l.item(), 1e-3 * size) <= 1e-10
    assert relative_error(ds, S.grad.numpy(), 1e-3 * tau / T / n) <= 1e-10
    assert relative_error(dt, Tt.grad.numpy(), 1e-3 * tau / T / n) <= 1e-10
    # "sum" is mdistiller's loss times the batch size
    assert relative_error(dkd_loss(s, t, y, T=T, alpha_tckd=alpha, beta_nckd=beta, reduction="sum"),
                          n * L.item(), 1e-3 * size * n) <= 1e-10


def test_where_mdistiller_differs():
    """Scaled gaps near and above 1000: mdistiller's target leaks into its non-target softmaxes (NCKD
    wrong), its binary log underflows (TCKD inf), and padded classes give NaN; minikd's values are the
    exact ones (computed by hand above)."""
    torch = pytest.importorskip("torch")

    def md(s, t, y, alpha, beta, T=1.0):
        tckd, nckd = reference_dkd_terms(torch, torch.tensor(s), torch.tensor(t), torch.tensor(y), T)
        return float((alpha * tckd if alpha else 0) + (beta * nckd if beta else 0))
    # NCKD at a scaled gap of 2000 (logits (2000, 0, 1) vs (1990, 1, 0)): mdistiller's "non-target"
    # softmaxes are almost all target, its NCKD ~ 0; the exact NCKD is KL(softmax(1, 0) || softmax(0, 1))
    a, b = np.exp([0.0, 1]) / np.exp([0.0, 1]).sum(), np.exp([1.0, 0]) / np.exp([1.0, 0]).sum()
    exact = np.sum(b * np.log(b / a))
    s, t, y = np.array([[2000.0, 0, 1]]), np.array([[1990.0, 1, 0]]), np.array([0])
    assert abs(dkd_loss(s, t, y, T=1.0, alpha_tckd=0.0, beta_nckd=1.0) - exact) <= 1e-14 * exact
    assert md(s, t, y, 0.0, 1.0) < 1e-100 * exact
    assert np.isnan(md(s, t, y, 1.0, 0.0))   # and its TCKD: 1 - p_y, 1 - q_y ~ e^-2000 are 0, 0 * log 0 NaN
    # the same at T = 0.1 with logit gaps of 200: the gap is in scaled units
    assert md(s / 10, t / 10, y, 0.0, 1.0, T=0.1) < 1e-100
    # gap 960 (scaled): the leak is still below float64's resolution, the two agree
    s9, t9 = np.array([[960.0, 0, 1]]), np.array([[950.0, 1, 0]])
    assert abs(md(s9, t9, y, 0.0, 1.0) - exact) <= 1e-13 * exact
    # TCKD with 1 - p_y = 2e-800: mdistiller's log of the summed probabilities is log 0
    s8, t8 = np.array([[800.0, 0, 0]]), np.zeros((1, 3))
    assert md(s8, t8, y, 1.0, 0.0) == np.inf
    assert abs(dkd_loss(s8, t8, y, T=1.0, alpha_tckd=1.0, beta_nckd=0.0) - (1600 / 3 - np.log(3))) < 1e-12
    # a padded class (-inf in both): NaN there, 0 here
    sp, tp = np.array([[1.0, -np.inf, 0.5, 2.0]]), np.array([[0.2, -np.inf, 0.1, -1.0]])
    assert np.isnan(md(sp, tp, np.array([2]), 1.0, 8.0))
    assert np.isfinite(dkd_loss(sp, tp, np.array([2]), T=1.0))
    # the teacher gradient of its formulation (teacher probabilities to F.kl_div) is NaN everywhere
    Tt = torch.tensor([[0.2, 1.0, 0.1]], requires_grad=True)
    tckd, nckd = reference_dkd_terms(torch, torch.tensor([[1.0, 0.0, 0.5]]), Tt, torch.tensor([0]), 1.0)
    (tckd + 8 * nckd).backward()
    assert torch.isnan(Tt.grad).all()
