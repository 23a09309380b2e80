"""The soft term's other divergences (reverse KL, JSD(beta), TVD): student and teacher gradients
against central differences, invariants, the JSD endpoint rule, values by hand, near one-hot rows
against 40-digit arithmetic, and the errors."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_kd import floor_of, kd_with_upstream

import minikd as mk
from minikd.checks import UserError
from minikd.gradcheck import check_vjp
from minikd.testing import kd_cases

RTOL = 1e-7
NEW = ("reverse_kl", "jsd", "tvd")


def away_from_kinks(case):
    """TVD has a kink where p_c = q_c: central differences across it are wrong, not the gradient.
    The reverse KL is +inf where the student has mass and the teacher none (its true value; no
    finite gradient there: test_neg_inf_classes_are_exact)."""
    if case.kind == "reverse_kl" or (case.kind == "jsd" and case.beta == 1.0):
        rows = mk.kd_loss(case.student, case.teacher, case.labels, **case.options(reduction="none", alpha=1.0,
                                                                                   unlabeled="soft"))
        return bool(np.isfinite(rows).all())
    if case.kind != "tvd":
        return True
    from minikd.softmax import _log_softmax
    p = np.exp(_log_softmax(case.student, case.T))
    q = case.teacher if case.teacher_as == "probs" else np.exp(
        case.teacher if case.teacher_as == "log_probs" else _log_softmax(case.teacher, case.T))
    d = np.abs(p - q)[np.isfinite(case.student)]
    return d.size == 0 or d.min() > 1e-3


@given(kd_with_upstream(kinds=NEW))
def test_student_gradient(cg):
    case, g = cg
    if not away_from_kinks(case):
        return
    kw = case.options()
    _, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    ds = mk.kd_backward(g, cache)
    eps = 1e-3 * min(case.T, 1)
    res = check_vjp(lambda s: mk.kd_loss(s, case.teacher, case.labels, **kw), [case.student], g,
                    [ds], eps=eps, floor=floor_of(case._replace(beta=None), g, eps))
    assert res.max_rel <= RTOL, res


@given(kd_with_upstream(kinds=NEW, teacher_forms=("logits", "log_probs")))
def test_teacher_gradient(cg):
    case, g = cg
    if not away_from_kinks(case):
        return
    kw = case.options()
    _, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    _, dt = mk.kd_backward(g, cache, teacher_grad=True)
    eps = 2e-4 * min(case.T, 1)
    res = check_vjp(lambda t: mk.kd_loss(case.student, t, case.labels, **kw), [case.teacher], g,
                    [dt], eps=eps, floor=floor_of(case._replace(beta=None), g, eps))
    assert res.max_rel <= RTOL, res


@given(kd_cases(kinds=NEW, teacher_forms=("logits",)))
def test_invariants(case):
    kw = case.options(alpha=1.0, unlabeled="soft", reduction="none")
    rows = mk.kd_loss(case.student, case.teacher, None, **kw)
    assert np.all(rows >= -1e-12)
    # zero at p = q, and unchanged by a constant added to a row
    assert np.allclose(mk.kd_loss(case.student, case.student, None, **kw), 0, atol=1e-12)
    shifted = mk.kd_loss(case.student + 3.0, case.teacher - 2.0, None, **kw)
    np.testing.assert_allclose(shifted, rows, rtol=1e-9, atol=1e-12)
    if case.kind == "tvd":
        assert np.all(rows <= 0.5 * (case.T**2 if case.scale_t2 else 1) * 2 + 1e-12)


@given(kd_cases(kinds=("jsd",), teacher_forms=("logits",)), st.floats(0.0, 1.0))
def test_jsd_swaps_with_beta(case, beta):
    """JSD(beta) of (p, q) equals JSD(1 - beta) of (q, p); the endpoints are the two KLs."""
    assume((beta in (0.0, 1.0)) == ((1.0 - beta) in (0.0, 1.0)))   # 1 - 1e-69 rounds to the endpoint 1
    kw = case.options(alpha=1.0, unlabeled="soft", reduction="none")
    a = mk.kd_loss(case.student, case.teacher, None, **{**kw, "beta": beta})
    b = mk.kd_loss(case.teacher, case.student, None, **{**kw, "beta": 1.0 - beta})
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_jsd_endpoints_are_the_kls_and_the_interior_tends_to_zero():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    kw = dict(T=2.0, alpha=1.0, unlabeled="soft", reduction="none")
    fwd = mk.kd_loss(s, t, **kw, kind="kl")
    rev = mk.kd_loss(s, t, **kw, kind="reverse_kl")
    np.testing.assert_allclose(mk.kd_loss(s, t, **kw, kind="jsd", beta=0.0), fwd, rtol=1e-14)
    np.testing.assert_allclose(mk.kd_loss(s, t, **kw, kind="jsd", beta=1.0), rev, rtol=1e-14)
    # the interior formula is discontinuous there: beta -> 0 or 1 sends it to 0, not to a KL
    assert np.all(mk.kd_loss(s, t, **kw, kind="jsd", beta=1e-9) < 1e-7)
    assert np.all(mk.kd_loss(s, t, **kw, kind="jsd", beta=1 - 1e-9) < 1e-7)
    # beta = 1/2: the symmetric JSD, bounded by log 2 (times T^2)
    half = mk.kd_loss(s, t, **kw, kind="jsd", beta=0.5)
    assert np.all(half <= 4 * np.log(2))


@pytest.mark.parametrize("teacher_as", ["logits", "log_probs"])
def test_jsd_endpoints_have_the_kls_gradients(teacher_as):
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((4, 6)) * 2, rng.standard_normal((4, 6)) * 2
    if teacher_as == "log_probs":
        t = t - np.log(np.exp(t / 1.5).sum(-1, keepdims=True)) * 1.5
        t = t / 1.5   # log-probabilities at T = 1.5
    kw = dict(T=1.5, alpha=1.0, unlabeled="soft", teacher_as=teacher_as)
    for beta, kind in ((0.0, "kl"), (1.0, "reverse_kl")):
        _, c1 = mk.kd_forward(s, t, kind="jsd", beta=beta, **kw)
        _, c2 = mk.kd_forward(s, t, kind=kind, **kw)
        for a, b in zip(mk.kd_backward(0.7, c1, teacher_grad=True), mk.kd_backward(0.7, c2, teacher_grad=True)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_values_by_hand():
    """Two classes, T = 1, no T^2: p = (0.8, 0.2), q = (0.5, 0.5) written as logits."""
    s = np.log(np.array([[0.8, 0.2]]))
    t = np.log(np.array([[0.5, 0.5]]))
    kw = dict(T=1.0, alpha=1.0, unlabeled="soft", scale_t2=False)
    p, q = np.array([0.8, 0.2]), np.array([0.5, 0.5])
    m = 0.3 * q + 0.7 * p
    want = {"reverse_kl": np.sum(p * np.log(p / q)), "tvd": 0.3,
            "jsd": 0.3 * np.sum(q * np.log(q / m)) + 0.7 * np.sum(p * np.log(p / m))}
    for kind, value in want.items():
        got = mk.kd_loss(s, t, kind=kind, beta=0.3 if kind == "jsd" else None, **kw)
        assert abs(got - value) < 1e-15, (kind, got, value)


def test_neg_inf_classes_are_exact():
    """A class that is -inf on both sides contributes nothing, value and gradient, for every kind."""
    s = np.array([[1.0, -np.inf, 0.5, -1.0]])
    t = np.array([[0.2, -np.inf, 1.5, 0.0]])
    for kind, beta in (("reverse_kl", None), ("jsd", 0.3), ("tvd", None)):
        kw = dict(T=1.5, alpha=1.0, unlabeled="soft", kind=kind, beta=beta)
        loss, cache = mk.kd_forward(s, t, **kw)
        ds, dt = mk.kd_backward(1.0, cache, teacher_grad=True)
        ref = mk.kd_loss(s[:, [0, 2, 3]], t[:, [0, 2, 3]], **kw)
        assert np.isfinite(loss) and abs(loss - ref) < 1e-15
        assert ds[0, 1] == 0 and dt[0, 1] == 0 and np.all(np.isfinite(ds)) and np.all(np.isfinite(dt))
    # the student puts mass where the teacher has none: the reverse KL is +inf, its true value
    s2 = np.array([[1.0, 0.0]])
    t2 = np.array([[1.0, -np.inf]])
    assert mk.kd_loss(s2, t2, T=1.0, alpha=1.0, unlabeled="soft", kind="reverse_kl") == np.inf


def test_nearly_one_hot_rows_against_40_digits():
    """Both sides nearly one-hot on the same class: the loss and both gradients keep their relative
    accuracy (logs by log1p, the dominant gradient entry as minus the sum of the others)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    s = np.array([[30.0, 2.0, -1.0, 0.5]])
    t = np.array([[27.0, 1.0, 0.0, -3.0]])
    T = 1.0

    def exact(kind, beta=None):
        beta = None if beta is None else mpmath.mpf(beta)   # 1 - beta in 40 digits, not in float64
        ss = [mpmath.mpf(float(v)) / T for v in s[0]]
        tt = [mpmath.mpf(float(v)) / T for v in t[0]]

        def value(ss, tt):
            zs, zt = mpmath.fsum(mpmath.e**v for v in ss), mpmath.fsum(mpmath.e**v for v in tt)
            p = [mpmath.e**v / zs for v in ss]
            q = [mpmath.e**v / zt for v in tt]
            if kind == "reverse_kl":
                return mpmath.fsum(a * mpmath.log(a / b) for a, b in zip(p, q))
            if kind == "tvd":
                return mpmath.fsum(abs(a - b) for a, b in zip(p, q)) / 2
            m = [beta * b + (1 - beta) * a for a, b in zip(p, q)]
            return beta * mpmath.fsum(b * mpmath.log(b / c) for b, c in zip(q, m)) + \
                (1 - beta) * mpmath.fsum(a * mpmath.log(a / c) for a, c in zip(p, m))
        v = value(ss, tt)
        gs = [mpmath.diff(lambda x, k=k: value(ss[:k] + [x] + ss[k + 1:], tt), ss[k]) / T for k in range(4)]
        gt = [mpmath.diff(lambda x, k=k: value(ss, tt[:k] + [x] + tt[k + 1:]), tt[k]) / T for k in range(4)]
        return float(v), np.array([float(x) for x in gs]), np.array([float(x) for x in gt])

    for kind, beta in (("reverse_kl", None), ("jsd", 0.5), ("jsd", 1e-6), ("tvd", None)):
        v, gs, gt = exact(kind, beta)
        loss, cache = mk.kd_forward(s, t, T=T, alpha=1.0, unlabeled="soft", scale_t2=False, kind=kind, beta=beta)
        ds, dt = mk.kd_backward(1.0, cache, teacher_grad=True)
        assert abs(loss - v) <= 1e-13 * abs(v), (kind, loss, v)
        np.testing.assert_allclose(ds[0], gs, rtol=1e-12, err_msg=kind)
        np.testing.assert_allclose(dt[0], gt, rtol=1e-12, err_msg=kind)


def test_float32_inputs_stay_float32_and_close():
    rng = np.random.default_rng(3)
    s, t = rng.standard_normal((64, 50)) * 3, rng.standard_normal((64, 50)) * 3
    for kind, beta in (("reverse_kl", None), ("jsd", 0.5), ("tvd", None)):
        kw = dict(T=2.0, alpha=1.0, unlabeled="soft", kind=kind, beta=beta)
        l64, g64 = mk.kd_loss_and_grad(s, t, **kw)
        l32, g32 = mk.kd_loss_and_grad(s.astype(np.float32), t.astype(np.float32), **kw)
        assert g32.dtype == np.float32 and abs(l32 - l64) <= 1e-5 * abs(l64)
        assert np.abs(g32 - g64).max() <= 1e-5 * np.abs(g64).max()


@pytest.mark.parametrize("kw, msg", [
    (dict(kind="jsd"), "beta: kind='jsd' needs beta"),
    (dict(kind="jsd", beta=1.5), "beta: expected a number in \\[0, 1\\], got 1.5"),
    (dict(kind="jsd", beta="x"), "beta: expected a number"),
    (dict(kind="reverse_kl", beta=0.5), "beta: only kind='jsd' takes it"),
    (dict(kind="kl", beta=0.5), "beta: only kind='jsd' takes it"),
    (dict(kind="js"), "kind: expected one of"),
])
def test_errors(kw, msg):
    s = np.zeros((2, 3))
    with pytest.raises(ValueError, match=msg):
        mk.kd_loss(s, s, T=1.0, alpha=1.0, unlabeled="soft", **kw)
    if "beta" in msg:
        with pytest.raises(UserError):
            mk.kd_loss(s, s, T=1.0, alpha=1.0, unlabeled="soft", **kw)


def test_the_kernels_entry_point_takes_every_kind():
    """mk.kernels.softmax_kl: the Numba kernel has every divergence (it matches the reference:
    tests/test_kernels_cpu.py); for a kind a fused kernel lacks (dkd), "auto" runs the reference
    (saying so once per kind) and an explicit fused backend is refused."""
    import warnings

    from minikd.kernels import _said_fallback
    rng = np.random.default_rng(5)
    s, t, y = rng.standard_normal((6, 5)), rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    _said_fallback.clear()
    for kind, beta in (("reverse_kl", None), ("jsd", 0.4), ("tvd", None)):
        want = mk.kd_loss_and_grad(s, t, y, T=2.0, alpha=0.6, kind=kind, beta=beta)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # no fallback, no warning
            for backend in ("auto", "numba"):
                got = mk.kernels.softmax_kl(s, t, y, T=2.0, alpha=0.6, kind=kind, beta=beta, backend=backend)
                assert abs(got[0] - want[0]) <= 1e-12 * abs(want[0])
                assert np.max(np.abs(got[1] - want[1])) <= 1e-12 * np.max(np.abs(want[1]))
    want = mk.kd_loss_and_grad(s, t, y, T=2.0, alpha=0.6, kind="dkd")
    with pytest.warns(UserWarning, match="kind='dkd' has no fused numba kernel yet"):
        got = mk.kernels.softmax_kl(s, t, y, T=2.0, alpha=0.6, kind="dkd")
    assert got[0] == want[0] and np.array_equal(got[1], want[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per kind
        mk.kernels.softmax_kl(s, t, y, T=2.0, alpha=0.6, kind="dkd")
    with pytest.raises(UserError, match="the numba kernel computes kind kl, ce, reverse_kl, jsd, tvd without label"):
        mk.kernels.softmax_kl(s, t, y, T=2.0, alpha=0.6, kind="dkd", backend="numba")
    with pytest.raises(UserError, match="beta: only kind='jsd' takes it"):
        mk.kernels.softmax_kl(s, t, y, T=2.0, alpha=0.6, kind="kl", beta=0.3, backend="numba")


@pytest.mark.parametrize("kind, beta", [("reverse_kl", None), ("jsd", 0.4), ("tvd", None), ("dkd", None)])
def test_training_applies_the_chosen_divergence(kind, beta):
    """Each optimizer step's loss and logit gradient are the reference loss of that kind on the
    batch (the transfer rows, labeled -100, get the distillation term alone)."""
    from minikd import data as D
    from minikd.distill import TrainConfig, train_student
    data = D.mnist1d(300, seed=1, transfer_samples=60)
    rng = np.random.default_rng(2)
    tl = rng.standard_normal((len(data.x_train), 10)).astype(np.float32) * 3
    tt = rng.standard_normal((len(data.x_transfer), 10)).astype(np.float32) * 3
    steps = []
    transfer = kind != "dkd"   # DKD needs a label on every row
    train_student(data, TrainConfig(epochs=1, batch_size=64), teacher_logits=tl, teacher_logits_transfer=tt,
                  T=3.0, alpha=0.8, hidden=8, use_transfer=transfer, progress=False, kind=kind, beta=beta,
                  on_step=steps.append)
    assert len(steps) > 2 and any((step.labels == -100).any() for step in steps) == transfer
    for step in steps:
        s64, t64 = step.logits.astype(np.float64), step.teacher_logits.astype(np.float64)
        want, grad = mk.kd_loss_and_grad(s64, t64, step.labels, T=3.0, alpha=0.8, kind=kind, beta=beta,
                                         unlabeled="soft")
        assert abs(step.loss - want) <= 1e-5 * abs(want)
        assert np.abs(step.dlogits - grad).max() <= 1e-5 * np.abs(grad).max()


def test_distill_with_a_divergence_reports_and_exports_it(tmp_path, capsys):
    import json

    from minikd.cli import main
    small = ["--samples", "400", "--transfer-samples", "0", "--teacher-epochs", "1", "--epochs", "1", "--quiet",
             "--teacher-width", "4", "--student-hidden", "8", "--no-cache"]
    assert main(["distill", *small, "--kind", "jsd", "--beta", "0.5", "--out", str(tmp_path / "o")]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["student_kd"]["kind"] == "jsd" and rep["student_kd"]["beta"] == 0.5
    assert rep["student_kd"]["name"] == "student KD jsd(beta=0.5) (T=4, alpha=0.9)"
    assert json.loads((tmp_path / "o" / "student.json").read_text())["extra"]["kind"] == "jsd"
    assert "KD jsd(beta=0.5)" in capsys.readouterr().out
    assert main(["distill", *small, "--kind", "dkd", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "report.json").read_text())["student_kd"]["kind"] == "dkd"


# ---------------------------------------------------------------- DKD through the one entry point

@given(kd_with_upstream(kinds=("dkd",), teacher_forms=("logits",), unlabeled=("ignore",)))
def test_dkd_through_kd_forward_student_and_teacher_gradients(cg):
    case, g = cg
    if case.labels is None:
        return
    kw = case.options()
    value, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    if not np.all(np.isfinite(value)):
        return
    ds, dt = mk.kd_backward(g, cache, teacher_grad=True)
    eps = 2e-4 * min(case.T, 1)
    floor = 10 * floor_of(case._replace(kind="kl"), g, eps)   # DKD's NCKD weight 8 scales the noise
    res = check_vjp(lambda s, t: mk.kd_loss(s, t, case.labels, **kw), [case.student, case.teacher], g,
                    [ds, dt], eps=eps, floor=floor)
    assert res.max_rel <= RTOL, res


def test_dkd_kind_is_alpha_dkd_plus_the_hard_term():
    from minikd.losses import dkd_loss
    rng = np.random.default_rng(0)
    s, t, y = rng.standard_normal((6, 5)), rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    y[2] = -100
    for weights in (None, (2.0, 0.5)):
        a, b = weights or (1.0, 8.0)
        got = mk.kd_loss(s, t, y, T=2.0, alpha=0.7, kind="dkd", dkd_weights=weights, reduction="none")
        want = 0.7 * dkd_loss(s, t, y, T=2.0, alpha_tckd=a, beta_nckd=b, reduction="none") + \
            0.3 * mk.kd_loss(s, t, y, T=2.0, alpha=0.0, reduction="none")
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
    with pytest.raises(UserError, match="every row that counts needs a label"):
        mk.kd_loss(s, t, y, T=2.0, alpha=0.7, kind="dkd", unlabeled="soft")
    with pytest.raises(UserError, match="dkd_weights: only kind='dkd'"):
        mk.kd_loss(s, t, y, T=2.0, alpha=0.7, dkd_weights=(1.0, 8.0))


# ---------------------------------------------------------------- token-level normalization

@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("kind, beta", [("kl", None), ("ce", None), ("reverse_kl", None), ("jsd", 0.3),
                                        ("tvd", None), ("dkd", None)])
def test_micro_batches_with_the_batch_count_sum_to_the_full_batch(kind, beta, backend):
    """Gradient accumulation: each micro-batch divides by the whole batch's count of rows that
    count (normalizer=, Hugging Face's num_items_in_batch); the micro-batch losses then sum to the
    full batch's loss and their gradients are its gradient's pieces. Dividing each micro-batch by
    its own count (the default) does not: the counts differ."""
    if backend == "numba" and kind == "dkd":
        backend = "numpy"   # no fused kernel: the reference
    rng = np.random.default_rng(7)
    s, t = rng.standard_normal((4, 6, 9)) * 2, rng.standard_normal((4, 6, 9)) * 2   # (B, S, C) tokens
    y = rng.integers(0, 9, (4, 6))
    y[rng.random(y.shape) < 0.3] = -100          # padding tokens: uneven counts per micro-batch
    kw = dict(T=2.0, alpha=0.6, kind=kind, beta=beta, backend=backend)
    full, gfull = mk.kernels.softmax_kl(s, t, y, **kw)
    n = int((y != -100).sum())
    parts = [mk.kernels.softmax_kl(s[i:i + 2], t[i:i + 2], y[i:i + 2], normalizer=n, **kw) for i in (0, 2)]
    assert abs(sum(p[0] for p in parts) - full) <= 1e-12 * abs(full)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), gfull, rtol=1e-12, atol=1e-15)
    naive = sum(mk.kernels.softmax_kl(s[i:i + 2], t[i:i + 2], y[i:i + 2], **kw)[0] for i in (0, 2)) / 2
    assert abs(naive - full) > 1e-6 * abs(full)


@pytest.mark.parametrize("normalizer, reduction, msg", [
    (0, "batchmean", "normalizer: expected a count >= 1"), (float("nan"), "batchmean", "count >= 1"),
    ("x", "batchmean", "count >= 1"), (5, "sum", "reduction='sum' has none"),
])
def test_normalizer_errors(normalizer, reduction, msg):
    s = np.zeros((2, 3))
    with pytest.raises(ValueError, match=msg):
        mk.kd_loss(s, s, np.arange(2), T=1.0, alpha=0.5, reduction=reduction, normalizer=normalizer)


# ---------------------------------------------------------------- the hard term's options

@given(kd_with_upstream(kinds=("kl", "jsd"), teacher_forms=("logits",), unlabeled=("ignore",)),
       st.sampled_from([0.0, 0.1, 0.5]), st.sampled_from([None, 0.0, 0.7, 3.0]))
def test_label_smoothing_and_hard_weight_gradients(cg, eps, hard_weight):
    case, g = cg
    if case.labels is None:
        return
    kw = case.options(label_smoothing=eps, hard_weight=hard_weight)
    value, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    if not np.all(np.isfinite(value)):
        return   # label smoothing puts eps / C on -inf classes: +inf, as PyTorch's
    ds = mk.kd_backward(g, cache)
    step = 1e-3 * min(case.T, 1)
    res = check_vjp(lambda s: mk.kd_loss(s, case.teacher, case.labels, **kw), [case.student], g, [ds],
                    eps=step, floor=4 * floor_of(case._replace(beta=None), g, step))
    assert res.max_rel <= RTOL, res


def test_label_smoothing_and_weights_equal_pytorch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(11)
    s, t, y = rng.standard_normal((8, 6)) * 2, rng.standard_normal((8, 6)) * 2, rng.integers(0, 6, 8)
    y[3] = -100
    S = torch.tensor(s, requires_grad=True)
    T, gamma, alpha_w, eps = 3.0, 0.4, 1.7, 0.1
    ce = F.cross_entropy(S, torch.tensor(y), label_smoothing=eps, ignore_index=-100, reduction="sum")
    kl = F.kl_div(F.log_softmax(S / T, -1), F.log_softmax(torch.tensor(t) / T, -1), log_target=True,
                  reduction="none").sum(-1)[torch.tensor(y) != -100].sum()
    L = (gamma * ce + alpha_w * T * T * kl) / 7
    L.backward()
    value, grad = mk.kd_loss_and_grad(s, t, y, T=T, alpha=alpha_w, hard_weight=gamma, label_smoothing=eps)
    assert abs(value - L.item()) <= 1e-12 * abs(L.item())
    np.testing.assert_allclose(grad, S.grad.numpy(), rtol=1e-11, atol=1e-14)
    # the fused kernel takes hard_weight (a weight); label smoothing falls back to the reference
    fused = mk.kernels.softmax_kl(s, t, y, T=T, alpha=alpha_w, hard_weight=gamma, backend="numba")
    plain = mk.kd_loss_and_grad(s, t, y, T=T, alpha=alpha_w, hard_weight=gamma)
    assert abs(fused[0] - plain[0]) <= 1e-12 * abs(plain[0])
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-12, atol=1e-15)
    with pytest.raises(UserError, match="label_smoothing: the numba kernel computes"):
        mk.kernels.softmax_kl(s, t, y, T=T, alpha=0.5, label_smoothing=eps, backend="numba")
    with pytest.raises(ValueError, match="alpha: expected a number in \\[0, 1\\]"):
        mk.kd_loss(s, t, y, T=T, alpha=1.7)   # above 1 only with an explicit hard_weight
    with pytest.raises(ValueError, match="label_smoothing: expected a number in \\[0, 1\\)"):
        mk.kd_loss(s, t, y, T=T, alpha=0.5, label_smoothing=1.0)


# ---------------------------------------------------------------- vocabularies of different sizes

@pytest.mark.parametrize("vocab", ["truncate", "pad"])
@pytest.mark.parametrize("cs, ct", [(7, 5), (5, 7)])
@pytest.mark.parametrize("kind, beta", [("kl", None), ("jsd", 0.3), ("reverse_kl", None)])
def test_vocabularies_of_different_sizes(vocab, cs, ct, kind, beta):
    rng = np.random.default_rng(cs * 10 + ct)
    s, t, y = rng.standard_normal((4, cs)) * 2, rng.standard_normal((4, ct)) * 2, rng.integers(0, 5, 4)
    kw = dict(T=2.0, alpha=0.6, kind=kind, beta=beta, vocab=vocab)
    loss, cache = mk.kd_forward(s, t, y, **kw)
    if not np.isfinite(loss):   # pad: the student lacks classes the teacher has mass on (reverse KL: the reverse)
        assert vocab == "pad"
        return
    ds, dt = mk.kd_backward(0.7, cache, teacher_grad=True)
    assert ds.shape == s.shape and dt.shape == t.shape
    res = check_vjp(lambda s, t: mk.kd_loss(s, t, y, **kw), [s, t], 0.7, [ds, dt], eps=1e-4)
    assert res.max_rel <= RTOL, res
    # what each means: "truncate" is the loss on the common classes, "pad" on -inf-padded logits
    c = min(cs, ct)
    if vocab == "truncate":
        assert loss == mk.kd_loss(s[:, :c], t[:, :c], y, T=2.0, alpha=0.6, kind=kind, beta=beta)
        assert np.all(ds[:, c:] == 0)
    else:
        n = max(cs, ct)
        padded = [np.concatenate([x, np.full((4, n - x.shape[1]), -np.inf)], axis=1) for x in (s, t)]
        assert loss == mk.kd_loss(*padded, y, T=2.0, alpha=0.6, kind=kind, beta=beta)
        liger = [np.concatenate([x, np.zeros((4, n - x.shape[1]))], axis=1) for x in (s, t)]   # zero logits
        assert abs(mk.kd_loss(*liger, y, T=2.0, alpha=0.6, kind=kind, beta=beta) - loss) > 1e-3


def test_vocab_through_the_kernels_entry_point():
    rng = np.random.default_rng(1)
    s, t, y = rng.standard_normal((4, 7)), rng.standard_normal((4, 5)), rng.integers(0, 5, 4)
    want = mk.kd_loss_and_grad(s, t, y, T=2.0, alpha=0.6, vocab="truncate")
    got = mk.kernels.softmax_kl(s, t, y, T=2.0, alpha=0.6, vocab="truncate", backend="numpy")
    assert got[0] == want[0] and np.array_equal(got[1], want[1])
    with pytest.raises(UserError, match="vocab: the numba kernel computes"):
        mk.kernels.softmax_kl(s, t, y, T=2.0, alpha=0.6, vocab="truncate", backend="numba")
    with pytest.raises(ValueError, match="vocab='truncate' or 'pad' matches them"):
        mk.kd_loss(s, t, y, T=2.0, alpha=0.6)


# ---------------------------------------------------------------- top-k teachers through the one entry point

@pytest.mark.parametrize("variant", ["gather", "renormalized", "tail"])
def test_a_topk_teacher_through_kd_forward(variant):
    """mk.kd_forward(student, mk.TopK(indices, values), labels, ...): alpha * tau * D_topk + (1 - alpha)
    * CE on labeled rows, the soft term alone on unlabeled ones; with k = C the dense KD loss."""
    rng = np.random.default_rng(3)
    s, t = rng.standard_normal((2, 4, 7)) * 2, rng.standard_normal((2, 4, 7)) * 2
    y = rng.integers(0, 7, (2, 4))
    y[0, 1] = y[1, 3] = -100
    kw = dict(T=2.0, alpha=0.7, unlabeled="soft")
    idx, vals = mk.topk_from_dense(t, 7, T_gen=2.0)
    full = mk.kd_loss_and_grad(s, mk.TopK(idx, vals, T_gen=2.0, variant=variant), y, **kw)
    dense = mk.kd_loss_and_grad(s, t, y, **kw)
    assert abs(full[0] - dense[0]) <= 1e-13 * abs(dense[0])
    np.testing.assert_allclose(full[1], dense[1], rtol=1e-12, atol=1e-14)
    idx, vals = mk.topk_from_dense(t, 3, T_gen=2.0)
    teacher = mk.TopK(idx, vals, T_gen=2.0, variant=variant)
    loss, cache = mk.kd_forward(s, teacher, y, **kw)
    g = 0.8
    ds = mk.kd_backward(g, cache)
    res = check_vjp(lambda s: mk.kd_loss(s, teacher, y, **kw), [s], g, [ds], eps=1e-4)
    assert res.max_rel <= RTOL, res
    soft = mk.topk_loss(s, idx, vals, T=2.0, T_gen=2.0, variant=variant, reduction="none")
    hard = mk.kd_loss(s, s, y, T=2.0, alpha=0.0, reduction="none")
    assert abs(loss - (0.7 * soft + 0.3 * hard).sum() / 8) <= 1e-13 * abs(loss)
    with pytest.raises(UserError, match="a top-k teacher"):
        mk.kd_loss(s, teacher, y, kind="jsd", beta=0.5, **kw)
    # the teacher gradient is d loss / d values (alpha times the top-k term's), shaped like the values;
    # with alpha = 0 there is no soft term, and it is 0
    ds_t, dv = mk.kd_backward(g, cache, teacher_grad=True)
    assert np.array_equal(ds_t, ds) and dv.shape == vals.shape
    _, tcache = mk.topk_forward(s, idx, vals, T=2.0, T_gen=2.0, variant=variant, reduction="none")
    np.testing.assert_allclose(dv, mk.topk_backward(np.full((2, 4), 0.7 * g / 8), tcache, teacher_grad=True)[1],
                               rtol=1e-13, atol=1e-16)
    res = check_vjp(lambda v: mk.kd_loss(s, mk.TopK(idx, v, T_gen=2.0, variant=variant), y, **kw),
                    [vals + np.log(0.9)], g,
                    [mk.kd_backward(g, mk.kd_forward(s, mk.TopK(idx, vals + np.log(0.9), T_gen=2.0, variant=variant),
                                                     y, **kw)[1], teacher_grad=True)[1]], eps=1e-4)
    assert res.max_rel <= RTOL, res
    zero = mk.kd_backward(g, mk.kd_forward(s, teacher, y, **dict(kw, alpha=0.0))[1], teacher_grad=True)[1]
    assert zero.shape == vals.shape and not zero.any()


def test_the_sweep_ranges_over_beta_and_dkd_takes_its_weights(tmp_path, capsys):
    import json

    from minikd.cli import main
    small = ["--samples", "300", "--transfer-samples", "0", "--teacher-epochs", "1", "--epochs", "1", "--quiet",
             "--teacher-width", "4", "--student-hidden", "8", "--no-cache"]
    assert main(["sweep", *small, "--T", "1", "4", "--alpha", "0.5", "1", "--kind", "jsd", "--beta", "0.2", "0.8",
                 "--out", str(tmp_path / "s")]) == 0
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    grid = np.array(rep["grid"]["val_accuracy"])
    assert rep["grid"]["beta"] == [0.2, 0.8] and grid.shape == (2, 2, 2)
    k, i, j = np.unravel_index(np.argmax(grid), grid.shape)   # the first best in (beta, T, alpha) order
    best = rep["student_kd"]
    assert (best["beta"], best["T"], best["alpha"]) == ([0.2, 0.8][k], [1.0, 4.0][i], [0.5, 1.0][j])
    assert best["val_accuracy"] == grid[k, i, j]
    assert "beta=0.8" in capsys.readouterr().out and (tmp_path / "s" / "sweep.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["sweep", *small, "--kind", "jsd", "--out", str(tmp_path / "x")])   # jsd without a beta
    assert main(["distill", *small, "--kind", "dkd", "--dkd-weights", "1", "2", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "report.json").read_text())["student_kd"]["dkd_weights"] == [1.0, 2.0]
    with pytest.raises(SystemExit):
        main(["distill", *small, "--dkd-weights", "1", "2", "--out", str(tmp_path / "x")])   # not kind dkd


def test_training_passes_the_dkd_weights():
    from minikd import data as D
    from minikd.distill import TrainConfig, train_student
    data = D.mnist1d(300, seed=1)
    tl = np.random.default_rng(2).standard_normal((len(data.x_train), 10)).astype(np.float32) * 3
    steps = []
    train_student(data, TrainConfig(epochs=1, batch_size=64), teacher_logits=tl, T=3.0, alpha=0.8, hidden=8,
                  progress=False, kind="dkd", dkd_weights=(2.0, 0.5), on_step=steps.append)
    for step in steps:
        want, grad = mk.kd_loss_and_grad(step.logits.astype(np.float64), step.teacher_logits.astype(np.float64),
                                         step.labels, T=3.0, alpha=0.8, kind="dkd", dkd_weights=(2.0, 0.5),
                                         unlabeled="soft")
        assert abs(step.loss - want) <= 1e-5 * abs(want)
        assert np.abs(step.dlogits - grad).max() <= 1e-5 * np.abs(grad).max()
