"""Hinton KD loss: gradient properties, invariants, limits, values by hand, every error."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minikd as mk
from minikd.gradcheck import check_vjp
from minikd.testing import kd_cases, upstreams

RTOL = 1e-7


def kwargs_of(case, **over):
    return case.options(**over)


def floor_of(case, g, eps):
    """Finite-difference noise floor. The loss sums terms of size alpha*tau*(H(q) + H(q, p)) +
    (1 - alpha)*CE per row that cancel (KL ~ 0 at s = t), and log-softmax forms (x - max x)/T of
    size R/T (R the spread of the finite logits), so rounding noise scales with those terms, not
    with the loss: about 1.5 * 8 * u * M / h with M their weighted sum."""
    rows = mk.kd_loss(case.student, case.teacher, case.labels,
                      **kwargs_of(case, reduction="none", kind="ce"))
    w = np.abs(g) if case.reduction == "none" else np.full(rows.shape, abs(g))
    if case.reduction == "batchmean":
        w = w / max(1, int(np.count_nonzero(rows)))
    tau = case.T**2 if case.scale_t2 else 1.0
    finite = np.isfinite(case.student)
    R = float(np.max(np.where(finite, case.student - np.max(case.student, -1, keepdims=True), 0) * -1,
                     initial=0.0))
    M = 2 * float(np.sum(w * np.abs(rows))) + float(np.max(w, initial=0)) * (
        case.alpha * tau * R / case.T + (1 - case.alpha) * R)
    return max(1e-4, 1.5 * 8 * 1.1e-16 * M / eps / RTOL)


@st.composite
def kd_with_upstream(draw, **kw):
    case = draw(kd_cases(**kw))
    lead = case.student.shape[:-1]
    g = draw(upstreams(lead)) if case.reduction == "none" else draw(upstreams(())).item()
    return case, g


@given(kd_with_upstream())
def test_student_gradient(cg):
    case, g = cg
    kw = kwargs_of(case)
    _, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    ds = mk.kd_backward(g, cache)
    eps = 1e-3 * min(case.T, 1)
    res = check_vjp(lambda s: mk.kd_loss(s, case.teacher, case.labels, **kw), [case.student], g,
                    [ds], eps=eps, floor=floor_of(case, g, eps))
    assert res.max_rel <= RTOL, res


@given(kd_with_upstream(teacher_forms=("logits", "log_probs")))
def test_teacher_gradient(cg):
    case, g = cg
    kw = kwargs_of(case)
    _, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    _, dt = mk.kd_backward(g, cache, teacher_grad=True)
    eps = 2e-4 * min(case.T, 1)
    res = check_vjp(lambda t: mk.kd_loss(case.student, t, case.labels, **kw), [case.teacher], g,
                    [dt], eps=eps, floor=floor_of(case, g, eps))
    assert res.max_rel <= RTOL, res


@given(kd_cases())
def test_invariants(case):
    kw = kwargs_of(case, reduction="none")
    rows, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    valid = cache.valid.reshape(rows.shape)
    assert np.all(rows[~valid] == 0)
    # KL >= 0 and the hard CE >= 0, so every row loss is >= 0 (up to rounding)
    if case.kind == "kl":
        assert np.all(rows >= -1e-12 * (1 + case.T**2))
    # rows of the gradient sum to zero; rows that do not count get exactly zero
    g = mk.kd_backward(np.random.default_rng(0).standard_normal(rows.shape), cache)
    scale = 1 + np.abs(g).max() * case.student.shape[-1]
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-12 * scale)
    assert np.all(g[~valid] == 0)
    # adding a constant to a row of the student (and of teacher logits) changes nothing
    shift = np.linspace(-30, 30, rows.size).reshape(rows.shape + (1,))
    t2 = case.teacher + shift if case.teacher_as == "logits" else case.teacher
    rows2 = mk.kd_loss(case.student + shift, t2, case.labels, **kw)
    np.testing.assert_allclose(rows2, rows, rtol=1e-9, atol=1e-9 * (1 + case.T**2))


@given(kd_cases(teacher_forms=("logits",)))
def test_kl_vs_ce_kind(case):
    """kind='ce' = kind='kl' + alpha*tau*H(q), with the same student gradient."""
    kw = kwargs_of(case, reduction="none")
    kl, ckl = mk.kd_forward(case.student, case.teacher, case.labels, **{**kw, "kind": "kl"})
    ce, cce = mk.kd_forward(case.student, case.teacher, case.labels, **{**kw, "kind": "ce"})
    q = mk.softmax(case.teacher, case.T)
    H = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), axis=-1)
    valid = ckl.valid.reshape(kl.shape)
    np.testing.assert_allclose(ce - kl, np.where(valid, case.alpha * ckl.tau * H, 0),
                               atol=1e-10 * (1 + case.T**2) * (1 + np.abs(ce).max()))
    g = np.random.default_rng(1).standard_normal(kl.shape)
    np.testing.assert_allclose(mk.kd_backward(g, ckl), mk.kd_backward(g, cce), atol=1e-14)


def test_zero_at_student_equals_teacher():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((5, 7)) * 10
    loss, grad = mk.kd_loss_and_grad(s, s.copy(), T=3.0, alpha=1.0)
    assert abs(loss) < 1e-14 and np.abs(grad).max() < 1e-14


def test_two_class_closed_form():
    a, b, T, alpha = 1.3, -0.4, 2.5, 0.6
    s, t, y = np.array([[a, 0.0]]), np.array([[b, 0.0]]), np.array([0])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p, q = sig(a / T), sig(b / T)
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    ce = np.log1p(np.exp(-a))
    loss, grad = mk.kd_loss_and_grad(s, t, y, T=T, alpha=alpha)
    np.testing.assert_allclose(loss, alpha * T**2 * kl + (1 - alpha) * ce, rtol=1e-14)
    da = alpha * T * (p - q) + (1 - alpha) * (sig(a) - 1)
    np.testing.assert_allclose(grad, [[da, -da]], rtol=1e-13)
    # scale_t2=False and kind="ce": the soft cross-entropy -q log p - (1-q) log(1-p)
    loss_ce = mk.kd_loss(s, t, y, T=T, alpha=alpha, kind="ce", scale_t2=False)
    np.testing.assert_allclose(loss_ce, alpha * -(q * np.log(p) + (1 - q) * np.log(1 - p))
                               + (1 - alpha) * ce, rtol=1e-14)


def test_high_temperature_limit_is_logit_matching():
    """T**2 KL(q||p) -> |(s - mean s) - (t - mean t)|^2 / (2C); T (p - q) -> that difference / C."""
    rng = np.random.default_rng(3)
    s, t = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    d = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
    loss, grad = mk.kd_loss_and_grad(s, t, T=1e4, alpha=1.0, reduction="none")
    np.testing.assert_allclose(loss, (d**2).sum(-1) / (2 * 6), rtol=1e-3)
    np.testing.assert_allclose(grad, d / 6, atol=1e-4)  # error O(|d|^2 / T)


def test_low_temperature_limit():
    """T KL(q||p) -> max s - s[argmax t] as T -> 0 (distinct logits)."""
    s = np.array([[0.3, 1.7, -0.2, 0.9]])
    t = np.array([[2.0, 0.1, 0.5, 0.4]])
    T = 1e-3
    kl = mk.kd_loss(s, t, T=T, alpha=1.0, scale_t2=False)
    np.testing.assert_allclose(T * kl, 1.7 - 0.3, rtol=1e-6)
    np.testing.assert_allclose(mk.softmax(s, T), [[0, 1, 0, 0]], atol=1e-100)


def test_reductions_and_sequences_agree():
    rng = np.random.default_rng(4)
    s, t = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    y = rng.integers(0, 5, (2, 3))
    y[0, 1] = -100
    mask = np.ones((2, 3), dtype=bool)
    mask[1, 2] = False
    kw = dict(T=2.0, alpha=0.3, mask=mask)
    rows = mk.kd_loss(s, t, y, reduction="none", **kw)
    assert rows.shape == (2, 3) and rows[0, 1] == 0 and rows[1, 2] == 0
    np.testing.assert_allclose(mk.kd_loss(s, t, y, reduction="sum", **kw), rows.sum(), rtol=1e-15)
    np.testing.assert_allclose(mk.kd_loss(s, t, y, **kw), rows.sum() / 4, rtol=1e-15)
    flat = mk.kd_loss(s.reshape(6, 5), t.reshape(6, 5), y.reshape(6), mask=mask.reshape(6),
                      T=2.0, alpha=0.3)
    np.testing.assert_allclose(mk.kd_loss(s, t, y, **kw), flat, rtol=1e-15)
    _, g = mk.kd_loss_and_grad(s, t, y, **kw)
    assert g.shape == s.shape and np.all(g[0, 1] == 0) and np.all(g[1, 2] == 0)


def test_padding_rows_may_hold_anything():
    s = np.array([[1.0, 2.0], [np.nan, np.inf]])
    t = np.array([[0.0, 1.0], [np.nan, -np.inf]])
    loss, g = mk.kd_loss_and_grad(s, t, np.array([1, -100]), T=2.0, alpha=0.5)
    assert np.isfinite(loss) and np.all(np.isfinite(g)) and np.all(g[1] == 0)
    ref = mk.kd_loss(s[:1], t[:1], np.array([1]), T=2.0, alpha=0.5)
    np.testing.assert_allclose(loss, ref, rtol=1e-15)


def test_no_valid_rows_gives_zero():
    s = np.zeros((2, 3))
    loss, g = mk.kd_loss_and_grad(s, s, np.array([-100, -100]), T=1.0, alpha=0.5)
    assert loss == 0 and np.all(g == 0)


def test_unlabeled_rows_get_the_soft_term_alone():
    """The transfer set in one call (unlabeled="soft"), worked by hand: rows labeled -100 get
    alpha T^2 KL alone, labeled rows both terms, and batchmean divides by every row that counts."""
    s = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.3, 0.1], [2.0, 1.0, 0.0]])
    t = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, -1.0], [0.2, 0.0, 0.4], [0.0, 0.0, 3.0]])
    y = np.array([0, -100, 2, -100])
    T, alpha = 2.0, 0.7

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q, p1 = softmax(s / T), softmax(t / T), softmax(s)
    kl = np.sum(q * np.log(q / p), axis=-1)
    ce = -np.log(p1[[0, 2], [0, 2]])
    rows = alpha * T**2 * kl
    rows[[0, 2]] += (1 - alpha) * ce
    loss, grad = mk.kd_loss_and_grad(s, t, y, T=T, alpha=alpha, unlabeled="soft")
    assert abs(loss - rows.sum() / 4) <= 1e-15 * rows.sum()
    g = alpha * T * (p - q)
    g[[0, 2]] += (1 - alpha) * (p1[[0, 2]] - np.eye(3)[[0, 2]])
    np.testing.assert_allclose(grad, g / 4, rtol=1e-13, atol=1e-17)
    # the default ("ignore"): the unlabeled rows count nowhere
    loss_ignore, grad_ignore = mk.kd_loss_and_grad(s, t, y, T=T, alpha=alpha)
    assert abs(loss_ignore - rows[[0, 2]].sum() / 2) <= 1e-15 * rows.sum() and not grad_ignore[[1, 3]].any()
    # a mask still removes a row of either kind; no labels at all: every row soft-only
    m = np.array([True, False, True, True])
    assert abs(mk.kd_loss(s, t, y, T=T, alpha=alpha, unlabeled="soft", mask=m) - rows[m].sum() / 3) <= 1e-14
    assert abs(mk.kd_loss(s, t, T=T, alpha=alpha, unlabeled="soft") - alpha * T**2 * kl.mean()) <= 1e-14
    with pytest.raises(ValueError, match="unlabeled: expected one of"):
        mk.kd_loss(s, t, y, T=T, alpha=alpha, unlabeled="drop")


def test_neg_inf_classes():
    s = np.array([[1.0, -np.inf, 0.5]])
    t = np.array([[0.2, -np.inf, 0.1]])
    loss, g = mk.kd_loss_and_grad(s, t, np.array([0]), T=2.0, alpha=0.5)
    assert np.isfinite(loss) and g[0, 1] == 0
    # the teacher has mass where the student has none: the KL divergence is truly infinite
    assert mk.kd_loss(np.array([[1.0, -np.inf]]), np.array([[0.0, 0.0]]), T=1.0, alpha=1.0) == np.inf


def test_inputs_not_mutated():
    rng = np.random.default_rng(5)
    s, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    s0, t0 = s.copy(), t.copy()
    mk.kd_loss_and_grad(s, t, np.array([0, 1, 2]), T=2.0, alpha=0.5)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(t, t0)


def test_float32_stays_float32():
    rng = np.random.default_rng(6)
    s = (rng.standard_normal((8, 10)) * 1e4).astype(np.float32)
    t = (rng.standard_normal((8, 10)) * 1e4).astype(np.float32)
    y = rng.integers(0, 10, 8)
    for T in (0.01, 1000.0):
        loss, g = mk.kd_loss_and_grad(s, t, y, T=T, alpha=0.5)
        assert g.dtype == np.float32 and np.isfinite(loss) and np.all(np.isfinite(g))
        ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, T=T, alpha=0.5)
        np.testing.assert_allclose(loss, ref, rtol=1e-4)
        np.testing.assert_allclose(g, gref, atol=1e-4 * np.abs(gref).max())


S, TT, Y = np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 1])


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=0.5, reduction="mean"), ValueError,
     "divides by N\\*C .* not the KL divergence; use 'batchmean'"),
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=0.5, reduction="avg"), ValueError, "reduction: expected"),
    (lambda: mk.kd_loss(S, TT, T=1, alpha=0.5), ValueError, "labels: required when alpha < 1"),
    (lambda: mk.kd_loss(S, TT, np.array([0, 3]), T=1, alpha=0.5), ValueError,
     "labels: row 1 has label 3, expected 0..2 or ignore_index=-100"),
    (lambda: mk.kd_loss(S, TT, np.array([0.0, 1.0]), T=1, alpha=0.5), TypeError, "labels: expected an integer"),
    (lambda: mk.kd_loss(S, TT, np.array([0]), T=1, alpha=0.5), ValueError, "labels: expected shape \\(2,\\)"),
    (lambda: mk.kd_loss(S, np.zeros((2, 4)), Y, T=1, alpha=0.5), ValueError, "teacher: expected the student's shape"),
    (lambda: mk.kd_loss(S, TT.astype(np.float32), Y, T=1, alpha=0.5), TypeError, "teacher: dtype float32"),
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=1.5), ValueError, "alpha: expected a number in \\[0, 1\\]"),
    (lambda: mk.kd_loss(S, TT, Y, T=0, alpha=0.5), ValueError, "T: the temperature"),
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=0.5, kind="js"), ValueError, "kind: expected"),
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=0.5, teacher_as="p"), ValueError, "teacher_as: expected"),
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=0.5, teacher_as="probs"), ValueError,
     "teacher: row 0 sums to 0, expected 1"),
    (lambda: mk.kd_loss(S, np.array([[-0.5, 1.0, 0.5]] * 2), Y, T=1, alpha=0.5, teacher_as="probs"),
     ValueError, "teacher: row 0 is not a probability vector"),
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=0.5, teacher_as="log_probs"), ValueError,
     "teacher: row 0 has logsumexp 1.09861"),
    (lambda: mk.kd_loss(np.array([[0.0, np.nan, 1]] * 2), TT, Y, T=1, alpha=0.5), ValueError,
     "student: row 0 contains NaN"),
    (lambda: mk.kd_loss(S, np.array([[0.0, 1, 2], [-np.inf] * 3]), Y, T=1, alpha=0.5), ValueError,
     "teacher: row 1 is entirely -inf"),
    (lambda: mk.kd_loss(S, TT, Y, T=1, alpha=0.5, mask=np.array([1, 0])), TypeError, "mask: expected a boolean"),
    (lambda: mk.kd_loss(np.zeros(3), np.zeros(3), T=1, alpha=1), ValueError, "student: expected at least 2"),
    (lambda: mk.kd_backward(np.ones(3), mk.kd_forward(S, TT, Y, T=1, alpha=0.5, reduction="none")[1]),
     ValueError, "dloss: reduction='none' needs"),
    (lambda: mk.kd_backward(1.0, mk.kd_forward(S, np.full((2, 3), 1 / 3), Y, T=1, alpha=0.5,
                                               teacher_as="probs")[1], teacher_grad=True),
     ValueError, "teacher_grad: not defined for teacher_as='probs'"),
])
def test_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
