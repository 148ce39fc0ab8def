"""gradcheck (npformer/gradcheck.py): passes on correct ops, and catches wrong backwards with a
report that names the input, the element and both values.

The wrong ops are built here with npformer.ops._core.result and a deliberately
wrong gradient; their backward records the cotangent it receives so the
expected analytical and numerical values can be computed independently.
"""

import re

import numpy as np
import pytest

import npformer as nf
from npformer.gradcheck import GradcheckError, gradcheck
from npformer.ops._core import result, tensors
from tests.helpers import T, host


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def _scaled_square(error_at=None, error=1.0, nan_at=None, seen=None):
    """f(a, b) = a * b^2 (elementwise) whose gradient for b is wrong by `error` at `error_at`
    (or NaN at `nan_at`). seen collects the cotangents the backward receives."""
    def op(a, b):
        a, b = tensors("scaled_square", a, b)

        def backward(g):
            if seen is not None:
                seen.append(host(g))
            gb = 2 * a.data * b.data
            if error_at is not None:
                gb[error_at] += error
            if nan_at is not None:
                gb[nan_at] = np.nan
            return g * b.data ** 2, g * gb
        return result(a.data * b.data ** 2, (a, b), backward, "scaled_square")
    return op


def _numbers(message):
    m = re.search(r"analytical (\S+), numerical (\S+) ", message)
    assert m, message
    return float(m.group(1)), float(m.group(2))


# ----------------------------------------------------------------------------- passing

@pytest.mark.parametrize("name, fn, shapes", [
    ("mul", lambda a, b: a * b, [(3, 4), (4,)]),
    ("matmul", lambda a, b: a @ b, [(2, 3), (3, 2)]),
    ("softmax", lambda a: a.softmax(-1), [(2, 5)]),
    ("tanh of sum", lambda a: (a.tanh() * 2.0).sum(axis=0), [(3, 2)]),
    ("custom op, correct", _scaled_square(), [(2, 3), (2, 3)]),
])
def test_passes_on_correct_ops(name, fn, shapes):
    inputs = [T(_rand(i, *s), requires_grad=True) for i, s in enumerate(shapes)]
    before = [host(x).copy() for x in inputs]
    assert gradcheck(fn, inputs) is True
    for x, b in zip(inputs, before):      # the inputs are left as they were
        np.testing.assert_array_equal(host(x), b)
        assert x.grad is None


def test_non_tensor_and_constant_inputs_pass_through():
    x = T(_rand(0, 4, 3), requires_grad=True)
    const = T(_rand(1, 3))
    target = T(np.array([0, 2, 1, 1]))
    assert gradcheck(lambda x, c, t, s: nf.cross_entropy(x * c * s, t), [x, const, target, 0.5])


# ----------------------------------------------------------------------------- failing

def test_wrong_backward_names_input_element_and_values():
    seen = []
    a0, b0 = _rand(2, 2, 3), _rand(3, 2, 3)
    op = _scaled_square(error_at=(1, 2), error=0.75, seen=seen)
    with pytest.raises(GradcheckError) as info:
        gradcheck(op, [T(a0, requires_grad=True), T(b0, requires_grad=True)])
    msg = str(info.value)
    assert "input 1" in msg and "element (1, 2)" in msg and "(2, 3)" in msg
    v = seen[0][1, 2]                       # the cotangent at that element
    analytical, numerical = _numbers(msg)
    assert analytical == pytest.approx(v * (2 * a0[1, 2] * b0[1, 2] + 0.75), rel=1e-8)
    assert numerical == pytest.approx(v * 2 * a0[1, 2] * b0[1, 2], rel=1e-5)
    assert gradcheck(op, [T(a0, requires_grad=True), T(b0, requires_grad=True)], raise_exception=False) is False
    # with input 1 held constant, the wrong gradient is never computed and the check passes
    assert gradcheck(op, [T(a0, requires_grad=True), T(b0)])


def test_nan_gradient_fails():
    op = _scaled_square(nan_at=(0, 1))
    with pytest.raises(GradcheckError, match=r"input 1 .*element \(0, 1\).*analytical nan"):
        gradcheck(op, [T(_rand(4, 2, 2), requires_grad=True), T(_rand(5, 2, 2), requires_grad=True)])


def test_wrong_gradient_shape_fails():
    def op(a):
        (a,) = tensors("bad_shape", a)
        return result(a.data.sum(axis=0), (a,), lambda g: (g,), "bad_shape")   # should broadcast to (2, 3)
    with pytest.raises(GradcheckError, match=r"input 0 has shape \(3,\).*expected \(2, 3\)"):
        gradcheck(op, [T(_rand(6, 2, 3), requires_grad=True)])


def test_non_float64_inputs_raise_type_error():
    x32 = T(_rand(7, 3), requires_grad=True, dtype=np.float32)
    with pytest.raises(TypeError, match="input 1 has dtype float32.*float64"):
        gradcheck(lambda a, b: a * b, [T(_rand(8, 3), requires_grad=True), x32])


def test_bad_calls():
    with pytest.raises(ValueError, match="no input has requires_grad"):
        gradcheck(lambda a: a * 2.0, [T(_rand(9, 3))])
    with pytest.raises(TypeError, match="must return Tensors"):
        gradcheck(lambda a: host(a), [T(_rand(10, 3), requires_grad=True)])


# ----------------------------------------------------------------------------- directions, outputs

def test_directions_mode_passes_and_catches():
    a = T(_rand(11, 12, 10), requires_grad=True)
    b = T(_rand(12, 10, 8), requires_grad=True)
    assert gradcheck(lambda a, b: (a @ b).tanh(), [a, b], directions=4)
    op = _scaled_square(error_at=(5, 7), error=2.0)
    with pytest.raises(GradcheckError, match=r"input 1 .*at direction \d"):
        gradcheck(op, [T(_rand(13, 12, 10), requires_grad=True), T(_rand(14, 12, 10), requires_grad=True)],
                  directions=3)


def test_multiple_outputs():
    a, b = T(_rand(15, 3, 2), requires_grad=True), T(_rand(16, 3, 2), requires_grad=True)
    assert gradcheck(lambda a, b: (a * b, (a - b).exp(), a.sum(axis=1)), [a, b])
    assert gradcheck(lambda a: a.split(1, axis=1), [a])

    def two(a, b):
        return nf.sigmoid(a), _scaled_square(error_at=(2, 0))(a, b)   # only the second output is wrong
    with pytest.raises(GradcheckError, match=r"input 1 .*element \(2, 0\)"):
        gradcheck(two, [a, b])
