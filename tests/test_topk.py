"""Top-k (sparse) teacher distillation: gradient properties per variant and teacher form, invariants,
k = C against the dense KL, T_gen, values by hand, PyTorch parity, every error."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minikd as mk
from minikd.gradcheck import check_vjp, relative_error
from minikd.losses import topk_backward, topk_forward, topk_from_dense, topk_loss, topk_loss_and_grad
from minikd.losses.topk import VARIANTS
from minikd.testing import kd_cases, labels_for, logits, masks, shapes, temperatures, upstreams

RTOL = 1e-7
FORMS = ("log_probs", "logits")
TGEN_MODES = ("none", "same", "other")   # T_gen=None, T_gen=T, T_gen != T (log-probs only)


def softmax_np(x, T=1.0):
    z = (x - x.max(-1, keepdims=True)) / T
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def log_softmax_np(x, T=1.0):
    return np.log(softmax_np(x, T))


class Case:
    """A top-k problem: student (.., C), the teacher's dense logits, its support and values."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def options(self, **over):
        kw = dict(T=self.T, T_gen=self.T_gen, teacher_as=self.teacher_as, variant=self.variant,
                  scale_t2=self.scale_t2, reduction=self.reduction, mask=self.mask)
        kw.update(over)
        return kw

    def __repr__(self):
        return f"Case({self.__dict__!r})"


def support_values(teacher, idx, teacher_as, T_gen_eff):
    """The values a top-k teacher stores at ids idx: raw logits, or log-probs at T_gen over all C."""
    if teacher_as == "logits":
        return np.take_along_axis(teacher, idx, -1)
    return np.take_along_axis(mk.log_softmax(teacher, T_gen_eff), idx, -1)


@st.composite
def topk_cases(draw, variants=VARIANTS, forms=FORMS, tgen_modes=TGEN_MODES, full=False,
               reductions=("batchmean", "sum", "none"), max_rows=5, max_classes=7):
    """Student -inf only off the support (padding / masked classes); outliers; teacher -inf at some
    support ids (never all of a row's); the support is the teacher's top-k or k random ids."""
    shape = tuple(draw(shapes(max_rows, max_classes)))
    C, lead = shape[-1], shape[:-1]
    n = int(np.prod(lead))
    k = C if full else draw(st.integers(1, C))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    teacher = draw(logits(shape))
    T = draw(temperatures())
    teacher_as = draw(st.sampled_from(forms))
    mode = draw(st.sampled_from(tgen_modes)) if teacher_as == "log_probs" else "none"
    T_gen = {"none": None, "same": T, "other": draw(temperatures())}[mode]
    T_gen_eff = T if T_gen is None else T_gen
    if draw(st.booleans()):
        idx = topk_from_dense(teacher, k, T_gen_eff)[0]
    else:   # k random ids, the teacher's argmax among them (so a row's values are never all -inf)
        rows = teacher.reshape(n, C)
        ids = np.stack([rng.permutation(C) for _ in range(n)])
        for r in range(n):
            am = int(np.argmax(rows[r]))
            pos = int(np.flatnonzero(ids[r] == am)[0])
            if pos >= k:
                ids[r, [0, pos]] = ids[r, [pos, 0]]
        idx = ids[:, :k].reshape(lead + (k,))
    values = support_values(teacher, idx, teacher_as, T_gen_eff)
    student = draw(logits(shape, neg_inf=False))
    on = np.zeros(shape, dtype=bool)
    np.put_along_axis(on, idx, True, -1)
    off_inf = draw(hnp.arrays(bool, shape, elements=st.sampled_from([False, False, True]))) & ~on
    if draw(st.booleans()):   # mostly keep a finite class off the support (an empty tail has p_t = 0)
        rows_inf, rows_on = off_inf.reshape(n, C), on.reshape(n, C)
        for r in range(n):
            if k < C and rows_inf[r][~rows_on[r]].all():
                rows_inf[r, np.flatnonzero(~rows_on[r])[0]] = False
    student = np.where(off_inf, -np.inf, student)
    labels = draw(labels_for(student)) if draw(st.booleans()) else None
    mask = draw(st.one_of(st.none(), masks(lead)))
    return Case(student=student, teacher=teacher, idx=idx, values=values, labels=labels, mask=mask, T=T,
                T_gen=T_gen, teacher_as=teacher_as, variant=draw(st.sampled_from(variants)),
                reduction=draw(st.sampled_from(reductions)), scale_t2=draw(st.booleans()), k=k)


def noise_floor(case, g, eps):
    """Finite-difference noise floor (as tests/test_kd.py): each row's loss is a sum of terms
    q_j log q_j, q_j log p_j, q_t log q_t, q_t log p_t that cancel, and log p is formed from
    (s - max s)/T of size R/T, so rounding noise scales with tau * (sum |q log q| + R/T + log C)
    per row, weighted by the row's upstream weight."""
    _, cache = topk_forward(case.student, case.idx, case.values, case.labels, **case.options())
    n, C = cache.valid.size, case.student.shape[-1]
    w = np.abs(np.broadcast_to(g, case.student.shape[:-1])).reshape(n) * cache.valid
    if case.reduction == "batchmean":
        w = w / max(1, int(cache.valid.sum()))
    q, qt = cache.q, cache.q_tail
    ent = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), -1) - \
        np.where(qt > 0, qt * np.log(np.where(qt > 0, qt, 1)), 0)
    s = case.student.reshape(n, C)
    R = np.max(np.where(np.isfinite(s), s.max(-1, keepdims=True) - s, 0), -1)
    M = cache.tau * float(np.sum(w * (ent + 2 * (R / case.T + np.log(C) + 1))))
    return max(1e-4, 1.5 * 8 * 1.1e-16 * M / eps / RTOL)


@st.composite
def with_upstream(draw, **kw):
    case = draw(topk_cases(**kw))
    g = draw(upstreams(case.student.shape[:-1])) if case.reduction == "none" else draw(upstreams(())).item()
    return case, g


# ---------------------------------------------------------------- the student gradient

@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_student_gradient(variant, data):
    case, g = data.draw(with_upstream(variants=(variant,)))
    kw = case.options()
    loss, cache = topk_forward(case.student, case.idx, case.values, case.labels, **kw)
    assume(np.all(np.isfinite(loss)))     # an empty student tail against a teacher tail: +inf (tested below)
    ds = topk_backward(g, cache)
    assert ds.shape == case.student.shape
    eps = 1e-3 * min(case.T, 1)
    res = check_vjp(lambda s: topk_loss(s, case.idx, case.values, case.labels, **kw), [case.student], g, [ds],
                    eps=eps, floor=noise_floor(case, g, eps))
    assert res.max_rel <= RTOL, res


# ---------------------------------------------------------------- the teacher gradient (d loss / d values)

@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_teacher_gradient(variant, data):
    """d loss / d values against finite differences, every form. Log-probabilities live on
    sum exp(v) <= 1: the case is moved inside (values + log 0.8, a tail >= 0.2; at T_gen != T the loss
    does not see the shift) so that a finite-difference step stays a valid teacher, and k < C (with
    k = C the values are pinned to sum 1; that gradient is tested against the dense one)."""
    case, g = data.draw(with_upstream(variants=(variant,)))
    if case.teacher_as == "log_probs":
        assume(case.k < case.student.shape[-1])
        case.values = case.values + np.log(0.8)
    kw = case.options()
    loss, cache = topk_forward(case.student, case.idx, case.values, case.labels, **kw)
    assume(np.all(np.isfinite(loss)))
    ds, dv = topk_backward(g, cache, teacher_grad=True)
    assert dv.shape == case.values.shape and np.array_equal(ds, topk_backward(g, cache))
    assert np.all(dv.reshape(-1, case.k)[~cache.valid] == 0)
    # q is a function of a v (a = 1/T for logits, T_gen/T for log-probs): steps of 1e-3 in a v at most
    a = 1 / case.T if case.teacher_as == "logits" else (case.T_gen or case.T) / case.T
    eps = 1e-3 * min(1, 1 / a)
    res = check_vjp(lambda v: topk_loss(case.student, case.idx, v, case.labels, **kw), [case.values], g, [dv],
                    eps=eps, floor=noise_floor(case, g, eps))
    assert res.max_rel <= RTOL, res


def test_teacher_gradient_of_a_nearly_one_hot_teacher_against_40_digits():
    """Teacher logits 40 apart: q ~ (1, 4e-18, ...). Its dominant entry q_m (g_m - D) is a difference of
    numbers near each other; it is recomputed from the others, so it keeps its relative accuracy."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    s = np.array([[3.0, 1.0, -2.0, 0.5, 30.0]])
    idx = np.array([[0, 2, 3]])
    vals = np.array([[40.0, 0.0, -1.0]])
    T = 1.0

    def value(v, variant):
        mp = mpmath.mpf
        zs = [mp(float(x)) / T for x in s[0]]
        e = [mpmath.e ** x for x in zs]
        p = [x / mpmath.fsum(e) for x in e]
        eq = [mpmath.e ** (x / T) for x in v]
        q = [x / mpmath.fsum(eq) for x in eq]
        pS = [p[i] for i in idx[0]]
        if variant == "renormalized":
            pS = [x / mpmath.fsum(pS) for x in pS]
        return mpmath.fsum(a * mpmath.log(a / b) for a, b in zip(q, pS))

    for variant in VARIANTS:
        v0 = [mpmath.mpf(float(x)) for x in vals[0]]
        want = np.array([float(mpmath.diff(lambda x, j=j: value(v0[:j] + [x] + v0[j + 1:], variant), v0[j]))
                         for j in range(3)])
        _, (_, dv) = topk_loss_and_grad(s, idx, vals, T=T, teacher_as="logits", variant=variant, scale_t2=False,
                                        teacher_grad=True)
        np.testing.assert_allclose(dv[0], want, rtol=1e-12, err_msg=variant)


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_invariants(variant, data):
    case = data.draw(topk_cases(variants=(variant,)))
    kw = case.options(reduction="none")
    rows, cache = topk_forward(case.student, case.idx, case.values, case.labels, **kw)
    valid = cache.valid.reshape(rows.shape)
    assert np.all(rows[~valid] == 0)
    tau = cache.tau
    Q = cache.q.sum(-1).reshape(rows.shape)
    tol = 1e-12 * tau * (1 + np.abs(rows) / tau)
    if variant in ("renormalized", "tail"):
        assert np.all(rows >= -tol)                     # KL divergences
    else:   # gather = Q (KL(q/Q || p) + log Q) >= Q log Q; >= 0 when the teacher's mass on S is 1
        assert np.all(rows >= tau * np.where(valid, Q * np.log(Q), 0) - tol)
        if case.teacher_as == "logits" or case.T_gen not in (None, case.T):
            assert np.all(rows >= -tol)
    finite = np.isfinite(rows)
    g = topk_backward(np.random.default_rng(0).standard_normal(rows.shape), cache)
    assert np.all(g[~valid] == 0) and np.all(np.isfinite(g))
    # gradient rows sum to zero (where the loss is finite: an empty student tail against q_t > 0 is +inf)
    scale = 1 + np.abs(g).max() * case.student.shape[-1]
    np.testing.assert_allclose(g.sum(-1)[finite], 0.0, atol=1e-12 * scale)
    if variant == "renormalized":   # the off-support logits do not enter the loss
        on = np.zeros(case.student.shape, dtype=bool)
        np.put_along_axis(on, case.idx, True, -1)
        assert np.all(g[~on] == 0)
    # adding a constant to a student row (and to logit values) changes nothing
    shift = np.linspace(-30, 30, rows.size).reshape(rows.shape + (1,))
    v2 = case.values + shift if case.teacher_as == "logits" else case.values
    rows2 = topk_loss(case.student + shift, case.idx, v2, case.labels, **kw)
    np.testing.assert_allclose(rows2, rows, rtol=1e-9, atol=1e-9 * tau)


def test_gather_can_be_negative():
    """q = 1/2 on a one-class support the student holds with p = 1: 1/2 log(1/2) < 0, = Q log Q."""
    s = np.array([[3.0, -np.inf, -np.inf]])
    loss, g = topk_loss_and_grad(s, np.array([[0]]), np.array([[np.log(0.5)]]), T=1.0)
    assert loss == pytest.approx(0.5 * np.log(0.5), rel=1e-15) and loss < 0
    np.testing.assert_allclose(g, [[0.5 - 0.5, 0, 0]], atol=1e-16)   # Q p - q = 0: a minimum
    for variant in ("renormalized", "tail"):   # the divergences: 0 (q~ = p~ = 1), +inf (q_t = 1/2, p_t = 0)
        assert topk_loss(s, np.array([[0]]), np.array([[np.log(0.5)]]), T=1.0, variant=variant) >= 0


@pytest.mark.parametrize("variant", ["renormalized", "tail"])
@pytest.mark.parametrize("T", [0.3, 1.0, 7.0])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_zero_when_student_equals_teacher(variant, T, k):
    rng = np.random.default_rng(k)
    t = mk.gradcheck.random_logits(rng, (2, 3, 8), p_inf=0.0)
    idx, values = topk_from_dense(t, k, T_gen=T)           # log-probs captured at the loss temperature
    for T_gen in (None, T):
        loss, g = topk_loss_and_grad(t, idx, values, T=T, T_gen=T_gen, variant=variant, reduction="none")
        assert np.abs(loss).max() <= 1e-13 * T**2 and np.abs(g).max() <= 1e-13 * T
    if variant == "renormalized":   # only the support's shape matters: logits, or log-probs at another T_gen
        loss = topk_loss(t, idx, np.take_along_axis(t, idx, -1), T=T, teacher_as="logits", variant=variant,
                         reduction="none")
        assert np.abs(loss).max() <= 1e-13 * T**2
        idx2, values2 = topk_from_dense(t, k, T_gen=2.5 * T)
        loss = topk_loss(t, idx2, values2, T=T, T_gen=2.5 * T, variant=variant, reduction="none")
        assert np.abs(loss).max() <= 1e-13 * T**2
    elif k < 8:   # the tail needs the absolute mass: logits (q_t = 0) do not give zero
        assert topk_loss(t, idx, np.take_along_axis(t, idx, -1), T=T, teacher_as="logits", variant=variant) > 0


# ---------------------------------------------------------------- k = C is the dense KL; T_gen

@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_full_support_is_the_dense_kl(variant, data):
    """k = C: every variant, every teacher form, is kd_loss(alpha=1, teacher_as="logits"), value and
    gradient, whatever the order of the ids and whatever T_gen the log-probs were captured at."""
    case = data.draw(kd_cases(teacher_forms=("logits",), unlabeled=("ignore",)))
    C = case.student.shape[-1]
    teacher_as = data.draw(st.sampled_from(FORMS))
    T_gen = data.draw(st.sampled_from([None, case.T, 0.5 * case.T, 3.0])) if teacher_as == "log_probs" else None
    if data.draw(st.booleans()):
        idx = topk_from_dense(case.teacher, C, T_gen or case.T)[0]
    else:
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        idx = rng.permuted(np.broadcast_to(np.arange(C), case.student.shape).copy(), axis=-1)
    values = support_values(case.teacher, idx, teacher_as, T_gen or case.T)
    kw = dict(T=case.T, scale_t2=case.scale_t2, reduction=case.reduction, mask=case.mask)
    dense, cache = mk.kd_forward(case.student, case.teacher, case.labels, alpha=1.0, teacher_as="logits", **kw)
    ours, ocache = topk_forward(case.student, idx, values, case.labels, T_gen=T_gen, teacher_as=teacher_as,
                                variant=variant, **kw)
    assert np.array_equal(np.isinf(dense), np.isinf(ours))
    fin = np.isfinite(dense)
    tau = cache.tau
    assert relative_error(np.where(fin, ours, 0), np.where(fin, dense, 0), tau) <= 1e-12
    g = np.random.default_rng(1).standard_normal(np.shape(dense)) if case.reduction == "none" else 0.7
    (gd, dt), (go, dv) = mk.kd_backward(g, cache, teacher_grad=True), topk_backward(g, ocache, teacher_grad=True)
    assert relative_error(go, gd, tau / case.T * 1e-3) <= 1e-12
    # the values' gradient, scattered back to the C classes: for q = softmax(a v) over the support, v is
    # t / T_gen up to a constant, so d/dv = T_gen d/dt (logits: v = t); log-probs used as given (gather and
    # tail at T_gen = T) are the dense teacher_as="log_probs" gradient
    back = np.zeros(dv.shape)
    np.put_along_axis(back, idx, dv, -1)
    if teacher_as == "log_probs" and T_gen in (None, case.T) and variant != "renormalized":
        want = mk.kd_backward(g, mk.kd_forward(case.student, mk.log_softmax(case.teacher, case.T), case.labels,
                                               alpha=1.0, teacher_as="log_probs", **kw)[1], teacher_grad=True)[1]
    else:
        want = dt * (1.0 if teacher_as == "logits" else (T_gen or case.T))
    assert relative_error(back, want, tau * 1e-3) <= 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_log_probs_at_another_T_gen_are_logits_on_the_support(variant, data):
    """log q_T = u * T_gen / T renormalized over the support (module doc) is log_softmax(t_S / T):
    the same loss and gradient as the raw logits on the same ids. T_gen=None is T_gen=T, bit for bit."""
    case = data.draw(topk_cases(variants=(variant,), forms=("log_probs",), tgen_modes=("other",)))
    assume(case.T_gen != case.T)
    logit_values = np.take_along_axis(case.teacher, case.idx, -1)
    kw = case.options()
    a, ca = topk_forward(case.student, case.idx, case.values, case.labels, **kw)
    b, cb = topk_forward(case.student, case.idx, logit_values, case.labels, **{**kw, "teacher_as": "logits",
                                                                                   "T_gen": None})
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * ca.tau * (1 + case.T / case.T_gen))
    g = np.ones(np.shape(a)) * 0.3 if case.reduction == "none" else 0.3
    np.testing.assert_allclose(topk_backward(g, ca), topk_backward(g, cb), rtol=0,
                               atol=1e-10 * ca.tau / case.T * (1 + case.T / case.T_gen))
    same = dict(kw, T_gen=case.T)
    values_T = support_values(case.teacher, case.idx, "log_probs", case.T)
    np.testing.assert_array_equal(topk_loss(case.student, case.idx, values_T, case.labels, **same),
                                  topk_loss(case.student, case.idx, values_T, case.labels, **dict(kw, T_gen=None)))


def test_T_gen_equal_to_T_keeps_the_tail():
    """At T_gen = T the log-probs keep their absolute mass (Q < 1, q_t = 1 - Q); at another T_gen the
    support is renormalized (Q = 1, q_t = 0). Worked by hand on C = 3, support {0}."""
    t = np.array([[1.0, 0.0, -1.0]])
    s = np.array([[0.5, 0.2, -0.3]])
    idx = np.array([[0]])
    T = 2.0
    q0 = softmax_np(t / T)[0, 0]
    p = softmax_np(s / T)[0]
    u = np.array([[np.log(q0)]])
    assert topk_loss(s, idx, u, T=T, T_gen=T, scale_t2=False) == pytest.approx(q0 * np.log(q0 / p[0]), rel=1e-14)
    tail = q0 * np.log(q0 / p[0]) + (1 - q0) * np.log((1 - q0) / (1 - p[0]))
    assert topk_loss(s, idx, u, T=T, variant="tail", scale_t2=False) == pytest.approx(tail, rel=1e-13)
    # the same values said to be captured at T_gen = 4: one id renormalized is q = 1, no tail
    for variant in ("gather", "tail"):
        assert topk_loss(s, idx, u, T=T, T_gen=4.0, variant=variant, scale_t2=False) == \
            pytest.approx(-np.log(p[0]), rel=1e-14)


# ---------------------------------------------------------------- values worked by hand

def test_values_and_gradients_by_hand():
    """C = 5, support {3, 0}, log-probs at T: every variant's loss and its gradient, on and off the
    support, from the formulas of the module doc written out."""
    s = np.array([[0.4, -1.0, 2.0, 0.1, -np.inf]])
    idx = np.array([[3, 0]])
    q = np.array([0.5, 0.3])      # teacher mass 0.8 on the support, tail 0.2
    T = 1.7
    p = softmax_np(s / T)[0]
    pS = p[[3, 0]]
    P, pt = pS.sum(), 1 - pS.sum()
    Q, qt = q.sum(), 1 - q.sum()
    want = {
        "gather": np.sum(q * np.log(q / pS)),
        "renormalized": np.sum(q / Q * np.log((q / Q) / (pS / P))),
        "tail": np.sum(q * np.log(q / pS)) + qt * np.log(qt / pt),
    }
    qhat = np.zeros(5)
    qhat[[3, 0]] = q
    off = np.array([False, True, True, False, True])
    r = np.where(off, p / pt, 0)
    ptil = np.zeros(5)
    ptil[[3, 0]] = pS / P
    qtil = np.zeros(5)
    qtil[[3, 0]] = q / Q
    grads = {"gather": (Q * p - qhat) / T, "renormalized": (ptil - qtil) / T,
             "tail": np.where(off, r * (pt - qt), p - qhat) / T}
    # the values' gradient (v = log q): gather q (g + 1), tail q (g - g_t), renormalized q~ (g~ - D)
    g_log = np.log(q / pS)
    g_til = np.log((q / Q) / (pS / P))
    dvals = {"gather": q * (g_log + 1), "tail": q * (g_log - np.log(qt / pt)),
             "renormalized": q / Q * (g_til - want["renormalized"])}
    for variant in VARIANTS:
        loss, (g, dv) = topk_loss_and_grad(s, idx, np.log(q)[None], T=T, variant=variant, teacher_grad=True)
        assert loss == pytest.approx(T**2 * want[variant], rel=1e-13), variant
        np.testing.assert_allclose(g[0], T**2 * grads[variant], rtol=1e-13, atol=1e-16, err_msg=variant)
        np.testing.assert_allclose(dv[0], T**2 * dvals[variant], rtol=1e-13, err_msg=variant)
    assert grads["gather"][1] > 0 and grads["renormalized"][1] == 0   # off the support: pushed down, or left


def test_tail_is_computed_stably():
    """A student tail of ~exp(-800): log(1 - P) would be log(0) = -inf and the loss +inf; the
    logsumexp off the support gives log p_t = log 2 - 800 exactly, and the tail gradient r (p_t - q_t)."""
    s = np.array([[0.0, -800.0, -800.0]])
    qt = -np.expm1(np.log(0.9))   # the teacher's tail as the values give it (0.1 to rounding)
    loss, g = topk_loss_and_grad(s, np.array([[0]]), np.array([[np.log(0.9)]]), T=1.0, variant="tail")
    want = 0.9 * np.log(0.9) + qt * (np.log(qt) - (np.log(2) - 800))
    assert loss == pytest.approx(want, rel=1e-14)
    np.testing.assert_allclose(g, [[qt, -qt / 2, -qt / 2]], rtol=1e-14)


def test_infinite_losses_are_the_true_values():
    # the teacher has mass at an id where the student is -inf: +inf for every variant
    s = np.array([[0.0, -np.inf, 1.0]])
    for variant in VARIANTS:
        loss, g = topk_loss_and_grad(s, np.array([[1, 0]]), np.log(np.array([[0.5, 0.4]])), T=1.0, variant=variant)
        assert loss == np.inf and np.all(np.isfinite(g))
    # ... where its mass is 0 (-inf log-prob) the term is 0 log 0 = 0
    loss = topk_loss(s, np.array([[1, 0]]), np.array([[-np.inf, np.log(0.4)]]), T=1.0, variant="gather")
    assert loss == pytest.approx(0.4 * np.log(0.4 / softmax_np(s)[0, 0]), rel=1e-14)
    # the student's tail is empty (every class off the support -inf) and the teacher's is not: +inf
    s2 = np.array([[0.0, 1.0, -np.inf]])
    assert topk_loss(s2, np.array([[0, 1]]), np.log(np.array([[0.5, 0.4]])), T=1.0, variant="tail") == np.inf
    # ... and when the teacher's support holds all its mass (rounding residue < k eps), 0
    t = np.array([[0.3, -0.2, -np.inf]])
    idx, v = topk_from_dense(t, 2)
    assert np.isfinite(topk_loss(s2, idx, v, T=1.0, variant="tail"))


# ---------------------------------------------------------------- rows, reductions, padding

def test_reductions_sequences_and_row_roles():
    rng = np.random.default_rng(4)
    s, t = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 6))
    idx, v = topk_from_dense(t, 3, T_gen=2.0)
    y = rng.integers(0, 6, (2, 3))
    y[0, 1] = -100
    mask = np.ones((2, 3), dtype=bool)
    mask[1, 2] = False
    for variant in VARIANTS:
        kw = dict(T=2.0, mask=mask, variant=variant)
        rows = topk_loss(s, idx, v, y, reduction="none", **kw)
        assert rows.shape == (2, 3) and rows[0, 1] == 0 and rows[1, 2] == 0 and np.all(rows[mask & (y >= 0)] != 0)
        np.testing.assert_allclose(topk_loss(s, idx, v, y, reduction="sum", **kw), rows.sum(), rtol=1e-15)
        np.testing.assert_allclose(topk_loss(s, idx, v, y, **kw), rows.sum() / 4, rtol=1e-15)
        flat = topk_loss(s.reshape(6, 6), idx.reshape(6, 3), v.reshape(6, 3), y.reshape(6), mask=mask.reshape(6),
                         T=2.0, variant=variant)
        np.testing.assert_allclose(topk_loss(s, idx, v, y, **kw), flat, rtol=1e-15)
        _, g = topk_loss_and_grad(s, idx, v, y, **kw)
        assert g.shape == s.shape and not g[0, 1].any() and not g[1, 2].any()
        # labels only mark rows: any label value in range gives the same loss
        np.testing.assert_array_equal(topk_loss(s, idx, v, np.where(y >= 0, 0, y), **kw), topk_loss(s, idx, v, y, **kw))
        assert topk_loss(s, idx, v, np.full((2, 3), -100), **kw) == 0


def test_padding_rows_may_hold_anything():
    s = np.array([[1.0, 2.0, 0.0], [np.nan, np.inf, 1.0]])
    idx = np.array([[0, 2], [7, 7]])
    v = np.array([[np.log(0.3), np.log(0.5)], [np.nan, 3.0]])
    for variant in VARIANTS:
        loss, g = topk_loss_and_grad(s, idx, v, np.array([1, -100]), T=2.0, variant=variant)
        assert np.isfinite(loss) and np.all(np.isfinite(g)) and not g[1].any()
        assert loss == topk_loss(s[:1], idx[:1], v[:1], T=2.0, variant=variant)
        assert topk_loss(s, idx, v, mask=np.array([True, False]), T=2.0, variant=variant) == loss


def test_inputs_not_mutated_and_float32_stays_float32():
    rng = np.random.default_rng(6)
    s = (rng.standard_normal((8, 50)) * 1e4).astype(np.float32)
    t = (rng.standard_normal((8, 50)) * 1e4).astype(np.float32)
    idx, v = topk_from_dense(t, 5, T_gen=1000.0)
    s0, idx0, v0 = s.copy(), idx.copy(), v.copy()
    for variant in VARIANTS:
        for T in (0.01, 1000.0):
            loss, g = topk_loss_and_grad(s, idx, v, T=T, T_gen=1000.0, variant=variant)
            assert g.dtype == np.float32 and np.isfinite(loss) and np.all(np.isfinite(g))
            ref, gref = topk_loss_and_grad(s.astype(np.float64), idx, v.astype(np.float64), T=T, T_gen=1000.0,
                                           variant=variant)
            np.testing.assert_allclose(loss, ref, rtol=1e-4)
            np.testing.assert_allclose(g, gref, atol=1e-4 * np.abs(gref).max())
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(idx, idx0)
    np.testing.assert_array_equal(v, v0)


def test_topk_from_dense():
    t = np.array([[0.0, 2.0, 1.0, 2.0, -np.inf], [1.0, -np.inf, -np.inf, -np.inf, 0.0]])
    idx, v = topk_from_dense(t, 3, T_gen=0.5)
    np.testing.assert_array_equal(idx[0], [1, 3, 2])     # most probable first, ties by the lower id
    np.testing.assert_array_equal(idx[1, :2], [0, 4])
    np.testing.assert_allclose(v[0], log_softmax_np(t[0, :4] / 0.5)[[1, 3, 2]], rtol=1e-15)
    assert v[1, 2] == -np.inf                            # fewer than k finite classes
    assert idx.dtype == np.int64 and v.dtype == t.dtype
    i3, v3 = topk_from_dense(np.zeros((2, 3, 4)), 4)
    assert i3.shape == v3.shape == (2, 3, 4)
    np.testing.assert_allclose(np.exp(v3).sum(-1), 1.0, rtol=1e-15)


# ---------------------------------------------------------------- PyTorch autograd, float64

def torch_topk(torch, S, idx, V, *, T, T_gen, teacher_as, variant, tau, valid, reduction, g):
    """The three variants written directly in PyTorch: a full log_softmax, gather, logsumexp."""
    F = torch.nn.functional
    k, C = idx.shape[-1], S.shape[-1]
    I = torch.tensor(idx.reshape(-1, k))
    S = S.reshape(-1, C)
    zero = torch.zeros((), dtype=torch.float64)
    V = V.reshape(-1, k)
    if teacher_as == "logits":
        log_q, q_t = F.log_softmax(V / T, -1), torch.zeros(V.shape[0], dtype=torch.float64)
    elif T_gen is None or T_gen == T:
        log_q = V
        q_t = (-torch.expm1(torch.logsumexp(V, -1))).clamp(min=0)
        q_t = torch.where((q_t > k * np.finfo(np.float64).eps) & (k < C), q_t, zero)
    else:
        log_q, q_t = F.log_softmax(V * (T_gen / T), -1), torch.zeros(V.shape[0], dtype=torch.float64)
    q = log_q.exp()
    has = q > 0
    if variant == "renormalized":
        lp = F.log_softmax(S.gather(-1, I) / T, -1)
        lq = log_q - torch.logsumexp(log_q, -1, keepdim=True)
        D = (lq.exp() * (torch.where(has, lq, zero) - torch.where(has, lp, zero))).sum(-1)
    else:
        log_p = F.log_softmax(S / T, -1)
        D = (q * (torch.where(has, log_q, zero) - torch.where(has, log_p.gather(-1, I), zero))).sum(-1)
        if variant == "tail":
            on = torch.zeros(S.shape, dtype=torch.bool).scatter(-1, I, True)
            lp_off = log_p.masked_fill(on, -float("inf"))
            empty = torch.isinf(lp_off).all(-1, keepdim=True)
            log_pt = torch.logsumexp(torch.where(empty, zero, lp_off), -1)
            ht = q_t > 0
            D = D + torch.where(ht, q_t * (torch.log(torch.where(ht, q_t, 1 + zero)) - log_pt), zero)
    valid = torch.tensor(valid)
    rows = torch.where(valid, tau * D, zero)
    if reduction == "none":
        return rows, (rows * torch.tensor(np.reshape(g, -1))).sum()
    total = rows.sum() / (max(int(valid.sum()), 1) if reduction == "batchmean" else 1)
    return total, total * g


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_matches_torch(variant, data):
    torch = pytest.importorskip("torch")
    case, g = data.draw(with_upstream(variants=(variant,)))
    kw = case.options()
    loss, cache = topk_forward(case.student, case.idx, case.values, case.labels, **kw)
    assume(np.all(np.isfinite(loss)))
    ds, dv = topk_backward(g, cache, teacher_grad=True)
    S = torch.tensor(case.student, requires_grad=True)
    V = torch.tensor(case.values, requires_grad=True)
    value, phi = torch_topk(torch, S, case.idx, V, T=case.T, T_gen=case.T_gen, teacher_as=case.teacher_as,
                            variant=variant, tau=cache.tau, valid=cache.valid, reduction=case.reduction, g=g)
    phi.backward()
    # natural sizes: a row's terms are ~tau (they cancel to ~0 at student = teacher); the gradient's ~tau / T
    n = max(1, int(cache.valid.sum()))
    assert relative_error(loss, value.detach().numpy().reshape(np.shape(loss)), cache.tau * 1e-3) <= 1e-10
    gs = np.max(np.abs(g)) * cache.tau / case.T / (n if case.reduction == "batchmean" else 1)
    assert relative_error(ds, S.grad.numpy(), gs * 1e-3) <= 1e-10
    vs = gs * case.T * (1 if case.teacher_as == "logits" else case.T_gen or case.T)
    assert relative_error(dv, V.grad.numpy(), vs * 1e-3) <= 1e-10


# ---------------------------------------------------------------- errors

S, I2, V2 = np.zeros((2, 3)), np.array([[0, 1], [2, 0]]), np.log(np.full((2, 2), 0.4))


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: topk_loss(S, I2, V2, T=1, variant="dense"), ValueError, "variant: expected one of"),
    (lambda: topk_loss(S, I2, V2, T=1, teacher_as="probs"), ValueError, "teacher_as: expected one of"),
    (lambda: topk_loss(S, I2, V2, T=1, reduction="mean"), ValueError, "divides by N\\*C"),
    (lambda: topk_loss(S, I2, V2, T=0), ValueError, "T: the temperature"),
    (lambda: topk_loss(S, I2, V2, T=1, T_gen=-1.0), ValueError, "T_gen: the temperature the log-probabilities were captured at"),
    (lambda: topk_loss(S, I2, V2, T=1, T_gen=2.0, teacher_as="logits"), ValueError,
     "T_gen: applies to teacher_as='log_probs' only"),
    (lambda: topk_loss(S, I2.astype(float), V2, T=1), TypeError, "indices: expected an integer array"),
    (lambda: topk_loss(S, I2, V2.astype(np.float32), T=1), TypeError, "values: dtype float32"),
    (lambda: topk_loss(S, I2[:, :1], V2, T=1), ValueError, "indices: shape \\(2, 1\\) differs from the values'"),
    (lambda: topk_loss(S, I2[:1], V2[:1], T=1), ValueError, "indices: expected shape \\(2, 'k'\\)"),
    (lambda: topk_loss(S, np.zeros((2, 0), int), np.zeros((2, 0)), T=1), ValueError, "indices: k must be >= 1"),
    (lambda: topk_loss(S, np.array([[0, 1, 2, 0]] * 2), np.full((2, 4), -2.0), T=1), ValueError,
     "indices: k = 4 ids per row, but the student has only C = 3"),
    (lambda: topk_loss(S, np.array([[0, 1], [3, 0]]), V2, T=1), ValueError, "indices: row 1 has class id 3, expected 0..2"),
    (lambda: topk_loss(S, np.array([[0, -1], [1, 0]]), V2, T=1), ValueError, "indices: row 0 has class id -1"),
    (lambda: topk_loss(S, np.array([[0, 1], [2, 2]]), V2, T=1), ValueError, "indices: row 1 lists class 2 twice"),
    (lambda: topk_loss(S, I2, np.array([[0.0, np.nan], [0.0, 0.0]]) - 1, T=1), ValueError, "values: row 0 contains NaN"),
    (lambda: topk_loss(S, I2, np.array([[-1.0, -1.0], [np.inf, 0.0]]), T=1), ValueError, "values: row 1 contains \\+inf"),
    (lambda: topk_loss(S, I2, np.array([[-1.0, -1.0], [-np.inf, -np.inf]]), T=1), ValueError,
     "values: row 1 is entirely -inf"),
    (lambda: topk_loss(S, I2, np.log(np.array([[0.6, 0.6], [0.1, 0.1]])), T=1), ValueError,
     "values: row 0 has logsumexp 0.182.* sum to more than 1"),
    (lambda: topk_loss(S, np.array([[0, 1, 2]] * 2), np.log(np.full((2, 3), 0.3)), T=1), ValueError,
     "values: row 0 covers all C = 3 classes but has logsumexp"),
    (lambda: topk_loss(np.array([[0.0, np.nan, 1.0]] * 2), I2, V2, T=1), ValueError, "student: row 0 contains NaN"),
    (lambda: topk_loss(np.array([[-np.inf, -np.inf, 1.0]] * 2), np.array([[0, 1]] * 2), V2, T=1,
                       variant="renormalized"), ValueError, "student: row 0 is -inf at every id of the teacher's support"),
    (lambda: topk_loss(S, I2, V2, np.array([0, 3]), T=1), ValueError, "labels: row 1 has label 3"),
    (lambda: topk_loss(S, I2, V2, T=1, mask=np.array([1, 0])), TypeError, "mask: expected a boolean"),
    (lambda: topk_loss(np.zeros(3), I2, V2, T=1), ValueError, "student: expected at least 2"),
    (lambda: topk_backward(np.ones(3), topk_forward(S, I2, V2, T=1, reduction="none")[1]), ValueError,
     "dloss: reduction='none' needs"),
    (lambda: topk_from_dense(S, 4), ValueError, "k: expected 1 <= k <= C = 3, got 4"),
    (lambda: topk_from_dense(S, 1.5), TypeError, "k: expected an integer"),
    (lambda: topk_from_dense(np.array([[0.0, np.nan]]), 1), ValueError, "teacher_logits: row 0 contains NaN"),
])
def test_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
