"""Hint, RKD distance/angle and deep mutual learning: gradients, invariances, PyTorch parity."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minikd as mk
from minikd.gradcheck import check_vjp
from minikd.losses.relational import RKD_TERMS
from minikd.testing import logits as logit_arrays
from minikd.testing import temperatures

RTOL = 1e-7


def seeded(seed):
    return np.random.default_rng(seed)


@st.composite
def embeddings(draw, max_n=7, min_d=1, duplicates=True):
    n = draw(st.integers(2, max_n))
    r = seeded(draw(st.integers(0, 2**32 - 1)))
    E = r.standard_normal((n, draw(st.integers(min_d, 5)))) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    F = r.standard_normal((n, draw(st.integers(1, 5))))
    if duplicates and draw(st.booleans()):  # a duplicated teacher point (a coincident pair)
        F[-1] = F[0]
    return E, F, float(r.standard_normal())


def direct_cosines(E):
    """The N^3 cosines written out (small N only), as the authors' code computes them."""
    v = E[None, :, :] - E[:, None, :]
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    u = np.where(n > 0, v / np.where(n > 0, n, 1), 0)
    return np.einsum("abd,acd->abc", u, u)


def near_huber_kink(E, F, which):
    """True when some Huber argument |x| is within 1e-3 of 1, where h'' jumps: finite differences
    straddling the kink are wrong by O(h) (seen: a 4-point stencil off by 4e-7 where the
    2-point one and PyTorch autograd agree with the analytic gradient)."""
    if which == "angle":
        x = direct_cosines(E) - direct_cosines(F)
    else:
        def psi(X):
            d = np.sqrt(np.maximum(((X[:, None] - X[None]) ** 2).sum(-1), 1e-12)) * (1 - np.eye(len(X)))
            return d / d[~np.eye(len(X), dtype=bool)].mean()
        x = psi(E) - psi(F)
    return bool(np.any(np.abs(np.abs(x) - 1) < 1e-3))


def min_distance(E):
    d = np.sqrt(((E[:, None] - E[None]) ** 2).sum(-1))
    return d[~np.eye(len(E), dtype=bool)].min()


def step(E):
    """Finite-difference step on the scale the losses vary on: the closest pair's distance."""
    return 1e-4 * max(min(min_distance(E), np.abs(E).max()), 1e-8)


def natural_floor(E):
    """1e-4 of the gradient's natural size ~ 1 / (N * closest pair distance): cosines of nearly
    coincident points are ill-conditioned (rounding of the loss grows as 1/distance), so a zero
    gradient there is compared at that scale (see minikd.gradcheck on floors)."""
    return 1e-4 * max(1.0, 1.0 / (len(E) * max(min_distance(E), 1e-12)))


def check_rkd_gradient(which, case, loss, reduction):
    """The hand-derived gradient of RKD term ``which`` ("distance" or "angle") against central
    differences of its loss."""
    forward, backward = RKD_TERMS[f"rkd_{which}"]
    E, F, g = case
    assume(loss == "squared" or not near_huber_kink(E, F, which))
    _, c = forward(E, F, loss=loss, reduction=reduction)
    res = check_vjp(lambda e: forward(e, F, loss=loss, reduction=reduction)[0], [E], g,
                    [backward(g, c)], eps=step(E), floor=natural_floor(E))
    assert res.max_rel <= RTOL, res


@given(embeddings(), st.sampled_from(["huber", "squared"]), st.sampled_from(["mean", "sum"]))
def test_rkd_distance_gradient(case, loss, reduction):
    check_rkd_gradient("distance", case, loss, reduction)


# D >= 2: in one dimension every triple is collinear, cos = +-1 is locally constant, the gradient is
# exactly 0 and finite differences measure only the rounding of ill-conditioned cosines
@given(embeddings(min_d=2), st.sampled_from(["huber", "squared"]), st.sampled_from(["mean", "sum"]))
def test_rkd_angle_gradient(case, loss, reduction):
    check_rkd_gradient("angle", case, loss, reduction)


def random_rotation(d, r):
    q, _ = np.linalg.qr(r.standard_normal((d, d)))
    return q


# no coincident points here: the authors' clamp (d >= 1e-6) is not scale invariant
@given(embeddings(duplicates=False), st.integers(0, 2**32 - 1))
def test_rkd_invariant_to_rotation_translation_scale(case, seed):
    E, F, _ = case
    r = seeded(seed)
    E2 = 3.7 * E @ random_rotation(E.shape[1], r) + r.standard_normal(E.shape[1])
    F2 = 0.4 * F @ random_rotation(F.shape[1], r) - 2.0
    for f in (mk.rkd_distance, mk.rkd_angle):
        np.testing.assert_allclose(f(E2, F2), f(E, F), rtol=1e-9, atol=1e-12)
    assert mk.rkd_distance(F, F) == 0 and mk.rkd_angle(F, F) == 0


@given(st.integers(0, 2**32 - 1), st.sampled_from(["batchmean", "mean", "sum"]))
def test_hint_gradient_and_zero(seed, reduction):
    r = seeded(seed)
    s, t = r.standard_normal((4, 3, 5)), r.standard_normal((4, 3, 5))
    g = float(r.standard_normal())
    _, c = mk.hint_forward(s, t, reduction=reduction)
    ds, dt = mk.hint_backward(g, c, teacher_grad=True)
    assert check_vjp(lambda a, b: mk.hint_loss(a, b, reduction=reduction), [s, t], g, [ds, dt]).max_rel <= RTOL
    assert mk.hint_loss(s, s.copy(), reduction=reduction) == 0
    np.testing.assert_allclose(mk.hint_loss(s, t, reduction="mean"), np.mean((s - t) ** 2), rtol=1e-14)
    np.testing.assert_allclose(mk.hint_loss(s, t), np.sum((s - t) ** 2) / 4, rtol=1e-14)


def test_hint_regressor_parameters_gradient():
    """The regressor (an nn.Linear) trained through the hint loss: parameter gradients checked."""
    r = seeded(0)
    reg = mk.nn.Linear(6, 4, dtype="float64", seed=1)
    x, t = r.standard_normal((5, 6)), r.standard_normal((5, 4))
    reg.zero_grad()
    y, c = reg.forward(x)
    _, hc = mk.hint_forward(y, t)
    reg.backward(mk.hint_backward(1.3, hc), c)

    def f(w, b):
        reg.params["weight"], reg.params["bias"] = w, b
        return mk.hint_loss(reg.forward(x)[0], t)
    w0, b0 = reg.params["weight"].copy(), reg.params["bias"].copy()
    grads = [reg.grads["weight"].copy(), reg.grads["bias"].copy()]
    assert check_vjp(f, [w0, b0], 1.3, grads).max_rel <= RTOL


@st.composite
def cohorts(draw):
    M = draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 5)), draw(st.integers(2, 6)))
    zs = [draw(logit_arrays(shape, neg_inf=False)) for _ in range(M)]
    labels = None
    if draw(st.booleans()):
        labels = seeded(draw(st.integers(0, 999))).integers(0, shape[1], shape[0])
        labels[0] = -100 if draw(st.booleans()) else labels[0]
    return zs, labels, draw(temperatures()), draw(st.booleans()), draw(st.booleans())


@given(cohorts(), st.integers(0, 2**32 - 1))
def test_mutual_detached_gradient(case, seed):
    zs, labels, T, avg, t2 = case
    kw = dict(T=T, mode="detached", average_peers=avg, scale_t2=t2)
    L, c = mk.mutual_forward(zs, labels, **kw)
    d = seeded(seed).standard_normal(len(zs))
    grads = mk.mutual_backward(d, c)
    for i in range(len(zs)):
        def f(z, i=i):
            return mk.mutual_loss([z if k == i else zs[k] for k in range(len(zs))], labels, **kw)[i]
        res = check_vjp(f, [zs[i]], d[i], [grads[i]], eps=1e-3 * min(T, 1), floor=1e-4 * max(1, T))
        assert res.max_rel <= RTOL, res


@given(cohorts(), st.integers(0, 2**32 - 1))
def test_mutual_joint_gradient_and_symmetry(case, seed):
    zs, labels, T, avg, t2 = case
    kw = dict(T=T, mode="joint", average_peers=avg, scale_t2=t2)
    L, c = mk.mutual_forward(zs, labels, **kw)
    g = float(seeded(seed).standard_normal())
    grads = mk.mutual_backward(g, c)
    res = check_vjp(lambda *z: mk.mutual_loss(list(z), labels, **kw), zs, g, grads, eps=1e-3 * min(T, 1),
                    floor=1e-4 * max(1, T))
    assert res.max_rel <= RTOL, res
    perm = seeded(seed).permutation(len(zs))
    np.testing.assert_allclose(mk.mutual_loss([zs[k] for k in perm], labels, **kw), L, rtol=1e-12, atol=1e-12)


def test_mutual_matches_kd_for_two_models():
    r = seeded(3)
    a, b = r.standard_normal((6, 5)), r.standard_normal((6, 5))
    y = r.integers(0, 5, 6)
    L, _ = mk.mutual_forward([a, b], y, T=3.0)
    np.testing.assert_allclose(L[0], mk.kd_loss(a, b, y, T=3.0, alpha=1.0) + mk.cross_entropy_and_grad(a, y)[0],
                               rtol=1e-13)


def test_errors():
    E = np.zeros((3, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mk.rkd_distance(E[:1], E[:1])
    with pytest.raises(ValueError, match="expected 3 rows"):
        mk.rkd_angle(E, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="loss: expected"):
        mk.rkd_angle(E, E, loss="l1")
    with pytest.raises(ValueError, match="map the student features with a regressor"):
        mk.hint_loss(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="mode: expected"):
        mk.mutual_loss([E], mode="both")
    with pytest.raises(ValueError, match=r"logits_list\[1\]: expected shape"):
        mk.mutual_loss([E, np.zeros((3, 3))])


def test_hint_through_a_1x1_conv_regressor_on_feature_maps():
    """Feature maps (N, C, L): the regressor is a 1x1 Conv1d; its parameter gradients checked."""
    r = seeded(4)
    reg = mk.nn.Conv1d(4, 6, 1, dtype="float64", seed=2)
    x, t = r.standard_normal((3, 4, 5)), r.standard_normal((3, 6, 5))
    reg.zero_grad()
    y, c = reg.forward(x)
    _, hc = mk.hint_forward(y, t, reduction="mean")
    dx = reg.backward(mk.hint_backward(0.8, hc), c)

    def f(x, w, b):
        reg.params["weight"], reg.params["bias"] = w, b
        return mk.hint_loss(reg.forward(x)[0], t, reduction="mean")
    w0, b0 = reg.params["weight"].copy(), reg.params["bias"].copy()
    assert check_vjp(f, [x, w0, b0], 0.8, [dx, reg.grads["weight"].copy(), reg.grads["bias"].copy()]).max_rel <= RTOL
