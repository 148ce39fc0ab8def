"""Property tests for the activations tanh, sigmoid, relu and gelu (exact and tanh forms)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from tests.helpers import T, host
from tests.strategies import arrays, assert_close, check_float32, gradcheck_all, shapes

COVERED_OPS = {"tanh", "sigmoid", "relu", "gelu"}
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_exact_ref(x):
    """x * Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2, erf from the math module."""
    return x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh_ref(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


# name -> (op, NumPy formula, domain). "wide" reaches the saturated tails.
ACTIVATIONS = {
    "tanh": (nf.tanh, np.tanh, "wide"),
    "sigmoid": (nf.sigmoid, lambda x: 1.0 / (1.0 + np.exp(-x)), "wide"),
    "relu": (nf.relu, lambda x: np.maximum(x, 0.0), "away_from_kink"),
    "gelu_none": (lambda x: nf.gelu(x, approximate="none"), gelu_exact_ref, "wide"),
    "gelu_tanh": (lambda x: nf.gelu(x, approximate="tanh"), gelu_tanh_ref, "wide"),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(a=arrays(shapes(max_dims=4), "wide"))
def test_activation_forward(name, a):
    op, ref, _ = ACTIVATIONS[name]
    # erf is a series/continued fraction in the backend: agreement with math.erf to ~1e-15, not bitwise
    assert_close(op(T(a)), ref(a), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(data=st.data())
def test_activation_grad(name, data):
    op, _, domain = ACTIVATIONS[name]
    gradcheck_all(op, data.draw(arrays(shapes(max_dims=4), domain), label="a"))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_float32_keeps_dtype(name):
    op, _, _ = ACTIVATIONS[name]
    check_float32(op, np.array([[-5.0, -1.0, -0.3], [0.2, 1.5, 6.0]]))
    check_float32(op, np.array(0.7))


def test_gelu_exact_uses_erf():
    """GELU(x) = x (1 + erf(x/sqrt 2)) / 2 at points in both erf regimes (series below 3, continued fraction above)."""
    xs = [-10.0, -6.0, -4.3, -3.0, -1.0, -1e-3, 0.0, 0.5, 2.0, 4.25, 4.5, 7.0]
    got = host(nf.gelu(T(np.array(xs))))
    for x, y in zip(xs, got):
        expected = x * 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        assert abs(y - expected) <= 1e-15 + 1e-13 * abs(expected), (x, y, expected)


def test_gelu_exact_and_tanh_forms_differ():
    """The two forms are close but not equal (the approximation error is ~1e-4 near |x| = 2)."""
    x = T(np.array([2.0]))
    diff = abs(host(nf.gelu(x))[0] - host(nf.gelu(x, approximate="tanh"))[0])
    assert 1e-6 < diff < 1e-3


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match=r"^gelu: approximate must be 'none' or 'tanh'; got 'erf'$"):
        nf.gelu(T(np.ones(2)), approximate="erf")


def test_sigmoid_saturates_without_overflow():
    x = T(np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0]), requires_grad=True)
    y = nf.sigmoid(x)
    y.sum().backward()
    out = host(y)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(host(x.grad)))
    np.testing.assert_allclose(out[[0, 2, 4]], [0.0, 0.5, 1.0], atol=1e-15)


def test_relu_gradient_at_zero_is_zero():
    x = T(np.array([-1.0, 0.0, 2.0]), requires_grad=True)
    nf.relu(x).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [0.0, 0.0, 1.0])


def test_gelu_refuses_integer_input():
    with pytest.raises(TypeError, match="gelu: the input must be floating point"):
        nf.gelu(T(np.arange(3)))
