"""Property tests for the fused attention op: forward against a NumPy formula, float64
gradcheck over drawn shapes, broadcast batch axes and masks (bool and additive), fully
masked rows, dropout (its draws, its generator, p = 0 and p = 1), the defaults, float32 kept.
Every test runs on the reference and on the fast path; the fast versions' blocks are tested in
tests/test_fast.py, the errors in tests/test_ops_attention_errors.py."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from npformer.ops.attention import dropout_scale
from tests.helpers import DEVICE, T, host
from tests.strategies import arrays, assert_close, check_float32

COVERED_OPS = {"attention", "self_attention"}
pytestmark = pytest.mark.usefixtures("ops_path")


def reference(q, k, v, mask=None, scale=1.0):
    """softmax(q k^T * scale + mask) v in NumPy; rows with no attended key give zeros."""
    s = q @ np.swapaxes(k, -1, -2) * scale
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    d = e.sum(axis=-1, keepdims=True)
    w = e / np.where(d == 0, 1.0, d)
    return w @ v


@st.composite
def attention_case(draw):
    """q, k, v shapes with broadcast batch axes, and an optional bool or float mask."""
    L, S, E, Ev = (draw(st.integers(1, 3)) for _ in range(4))
    batch = draw(st.sampled_from([(), (2,), (2, 1), (1, 2)]))
    kv_batch = draw(st.sampled_from([batch, batch[-1:] if batch else (), (1,) * len(batch)]))
    kind = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    mask = None
    if kind == "bool":
        mask = np.array(draw(st.lists(st.booleans(), min_size=L * S, max_size=L * S))).reshape(L, S)
    elif kind == "float":
        mask = np.array(draw(st.lists(st.sampled_from([0.0, -1.0, 0.5, -np.inf]), min_size=L * S,
                                      max_size=L * S))).reshape(L, S)
    elif kind == "causal":
        mask = np.tri(L, S, dtype=bool)
    return batch + (L, E), kv_batch + (S, E), kv_batch + (S, Ev), mask


@given(case=attention_case(), scale=st.sampled_from([1.0, 0.5]), data=st.data())
def test_attention_forward_and_grad(case, scale, data):
    sq, sk, sv, mask = case
    q, k, v = (data.draw(arrays(s), label=n) for s, n in ((sq, "q"), (sk, "k"), (sv, "v")))
    m = None if mask is None else T(mask).data
    assert_close(nf.attention(T(q), T(k), T(v), m, scale=scale), reference(q, k, v, mask, scale))
    inputs = [T(a, requires_grad=True) for a in (q, k, v)]
    assert nf.gradcheck(lambda a, b, c: nf.attention(a, b, c, m, scale=scale), inputs)


def test_fully_masked_rows_give_zero_output_and_zero_gradients():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False                                          # query 1 may attend to nothing
    qt, kt, vt = (T(a, requires_grad=True) for a in (q, k, v))
    out = nf.attention(qt, kt, vt, T(mask).data)
    assert np.all(host(out)[:, 1] == 0) and np.all(np.isfinite(host(out)))
    out.sum().backward()
    assert np.all(host(qt.grad)[:, 1] == 0)
    assert all(np.all(np.isfinite(host(t.grad))) for t in (qt, kt, vt))
    assert nf.gradcheck(lambda a, b, c: nf.attention(a, b, c, T(mask).data), [T(q, True), T(k, True), T(v, True)])


def test_dropout_is_seeded_and_gradchecks():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))

    def fn(a, b, c):
        return nf.attention(a, b, c, dropout_p=0.4, generator=nf.random.Generator(7, DEVICE))
    assert nf.gradcheck(fn, [T(q, True), T(k, True), T(v, True)])
    np.testing.assert_array_equal(host(fn(T(q), T(k), T(v))), host(fn(T(q), T(k), T(v))))
    assert not np.allclose(host(fn(T(q), T(k), T(v))), reference(q, k, v))


def test_the_defaults_are_scale_1_no_mask_no_bias_no_dropout_not_causal():
    rng = np.random.default_rng(9)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    out = nf.attention(T(q), T(k), T(v))
    assert_close(out, reference(q, k, v, scale=1.0))
    spelled = nf.attention(T(q), T(k), T(v), None, scale=1.0, dropout_p=0.0, generator=None, causal=False, bias=None)
    np.testing.assert_array_equal(host(out), host(spelled))


def _dropped(q, k, v, p, u):
    """The dropout reference: W = P * (u >= p) / (1 - p), out = W v, for the uniforms u (..., L, S)."""
    s = q @ np.swapaxes(k, -1, -2)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True) * (u >= p) / (1 - p)) @ v


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dropout_keeps_a_weight_where_the_generators_draw_in_the_scores_dtype_is_at_least_p(dtype):
    """One seed, one mask: the uniforms come from `generator`, drawn in (..., L, S) order in the
    scores' dtype (the fast path draws the same), each weight kept where u >= p, scaled by 1 / (1 - p)."""
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((2, 3, 4), (2, 5, 4), (2, 5, 2)))
    out = nf.attention(T(q), T(k), T(v), dropout_p=0.25, generator=nf.random.Generator(7, DEVICE))
    u = host(nf.random.Generator(7, DEVICE).random((2, 3, 5), dtype=dtype))
    assert out.dtype == dtype and 0 < (u >= 0.25).mean() < 1
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_close(out, _dropped(q.astype(np.float64), k, v, 0.25, u), **tol)


def test_dropout_scale_keeps_a_draw_equal_to_p_and_scales_by_1_over_1_minus_p():
    """keep = (u >= p), so P(keep) = 1 - p exactly for u uniform in [0, 1); asked for in `dtype`."""
    asked = []

    class Draws:                      # a generator whose uniforms are chosen, not random
        def random(self, shape, dtype):
            asked.append((shape, dtype))
            return np.array([0.0, 0.2, 0.25, 0.5, 0.9], dtype=dtype).reshape(shape)
    D = dropout_scale((1, 5), np.float32, 0.25, Draws(), DEVICE)
    assert asked == [((1, 5), np.float32)] and D.dtype == np.float32
    np.testing.assert_array_equal(D, np.array([[0, 0, 4 / 3, 4 / 3, 4 / 3]], np.float32))
    np.testing.assert_array_equal(dropout_scale((1, 5), np.float64, 1.0, Draws(), DEVICE), np.zeros((1, 5)))
    assert dropout_scale((1, 5), np.float64, 0.0, None, DEVICE) is None and len(asked) == 2


def test_dropout_without_a_generator_draws_from_the_device_s_global_one():
    rng = np.random.default_rng(11)
    q, k, v = (T(rng.standard_normal(s)) for s in ((3, 4), (5, 4), (5, 2)))
    with nf.random.thread_default_generator(nf.random.Generator(7, DEVICE), DEVICE):
        got = host(nf.attention(q, k, v, dropout_p=0.3))
    want = host(nf.attention(q, k, v, dropout_p=0.3, generator=nf.random.Generator(7, DEVICE)))
    np.testing.assert_array_equal(got, want)


def test_no_dropout_draws_nothing_from_the_generator():
    """dropout_p = 0 (evaluation) leaves the generator where it was, so the draws after it do not shift."""
    x = T(np.random.default_rng(12).standard_normal((3, 4)))
    gen = nf.random.Generator(7, DEVICE)
    nf.attention(x, x, x, dropout_p=0.0, generator=gen)
    np.testing.assert_array_equal(host(gen.random((4,))), host(nf.random.Generator(7, DEVICE).random((4,))))


def test_dropout_p_1_drops_every_weight():
    """Zero output and zero gradients (not a division by 1 - p = 0)."""
    rng = np.random.default_rng(13)
    q, k, v = (T(rng.standard_normal(s), requires_grad=True) for s in ((3, 4), (5, 4), (5, 2)))
    out = nf.attention(q, k, v, dropout_p=1.0, generator=nf.random.Generator(7, DEVICE))
    out.backward(T(np.ones((3, 2))).data)
    assert np.all(host(out) == 0) and all(np.all(host(t.grad) == 0) for t in (q, k, v))


def test_float32_keeps_dtype():
    rng = np.random.default_rng(2)
    check_float32(nf.attention, rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)),
                  rng.standard_normal((2, 5, 3)))


@given(L=st.integers(1, 9), S=st.integers(1, 9), E=st.integers(1, 3), Ev=st.integers(1, 3),
       batch=st.sampled_from([(), (2,), (2, 3)]), dtype=st.sampled_from([np.float64, np.float32]),
       data=st.data())
def test_causal_matches_the_masked_computation_and_gradchecks(L, S, E, Ev, batch, dtype, data):
    """causal=True: same output and gradients as the top-left aligned lower triangle np.tri(L, S)
    (query i sees keys 0..i), also when there are more or fewer keys than queries."""
    _check_causal(L, S, E, Ev, batch, dtype, data)


def _check_causal(L, S, E, Ev, batch, dtype, data):
    q, k, v = (data.draw(arrays(batch + (n_rows, n)), label=name)
               for name, n_rows, n in (("q", L, E), ("k", S, E), ("v", S, Ev)))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    g = data.draw(arrays(batch + (L, Ev)), label="g").astype(dtype)
    mask = T(np.tri(L, S, dtype=bool)).data
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    results = []
    for kw in (dict(mask=mask), dict(causal=True)):
        ts = [T(a, requires_grad=True) for a in (q, k, v)]
        out = nf.attention(*ts, scale=0.7, **kw)
        assert out.dtype == dtype
        out.backward(T(g).data)
        results.append([host(out)] + [host(t.grad) for t in ts])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, **tol)
    if dtype == np.float64:
        inputs = [T(a, requires_grad=True) for a in (q, k, v)]
        assert nf.gradcheck(lambda a, b, c: nf.attention(a, b, c, scale=0.7, causal=True), inputs)


# ----------------------------------------------------------------------------- self_attention

def _split_heads_reference(x, n_head, **kw):
    """self_attention spelled with split, reshape, transpose, attention and the merge."""
    *batch, T_, E3 = x.shape
    E = E3 // 3
    q, k, v = (nf.transpose(nf.reshape(part, tuple(batch) + (T_, n_head, E // n_head)), -3, -2)
               for part in nf.split(x, E, axis=-1))
    y = nf.attention(q, k, v, scale=kw.pop("scale", 1.0 / math.sqrt(E // n_head)), **kw)
    return nf.reshape(nf.transpose(y, -3, -2), tuple(batch) + (T_, E))


@given(T_=st.integers(1, 7), n_head=st.integers(1, 3), D=st.integers(1, 3),
       batch=st.sampled_from([(), (2,), (2, 1)]), causal=st.booleans(), scale=st.sampled_from([None, 0.8]),
       dtype=st.sampled_from([np.float64, np.float32]), data=st.data())
def test_self_attention_equals_the_split_heads_computation_and_gradchecks(T_, n_head, D, batch, causal, scale,
                                                                          dtype, data):
    """Same output and gradient as split / reshape / transpose / attention / merge, with the scale
    given or left to its default 1 / sqrt(D)."""
    kw = dict(causal=causal) if scale is None else dict(causal=causal, scale=scale)
    x = data.draw(arrays(batch + (T_, 3 * n_head * D)), label="qkv").astype(dtype)
    g = data.draw(arrays(batch + (T_, n_head * D)), label="g").astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    results = []
    for fn in (lambda t: _split_heads_reference(t, n_head, **kw), lambda t: nf.self_attention(t, n_head, **kw)):
        t = T(x, requires_grad=True)
        out = fn(t)
        assert out.dtype == dtype and out.shape == batch + (T_, n_head * D)
        out.backward(T(g).data)
        results.append((host(out), host(t.grad)))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, **tol)
    if dtype == np.float64:
        assert nf.gradcheck(lambda t: nf.self_attention(t, n_head, scale=0.8, causal=causal), [T(x, True)])


def test_self_attention_dropout_matches_the_split_heads_computation():
    x = np.random.default_rng(3).standard_normal((2, 5, 12))
    outs = []
    for fn in (lambda t, gen: _split_heads_reference(t, 2, dropout_p=0.3, generator=gen),
               lambda t, gen: nf.self_attention(t, 2, dropout_p=0.3, generator=gen)):
        t = T(x, requires_grad=True)
        out = fn(t, nf.random.Generator(11, DEVICE))
        out.sum().backward()
        outs.append((host(out), host(t.grad)))
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    assert nf.gradcheck(lambda t: nf.self_attention(t, 2, dropout_p=0.3, generator=nf.random.Generator(5, DEVICE)),
                        [T(x, True)])


def test_self_attention_default_scale_is_sdpa_s_and_numpy_ints_are_accepted():
    """scale defaults to 1 / sqrt(D) exactly as scaled_dot_product_attention's; n_head may be np.int64."""
    x = np.random.default_rng(4).standard_normal((2, 6, 3 * 2 * 32))
    got = host(nf.self_attention(T(x), np.int64(2), causal=True))
    want = host(_split_heads_reference(T(x), 2, causal=True))
    np.testing.assert_array_equal(got, want)



def test_dropout_in_float16_draws_float64_uniforms():
    """Generators draw float32 or float64 only: float16 scores take their keep mask from float64 draws."""
    D = dropout_scale((3, 5), np.float16, 0.5, nf.random.Generator(1, DEVICE), DEVICE)
    u = host(nf.random.Generator(1, DEVICE).random((3, 5), dtype=np.float64))
    assert D.dtype == np.float16
    np.testing.assert_array_equal(host(D), (u >= 0.5) * 2.0)
    q = T(np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float16))
    assert nf.attention(q, q, q, dropout_p=0.5, generator=nf.random.Generator(1, DEVICE)).dtype == np.float16
