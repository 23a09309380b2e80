"""The gradient checker itself: accurate on a known function, and it catches wrong gradients."""
import numpy as np
import pytest

from minikd.gradcheck import check_vjp, compare, numerical_vjp


def f(x, w):
    return np.sin(x) * w**3 + x * w


def grads(x, w, g):
    return [g * (np.cos(x) * w**3 + w), g * (3 * np.sin(x) * w**2 + x)]


@pytest.mark.parametrize("method, eps, tol", [("central", 1e-6, 1e-8), ("central4", 1e-3, 1e-10),
                                              ("complex", 1e-20, 1e-14)])
def test_methods_are_accurate(method, eps, tol):
    rng = np.random.default_rng(0)
    x, w, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    num = numerical_vjp(f, [x, w], g, eps=eps, method=method)
    for a, n in zip(grads(x, w, g), num):
        assert compare(a, n).max_rel <= tol


def test_wrong_gradients_fail():
    rng = np.random.default_rng(1)
    x, w, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    good = grads(x, w, g)
    assert check_vjp(f, [x, w], g, good).max_rel <= 1e-9
    for bad in ([good[0] * 1.001, good[1]], [good[0], np.zeros_like(good[1])], [np.ones_like(good[0]), good[1]]):
        assert check_vjp(f, [x, w], g, bad).max_rel > 1e-4


def test_inputs_are_not_modified_and_errors():
    x = np.ones(3)
    x0 = x.copy()
    numerical_vjp(lambda x: x**2, [x], np.ones(3))
    np.testing.assert_array_equal(x, x0)
    with pytest.raises(ValueError, match="method"):
        numerical_vjp(lambda x: x, [x], np.ones(3), method="forward")
    with pytest.raises(ValueError, match="shape"):
        compare(np.zeros(2), np.zeros(3))
