"""The two ops LLaMA-style blocks add: rms_norm (npformer/ops/fused.py) and silu
(npformer/ops/activations.py). Forwards against NumPy formulas, hand-derived backwards by float64
central differences with tight tolerances (rtol 1e-6, atol 1e-8: a 1e-4 error in a backward
fails), on contiguous and non-contiguous inputs; eps=None; dtypes; the shape errors, matched whole.
(Their comparisons with torch are in tests/test_nn_llm_layers.py.)
"""

import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from npformer.ops.fused import rms_norm_eps
from tests.helpers import T, host
from tests.strategies import arrays, assert_close, check_float32, shapes

COVERED_OPS = {"rms_norm", "silu"}
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path

TIGHT = dict(rtol=1e-6, atol=1e-8)

# npformer/__init__.py exports the ops by name; until its `from .ops import (...)` list names
# rms_norm and silu, the tests reach them as nf.ops.<name> and the nf.<name> test is skipped.
exported = pytest.mark.skipif(not (hasattr(nf, "rms_norm") and hasattr(nf, "silu")),
                              reason="npformer/__init__.py does not export rms_norm and silu yet: add them to its "
                                     "`from .ops import (...)` list")
rms_norm, silu = nf.ops.rms_norm, nf.ops.silu


def rms_norm_ref(x, norm, weight=None, eps=None):
    """x / sqrt(mean(x^2) + eps) * weight over the trailing len(norm) axes, eps=None the float64 epsilon."""
    eps = np.finfo(np.float64).eps if eps is None else eps
    axes = tuple(range(x.ndim - len(norm), x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    return y if weight is None else y * weight


def silu_ref(x):
    return x / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- non-contiguous inputs
# A layout stores an array x as another array s, and recovers x from s through a view op, so that
# the op under test receives non-contiguous data (and its backward's gradient flows back through
# the view op's own backward into s).

def stored(x, layout):
    """(s, view): s holds x's values in `layout`; view(Tensor of s) is a Tensor equal to x."""
    if layout == "transposed":                                  # Fortran order
        perm = tuple(reversed(range(x.ndim)))
        return np.ascontiguousarray(x.transpose(perm)), lambda t: nf.permute(t, perm)
    if layout == "reversed":                                    # negative strides on every axis
        flip = (slice(None, None, -1),) * x.ndim
        return x[flip].copy(), lambda t: nf.getitem(t, flip)
    if layout == "strided":                                     # every other element of the last axis
        s = np.zeros(x.shape[:-1] + (2 * x.shape[-1],))
        s[..., ::2] = x
        return s, lambda t: nf.getitem(t, (Ellipsis, slice(None, None, 2)))
    return x, lambda t: t


LAYOUTS = ["contiguous", "transposed", "reversed", "strided"]


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_give_non_contiguous_views_of_the_same_values(layout):
    x = np.arange(6.0).reshape(2, 3)
    s, view = stored(x, layout)
    v = view(T(s)).data
    assert not v.flags.c_contiguous
    np.testing.assert_array_equal(host(v), x)


@st.composite
def rms_norm_cases(draw):
    """(x, normalized_shape, weight or None, eps, layout): normalized_shape of 1 or 2 axes, up to 2
    leading axes. With eps None or 1e-6 every |x| >= 0.5: a row whose mean square is near 0 has
    1/sqrt(eps) ~ 7e7 as its slope, where central differences mean nothing."""
    norm = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2), label="normalized_shape"))
    lead = draw(shapes(min_dims=0, max_dims=2), label="lead")
    eps = draw(st.sampled_from([None, 1e-6, 1e-5, 1e-2]), label="eps")
    x = draw(arrays(lead + norm, "nonzero" if eps in (None, 1e-6) else "real"), label="x")
    weight = draw(st.none() | arrays(norm), label="weight")
    return x, norm, weight, eps, draw(st.sampled_from(LAYOUTS), label="layout")


# ----------------------------------------------------------------------------- rms_norm

@given(case=rms_norm_cases())
def test_rms_norm_forward_and_grad(case):
    x, norm, weight, eps, layout = case
    sx, view_x = stored(x, layout)
    arrays_ = [sx]
    if weight is not None:
        sw, view_w = stored(weight, layout)
        arrays_.append(sw)

    def fn(t, *w):
        return rms_norm(view_x(t), norm, view_w(w[0]) if w else None, eps)
    assert_close(fn(*(T(a) for a in arrays_)), rms_norm_ref(x, norm, weight, eps))
    inputs = [T(a, requires_grad=True) for a in arrays_]
    assert nf.gradcheck(fn, inputs, **TIGHT)


def test_rms_norm_by_hand():
    """x = (3, 4): mean(x^2) = 12.5, so y = x / sqrt(12.5) (eps = 0) and, for g = (1, 0), the docs'
    dx = rstd (g - xhat mean(g xhat)) = rstd ((1, 0) - 1.5 rstd^2 (3, 4)) = (8, -6) / 12.5^1.5."""
    x = T(np.array([3.0, 4.0]), requires_grad=True)
    y = rms_norm(x, 2, eps=0.0)
    assert_close(y, np.array([3.0, 4.0]) / np.sqrt(12.5))
    y.backward(T(np.array([1.0, 0.0])).data)
    assert_close(x.grad, np.array([8.0, -6.0]) / 12.5 ** 1.5)


@given(x=arrays(shapes(1, 3, 2, 4), "nonzero"), seed=st.integers(0, 2 ** 16))
def test_rms_norm_gradient_is_orthogonal_to_the_input_when_eps_is_zero(x, seed):
    """With eps = 0, y(c x) = y(x) for c > 0, so <dx, x> = 0 over each row, for any g (the docs' check;
    a backward that drops or doubles its xhat * mean(dxhat * xhat) term fails it)."""
    g = np.random.default_rng(seed).standard_normal(x.shape)
    t = T(x, requires_grad=True)
    rms_norm(t, x.shape[-1:], eps=0.0).backward(T(g).data)
    dots = (host(t.grad) * x).sum(axis=-1)
    np.testing.assert_allclose(dots, 0.0, atol=1e-12 * np.abs(g).sum())


def test_rms_norm_eps_none_is_the_dtype_epsilon():
    """eps=None: 2.2e-16 in float64 (torch.finfo(float64).eps), 1.2e-7 in float32, and float32's for
    float16, as torch. Inputs of 1e-8 make mean(x^2) = 1e-16 comparable with the float64 eps."""
    x = np.array([[1e-8, -2e-8, 1.5e-8], [3.0, -1.0, 2.0]])
    got = host(rms_norm(T(x), 3))
    assert_close(got, rms_norm_ref(x, (3,), eps=2.220446049250313e-16), rtol=1e-13, atol=0)
    assert not np.allclose(got[0], rms_norm_ref(x, (3,), eps=0.0)[0], rtol=1e-3)      # the eps shows
    x32 = np.array([1e-4, -2e-4, 3e-4], dtype=np.float32)                              # mean(x^2) ~ 5e-8
    np.testing.assert_allclose(host(rms_norm(T(x32), 3)), rms_norm_ref(x32.astype(np.float64), (3,),
                                                                          eps=float(np.finfo(np.float32).eps)),
                               rtol=1e-6)
    assert rms_norm_eps(np, np.float64) == np.finfo(np.float64).eps
    assert rms_norm_eps(np, np.float32) == rms_norm_eps(np, np.float16) == np.finfo(np.float32).eps


def test_rms_norm_float32_keeps_dtype():
    rng = np.random.default_rng(30)
    x, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((3, 4))
    check_float32(lambda t, s: rms_norm(t, (3, 4), s), x, w)
    check_float32(lambda t: rms_norm(t, 4, eps=1e-6), x)


def raises(kind, message):
    """pytest.raises for exactly `message` (plain text, not a pattern)."""
    return pytest.raises(kind, match=f"^{re.escape(message)}$")


def test_rms_norm_errors_name_the_op_and_the_shapes():
    x = T(np.ones((2, 3)))
    with raises(ValueError, "rms_norm: input of shape (2, 3) does not end with normalized_shape (4,)"):
        rms_norm(x, 4)
    with raises(ValueError, "rms_norm: input of shape (2, 3) does not end with normalized_shape (2, 3, 1)"):
        rms_norm(x, (2, 3, 1))
    with raises(ValueError, "rms_norm: input of shape (2, 3) does not end with normalized_shape ()"):
        rms_norm(x, ())
    with raises(ValueError, "rms_norm: weight has shape (2,); expected normalized_shape (3,)"):
        rms_norm(x, 3, weight=T(np.ones(2)))
    with raises(ValueError, "rms_norm: weight has shape (1, 3); expected normalized_shape (3,)"):
        rms_norm(x, [3], T(np.ones((1, 3))))                  # no broadcasting of the weight either
    with raises(TypeError, "rms_norm: the input must be floating point; got int64 (cast it with .astype)"):
        rms_norm(T(np.ones((2, 3), dtype=np.int64)), 3)


# ----------------------------------------------------------------------------- silu

@given(x=arrays(shapes(max_dims=4), "wide"), layout=st.sampled_from(LAYOUTS))
def test_silu_forward_and_grad(x, layout):
    layout = layout if x.ndim else "contiguous"          # a 0-d array has one layout
    s, view = stored(x, layout)
    assert_close(silu(view(T(s))), silu_ref(x), rtol=1e-14, atol=1e-15)
    assert nf.gradcheck(lambda t: silu(view(t)), [T(s, requires_grad=True)], **TIGHT)


def test_silu_tails_are_finite_and_keep_their_relative_precision():
    """No overflow warning at +-800, y(-800) = -0 and y(800) = 800; far left, where s ~ e^x is tiny,
    y keeps its relative precision (1 + tanh(x / 2) would lose 3 digits at x = -30), and the
    gradient is the docs' s (1 + x (1 - s))."""
    x = np.array([-800.0, -40.0, -30.0, -1.0, 0.0, 1e-9, 1.0, 30.0, 800.0])
    t = T(x, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = silu(t)
        y.backward(T(np.ones_like(x)).data)
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-x))                  # exp(800) = inf: s(-800) = 0, as in float64 exactly
    np.testing.assert_allclose(host(y), x * s, rtol=1e-14, atol=0)
    np.testing.assert_allclose(host(t.grad), s * (1 + x * (1 - s)), rtol=1e-14, atol=0)
    assert host(y)[0] == 0.0 and np.signbit(host(y)[0]) and host(y)[-1] == 800.0


def test_silu_float32_keeps_dtype():
    check_float32(silu, np.array([[-5.0, -1.0, -0.3], [0.2, 1.5, 6.0]]))
    check_float32(silu, np.array(0.7))


# ----------------------------------------------------------------------------- top-level names

@exported
def test_ops_are_exported_as_npformer_names():
    assert nf.rms_norm is nf.ops.rms_norm and nf.silu is nf.ops.silu
    x = np.random.default_rng(31).standard_normal((2, 3))
    assert nf.gradcheck(lambda t, w: nf.rms_norm(t, 3, w), [T(x, requires_grad=True), T(x[0], requires_grad=True)],
                        **TIGHT)
    assert nf.gradcheck(nf.silu, [T(x, requires_grad=True)], **TIGHT)
