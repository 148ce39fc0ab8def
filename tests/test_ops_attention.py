"""Property tests for the fused attention op: forward against a NumPy formula, float64
gradcheck over drawn shapes, broadcast batch axes and masks (bool and additive), fully
masked rows, dropout, float32 kept, and errors. Every test runs on the reference and on the
fast path; the fast versions' blocks are tested in tests/test_fast.py."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
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


def test_float32_keeps_dtype():
    rng = np.random.default_rng(2)
    check_float32(nf.attention, rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)),
                  rng.standard_normal((2, 5, 3)))


def test_bad_shapes_name_the_op_and_shapes():
    with pytest.raises(ValueError) as info:
        nf.attention(T(np.ones((3, 4))), T(np.ones((5, 3))), T(np.ones((5, 2))))
    assert "attention" in str(info.value) and "(3, 4)" in str(info.value) and "(5, 3)" in str(info.value)


@given(L=st.integers(1, 9), E=st.integers(1, 3), Ev=st.integers(1, 3),
       batch=st.sampled_from([(), (2,), (2, 3)]), dtype=st.sampled_from([np.float64, np.float32]),
       data=st.data())
def test_causal_matches_the_masked_computation_and_gradchecks(L, E, Ev, batch, dtype, data):
    """causal=True: same output and gradients as the lower-triangle mask."""
    _check_causal(L, E, Ev, batch, dtype, data)


def _check_causal(L, E, Ev, batch, dtype, data):
    q, k, v = (data.draw(arrays(batch + (L, n)), label=name) for name, n in (("q", E), ("k", E), ("v", Ev)))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    g = data.draw(arrays(batch + (L, Ev)), label="g").astype(dtype)
    mask = T(np.tri(L, L, dtype=bool)).data
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


def test_causal_with_a_mask_is_refused():
    x = T(np.ones((3, 2)))
    with pytest.raises(ValueError, match="attention: causal=True cannot be combined with a mask"):
        nf.attention(x, x, x, T(np.tri(3, 3, dtype=bool)).data, causal=True)


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
       batch=st.sampled_from([(), (2,), (2, 1)]), causal=st.booleans(),
       dtype=st.sampled_from([np.float64, np.float32]), data=st.data())
def test_self_attention_equals_the_split_heads_computation_and_gradchecks(T_, n_head, D, batch, causal,
                                                                          dtype, data):
    """Same output and gradient as split / reshape / transpose / attention / merge."""
    x = data.draw(arrays(batch + (T_, 3 * n_head * D)), label="qkv").astype(dtype)
    g = data.draw(arrays(batch + (T_, n_head * D)), label="g").astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    results = []
    for fn in (lambda t: _split_heads_reference(t, n_head, causal=causal),
               lambda t: nf.self_attention(t, n_head, causal=causal)):
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


@pytest.mark.parametrize("shape, n_head, words", [((4, 10), 2, "(4, 10)"), ((4, 12), 0, "n_head"),
                                                  ((12,), 2, "(12,)"), ((4, 12), 2.0, "n_head")])
def test_self_attention_bad_input_names_the_op(shape, n_head, words):
    with pytest.raises(ValueError) as info:
        nf.self_attention(T(np.ones(shape)), n_head)
    assert "self_attention" in str(info.value) and words in str(info.value)
