"""The engine (npformer/autograd.py) when inputs share arrays or only some require grad: one array
fed to several inputs sums into new arrays and every leaf owns its .grad; a frozen input gets none.

Every test builds its tensors on the device under test (NPFORMER_DEVICE) with
``T`` and reads them back with ``host``.
"""

import numpy as np
import pytest

import npformer as nf
from tests.helpers import T, host
from tests.test_autograd import _rand


# ----------------------------------------------------------------------------- one array, several inputs
# add's backward hands the very array it receives to both inputs, and the seed may be the caller's
# own array: the engine must sum into new arrays (never `prev += pg`) and each leaf must own its .grad.

def test_an_intermediate_used_twice_beside_a_weight():
    # y = (h + w) + h with h = 3x: dy/dx = 2 * 3 g = 6g, dy/dw = g
    x0, w0, g0 = _rand(20, 2, 3), _rand(21, 2, 3), _rand(22, 2, 3)
    x, w, g = T(x0, requires_grad=True), T(w0, requires_grad=True), T(g0)
    h = x * 3.0
    ((h + w) + h).backward(g)
    np.testing.assert_array_equal(host(w.grad), g0)              # exact: one contribution, copied
    np.testing.assert_allclose(host(x.grad), 6 * g0, rtol=1e-15)
    np.testing.assert_array_equal(host(g), g0)                   # the caller's array is untouched


def test_two_parameters_added_own_their_grads_across_two_backwards():
    a, b = T(np.zeros(3), requires_grad=True), T(np.zeros(3), requires_grad=True)
    g0 = np.array([1.0, 2.0, 4.0])
    g = T(g0)
    for n in (1, 2):
        (a + b).backward(g)
        assert a.grad is not b.grad                              # else the second pass would add 2g to each
        np.testing.assert_array_equal(host(a.grad), n * g0)
        np.testing.assert_array_equal(host(b.grad), n * g0)
    np.testing.assert_array_equal(host(g), g0)


def test_add_of_a_tensor_to_itself():
    x0, g0 = _rand(23, 4), _rand(24, 4)
    x, g = T(x0, requires_grad=True), T(g0)
    nf.add(x, x).backward(g)
    np.testing.assert_array_equal(host(x.grad), 2 * g0)          # g + g is exact
    np.testing.assert_array_equal(host(g), g0)


def test_a_leaf_seeded_directly_copies_the_callers_grad():
    x, g = T(np.zeros(3), requires_grad=True), T(np.array([1.0, 2.0, 3.0]))
    x.backward(g)
    assert x.grad is not g.data
    x.grad[0] = 42.0
    assert host(g).tolist() == [1.0, 2.0, 3.0]


def test_grad_accumulates_in_place_as_in_pytorch():
    """A second backward adds into the same .grad array (PyTorch's AccumulateGrad does the same, in
    place): a reference held to .grad sees the sum, and a copy keeps the first gradient."""
    x0 = _rand(25, 3)
    x = T(x0, requires_grad=True)
    (x * x).sum().backward()
    first, kept = x.grad, host(x.grad).copy()
    (x * 3.0).sum().backward()
    assert x.grad is first
    np.testing.assert_allclose(host(first), 2 * x0 + 3, rtol=1e-15)
    np.testing.assert_array_equal(kept, 2 * x0)


def test_a_sink_gets_one_array_per_leaf_and_writes_nothing():
    """With a sink, the arrays handed over stay as they were: nothing adds into them later."""
    a, b = T(np.zeros(3), requires_grad=True), T(np.zeros(3), requires_grad=True)
    g0 = np.array([1.0, 2.0, 4.0])
    g = T(g0)
    got = []
    for _ in range(2):
        nf.autograd.backward(a + b + a, g, sink=lambda t, arr: got.append((t, arr)))
    assert a.grad is None and b.grad is None
    assert [t is a for t, _ in got].count(True) == 2 and len(got) == 4      # one per leaf and pass
    for t, arr in got:
        np.testing.assert_array_equal(host(arr), 2 * g0 if t is a else g0)
    np.testing.assert_array_equal(host(g), g0)


# ----------------------------------------------------------------------------- only some inputs require grad

def _partial_cases():
    rng = np.random.default_rng(30)
    r = lambda *shape: rng.standard_normal(shape)                       # noqa: E731
    return {
        "mul": (lambda a, b: a * b, [r(3, 4), r(4)]),
        "div": (lambda a, b: a / b, [r(3, 4), r(3, 1) + 3.0]),
        "matmul": (lambda a, b: a @ b, [r(2, 3, 4), r(4, 5)]),
        "linear": (lambda x, w, b: nf.linear(x, w, b), [r(2, 3, 4), r(5, 4), r(5)]),
        "layer_norm": (lambda x, w, b: nf.layer_norm(x, 4, weight=w, bias=b), [r(3, 4), r(4), r(4)]),
        "concatenate": (lambda a, b: nf.concatenate([a, b], axis=1) * 2.0, [r(2, 3), r(2, 2)]),
        "where": (lambda a, b: nf.where(T(np.array([True, False, True])), a, b), [r(2, 3), r(3)]),
        "reused": (lambda a, b: a * b + a * a - b, [r(3), r(3)]),
    }


@pytest.mark.parametrize("case", sorted(_partial_cases()))
def test_gradients_when_only_some_inputs_require_grad(case):
    """Each subset of inputs requiring grad: the frozen ones get no .grad, the others the same
    gradient, bit for bit, as when every input requires it, and that gradient passes a
    central-difference check in float64."""
    import itertools
    fn, arrays = _partial_cases()[case]
    cot = np.random.default_rng(31).standard_normal(fn(*[T(a) for a in arrays]).shape)

    def grads_for(mask):
        inputs = [T(a, requires_grad=m) for a, m in zip(arrays, mask)]
        fn(*inputs).backward(T(cot))
        return [t.grad for t in inputs]

    full = grads_for([True] * len(arrays))
    for mask in itertools.product([False, True], repeat=len(arrays)):
        if not any(mask):
            continue
        got = grads_for(mask)
        for m, g, ref in zip(mask, got, full):
            if m:
                np.testing.assert_array_equal(host(g), host(ref))
            else:
                assert g is None
        inputs = [T(a, requires_grad=m) for a, m in zip(arrays, mask)]
        assert nf.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("op", ["add", "mul", "matmul"])
def test_a_second_input_frozen_after_the_forward_leaves_the_first_its_grad(op):
    """The backward pass visits an op's second input before its first: a frozen one (whether the op
    hands it a gradient, as add does, or skips it, as mul does) must not end the pass there."""
    w0, x0 = _rand(40, 3, 3), _rand(41, 3, 3)
    w, x = T(w0, requires_grad=True), T(x0, requires_grad=True)
    fn, dw = {"add": (lambda a, b: a + b, np.ones((3, 3))), "mul": (lambda a, b: a * b, x0),
              "matmul": (lambda a, b: a @ b, np.ones((3, 3)) @ x0.T)}[op]
    y = fn(w, x)
    x.requires_grad = False
    y.sum().backward()
    assert x.grad is None
    np.testing.assert_allclose(host(w.grad), dw, rtol=1e-15)
