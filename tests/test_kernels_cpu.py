"""The fused Numba kernel equals the reference (float64 to 1e-12, float32 to 1e-5)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given

import minikd as mk
from kernel_cases import make
from minikd.gradcheck import relative_error
from minikd.kernels import softmax_kl
from minikd.testing import kd_cases

pytest.importorskip("numba")


def kw_of(case):
    kw = case.options()
    del kw["teacher_as"]   # the kernels take teacher logits
    return kw


@given(kd_cases(teacher_forms=("logits",)))
def test_float64_matches_reference(case):
    kw = kw_of(case)
    loss, grad = mk.kd_loss_and_grad(case.student, case.teacher, case.labels, **kw)
    kloss, kgrad = softmax_kl(case.student, case.teacher, case.labels, backend="numba", **kw)
    tau = case.T**2 if case.scale_t2 else 1.0
    # relative to the size of the terms (a KL of equal rows cancels to ~0; see test_torch_parity)
    scale_loss = max(np.max(np.abs(loss)), case.alpha * tau * np.log(case.student.shape[-1] + 1) + 1 - case.alpha)
    assert relative_error(kloss, loss, scale_loss) <= 1e-12
    assert relative_error(kgrad, grad) <= 1e-12 or np.max(np.abs(kgrad - grad)) <= 1e-15


@pytest.mark.parametrize("C", [3, 16, 700])           # the short-row kernel (C <= 16) and the row kernel
@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("unlabeled", ["ignore", "soft"])
def test_float64_outliers_inf_masks(C, kind, reduction, unlabeled):
    # some classes the teacher alone rules out; a fifth of the rows unlabeled (the transfer set)
    s, t, y, mask = make(40, C, C, "float64", teacher_only_inf=0.05, unlabeled_fraction=0.2)
    for T, alpha in ((0.05, 0.3), (1.0, 0.5), (50.0, 1.0), (2.0, 0.0)):
        kw = dict(T=T, alpha=alpha, kind=kind, reduction=reduction, mask=mask, unlabeled=unlabeled)
        loss, grad = mk.kd_loss_and_grad(s, t, y, **kw)
        kloss, kgrad = softmax_kl(s, t, y, backend="numba", **kw)
        np.testing.assert_allclose(kloss, loss, rtol=1e-12, atol=1e-12 * (1 + T * T))
        # relative to max |grad| (the label entry p1_y - 1 cancels differently in the two orders)
        assert np.max(np.abs(kgrad - grad)) <= 1e-12 * np.max(np.abs(grad))


@pytest.mark.parametrize("C", [10, 300, 1000])
@pytest.mark.parametrize("T", [0.05, 1.0, 50.0])
def test_float32_matches_reference(C, T):
    s, t, y, _ = make(64, C, C, "float64", unlabeled_fraction=0.2)
    for kind, unlabeled in (("kl", "ignore"), ("ce", "ignore"), ("kl", "soft"), ("ce", "soft")):
        kw = dict(T=T, alpha=0.6, kind=kind, unlabeled=unlabeled)
        l32, g32 = softmax_kl(s.astype(np.float32), t.astype(np.float32), y, backend="numba", **kw)
        assert g32.dtype == np.float32
        # reference in float64 on the float32-rounded inputs
        ref, gref = mk.kd_loss_and_grad(s.astype(np.float32).astype(np.float64),
                                        t.astype(np.float32).astype(np.float64), y, **kw)
        assert abs(l32 - ref) <= 1e-5 * abs(ref)
        assert np.max(np.abs(g32 - gref)) <= 1e-5 * np.max(np.abs(gref))


def test_in_place_and_out():
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((32, 50)), rng.standard_normal((32, 50))
    y = rng.integers(0, 50, 32)
    ref_loss, ref_grad = mk.kd_loss_and_grad(s, t, y, T=3.0, alpha=0.5)
    out = np.empty_like(s)
    loss, g = softmax_kl(s, t, y, T=3.0, alpha=0.5, out=out, backend="numba")
    assert g is out and np.allclose(out, ref_grad, rtol=1e-12, atol=1e-16)
    s2 = s.copy()
    loss2, g2 = softmax_kl(s2, t, y, T=3.0, alpha=0.5, out=s2, backend="numba")
    assert g2 is s2 and np.allclose(s2, ref_grad, rtol=1e-12, atol=1e-16) and abs(loss2 - ref_loss) < 1e-12
    for backend in ("numpy", "numba"):
        with pytest.raises(ValueError, match="out: expected shape"):
            softmax_kl(s, t, y, T=3.0, alpha=0.5, out=np.empty((2, 2)), backend=backend)


BACKENDS_CPU = ("numpy", "numba", "auto")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exactly_in_place_matches_reference(backend, dtype):
    """out=student (the same array, or a view with its data pointer, shape and strides) is the
    one overlap allowed, also for a student that is not contiguous."""
    rng = np.random.default_rng(2)
    wide = rng.standard_normal((300, 24)).astype(dtype)
    t = rng.standard_normal((300, 12)).astype(dtype)
    y = rng.integers(0, 12, 300)
    ref_loss, ref_grad = mk.kd_loss_and_grad(wide[:, :12].astype(np.float64), t.astype(np.float64), y,
                                             T=2.0, alpha=0.5)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for make_student in (lambda: wide[:, :12].copy(), lambda: wide.copy()[:, :12]):
        s = make_student()
        for out in (s, s[:]):
            s[...] = wide[:, :12]
            loss, g = softmax_kl(s, t, y, T=2.0, alpha=0.5, out=out, backend=backend)
            assert g is out and np.max(np.abs(s - ref_grad)) <= tol * np.max(np.abs(ref_grad))
            assert abs(loss - ref_loss) <= tol * abs(ref_loss)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_out_overlapping_an_input_is_refused(backend):
    """out over other rows of the student (the Numba kernel once wrote row i's gradient over row
    i + 1 before reading it: a gradient 15% off, silently) or over the teacher is refused before
    any work: the inputs are left as they were."""
    rng = np.random.default_rng(3)
    N, C = 200, 10
    buf = rng.standard_normal((N + 1, C))
    s, t, y = buf[:-1], rng.standard_normal((N, C)), rng.integers(0, C, N)
    before = buf.copy(), t.copy()
    for out, name in ((buf[1:], "student"), (s[::-1], "student"), (t, "teacher"), (t[::-1], "teacher")):
        with pytest.raises(ValueError, match=f"out: overlaps the memory of {name}; pass an array"):
            softmax_kl(s, t, y, T=2.0, alpha=0.5, out=out, backend=backend)
        assert np.array_equal(buf, before[0]) and np.array_equal(t, before[1])
    with pytest.raises(ValueError, match="out: overlaps the memory of teacher"):   # student is teacher
        softmax_kl(s, s, y, T=2.0, alpha=0.5, out=s, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_out_not_an_array_or_read_only_is_refused(backend):
    s, t, y = np.zeros((3, 4)), np.zeros((3, 4)), np.array([0, 1, 2])
    with pytest.raises(TypeError, match="out: expected a NumPy or CuPy array, got list"):
        softmax_kl(s, t, y, T=1.0, alpha=0.5, out=np.zeros((3, 4)).tolist(), backend=backend)
    read_only = np.zeros((3, 4))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        softmax_kl(s, t, y, T=1.0, alpha=0.5, out=read_only, backend=backend)
    with pytest.raises(ValueError, match="out: the array is read-only"):   # in place over a read-only student
        softmax_kl(read_only, t, y, T=1.0, alpha=0.5, out=read_only, backend=backend)


def _array_likes():
    s, y = np.zeros((3, 4)), np.array([0, 1, 2])
    return [
        ("student list", (s.tolist(), s, y), {}),
        ("teacher tuple", (s, tuple(map(tuple, s)), y), {}),
        ("labels list", (s, s, [0, 1, 2]), {}),
        ("labels tuple", (s, s, (0, 1, 2)), {}),
        ("labels float", (s, s, y.astype(np.float64)), {}),
        ("labels bool", (s, s, y > 0), {}),
        ("mask list", (s, s, y), dict(mask=[True, False, True])),
        ("student int", (np.zeros((3, 4), np.int64), s, y), {}),
        ("student 1-D", (np.zeros(4), np.zeros(4), y), {}),
    ]


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("what, args, kw", _array_likes(), ids=[c[0] for c in _array_likes()])
def test_array_likes_refused_as_the_reference_refuses_them(backend, what, args, kw):
    """Lists, tuples and wrong dtypes: the reference's error, word for word, on every backend
    (the Numba backend once gave Numba's typing error, or an AttributeError)."""
    with pytest.raises((TypeError, ValueError)) as ref:
        mk.kd_loss_and_grad(*args, T=1.0, alpha=0.5, **kw)
    with pytest.raises(type(ref.value)) as got:
        softmax_kl(*args, T=1.0, alpha=0.5, backend=backend, **kw)
    assert str(got.value) == str(ref.value)
    assert str(ref.value).split(":")[0] in ("student", "teacher", "labels", "mask")


def test_each_kernel_refuses_the_other_device():
    """CuPy arrays to the Numba kernel, NumPy arrays to the CuPy kernel: a TypeError saying so
    (the CuPy one before CuPy is imported: a NumPy user may not have it)."""
    import fake_cupy
    s = np.zeros((3, 4), np.float32)
    y = np.array([0, 1, 2])
    with pytest.raises(TypeError, match="student: the CuPy kernel takes CuPy arrays, got numpy.ndarray"):
        softmax_kl(s, s, y, T=1.0, alpha=0.5, backend="cupy")
    S = s.view(fake_cupy.ndarray)
    with pytest.raises(TypeError, match="student: the Numba kernel takes NumPy arrays, got a CuPy array"):
        softmax_kl(S, S, y, T=1.0, alpha=0.5, backend="numba")


@pytest.mark.parametrize("args, exc, msg", [
    (dict(reduction="mean"), ValueError, "divides by N\\*C"),
    (dict(alpha=0.5, labels=None), ValueError, "labels: required"),
    (dict(T=-1.0), ValueError, "T: the temperature"),
    (dict(backend="tpu"), ValueError, "backend: expected"),
])
def test_same_errors_as_reference(args, exc, msg):
    s = np.zeros((3, 4))
    kw = dict(labels=np.array([0, 1, 2]), T=1.0, alpha=0.5, backend="numba")
    kw.update(args)
    labels = kw.pop("labels")
    with pytest.raises(exc, match=msg):
        softmax_kl(s, s, labels, **kw)
    t = s.copy()
    t[1, 2] = np.nan
    with pytest.raises(ValueError, match="teacher: row 1 contains NaN"):
        softmax_kl(s, t, np.array([0, 1, 2]), T=1.0, alpha=0.5, backend="numba")


def test_exp_over_its_whole_range():
    from minikd.kernels.fastexp import EXP_MAX, EXP_MIN, exp_f32_array
    x = np.linspace(EXP_MIN, EXP_MAX, 2_000_001, dtype=np.float32)
    x = np.concatenate([x, np.float32(np.random.default_rng(0).uniform(EXP_MIN, EXP_MAX, 1_000_000))])
    ref = np.exp(x.astype(np.float64))
    got = exp_f32_array(x, np.empty_like(x))
    assert np.max(np.abs(got - ref) / ref) <= 1.5e-7
    neg = x[x <= 0]
    got = exp_f32_array(neg, np.empty_like(neg), True)
    assert np.max(np.abs(got - np.exp(neg.astype(np.float64))) / np.exp(neg.astype(np.float64))) <= 1.5e-7
    special = np.array([-np.inf, -1e4, -87.4, 0.0, 88.8, np.inf, np.nan], np.float32)
    got = exp_f32_array(special, np.empty_like(special))
    np.testing.assert_array_equal(got[:4], [0, 0, 0, 1])
    assert got[4] == np.inf and got[5] == np.inf and np.isnan(got[6])
    got = exp_f32_array(special[:4], np.empty(4, np.float32), True)
    np.testing.assert_array_equal(got, [0, 0, 0, 1])


def test_auto_backend():
    from minikd.kernels import resolve_backend
    assert resolve_backend("auto", np.zeros((1, 2))) == "numba"


def test_interpreted_logic_without_jit():
    """The same kernel with NUMBA_DISABLE_JIT=1 (pure Python) on a small case."""
    code = ("import numpy as np, minikd as mk; from minikd.kernels import softmax_kl;"
            "r=np.random.default_rng(0); s=r.standard_normal((4,6)); t=r.standard_normal((4,6));"
            "s[1,2]=t[1,2]=-np.inf; y=np.array([0,1,3,-100]);"
            "a=mk.kd_loss_and_grad(s,t,y,T=2.0,alpha=0.5); b=softmax_kl(s,t,y,T=2.0,alpha=0.5,backend='numba');"
            "assert abs(a[0]-b[0])<1e-13 and np.abs(a[1]-b[1]).max()<1e-15; print('ok')")
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("C", [2, 10, 1000, 128256])
def test_sum_of_logs_by_products(C):
    from minikd.kernels import sum_of_logs
    rng = np.random.default_rng(C)
    x = np.exp(rng.uniform(-np.log(C), np.log(C), 10_007))   # the range of the row statistics
    x[:5] = [1.0 / C, C, 1.0, C, 1.0 / C]
    ref = np.log(x).sum()
    assert abs(sum_of_logs(x, C) - ref) <= 1e-12 * np.abs(np.log(x)).sum()
