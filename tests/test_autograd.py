"""The engine (npformer/autograd.py): accumulation, deep graphs, no_grad, retain_graph, errors
(shared input arrays and partly frozen inputs: tests/test_autograd_inputs.py).

Every test builds its tensors on the device under test (NPFORMER_DEVICE) with
``T`` and reads them back with ``host``.
"""

import re
import threading
import time

import numpy as np
import pytest

import npformer as nf
from npformer import backend
from npformer.autograd import is_grad_enabled, no_grad, set_grad_enabled
from npformer.ops._core import result
from tests.helpers import T, host


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------- accumulation

def test_square_by_self_multiplication_gives_two_x():
    x0 = _rand(0, 3, 4)
    x = T(x0, requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_allclose(host(x.grad), 2 * x0, rtol=1e-15)


def test_weight_used_twice_gets_both_contributions():
    # y = (x @ w) @ w.T  uses w twice: dL/dw = x^T G w + G^T (x w) with G = dL/dy = ones.
    x0, w0 = _rand(1, 2, 3), _rand(2, 3, 4)
    x, w = T(x0), T(w0, requires_grad=True)
    h = x @ w                                  # (2, 4)
    y = h @ w.T                                # (2, 3)
    y.sum().backward()
    G = np.ones((2, 3))
    expected = x0.T @ G @ w0 + G.T @ (x0 @ w0)
    np.testing.assert_allclose(host(w.grad), expected, rtol=1e-12)


def test_shared_subexpression_diamond():
    # a feeds b and c, which meet again: d = b * c = (2a)(a + 1), dd/da = 4a + 2.
    a0 = _rand(3, 5)
    a = T(a0, requires_grad=True)
    b = a * 2.0
    c = a + 1.0
    (b * c).sum().backward()
    np.testing.assert_allclose(host(a.grad), 4 * a0 + 2, rtol=1e-14)


def test_deep_chain_backpropagates_without_recursion_error():
    n = 100_000
    x = T(np.array(1.5), requires_grad=True)
    y = x
    start = time.perf_counter()
    for _ in range(n):
        y = y + 1.0
    y.backward()
    elapsed = time.perf_counter() - start
    assert host(y).item() == pytest.approx(1.5 + n)
    assert host(x.grad).item() == 1.0
    assert elapsed < 30.0, f"a chain of {n} adds took {elapsed:.1f} s"


def test_gradients_accumulate_over_two_passes():
    x0 = _rand(4, 3)
    x = T(x0, requires_grad=True)
    for _ in range(2):
        (x * x * x).sum().backward()
    np.testing.assert_allclose(host(x.grad), 2 * 3 * x0 ** 2, rtol=1e-14)
    x.zero_grad()
    assert x.grad is None


# ----------------------------------------------------------------------------- graph recording

def test_no_grad_records_no_graph():
    x = T(_rand(5, 3), requires_grad=True)
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert is_grad_enabled()
    assert not y.requires_grad and y.is_leaf and y.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_set_grad_enabled_restores_after_exception():
    assert is_grad_enabled()
    with pytest.raises(ZeroDivisionError):
        with set_grad_enabled(False):
            assert not is_grad_enabled()
            1 / 0
    assert is_grad_enabled()
    # nesting: enabling inside no_grad records again, and the outer state comes back
    x = T(_rand(6, 2), requires_grad=True)
    with no_grad():
        with set_grad_enabled(True):
            inner = x * 3.0
        assert not is_grad_enabled()
        outer = x * 3.0
    assert inner.requires_grad and inner.grad_fn == "mul"
    assert not outer.requires_grad


def test_retain_graph_allows_second_backward_and_accumulates():
    x0 = _rand(7, 4)
    x = T(x0, requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    np.testing.assert_allclose(host(x.grad), 2 * x0, rtol=1e-15)
    y.backward()
    np.testing.assert_allclose(host(x.grad), 4 * x0, rtol=1e-15)


def test_second_backward_without_retain_graph_raises():
    x = T(_rand(8, 4), requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time.*retain_graph=True"):
        y.backward()
    # the same applies to a new node built on top of a freed one
    z = y * 2.0
    with pytest.raises(RuntimeError, match="second time"):
        z.backward()


def test_detach_cuts_graph_and_shares_data():
    x0 = _rand(9, 3)
    x = T(x0, requires_grad=True)
    y = x * 2.0
    d = y.detach()
    assert d.data is y.data
    assert not d.requires_grad and d.is_leaf
    # a graph through the detached copy reaches x only along the other branch
    (d * x).sum().backward()
    np.testing.assert_allclose(host(x.grad), 2 * x0, rtol=1e-15)


def test_retain_grad_stores_grad_on_non_leaf():
    x0 = _rand(10, 2, 3)
    x = T(x0, requires_grad=True)
    h = (x * 3.0).retain_grad()
    plain = x * 5.0
    (h * h + plain).sum().backward()
    np.testing.assert_allclose(host(h.grad), 2 * 3 * x0, rtol=1e-14)
    assert plain.grad is None
    np.testing.assert_allclose(host(x.grad), 2 * 9 * x0 + 5, rtol=1e-14)


def test_leaf_grads_are_owned():
    # add's backward hands the same array to both parents (and it is the caller's grad):
    # each leaf must store its own copy.
    a, b = T(np.zeros(3), requires_grad=True), T(np.zeros(3), requires_grad=True)
    g = T(np.ones(3))
    (a + b).backward(g)
    a.grad[0] = 42.0
    assert host(b.grad).tolist() == [1.0, 1.0, 1.0]
    assert host(g).tolist() == [1.0, 1.0, 1.0]
    assert a.grad is not b.grad


# ----------------------------------------------------------------------------- dtypes

def _small_network(dtype):
    rng = np.random.default_rng(11)
    x = T(rng.standard_normal((4, 6)), dtype=dtype)
    w1 = T(rng.standard_normal((6, 8)) * 0.3, requires_grad=True, dtype=dtype)
    b1 = T(np.zeros(8), requires_grad=True, dtype=dtype)
    ln_w = T(np.ones(8), requires_grad=True, dtype=dtype)
    w2 = T(rng.standard_normal((8, 5)) * 0.3, requires_grad=True, dtype=dtype)
    h = nf.layer_norm(nf.gelu(x @ w1 + b1), 8, weight=ln_w)
    h = h * 0.5 + 2.0 * h.tanh() - h / 3.0 + h ** 2 * 0.1
    logits = h @ w2
    loss = nf.cross_entropy(logits, T(np.array([0, 1, 4, 2]))) + logits.softmax(-1).var() * 1e-3
    return loss, (w1, b1, ln_w, w2), (h, logits)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_through_network_and_gradients(dtype):
    loss, params, inner = _small_network(dtype)
    assert loss.dtype == dtype and all(t.dtype == dtype for t in inner)
    loss.backward()
    for p in params:
        assert p.grad is not None and p.grad.dtype == dtype, (p.shape, p.grad)
        assert np.isfinite(host(p.grad)).all()


# ----------------------------------------------------------------------------- errors

def test_backward_on_non_scalar_needs_grad():
    y = T(_rand(12, 2, 3), requires_grad=True) * 2.0
    with pytest.raises(RuntimeError, match=r"one element.*\(2, 3\)"):
        y.backward()


def test_backward_with_wrong_grad_shape_names_both_shapes():
    y = T(_rand(13, 2, 3), requires_grad=True) * 2.0
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        y.backward(T(np.ones((3, 2))))


def test_one_element_non_scalar_gets_implicit_grad():
    x = T(np.array([[2.0]]), requires_grad=True)
    (x * x).backward()
    assert host(x.grad).tolist() == [[4.0]]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_requires_grad_on_non_float_raises(dtype):
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=name):
        T(np.array([1, 0]), requires_grad=True, dtype=dtype)
    t = T(np.array([1, 0]), dtype=dtype)
    with pytest.raises(TypeError, match=name):
        t.requires_grad_()
    assert not t.requires_grad


def test_the_graph_holds_nodes_not_intermediate_tensors():
    """An intermediate tensor the caller drops is freed (add keeps only shapes); backward still works."""
    import gc
    import weakref
    x = T(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    h = x + 1.0
    seen = weakref.ref(h)
    y = (h + 2.0).sum()
    assert h.grad_fn == "add" and not h.is_leaf
    del h
    gc.collect()
    assert seen() is None
    y.backward()
    np.testing.assert_array_equal(host(x.grad), [1.0, 1.0, 1.0])
    assert y.grad_fn == "sum" and not y.is_leaf      # a freed graph keeps its op names


def test_leaf_gradients_are_handed_over_right_after_their_consumer():
    """Backward order: a weight's gradient is complete right after its consumer's backward."""
    w1, w2 = T(np.ones((3, 3)), requires_grad=True), T(np.ones((3, 3)), requires_grad=True)
    x = T(np.ones((2, 3)))
    arrived = []

    nf.autograd.backward(nf.linear(nf.linear(x, w1), w2).sum(), sink=lambda t, g: arrived.append(t))
    assert len(arrived) == 2 and arrived[0] is w2 and arrived[1] is w1
    assert w1.grad is None and w2.grad is None                  # a sink takes the place of .grad


@pytest.mark.parametrize("op", ["add", "reshape", "mul", "getitem"])
def test_a_leaf_frozen_between_forward_and_backward_gets_no_grad(op):
    """requires_grad switched off after the forward: no .grad, whichever op consumed the leaf."""
    w = T(np.ones(3), requires_grad=True)
    use = {"add": lambda t: t + 1.0, "reshape": lambda t: t.reshape(3, 1), "mul": lambda t: t * 2.0,
           "getitem": lambda t: t[1:]}[op]
    other = T(np.ones(3), requires_grad=True)
    loss = use(w).sum() + (other * 2.0).sum()
    w.requires_grad = False
    loss.backward()
    assert w.grad is None
    np.testing.assert_array_equal(host(other.grad), [2.0, 2.0, 2.0])


def test_retain_grad_does_not_keep_the_graph_alive():
    """The node refers to a retained tensor weakly: dropping the tensors frees the graph without gc."""
    import gc
    import weakref
    gc.disable()
    try:
        x = T(np.ones(4), requires_grad=True)
        h = (x * 2.0).retain_grad()
        y = (h * 3.0).sum()
        seen = weakref.ref(h)
        y.backward(retain_graph=True)
        np.testing.assert_array_equal(host(h.grad), [3.0] * 4)
        del h, y
        assert seen() is None
    finally:
        gc.enable()


def test_requires_grad_is_settable_on_leaves_only_and_retain_grad_needs_it():
    x = T(np.ones(3), requires_grad=True)
    h = x * 2.0
    with pytest.raises(RuntimeError, match="only a leaf tensor's flag can be changed; this one was made by 'mul'"):
        h.requires_grad = False
    h.requires_grad_(True)                                   # already true: allowed
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        T(np.arange(3)).requires_grad = True
    with pytest.raises(RuntimeError, match="retain_grad: the tensor does not require grad"):
        T(np.ones(3)).retain_grad()
    x.requires_grad = False                                  # a leaf: allowed
    assert not x.requires_grad and not (x * 2.0).requires_grad


# ----------------------------------------------------------------------------- messages, seed, threads

def test_backward_errors_say_what_went_wrong():
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "backward: the tensor does not require grad and has no grad_fn (was it computed under "
            "no_grad(), or from tensors with requires_grad=False?)") + "$"):
        T(np.ones(2)).sum().backward()
    # autograd.backward itself frees the graph unless told otherwise, like Tensor.backward
    y = (T(_rand(14, 3), requires_grad=True) * 2.0).sum()
    nf.autograd.backward(y)
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "backward: trying to backward through the graph a second time; its buffers were freed. "
            "Pass retain_graph=True the first time.") + "$"):
        nf.autograd.backward(y)


def test_the_seed_is_cast_to_the_roots_dtype_and_otherwise_not_copied():
    x = T(np.ones(3), requires_grad=True, dtype=np.float32)
    got = []
    nf.autograd.backward(x * 2.0, T(np.array([1.0, 2.0, 3.0])).data, sink=lambda t, g: got.append(g))
    assert got[0].dtype == np.float32 and host(got[0]).tolist() == [2.0, 4.0, 6.0]
    seed = T(np.array([1.0, 2.0, 3.0]), dtype=np.float32).data     # already float32: handed on as is
    nf.autograd.backward(x, seed, sink=lambda t, g: got.append(g))
    assert got[1] is seed


def test_grad_mode_is_per_thread_and_on_in_a_new_thread():
    """no_grad() in one thread leaves every other thread recording, and a new thread starts enabled."""
    x = T(np.ones(3), requires_grad=True)
    seen = {}

    def ops(where):
        seen[where] = (is_grad_enabled(), (x * 2.0).requires_grad)

    def in_thread(where):
        thread = threading.Thread(target=ops, args=(where,))
        thread.start()
        thread.join()

    in_thread("new thread")
    with no_grad():
        in_thread("beside a no_grad block")
        ops("inside the no_grad block")
    assert seen == {"new thread": (True, True), "beside a no_grad block": (True, True),
                    "inside the no_grad block": (False, False)}


# ----------------------------------------------------------------------------- ops written outside the library
# An op is result(out, parents, backward, name) (npformer/ops/_core.py): its backward may return None
# for an input, or a Python number for a 0-d input; the engine copes with both.

def test_an_input_whose_backward_returns_none_gets_no_grad_and_others_still_do():
    a, b = T(np.ones(3), requires_grad=True), T(np.ones(3), requires_grad=True)
    first_only = lambda: result(a.data + b.data, (a, b), lambda g: (g * 2.0, None), "first_only")  # noqa: E731
    first_only().backward(T(np.array([1.0, 2.0, 3.0])))
    assert b.grad is None
    np.testing.assert_array_equal(host(a.grad), [2.0, 4.0, 6.0])
    a.grad = None
    (first_only() + b * 5.0).sum().backward()              # b's only gradient comes from the other branch
    np.testing.assert_array_equal(host(a.grad), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(host(b.grad), [5.0, 5.0, 5.0])


@pytest.mark.parametrize("through", ["leaf", "intermediate"])
def test_a_python_float_gradient_becomes_an_array_of_the_inputs_dtype(through):
    x = T(np.array(1.5), requires_grad=True, dtype=np.float32)
    scale = 1.0 if through == "leaf" else 2.0

    def triple():
        inp = x if through == "leaf" else x * 2.0            # an intermediate: its Node carries the dtype
        return result(inp.data * 3.0, (inp,), lambda g: (float(g) * 3.0,), "triple")
    got = []
    nf.autograd.backward(triple(), sink=lambda t, g: got.append(g))
    assert backend.is_array(got[0]) and got[0].dtype == np.float32 and host(got[0]) == 3.0 * scale
    triple().backward()
    assert backend.is_array(x.grad) and x.grad.dtype == np.float32 and host(x.grad) == 3.0 * scale


def test_a_node_records_its_outputs_dtype_and_shape():
    """Node.dtype and Node.shape (docs/autograd.md section 2) are the output's: tests seed a node's
    backward from them (tests/test_ops_dtype.py), and the engine casts a scalar gradient to the dtype."""
    x = T(_rand(15, 2, 3), requires_grad=True, dtype=np.float32)
    for y in (x * 2.0, x.sum(), x.reshape(3, 2), x[0]):
        assert y._node.dtype == np.float32 and y._node.shape == y.shape
