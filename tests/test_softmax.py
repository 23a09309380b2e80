"""Temperature softmax / log-softmax / logsumexp: gradients, invariants, numerics, errors."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minikd as mk
from minikd.gradcheck import check_vjp
from minikd.testing import logits, shapes, temperatures, upstreams

RTOL = 1e-7


@st.composite
def softmax_cases(draw):
    shape = draw(shapes())
    return draw(logits(shape)), draw(temperatures()), draw(upstreams(shape))


@given(softmax_cases())
def test_softmax_gradient(case):
    x, T, g = case
    _, cache = mk.softmax_forward(x, T)
    res = check_vjp(lambda x: mk.softmax(x, T), [x], g, [mk.softmax_backward(g, cache)],
                    eps=1e-3 * min(T, 1))
    assert res.max_rel <= RTOL, res


@given(softmax_cases())
def test_log_softmax_gradient(case):
    x, T, g = case
    y, cache = mk.log_softmax_forward(x, T)
    g = np.where(np.isfinite(y), g, 0)  # -inf outputs: their upstream cannot be probed
    res = check_vjp(lambda x: np.where(np.isfinite(y), mk.log_softmax(x, T), 0), [x], g,
                    [mk.log_softmax_backward(g, cache)], eps=1e-3 * min(T, 1))
    assert res.max_rel <= RTOL, res


@given(softmax_cases())
def test_logsumexp_gradient(case):
    x, _, g = case
    g = g[..., 0]
    _, cache = mk.logsumexp_forward(x)
    res = check_vjp(mk.logsumexp, [x], g, [mk.logsumexp_backward(g, cache)], eps=1e-3)
    assert res.max_rel <= RTOL, res


@given(softmax_cases())
def test_softmax_invariants(case):
    x, T, g = case
    p, cache = mk.softmax_forward(x, T)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    assert np.all(p[np.isneginf(x)] == 0)
    shift = 7.5 * np.arange(1, x.shape[-2] + 1).reshape((-1, 1))
    np.testing.assert_allclose(mk.softmax(x + shift, T), p, atol=1e-12)
    dx = mk.softmax_backward(g, cache)
    np.testing.assert_allclose(dx.sum(-1), 0.0, atol=1e-12 * (1 + np.abs(g).max() / T))
    assert np.all(dx[np.isneginf(x)] == 0)
    _, lcache = mk.log_softmax_forward(x, T)
    dlx = mk.log_softmax_backward(np.where(np.isfinite(x), g, 0), lcache)
    np.testing.assert_allclose(dlx.sum(-1), 0.0, atol=1e-12 * (1 + np.abs(g).max() * x.shape[-1] / T))


def test_values_by_hand():
    x = np.array([[0.0, np.log(3.0)], [1.0, -np.inf]])
    np.testing.assert_allclose(mk.softmax(x), [[0.25, 0.75], [1.0, 0.0]], rtol=1e-15)
    np.testing.assert_allclose(mk.logsumexp(x), [np.log(4.0), 1.0], rtol=1e-15)
    # at T = 2 the odds are sqrt(3) : 1
    np.testing.assert_allclose(mk.softmax(x[:1], T=2.0), [[1 / (1 + 3**0.5), 3**0.5 / (1 + 3**0.5)]],
                               rtol=1e-15)
    np.testing.assert_allclose(mk.log_softmax(x[:1]), [[np.log(0.25), np.log(0.75)]], rtol=1e-15)


@pytest.mark.parametrize("T", [0.01, 0.1, 1.0, 100.0, 1000.0])
def test_float32_extremes_do_not_overflow(T):
    rng = np.random.default_rng(1)
    x = (rng.uniform(-1e4, 1e4, size=(64, 50))).astype(np.float32)
    x[:, 3] = -np.inf
    p = mk.softmax(x, T)
    lp = mk.log_softmax(x, T)
    assert p.dtype == np.float32 and lp.dtype == np.float32
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(lp[:, [0, 1, 2, 4]]))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    ref = mk.softmax(x.astype(np.float64), T)
    np.testing.assert_allclose(p, ref, atol=1e-5)
    assert np.all(np.isfinite(mk.logsumexp(x)))


def test_naive_formula_overflows_where_ours_does_not():
    x = np.array([[1e4, 0.0]], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(x / 0.01) / np.exp(x / 0.01).sum(-1, keepdims=True)
    assert np.isnan(naive).any()
    np.testing.assert_array_equal(mk.softmax(x, 0.01), [[1.0, 0.0]])


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, r"\+inf")])
def test_bad_values_name_the_row(bad, what):
    x = np.zeros((4, 3))
    x[2, 1] = bad
    for f in (mk.softmax, mk.log_softmax, mk.logsumexp):
        with pytest.raises(ValueError, match=rf"x: row 2 contains {what}"):
            f(x)


def test_all_neg_inf_row_and_sequence_index():
    x = np.zeros((2, 3, 4))
    x[1, 2] = -np.inf
    with pytest.raises(ValueError, match=r"row \(1, 2\) is entirely -inf"):
        mk.softmax(x)


@pytest.mark.parametrize("T", [0, -1.0, np.inf, np.nan])
def test_bad_temperature(T):
    with pytest.raises(ValueError, match="T: the temperature must be finite and > 0"):
        mk.softmax(np.zeros((1, 2)), T)


def test_bad_dtype_and_type():
    with pytest.raises(TypeError, match="floating-point"):
        mk.softmax(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="expected a NumPy or CuPy array"):
        mk.softmax([[0.0, 1.0]])
    with pytest.raises(TypeError, match="T: expected a positive number"):
        mk.softmax(np.zeros((1, 2)), "hot")


def test_inputs_not_mutated():
    x = np.random.default_rng(0).standard_normal((3, 4))
    x0 = x.copy()
    p, cache = mk.softmax_forward(x, 2.0)
    mk.softmax_backward(np.ones_like(p), cache)
    np.testing.assert_array_equal(x, x0)
    assert not np.shares_memory(p, x)
