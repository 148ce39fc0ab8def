"""Property tests for the fused ops (softmax, log_softmax, cross_entropy, layer_norm) and for
embedding and dropout: forward against NumPy formulas, hand-derived backwards by gradcheck."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from tests.helpers import DEVICE, T, host
from tests.strategies import arrays, assert_close, check_float32, gradcheck_all, shapes

COVERED_OPS = {"softmax", "log_softmax", "cross_entropy", "layer_norm", "embedding", "dropout"}
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path


# ----------------------------------------------------------------------------- softmax, log_softmax

def log_softmax_ref(x, axis):
    if x.ndim == 0:
        return np.zeros_like(x)
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


SOFTMAXES = {
    "softmax": (nf.softmax, lambda x, axis: np.exp(log_softmax_ref(x, axis))),
    "log_softmax": (nf.log_softmax, log_softmax_ref),
}


@pytest.mark.parametrize("name", sorted(SOFTMAXES))
@given(data=st.data())
def test_softmax_forward_and_grad(name, data):
    op, ref = SOFTMAXES[name]
    x = data.draw(arrays(shapes(max_dims=4), "wide"), label="x")
    axis = data.draw(st.integers(-max(x.ndim, 1), max(x.ndim, 1) - 1), label="axis")
    assert_close(op(T(x), axis=axis), ref(x, axis))
    gradcheck_all(lambda t: op(t, axis=axis), x)


@pytest.mark.parametrize("name", sorted(SOFTMAXES))
def test_softmax_huge_logits_stay_finite(name):
    """Each row is shifted by its own max: the last row, 2e4 below the others, would underflow to
    exp(-2e4) = 0 (0/0, log 0) if shifted by the array's max."""
    op, ref = SOFTMAXES[name]
    a = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4], [-1e4, -1e4, 1e4], [-1e4, -1e4, -1e4]])
    x = T(a, requires_grad=True)
    y = op(x, axis=-1)
    assert np.all(np.isfinite(host(y)))
    assert_close(y, ref(a, -1))
    y.backward(T(np.random.default_rng(5).standard_normal(a.shape)).data)
    assert np.all(np.isfinite(host(x.grad)))


@pytest.mark.parametrize("name", sorted(SOFTMAXES))
def test_softmax_float32_keeps_dtype(name):
    op, _ = SOFTMAXES[name]
    check_float32(lambda t: op(t, axis=0), np.random.default_rng(6).standard_normal((3, 2)))


# ----------------------------------------------------------------------------- cross_entropy

def cross_entropy_ref(x, t, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Loop over samples: loss = -sum_c q_c log p_c with q = (1 - eps) onehot + eps / C; 0 where ignored."""
    C = x.shape[0] if x.ndim == 1 else x.shape[1]
    rows = (x if x.ndim <= 2 else np.moveaxis(x, 1, -1)).reshape(-1, C)
    flat = t.reshape(-1)
    losses = np.zeros(len(flat))
    for i, (row, c) in enumerate(zip(rows, flat)):
        if c == ignore_index:
            continue
        q = np.full(C, label_smoothing / C)
        q[c] += 1.0 - label_smoothing
        losses[i] = -(q * log_softmax_ref(row, 0)).sum()
    if reduction == "none":
        return losses.reshape(t.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (flat != ignore_index).sum()


@st.composite
def cross_entropy_cases(draw):
    """(logits, target, kwargs): logits (C,), (N, C), (N, C, d1) or (N, C, d1, d2); some targets ignored."""
    C = draw(st.integers(1, 4), label="C")
    rest = draw(shapes(min_dims=0, max_dims=3), label="(N, d1, ...)")
    shape = (C,) if not rest else rest[:1] + (C,) + rest[1:]
    ignore_index = draw(st.sampled_from([-100, -1, 1]), label="ignore_index")   # 1 is also a class
    target = draw(hnp.arrays(np.int64, rest, elements=st.integers(0, C - 1)), label="target")
    ignored = draw(hnp.arrays(bool, rest), label="ignored")
    target = np.where(ignored, ignore_index, target).astype(np.int64)
    if np.all(target == ignore_index):                 # keep one valid target ("mean" would be nan)
        target.reshape(-1)[0] = 0
    kwargs = dict(ignore_index=ignore_index,
                  label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.35]), label="label_smoothing"),
                  reduction=draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"))
    return draw(arrays(shape, "wide"), label="logits"), target, kwargs


@given(case=cross_entropy_cases())
def test_cross_entropy_forward_and_grad(case):
    x, target, kwargs = case
    assert_close(nf.cross_entropy(T(x), T(target), **kwargs), cross_entropy_ref(x, target, **kwargs))
    gradcheck_all(lambda t: nf.cross_entropy(t, T(target), **kwargs), x)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_all_ignored(label_smoothing):
    """Every target ignored: "mean" is nan (0/0, as in torch), "sum" 0, "none" zeros; the gradient is 0."""
    a = np.random.default_rng(7).standard_normal((3, 4))
    target = T(np.array([-100, -100, -100]))
    for reduction in ("mean", "sum", "none"):
        x = T(a, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)      # NumPy warns about 0/0
            loss = nf.cross_entropy(x, target, label_smoothing=label_smoothing, reduction=reduction)
        if reduction == "mean":
            assert np.isnan(host(loss))
        else:
            np.testing.assert_array_equal(host(loss), np.zeros(loss.shape))
        loss.sum().backward()
        np.testing.assert_array_equal(host(x.grad), np.zeros((3, 4)))


def test_cross_entropy_float32_keeps_dtype():
    rng = np.random.default_rng(8)
    for reduction in ("mean", "sum", "none"):
        check_float32(lambda t: nf.cross_entropy(t, T(np.array([0, 2, -100])), reduction=reduction,
                                                 label_smoothing=0.1), rng.standard_normal((3, 4)))
    check_float32(lambda t: nf.cross_entropy(t, T(np.array([[1, 0]]))), rng.standard_normal((1, 3, 2)))


def test_cross_entropy_defaults():
    """ignore_index=-100, label_smoothing=0.0 and reduction="mean", as in torch."""
    x = np.random.default_rng(20).standard_normal((4, 3))
    target = np.array([2, -100, 0, 1])
    expected = cross_entropy_ref(x, target, ignore_index=-100, label_smoothing=0.0, reduction="mean")
    assert_close(nf.cross_entropy(T(x), T(target)), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_1d_logits_take_a_0d_target(reduction):
    """Logits (C,) and a 0-d target (as torch allows): the loss is -log softmax(x)[t], 0-d for every
    reduction, and the gradient softmax(x) - onehot(t)."""
    x = np.array([0.5, -1.0, 2.0, 0.0])
    logits = T(x, requires_grad=True)
    loss = nf.cross_entropy(logits, T(np.array(2)), reduction=reduction)
    assert loss.shape == ()
    assert_close(loss, -log_softmax_ref(x, 0)[2])
    loss.backward()
    assert_close(logits.grad, np.exp(log_softmax_ref(x, 0)) - np.eye(4)[2])
    gradcheck_all(lambda t: nf.cross_entropy(t, T(np.array(1)), label_smoothing=0.3, reduction=reduction), x)


def test_cross_entropy_label_smoothing_one_is_a_uniform_target():
    """label_smoothing=1.0 is allowed (as in torch): q is uniform, each loss -mean_c log p_c whatever the target."""
    x = np.random.default_rng(21).standard_normal((3, 4))
    target = np.array([0, 3, 1])
    assert_close(nf.cross_entropy(T(x), T(target), label_smoothing=1.0), -log_softmax_ref(x, 1).mean())
    gradcheck_all(lambda t: nf.cross_entropy(t, T(target), label_smoothing=1.0), x)


def test_cross_entropy_classes_masked_with_minus_inf_drop_out():
    """A class whose logit is -inf (a vocabulary mask) has p = 0. Without label smoothing the loss and
    the other classes' gradients are those of the logits without it, and its gradient is 0 (no nan
    from 0 * -inf: the smoothing term is not formed at all)."""
    x = np.random.default_rng(22).standard_normal((3, 5))
    x[:, [1, 3]] = -np.inf
    kept, target = [0, 2, 4], np.array([0, 4, 2])
    small, small_target = x[:, kept], np.array([0, 2, 1])         # the same classes, renumbered
    logits = T(x, requires_grad=True)
    loss = nf.cross_entropy(logits, T(target))
    assert_close(loss, cross_entropy_ref(small, small_target))
    loss.backward()
    grad = host(logits.grad)
    np.testing.assert_array_equal(grad[:, [1, 3]], 0.0)
    assert_close(grad[:, kept], (np.exp(log_softmax_ref(small, 1)) - np.eye(3)[small_target]) / 3)


# ----------------------------------------------------------------------------- layer_norm

@st.composite
def layer_norm_cases(draw):
    """(x, normalized_shape, weight or None, bias or None, eps); normalized_shape has 1 or 2 axes."""
    norm = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2), label="normalized_shape"))
    lead = draw(shapes(min_dims=0, max_dims=2), label="lead")
    x = draw(arrays(lead + norm), label="x")
    weight = draw(st.none() | arrays(norm), label="weight")
    bias = draw(st.none() | arrays(norm), label="bias")
    return x, norm, weight, bias, draw(st.sampled_from([1e-5, 1e-3]), label="eps")


@given(case=layer_norm_cases())
def test_layer_norm_forward_and_grad(case):
    x, norm, weight, bias, eps = case
    axes = tuple(range(x.ndim - len(norm), x.ndim))
    xhat = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)
    expected = xhat * (1.0 if weight is None else weight) + (0.0 if bias is None else bias)
    params = [p for p in (weight, bias) if p is not None]
    got = nf.layer_norm(T(x), norm, None if weight is None else T(weight), None if bias is None else T(bias), eps)
    # looser than 1e-12: with var near 0, 1/sqrt(var + eps) ~ 300 magnifies rounding differences
    assert_close(got, expected, rtol=1e-10, atol=1e-10)

    def fn(t, *ps):
        ps = iter(ps)
        w = next(ps) if weight is not None else None
        b = next(ps) if bias is not None else None
        return nf.layer_norm(t, norm, w, b, eps)
    gradcheck_all(fn, x, *params)


def test_layer_norm_float32_keeps_dtype():
    rng = np.random.default_rng(9)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    check_float32(lambda t, s, u: nf.layer_norm(t, (3, 4), s, u), x, w, b)
    check_float32(lambda t: nf.layer_norm(t, 4), x)


def test_layer_norm_default_eps():
    """eps defaults to 1e-5 (as in torch); the rows' variance, about 1e-4, is small enough for eps to show."""
    x = np.random.default_rng(23).standard_normal((2, 5)) * 1e-2
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    assert_close(nf.layer_norm(T(x), 5), xhat, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- embedding

@st.composite
def embedding_cases(draw):
    """(weight (V, D), indices of any shape with repeats likely)."""
    V, D = draw(st.integers(1, 5), label="V"), draw(st.integers(1, 3), label="D")
    idx = draw(hnp.arrays(np.int64, shapes(max_dims=2, max_side=4), elements=st.integers(0, V - 1)), label="idx")
    return draw(arrays((V, D)), label="weight"), idx


@given(case=embedding_cases())
def test_embedding_forward_and_grad(case):
    weight, idx = case
    assert_close(nf.embedding(T(weight), T(idx)), weight[idx])
    gradcheck_all(lambda w: nf.embedding(w, T(idx)), weight)


def test_embedding_repeated_rows_add_gradient():
    w = T(np.zeros((3, 2)), requires_grad=True)
    nf.embedding(w, T(np.array([[0, 2], [0, 0]]))).sum().backward()
    np.testing.assert_array_equal(host(w.grad), [[3.0, 3.0], [0.0, 0.0], [1.0, 1.0]])


def test_embedding_float32_keeps_dtype():
    check_float32(lambda w: nf.embedding(w, T(np.array([1, 1, 0]))), np.ones((2, 3)))


# ----------------------------------------------------------------------------- dropout

def _gen(seed):
    return nf.random.Generator(seed, device=DEVICE)


@given(x=arrays(shapes(max_dims=3, max_side=4), "nonzero"), p=st.sampled_from([0.2, 0.5, 0.8]),
       seed=st.integers(0, 2 ** 16))
def test_dropout_forward_and_grad(x, p, seed):
    """Each element is 0 or x / (1 - p); the generator is recreated inside fn so every call draws the same mask."""
    fn = lambda t: nf.dropout(t, p, generator=_gen(seed))   # noqa: E731
    out = host(fn(T(x)))
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-14)
    np.testing.assert_array_equal(host(fn(T(x))), out)     # same seed, same mask
    gradcheck_all(fn, x)
    t = T(x, requires_grad=True)
    fn(t).sum().backward()
    np.testing.assert_allclose(host(t.grad), kept / (1 - p), rtol=1e-14)


def test_dropout_keeps_about_1_minus_p():
    out = host(nf.dropout(T(np.ones(20000)), 0.3, generator=_gen(0)))
    assert abs((out != 0).mean() - 0.7) < 0.02


def test_dropout_identity_cases():
    a = np.array([[1.0, -2.0], [3.0, 4.0]])
    for kwargs in (dict(p=0.5, training=False), dict(p=0.0)):
        x = T(a, requires_grad=True)
        y = nf.dropout(x, **kwargs)
        assert_close(y, a)
        y.sum().backward()
        np.testing.assert_array_equal(host(x.grad), np.ones_like(a))
    x = T(a, requires_grad=True)
    y = nf.dropout(x, 1.0)
    y.sum().backward()
    np.testing.assert_array_equal(host(y), np.zeros_like(a))
    np.testing.assert_array_equal(host(x.grad), np.zeros_like(a))


def test_dropout_float32_keeps_dtype():
    check_float32(lambda t: nf.dropout(t, 0.5, generator=_gen(1)), np.ones((4, 3)))


def test_dropout_default_p_is_one_half():
    x = np.ones((4, 8))
    np.testing.assert_array_equal(host(nf.dropout(T(x), generator=_gen(13))),
                                  host(nf.dropout(T(x), 0.5, generator=_gen(13))))


@pytest.mark.parametrize("dtype, draw", [(np.float64, np.float64), (np.float32, np.float32),
                                         (np.float16, np.float64), (np.int64, np.float64)])
def test_dropout_keeps_the_uniforms_at_or_above_p(dtype, draw):
    """keep = u >= p, u the generator's uniforms drawn in the input's dtype (float64 for float16 and
    integers, which generators cannot draw). p is set to one of the draws: that element is kept."""
    shape = (4, 8)
    u = host(_gen(11).random(shape, dtype=draw))
    p = float(np.sort(u, axis=None)[u.size // 2])
    x = np.arange(1, u.size + 1).reshape(shape).astype(dtype)
    out = nf.dropout(T(x), p, generator=_gen(11))
    assert out.dtype == (dtype if np.dtype(dtype).kind == "f" else np.float64)
    keep = u >= p
    assert keep.sum() == u.size // 2
    np.testing.assert_array_equal(host(out) != 0, keep)
    np.testing.assert_allclose(host(out)[keep], x[keep] / (1 - p), rtol=1e-3 if dtype == np.float16 else 1e-6)


def test_dropout_without_generator_draws_from_the_global_one():
    x = np.ones((4, 8))
    with nf.random.thread_default_generator(_gen(12), device=DEVICE):
        got = host(nf.dropout(T(x), 0.5))
    np.testing.assert_array_equal(got, host(nf.dropout(T(x), 0.5, generator=_gen(12))))


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_dropout_records_dropout_as_grad_fn(p):
    assert nf.dropout(T(np.ones((2, 3)), requires_grad=True), p, generator=_gen(0)).grad_fn == "dropout"
