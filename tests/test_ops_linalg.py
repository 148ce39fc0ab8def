"""Property tests for matmul (2-D, 1-D operands on either side, batched with broadcast batch axes)
and linear (x @ weight^T + bias over any leading axes)."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from tests.helpers import T
from tests.strategies import arrays, assert_close, check_float32, gradcheck_all

COVERED_OPS = {"matmul", "linear"}
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path


@st.composite
def matmul_shapes(draw):
    """(shape_a, shape_b) for a @ b: each operand 1-D, 2-D, or batched with batch axes that
    broadcast against the other's (rank changes and size-1 axes on either side)."""
    n, k, m = (draw(st.integers(1, 3), label=s) for s in "nkm")
    batch_a, batch_b = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2,
                                                               max_side=3), label="batch").input_shapes
    shape_a = (k,) if draw(st.booleans()) else batch_a + (n, k)
    shape_b = (k,) if draw(st.booleans()) else batch_b + (k, m)
    return shape_a, shape_b


@given(shapes=matmul_shapes(), data=st.data())
@example(shapes=((3,), (3,)), data=None)              # vector . vector -> 0-d
@example(shapes=((2,), (4, 2, 3)), data=None)         # 1-D a against a batch
@example(shapes=((2, 1, 3, 2), (2,)), data=None)      # batch against a 1-D b
@example(shapes=((1, 2, 3), (4, 1, 3, 2)), data=None)  # batch axes broadcast both ways, rank change
def test_matmul_forward_and_grad(shapes, data):
    shape_a, shape_b = shapes
    if data is None:                                  # explicit examples: seeded values
        rng = np.random.default_rng(len(shape_a) * 10 + len(shape_b))
        a, b = rng.standard_normal(shape_a), rng.standard_normal(shape_b)
    else:
        a, b = data.draw(arrays(shape_a), label="a"), data.draw(arrays(shape_b), label="b")
    assert_close(nf.matmul(T(a), T(b)), np.matmul(a, b), rtol=1e-12, atol=1e-12)
    gradcheck_all(nf.matmul, a, b)


def test_matmul_operator_and_reuse():
    """x @ x^T through the @ operator: both uses of x contribute to its gradient."""
    a = np.random.default_rng(3).standard_normal((3, 2))
    gradcheck_all(lambda x: x @ nf.transpose(x), a)


@pytest.mark.parametrize("shapes", [((2, 3), (3, 4)), ((3,), (3,)), ((3,), (2, 3, 4)), ((2, 2, 3), (3,)),
                                    ((1, 2, 3), (4, 3, 2))])
def test_matmul_float32_keeps_dtype(shapes):
    rng = np.random.default_rng(4)
    check_float32(nf.matmul, *(rng.standard_normal(s) for s in shapes))


@pytest.mark.parametrize("shape_a, shape_b, why", [
    ((2, 3), (4, 5), "not aligned"),
    ((3,), (4,), "not aligned"),
    ((2, 3), (2,), "not aligned"),
    ((2, 2, 3), (3, 3, 4), "batch"),
    ((), (3,), "at least 1 dimension"),
])
def test_matmul_bad_shapes_name_op_and_shapes(shape_a, shape_b, why):
    with pytest.raises(ValueError) as info:
        nf.matmul(T(np.ones(shape_a)), T(np.ones(shape_b)))
    msg = str(info.value)
    assert "matmul" in msg and str(shape_a) in msg and str(shape_b) in msg and why in msg


@given(lead=hnp.array_shapes(min_dims=0, max_dims=3, max_side=3), n_in=st.integers(1, 3),
       n_out=st.integers(1, 3), bias=st.booleans(), data=st.data())
def test_linear_forward_and_grad(lead, n_in, n_out, bias, data):
    x = data.draw(arrays(lead + (n_in,)), label="x")
    w = data.draw(arrays((n_out, n_in)), label="w")
    b = data.draw(arrays((n_out,)), label="b") if bias else None
    expected = x @ w.T + (b if bias else 0.0)
    args = (x, w, b) if bias else (x, w)
    assert_close(nf.linear(*(T(a) for a in args)), expected, rtol=1e-12, atol=1e-12)
    gradcheck_all(nf.linear, *args)


def test_linear_float32_keeps_dtype():
    rng = np.random.default_rng(5)
    check_float32(nf.linear, rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5))


@pytest.mark.parametrize("shape_x, shape_w, shape_b", [((2, 3), (4, 2), None), ((2, 3), (4, 3), (3,)),
                                                        ((3,), (3,), None)])
def test_linear_bad_shapes_name_op_and_shapes(shape_x, shape_w, shape_b):
    args = [T(np.ones(shape_x)), T(np.ones(shape_w))] + ([T(np.ones(shape_b))] if shape_b else [])
    with pytest.raises(ValueError) as info:
        nf.linear(*args)
    msg = str(info.value)
    assert "linear" in msg and (str(shape_w) in msg)
