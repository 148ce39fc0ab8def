"""Property tests for matmul (2-D, 1-D operands on either side, batched with broadcast batch axes)
and linear (x @ weight^T + bias over any leading axes)."""

import re
import types

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from npformer import backend
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
    ((2, 3), (4, 5), "are not aligned (3 != 4)"),
    ((3,), (4,), "are not aligned (3 != 4)"),
    ((2, 3), (2,), "are not aligned (3 != 2)"),
    ((2, 2, 3), (3, 3, 4), "have batch axes that cannot be broadcast together"),
    ((), (3,), "are invalid: matmul needs operands with at least 1 dimension"),
    ((3,), (), "are invalid: matmul needs operands with at least 1 dimension"),
])
def test_matmul_bad_shapes_name_op_and_shapes(shape_a, shape_b, why):
    with pytest.raises(ValueError, match=f"^{re.escape(f'matmul: shapes {shape_a} and {shape_b} {why}')}$"):
        nf.matmul(T(np.ones(shape_a)), T(np.ones(shape_b)))


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


MISFIT = "linear: input of shape {} does not match weight of shape {} " \
         "(expected input (..., in) and weight (out, in), here input (..., {}))"


@pytest.mark.parametrize("shape_x, shape_w, shape_b, message", [
    ((2, 3), (4, 2), None, MISFIT.format((2, 3), (4, 2), 2)),
    ((), (4, 3), None, MISFIT.format((), (4, 3), 3)),
    ((3,), (3,), None, MISFIT.format((3,), (3,), 3)),
    ((3,), (), None, MISFIT.format((3,), (), "?")),          # a 0-d weight has no "in"
    ((2, 3), (4, 3), (3,), "linear: shapes (4, 3) and (3,) (weight, bias) do not fit: bias must be (out,)"),
    ((2, 3), (4, 3), (1, 4), "linear: shapes (4, 3) and (1, 4) (weight, bias) do not fit: bias must be (out,)"),
])
def test_linear_bad_shapes_name_op_and_shapes(shape_x, shape_w, shape_b, message):
    args = [T(np.ones(shape_x)), T(np.ones(shape_w))] + ([T(np.ones(shape_b))] if shape_b else [])
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        nf.linear(*args)


class _FakeGpuArray(np.ndarray):
    """A NumPy array the backend is told to treat as a GPU array (as in tests/test_backend.py)."""


def test_device_mismatch_names_the_op_and_the_operands(monkeypatch):
    """The device checks run on the CPU with a NumPy array posing as a GPU one (host arrays, not T(...))."""
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=_FakeGpuArray))
    x, on_gpu = nf.Tensor(np.ones((2, 3))), nf.Tensor(np.ones((3, 2)).view(_FakeGpuArray))
    message = "{}: inputs are on different devices ({}); move them with .to(device) first"
    with pytest.raises(backend.DeviceMismatchError,
                       match=f"^{re.escape(message.format('matmul', '(2, 3) on cpu, (3, 2) on gpu'))}$"):
        nf.matmul(x, on_gpu)
    with pytest.raises(backend.DeviceMismatchError,
                       match=f"^{re.escape(message.format('linear', '(2, 3) on cpu, (2, 3) on cpu, (2,) on gpu'))}$"):
        nf.linear(x, nf.Tensor(np.ones((2, 3))), nf.Tensor(np.ones(2).view(_FakeGpuArray)))
