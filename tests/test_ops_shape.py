"""Property tests for the shape ops: reshape, permute, transpose, expand, getitem, concatenate,
stack, split, where and masked_fill."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from tests.helpers import T, host
from tests.strategies import (arrays, assert_close, check_float32, gradcheck_all, index_expressions,
                              on_device, reshape_targets, shapes)

COVERED_OPS = {"reshape", "permute", "transpose", "expand", "getitem", "concatenate", "stack", "split",
               "where", "masked_fill"}
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path


def _signed(draw, ax, ndim):
    """`ax` or its negative spelling, drawn."""
    return ax - ndim if draw(st.booleans()) else ax


# ----------------------------------------------------------------------------- reshape, permute, transpose

@given(data=st.data())
def test_reshape(data):
    x = data.draw(arrays(shapes(max_dims=4)), label="x")
    target = data.draw(reshape_targets(x.size), label="target")
    assert_close(nf.reshape(T(x), target), x.reshape(target))
    gradcheck_all(lambda t: nf.reshape(t, target), x)


@given(data=st.data())
def test_permute(data):
    x = data.draw(arrays(shapes(max_dims=4)), label="x")
    order = data.draw(st.permutations(range(x.ndim)), label="order")
    order = tuple(_signed(data.draw, ax, x.ndim) for ax in order)
    assert_close(nf.permute(T(x), order), np.transpose(x, order))
    gradcheck_all(lambda t: nf.permute(t, order), x)


@given(data=st.data())
def test_transpose(data):
    x = data.draw(arrays(shapes(max_dims=4)), label="x")
    if x.ndim < 2:                                   # torch's t(): 0-d and 1-d come back unchanged
        assert_close(nf.transpose(T(x)), x)
        gradcheck_all(nf.transpose, x)
        return
    ax0, ax1 = (data.draw(st.integers(-x.ndim, x.ndim - 1), label=f"axis{i}") for i in range(2))
    assert_close(nf.transpose(T(x), ax0, ax1), np.swapaxes(x, ax0, ax1))
    gradcheck_all(lambda t: nf.transpose(t, ax0, ax1), x)


@given(data=st.data())
def test_expand(data):
    """Add leading axes and grow size-1 axes; -1 keeps a size."""
    x = data.draw(arrays(shapes(max_dims=3)), label="x")
    lead = data.draw(st.lists(st.integers(1, 3), max_size=4 - x.ndim), label="lead")
    kept = [data.draw(st.integers(1, 3)) if n == 1 else data.draw(st.sampled_from([n, -1])) for n in x.shape]
    target = tuple(lead) + tuple(kept)
    full = tuple(lead) + tuple(n if k == -1 else k for n, k in zip(x.shape, kept))
    assert_close(nf.expand(T(x), target), np.broadcast_to(x, full))
    gradcheck_all(lambda t: nf.expand(t, target), x)


# ----------------------------------------------------------------------------- getitem

@given(data=st.data())
def test_getitem(data):
    """Slices, ints, integer arrays with repeats, paired integer arrays, boolean masks."""
    x = data.draw(arrays(shapes(max_dims=3, max_side=4)), label="x")
    idx = data.draw(index_expressions(x.shape), label="idx")
    assert_close(nf.getitem(T(x), on_device(idx)), x[idx])
    gradcheck_all(lambda t: nf.getitem(t, on_device(idx)), x)


def test_getitem_repeated_index_adds_gradient():
    x = T(np.arange(4.0), requires_grad=True)
    nf.getitem(x, T(np.array([0, 0, 2, -4]))).sum().backward()     # -4 is element 0 again
    np.testing.assert_array_equal(host(x.grad), [3.0, 0.0, 1.0, 0.0])


def test_getitem_boolean_mask():
    a = np.array([[1.0, -2.0], [3.0, -4.0]])
    x = T(a, requires_grad=True)
    y = nf.getitem(x, T(a > 0))
    assert_close(y, [1.0, 3.0])
    y.backward(T(np.array([5.0, 7.0])).data)
    np.testing.assert_array_equal(host(x.grad), [[5.0, 0.0], [7.0, 0.0]])


# ----------------------------------------------------------------------------- concatenate, stack, split

@given(data=st.data())
def test_concatenate(data):
    base = data.draw(shapes(min_dims=1, max_dims=3), label="base")
    axis = data.draw(st.integers(-len(base), len(base) - 1), label="axis")
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3), label="sizes")
    parts = []
    for i, n in enumerate(sizes):
        shape = list(base)
        shape[axis] = n
        parts.append(data.draw(arrays(tuple(shape)), label=f"part{i}"))
    assert_close(nf.concatenate([T(p) for p in parts], axis=axis), np.concatenate(parts, axis=axis))
    gradcheck_all(lambda *ts: nf.concatenate(ts, axis=axis), *parts)


@given(data=st.data())
def test_stack(data):
    shape = data.draw(shapes(max_dims=3), label="shape")
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)), label="axis")
    k = data.draw(st.integers(1, 3), label="k")
    parts = [data.draw(arrays(shape), label=f"part{i}") for i in range(k)]
    assert_close(nf.stack([T(p) for p in parts], axis=axis), np.stack(parts, axis=axis))
    gradcheck_all(lambda *ts: nf.stack(ts, axis=axis), *parts)


@given(data=st.data(), by_list=st.booleans())
def test_split(data, by_list):
    """By a piece size (the last piece may be shorter) and by a list of sizes; every piece gets its gradient."""
    x = data.draw(arrays(shapes(min_dims=1, max_dims=3, max_side=4)), label="x")
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
    n = x.shape[axis]
    if by_list:
        cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3), label="cuts"))
        sections = [b - a for a, b in zip([0] + cuts, cuts + [n])]      # zero-size pieces allowed
    else:
        sections = data.draw(st.integers(1, n + 1), label="size")
        cuts = list(range(sections, n, sections))
    pieces = nf.split(T(x), sections, axis=axis)
    expected = np.split(x, cuts, axis=axis)
    assert len(pieces) == len(expected)
    for got, want in zip(pieces, expected):
        assert_close(got, want)
    gradcheck_all(lambda t: nf.split(t, sections, axis=axis), x)


# ----------------------------------------------------------------------------- where, masked_fill

@given(data=st.data())
def test_where(data):
    """cond, a and b broadcast together (rank changes and size-1 axes on every side)."""
    cond_shape, shape_a, shape_b = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=3, min_dims=0, max_dims=3, max_side=3), label="shapes").input_shapes
    cond = data.draw(hnp.arrays(bool, cond_shape), label="cond")
    a = data.draw(arrays(shape_a), label="a")
    b = data.draw(arrays(shape_b), label="b")
    assert_close(nf.where(T(cond), T(a), T(b)), np.where(cond, a, b))
    gradcheck_all(lambda s, t: nf.where(T(cond), s, t), a, b)


@given(data=st.data(), value=st.sampled_from([0.0, -1e9, 2.5]))
def test_masked_fill(data, value):
    """The mask broadcasts to the tensor's shape (it may drop leading axes or have size-1 axes)."""
    x = data.draw(arrays(shapes(max_dims=3)), label="x")
    drop = data.draw(st.integers(0, x.ndim), label="drop")
    mask_shape = tuple(1 if data.draw(st.booleans()) else n for n in x.shape[drop:])
    mask = data.draw(hnp.arrays(bool, mask_shape), label="mask")
    assert_close(nf.masked_fill(T(x), T(mask), value), np.where(mask, value, x))
    # the gradient does not depend on value; a -1e9 in the output would swamp gradcheck's
    # float64 sum <v, out> (its ulp ~1e-7 against a 1e-6 step), so check with a moderate one
    fill = value if abs(value) < 10 else -2.0
    gradcheck_all(lambda t: nf.masked_fill(t, T(mask), fill), x)


# ----------------------------------------------------------------------------- dtypes

FLOAT32_CASES = {
    "reshape": (lambda t: nf.reshape(t, (3, 2)), 1),
    "permute": (lambda t: nf.permute(t, (1, 0)), 1),
    "transpose": (lambda t: nf.transpose(t, 0, -1), 1),
    "expand": (lambda t: nf.expand(nf.reshape(t, (1, 2, 3)), (2, 2, 3)), 1),
    "getitem_int_array": (lambda t: nf.getitem(t, (T(np.array([1, 1, 0])), slice(None))), 1),
    "getitem_mask": (lambda t: nf.getitem(t, T(np.array([[True, False, True], [False, True, True]]))), 1),
    "concatenate": (lambda s, t: nf.concatenate([s, t], axis=0), 2),
    "stack": (lambda s, t: nf.stack([s, t], axis=-1), 2),
    "split": (lambda t: nf.split(t, [1, 2], axis=1), 1),
    "where": (lambda s, t: nf.where(T(np.array([True, False, True])), s, t), 2),
    "masked_fill": (lambda t: nf.masked_fill(t, T(np.array([False, True, False])), -1e9), 1),
}


@pytest.mark.parametrize("name", sorted(FLOAT32_CASES))
def test_shape_ops_float32_keep_dtype(name):
    fn, n_inputs = FLOAT32_CASES[name]
    rng = np.random.default_rng(2)
    check_float32(fn, *(rng.standard_normal((2, 3)) for _ in range(n_inputs)))


# ----------------------------------------------------------------------------- defaults and operands

def test_reshape_takes_a_single_int():
    x = np.arange(6.0).reshape(2, 3)
    assert_close(nf.reshape(T(x), 6), x.reshape(6))
    assert_close(nf.reshape(T(x), -1), x.reshape(-1))


def test_concatenate_stack_and_split_default_to_axis_0():
    a, b = np.arange(6.0).reshape(2, 3), -np.arange(6.0).reshape(2, 3)
    assert_close(nf.concatenate([T(a), T(b)]), np.concatenate([a, b], axis=0))
    assert_close(nf.stack([T(a), T(b)]), np.stack([a, b], axis=0))
    pieces = nf.split(T(np.arange(12.0).reshape(3, 4)), 2)
    assert [p.shape for p in pieces] == [(2, 4), (1, 4)]


def test_masks_and_indices_may_be_lists_arrays_or_tensors():
    """A list, a NumPy array and a Tensor select alike; none of them gets a gradient."""
    x = np.arange(6.0).reshape(2, 3)
    rows = [[True, False, True], [False, True, False]]
    for mask in (rows, np.array(rows), T(np.array(rows))):
        assert_close(nf.masked_fill(T(x), mask, -1.0), np.where(rows, -1.0, x))
        assert_close(nf.where(mask, T(x), 0.0), np.where(rows, x, 0.0))
    for index in ([1, 1, 0], np.array([1, 1, 0]), T(np.array([1, 1, 0]))):
        t = T(x, requires_grad=True)
        nf.getitem(t, index).sum().backward()
        np.testing.assert_array_equal(host(t.grad), [[1.0] * 3, [2.0] * 3])
        assert_close(nf.getitem(T(x), (slice(None), index)), x[:, [1, 1, 0]])


# ----------------------------------------------------------------------------- errors
# The messages users meet, pinned whole: the op's name, the shapes and what is wrong.

def _raises(exc_type, pattern, fn):
    with pytest.raises(exc_type, match=pattern):
        fn()


def test_reshape_to_wrong_size():
    _raises(ValueError, r"^reshape: cannot reshape a tensor of shape \(2, 3\) \(6 elements\) into shape \(4, 2\)$",
            lambda: nf.reshape(T(np.ones((2, 3))), (4, 2)))


def test_expand_incompatible():
    _raises(ValueError, r"^expand: shapes \(2, 3\) and \(2, 4\) cannot be expanded \(from the first to the second\)$",
            lambda: nf.expand(T(np.ones((2, 3))), (2, 4)))


def test_permute_and_transpose_bad_axes():
    _raises(ValueError, r"^permute: axes \(0, 0\) are not a permutation of the 2 axes of shape \(2, 3\)$",
            lambda: nf.permute(T(np.ones((2, 3))), (0, 0)))
    _raises(ValueError, r"^permute: axes \(0,\) are not a permutation of the 0 axes of shape \(\)$",
            lambda: nf.permute(T(np.array(1.0)), (0,)))         # a 0-d tensor takes only ()
    assert nf.permute(T(np.array(1.0)), ()).shape == ()
    _raises(ValueError, r"^transpose: axis 2 is out of range for shape \(2, 3\)$",
            lambda: nf.transpose(T(np.ones((2, 3))), 0, 2))


def test_getitem_out_of_bounds_names_op_and_shape():
    _raises(IndexError, r"^getitem: index invalid for shape \(2, 3\): index 5 is out of bounds",
            lambda: nf.getitem(T(np.ones((2, 3))), (0, 5)))


def test_concatenate_and_stack_mismatch():
    _raises(ValueError, r"^concatenate: shapes \(2, 3\) and \(2, 4\) cannot be joined along axis 0$",
            lambda: nf.concatenate([T(np.ones((2, 3))), T(np.ones((2, 4)))], axis=0))
    _raises(ValueError, r"^stack: shapes \(2, 3\) and \(3, 2\) must all be equal$",
            lambda: nf.stack([T(np.ones((2, 3))), T(np.ones((3, 2)))]))


def test_split_sizes_must_add_up():
    _raises(ValueError, r"^split: sizes \[2, 2\] do not add up to 5, the length of axis 0 of shape \(5, 2\)$",
            lambda: nf.split(T(np.ones((5, 2))), [2, 2]))
    _raises(ValueError, r"^split: piece size must be positive; got 0$", lambda: nf.split(T(np.ones((5, 2))), 0))


def test_where_bad_shapes():
    _raises(ValueError, r"^where: shapes \(2, 1\) and \(3,\) and \(4,\) cannot be broadcast together$",
            lambda: nf.where(T(np.ones((2, 1), bool)), T(np.ones((3,))), T(np.ones((4,)))))


def test_where_and_masked_fill_need_a_boolean_mask():
    x = T(np.ones((2, 3)))
    _raises(TypeError, r"^where: mask must be boolean; got dtype float64$", lambda: nf.where(x, x, x))
    _raises(TypeError, r"^masked_fill: mask must be boolean; got dtype float64$", lambda: nf.masked_fill(x, x, 0.0))
    _raises(TypeError, r"^masked_fill: mask must be boolean; got dtype int64$",
            lambda: nf.masked_fill(x, [[1, 0, 1], [0, 1, 0]], 0.0))


def test_masked_fill_needs_a_mask_of_a_fitting_shape():
    _raises(ValueError, r"^masked_fill: shapes \(2, 3\) and \(2, 2\) \(tensor and mask\) cannot be broadcast together$",
            lambda: nf.masked_fill(T(np.ones((2, 3))), T(np.ones((2, 2), bool)), 0.0))
    _raises(ValueError, r"^masked_fill: shapes \(3,\) and \(2, 3\) \(tensor and mask\): the mask may not enlarge "
                        r"the tensor$", lambda: nf.masked_fill(T(np.ones((3,))), T(np.ones((2, 3), bool)), 0.0))
