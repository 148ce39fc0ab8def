"""Property tests for the elementwise ops: forward against NumPy, gradients by gradcheck, dtypes, errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from tests.helpers import T, host
from tests.strategies import (arrays, assert_close, broadcast_pairs, check_float32, gradcheck_all,
                              separated_pair, shapes)

COVERED_OPS = {"add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "abs", "maximum", "minimum"}
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path

# name -> (op, NumPy formula, domain of a, domain of b)
BINARY = {
    "add": (nf.add, lambda a, b: a + b, "real", "real"),
    "sub": (nf.sub, lambda a, b: a - b, "real", "real"),
    "mul": (nf.mul, lambda a, b: a * b, "real", "real"),
    "div": (nf.div, lambda a, b: a / b, "real", "nonzero"),
    "pow": (nf.pow, lambda a, b: a ** b, "positive", "real"),   # d/db = a^b log a needs a > 0
}

# name -> (op, NumPy formula, domain)
UNARY = {
    "neg": (nf.neg, lambda a: -a, "real"),
    "exp": (nf.exp, lambda a: np.exp(a), "real"),
    "log": (nf.log, lambda a: np.log(a), "positive"),
    "sqrt": (nf.sqrt, lambda a: np.sqrt(a), "positive"),
    "abs": (nf.abs, lambda a: np.abs(a), "away_from_kink"),
}

EXTREMA = {"maximum": (nf.maximum, np.maximum), "minimum": (nf.minimum, np.minimum)}


# ----------------------------------------------------------------------------- binary arithmetic

@pytest.mark.parametrize("name", sorted(BINARY))
@given(data=st.data())
def test_binary_forward_and_grad(name, data):
    op, ref, dom_a, dom_b = BINARY[name]
    shape_a, shape_b = data.draw(broadcast_pairs(), label="shapes")
    a = data.draw(arrays(shape_a, dom_a), label="a")
    b = data.draw(arrays(shape_b, dom_b), label="b")
    assert_close(op(T(a), T(b)), ref(a, b))
    gradcheck_all(op, a, b)


@pytest.mark.parametrize("name", sorted(BINARY))
@given(data=st.data())
def test_binary_with_python_number(name, data):
    """A Python number on either side is a constant; only the tensor gets a gradient."""
    op, ref, dom_a, dom_b = BINARY[name]
    a = data.draw(arrays(shapes(), dom_a), label="a")
    b = data.draw(arrays(shapes(), dom_b), label="b")
    c_left, c_right = 1.5, (2.5 if dom_b == "nonzero" else -1.25)
    assert_close(op(T(a), c_right), ref(a, c_right))
    gradcheck_all(lambda x: op(x, c_right), a)
    if name != "pow":                                            # pow's base must stay positive
        assert_close(op(c_left, T(b)), ref(c_left, b))
        gradcheck_all(lambda y: op(c_left, y), b)


@pytest.mark.parametrize("exponent", [2, 3])
@given(a=arrays(shapes(), "nonzero"))
def test_pow_negative_base_integer_exponent(exponent, a):
    """x ** n with an integer n is defined for negative x; d/dx = n x^(n-1)."""
    assert_close(nf.pow(T(a), exponent), a ** exponent)
    gradcheck_all(lambda x: x ** exponent, a)


def test_binary_float32_keeps_dtype():
    """float32 stays float32 against float32 tensors, Python numbers and NumPy float64 scalars (NEP 50)."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2.0, (2, 3))
    b = rng.uniform(0.5, 2.0, (3,))
    for name, (op, _, _, _) in BINARY.items():
        check_float32(op, a, b)
        check_float32(lambda x: op(x, 2.0), a)
        check_float32(lambda x: op(x, np.float64(2.0)), a)
        check_float32(lambda x: op(np.float64(2.0), x), a)


@pytest.mark.parametrize("name", sorted(BINARY) + sorted(EXTREMA))
def test_binary_shape_error_names_op_and_shapes(name):
    op = BINARY[name][0] if name in BINARY else EXTREMA[name][0]
    with pytest.raises(ValueError, match=rf"^{name}: shapes \(2, 3\) and \(4,\) cannot be broadcast together$"):
        op(T(np.ones((2, 3))), T(np.ones((4,))))


# ----------------------------------------------------------------------------- unary

@pytest.mark.parametrize("name", sorted(UNARY))
@given(data=st.data())
def test_unary_forward_and_grad(name, data):
    op, ref, dom = UNARY[name]
    a = data.draw(arrays(shapes(max_dims=4), dom), label="a")
    assert_close(op(T(a)), ref(a))
    gradcheck_all(op, a)


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_float32_keeps_dtype(name):
    op, _, _ = UNARY[name]
    check_float32(op, np.random.default_rng(1).uniform(0.5, 2.0, (3, 2)))
    check_float32(op, np.array(1.5))                             # 0-d


def test_abs_gradient_at_zero_is_zero():
    """sign(0) = 0, as in torch."""
    x = T(np.array([-2.0, 0.0, 3.0]), requires_grad=True)
    nf.abs(x).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [-1.0, 0.0, 1.0])


def test_reused_tensor_gets_both_contributions():
    """x * x: d/dx = 2x (the engine adds the gradient of each use)."""
    a = np.array([[1.0, -2.0], [0.5, 3.0]])
    x = T(a, requires_grad=True)
    nf.mul(x, x).sum().backward()
    np.testing.assert_allclose(host(x.grad), 2 * a)


# ----------------------------------------------------------------------------- maximum / minimum

@pytest.mark.parametrize("name", sorted(EXTREMA))
@given(data=st.data())
def test_extremum_forward_and_grad(name, data):
    op, ref = EXTREMA[name]
    shape_a, shape_b = data.draw(broadcast_pairs(), label="shapes")
    a, b = data.draw(separated_pair(shape_a, shape_b), label="a, b")
    assert_close(op(T(a), T(b)), ref(a, b))
    gradcheck_all(op, a, b)


@pytest.mark.parametrize("name", sorted(EXTREMA))
def test_extremum_ties_split_gradient_evenly(name):
    op, _ = EXTREMA[name]
    a = T(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = T(np.array([1.0, 0.0, 5.0]), requires_grad=True)
    op(a, b).backward(T(np.array([2.0, 1.0, 1.0])).data)        # tie at index 0: 2.0 splits 1.0 / 1.0
    if name == "maximum":                                         # a wins at 1, b wins at 2
        expected_a, expected_b = [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]
    else:                                                         # b wins at 1, a wins at 2
        expected_a, expected_b = [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]
    np.testing.assert_array_equal(host(a.grad), expected_a)
    np.testing.assert_array_equal(host(b.grad), expected_b)


@pytest.mark.parametrize("name", sorted(EXTREMA))
def test_extremum_tie_with_broadcast_scalar(name):
    """Every element ties with a broadcast 0-d b: each side gets half of each element's gradient."""
    op, _ = EXTREMA[name]
    a = T(np.ones((2, 2)), requires_grad=True)
    b = T(np.array(1.0), requires_grad=True)
    op(a, b).sum().backward()
    np.testing.assert_allclose(host(a.grad), np.full((2, 2), 0.5))
    np.testing.assert_allclose(host(b.grad), 2.0)


@pytest.mark.parametrize("name", sorted(EXTREMA))
def test_extremum_float32_keeps_dtype(name):
    op, _ = EXTREMA[name]
    a = np.array([[1.0, 2.0, 3.0], [0.0, 2.0, -1.0]])
    check_float32(op, a, np.array([1.0, 0.0, 5.0]))              # includes a tie
    check_float32(lambda x: op(x, 0.5), a)
