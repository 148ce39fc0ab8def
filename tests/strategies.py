"""Hypothesis strategies and checks shared by the op tests (tests/test_ops_*.py).

Everything drawn is small (<= 4 per axis, <= 4 axes): gradcheck perturbs one
element at a time, so its cost grows with the number of elements.

Value domains keep central differences valid: "positive" for log/sqrt and a
pow base, "nonzero" for a divisor, "away_from_kink" for abs/relu.
``separated_pair`` keeps the operands of maximum/minimum >= 0.15 apart and
``distinct_arrays`` keeps the elements of a max >= 0.125 apart, so no tie
sits inside the finite-difference step.
"""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from tests.helpers import T, host


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


DOMAINS = {
    "real": _floats(-3.0, 3.0),
    "wide": _floats(-8.0, 8.0),                                          # tails of tanh/sigmoid/gelu
    "positive": _floats(0.5, 3.0),                                       # log, sqrt, pow base
    "nonzero": st.one_of(_floats(-3.0, -0.5), _floats(0.5, 3.0)),        # divisors
    "away_from_kink": st.one_of(_floats(-3.0, -0.1), _floats(0.1, 3.0)),  # abs, relu at 0
}

# Broadcast pairs that must always be tried: rank change on either side, size-1
# expansion on either side, a 0-d operand, and equal shapes.
EDGE_PAIRS = [((2, 3), (3,)), ((3,), (2, 3)), ((2, 1), (1, 3)), ((1, 3), (2, 1)), ((), (2, 3)),
              ((2, 3), ()), ((4, 1, 3), (2, 1)), ((1,), (3, 1)), ((2, 3), (2, 3)), ((), ())]


def shapes(min_dims=0, max_dims=3, min_side=1, max_side=3):
    """Array shapes, 0-d included by default, size-1 axes included."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


@st.composite
def _drawn_pair(draw, max_dims, max_side):
    # each operand keeps the trailing k axes of a common result shape, some of them set to 1
    out = draw(shapes(0, max_dims, 2, max_side))

    def operand():
        k = draw(st.integers(0, len(out)))
        return tuple(1 if draw(st.booleans()) else n for n in out[len(out) - k:])
    return operand(), operand()


def broadcast_pairs(max_dims=4, max_side=3):
    """(shape_a, shape_b) that broadcast together: the EDGE_PAIRS or a drawn pair, with rank
    changes and size-1 expansion on either side."""
    return st.one_of(st.sampled_from(EDGE_PAIRS), _drawn_pair(max_dims, max_side))


def arrays(shape, domain="real"):
    """float64 arrays of `shape` (a tuple or a strategy) with values from DOMAINS[domain]."""
    return hnp.arrays(np.float64, shape, elements=DOMAINS[domain])


def distinct_arrays(shape):
    """float64 arrays whose elements are pairwise >= 0.125 apart (no near-ties for max)."""
    return hnp.arrays(np.float64, shape, elements=st.integers(-64, 64).map(lambda k: k / 8), unique=True)


def _grid(offset):
    # k/2 + offset + u, u in [0, 0.1]: two grids offset by 0.25 stay >= 0.15 apart
    return st.builds(lambda k, u: k / 2 + offset + u, st.integers(-6, 6), _floats(0.0, 0.1))


@st.composite
def separated_pair(draw, shape_a, shape_b):
    """Arrays a, b whose elements differ by at least 0.15 everywhere they meet under broadcasting."""
    a = draw(hnp.arrays(np.float64, shape_a, elements=_grid(0.0)))
    b = draw(hnp.arrays(np.float64, shape_b, elements=_grid(0.25)))
    return a, b


@st.composite
def axes(draw, ndim):
    """An `axis` argument for a reduction over `ndim` axes: None, an int or a tuple.

    Tuples mix negative and non-negative entries, and most are out of order (``(2, -3)``,
    ``(1, 0)``): "unordered" tuples are never increasing, which a backward that assumes
    sorted axes gets wrong. They are weighted so that 25 derandomized examples draw several.
    """
    if ndim == 0:
        return draw(st.sampled_from([None, 0, -1]))
    kind = draw(st.sampled_from(["unordered", "int", "tuple", "none", "unordered"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    most = ndim - 1 if kind == "unordered" and ndim >= 3 else ndim   # keep an axis after the reduced ones
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=min(2, ndim), max_size=most, unique=True))
    order = draw(st.permutations(chosen))
    if kind == "unordered" and order == sorted(order):
        order = order[1:] + order[:1]                   # rotated: out of order when 2 or more
    return tuple(ax - ndim if draw(st.booleans()) else ax for ax in order)


def is_unordered(axis, ndim) -> bool:
    """Whether a reduction's `axis` is a tuple whose axes (taken mod ndim) are not increasing."""
    if not isinstance(axis, tuple) or ndim == 0:
        return False
    axes_ = [ax % ndim for ax in axis]
    return axes_ != sorted(axes_)


# Reductions that must always be tried: out-of-order and negative axis tuples that leave an axis
# after the reduced ones (so re-inserting the reduced axes in the wrong order shows), keepdims both ways.
EDGE_REDUCTIONS = [((2, 3, 4), (1, 0), False), ((2, 3, 4), (-2, -3), False), ((2, 3, 4, 2), (2, -4), False),
                   ((3, 2, 4), (1, -3), True), ((2, 3, 4), (2, 0), False)]


@st.composite
def _drawn_reduction(draw, max_dims, max_side):
    shape = draw(st.one_of(shapes(2, max_dims, 1, max_side), shapes(0, max_dims, 1, max_side)))
    return shape, draw(axes(len(shape))), draw(st.booleans())


def reduction_args(max_dims=4, max_side=3):
    """(shape, axis, keepdims) for sum/mean/max/var: the EDGE_REDUCTIONS or a drawn one (mostly two
    or more axes)."""
    return st.one_of(st.sampled_from(EDGE_REDUCTIONS), _drawn_reduction(max_dims, max_side))


@st.composite
def reshape_targets(draw, size):
    """A shape with `size` elements (made of its divisors), sometimes with one -1."""
    dims, left = [], size
    while left > 1 and len(dims) < 3:
        d = draw(st.sampled_from([k for k in range(1, left + 1) if left % k == 0]))
        dims.append(d)
        left //= d
    if left > 1 or draw(st.booleans()):
        dims.append(left)
    dims = draw(st.permutations(dims))
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    return tuple(dims)


@st.composite
def _basic_item(draw, n):
    """An int (negative too) or a slice (any step) for an axis of length n."""
    if draw(st.booleans()):
        return draw(st.integers(-n, n - 1))
    return draw(st.slices(n))


@st.composite
def index_expressions(draw, shape):
    """An index for an array of `shape`.

    Kinds: basic (ints and slices); one integer array that always holds a
    repeat (and may hold negatives); two paired integer arrays; a boolean mask
    over one axis; a boolean mask over the whole array. 0-d arrays get (), ... or None.
    """
    ndim = len(shape)
    if ndim == 0:
        return draw(st.sampled_from([(), Ellipsis, None]))
    kinds = ["basic", "int_array", "bool_axis", "bool_full"] + (["int_pair"] if ndim >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "bool_full":
        return draw(hnp.arrays(bool, shape))
    k = draw(st.integers(2 if kind == "int_pair" else 1, ndim))        # index the first k axes
    items = [draw(_basic_item(n)) for n in shape[:k]]
    j = draw(st.integers(0, k - 1))
    n = shape[j]
    if kind == "int_array":
        picks = draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=4))
        items[j] = np.array(picks + [draw(st.sampled_from(picks))])      # at least one repeat
    elif kind == "int_pair":
        length = draw(st.integers(1, 4))
        items[0] = np.array(draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=length, max_size=length)))
        items[1] = np.array(draw(st.lists(st.integers(-shape[1], shape[1] - 1), min_size=length, max_size=length)))
    elif kind == "bool_axis":
        items[j] = draw(hnp.arrays(bool, (n,)))
    return tuple(items)


# ----------------------------------------------------------------------------- checks

def gradcheck_all(fn, *arrays, **kwargs):
    """gradcheck `fn` at float64 tensors made from `arrays`, every one requiring grad."""
    inputs = [T(np.asarray(a, dtype=np.float64), requires_grad=True) for a in arrays]
    assert nf.gradcheck(fn, inputs, **kwargs)


def check_float32(fn, *arrays):
    """fn on float32 inputs gives float32 outputs and float32 gradients.

    The engine casts a leaf's gradient to the leaf's dtype, which would hide an
    upcast inside an op's backward, so each output's backward closure is also
    called directly and what it returns is checked.
    """
    inputs = [T(np.asarray(a, dtype=np.float32), requires_grad=True) for a in arrays]
    out = fn(*inputs)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        assert o.dtype == np.float32, f"output dtype {o.dtype}"
        if o._node is not None:
            grads = o._node.backward(o.xp.ones(o.shape, dtype=np.float32))
            for p, g in zip(o._node.parents, grads):      # a parent: a Node or a leaf tensor
                if g is not None and p is not None:
                    assert g.dtype == np.float32, f"backward gave {g.dtype} for a float32 input"
                    assert tuple(g.shape) == p.shape
    loss = outs[0].sum()
    for o in outs[1:]:
        loss = loss + o.sum()
    loss.backward()
    for t in inputs:
        assert t.grad is not None and t.grad.dtype == np.float32


def on_device(idx):
    """`idx` with its NumPy arrays made tensors on the device under test (index and tensor share a device)."""
    if isinstance(idx, tuple):
        return tuple(on_device(i) for i in idx)
    return T(idx) if isinstance(idx, np.ndarray) else idx


def assert_close(out, expected, rtol=1e-12, atol=1e-12):
    """A Tensor's value equals a NumPy reference (shape and values), float64 tolerance by default."""
    got = host(out)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, f"shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)

