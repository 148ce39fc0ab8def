"""Property tests for the reductions sum, mean, max and var over drawn axes, keepdims on and off."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from tests.helpers import T, host
from tests.strategies import (arrays, assert_close, check_float32, distinct_arrays, gradcheck_all,
                              reduction_args)

COVERED_OPS = {"sum", "mean", "max", "var"}
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path


def np_axis(axis, ndim):
    """The axis NumPy needs for the same reduction: a 0-d array reduces over no axes (axis 0 or -1 allowed)."""
    return () if ndim == 0 and axis is not None else axis


# name -> (op, NumPy formula taking (x, axis, keepdims))
REDUCTIONS = {
    "sum": (nf.sum, lambda x, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims)),
    "mean": (nf.mean, lambda x, axis, keepdims: np.mean(x, axis=axis, keepdims=keepdims)),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@given(args=reduction_args(), data=st.data())
def test_sum_mean_forward_and_grad(name, args, data):
    op, ref = REDUCTIONS[name]
    shape, axis, keepdims = args
    x = data.draw(arrays(shape), label="x")
    assert_close(op(T(x), axis, keepdims), ref(x, np_axis(axis, x.ndim), keepdims))
    gradcheck_all(lambda t: op(t, axis=axis, keepdims=keepdims), x)


@given(args=reduction_args(), data=st.data())
def test_max_forward_and_grad(args, data):
    shape, axis, keepdims = args
    x = data.draw(distinct_arrays(shape), label="x")          # no tie inside the finite-difference step
    assert_close(nf.max(T(x), axis, keepdims), np.max(x, axis=np_axis(axis, x.ndim), keepdims=keepdims))
    gradcheck_all(lambda t: nf.max(t, axis=axis, keepdims=keepdims), x)


@given(args=reduction_args(), correction=st.sampled_from([0, 1]), data=st.data())
def test_var_forward_and_grad(args, correction, data):
    shape, axis, keepdims = args
    x = data.draw(arrays(shape), label="x")
    ax = np_axis(axis, x.ndim)
    n = x.size // np.size(np.sum(x, axis=ax))                 # elements reduced into each output
    if n <= correction:                                        # no degrees of freedom: tested below
        correction = 0
    expected = np.var(x, axis=ax, ddof=correction, keepdims=keepdims)
    assert_close(nf.var(T(x), axis, keepdims, correction), expected)
    gradcheck_all(lambda t: nf.var(t, axis=axis, keepdims=keepdims, correction=correction), x)


def test_max_ties_split_gradient_evenly():
    """Tied maxima share the gradient equally (torch.amax), along an axis and over all elements."""
    a = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    x = T(a, requires_grad=True)
    nf.max(x, axis=1).backward(T(np.array([1.0, 3.0])).data)
    np.testing.assert_allclose(host(x.grad), [[0.0, 0.5, 0.5], [1.0, 1.0, 1.0]])
    x = T(a, requires_grad=True)
    nf.max(x).backward()
    np.testing.assert_allclose(host(x.grad), [[0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
    x = T(a, requires_grad=True)
    nf.max(x, axis=0, keepdims=True).sum().backward()
    np.testing.assert_allclose(host(x.grad), [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_zero_dim_axis_zero_is_identity():
    """A 0-d tensor accepts axis 0 or -1 (as torch does); the reduction leaves it unchanged."""
    for op in (nf.sum, nf.mean, nf.max):
        x = T(np.array(2.5), requires_grad=True)
        y = op(x, axis=-1, keepdims=True)
        assert y.shape == () and host(y) == 2.5
        y.backward()
        assert host(x.grad) == 1.0


@pytest.mark.parametrize("name", ["sum", "mean", "max", "var"])
def test_reduction_float32_keeps_dtype(name):
    op = getattr(nf, name)
    a = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    check_float32(lambda t: op(t, axis=1), a)
    check_float32(lambda t: op(t, axis=(0, -1), keepdims=True), a)
    check_float32(op, a)


@pytest.mark.parametrize("name", ["sum", "mean", "max", "var"])
def test_reduction_axis_out_of_range(name):
    with pytest.raises(ValueError) as info:
        getattr(nf, name)(T(np.ones((2, 3))), axis=2)
    assert name in str(info.value) and "axis 2" in str(info.value)


def test_var_without_degrees_of_freedom_raises():
    with pytest.raises(ValueError, match="var.*degrees of freedom"):
        nf.var(T(np.ones((3, 1))), axis=1)


def test_max_of_empty_raises():
    with pytest.raises(ValueError, match=r"max.*\(0, 3\)"):
        nf.max(T(np.ones((0, 3))))
