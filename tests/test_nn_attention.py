"""scaled_dot_product_attention and MultiHeadAttention: against a NumPy reference written here,
float64 gradient checks, mask polarity, fully masked rows (zeros, never NaN), and errors."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from npformer import nn
from npformer.nn import functional as F
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

F64 = dict(dtype=np.float64, device=DEVICE)


def ref_attention(q, k, v, allowed=None, additive=None, scale=None):
    """NumPy softmax(q k^T scale + mask) v; a row with no allowed key gets zero weights."""
    s = q @ np.swapaxes(k, -1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    if additive is not None:
        s = s + additive
    top = s.max(axis=-1, keepdims=True)
    dead = np.isneginf(top)
    e = np.exp(s - np.where(dead, 0.0, top))
    w = e / np.where(dead, 1.0, e.sum(axis=-1, keepdims=True))
    return w @ v, w


# ----------------------------------------------------------------------------- scaled_dot_product_attention

@st.composite
def attention_case(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    L, S, E, Ev = (draw(st.integers(1, 5)) for _ in range(4))
    kind = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    # the mask drops some leading axes and sets some axes to 1 (broadcasting)
    full = batch + (L, S)
    keep = draw(st.integers(2, len(full)))
    mshape = tuple(1 if draw(st.booleans()) else n for n in full[len(full) - keep:])
    return batch, L, S, E, Ev, kind, mshape, draw(st.integers(0, 2 ** 16)), draw(st.booleans())


@given(attention_case())
def test_sdpa_matches_reference_for_any_broadcast_mask(case):
    batch, L, S, E, Ev, kind, mshape, seed, kill_row = case
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(batch + s) for s in ((L, E), (S, E), (S, Ev)))
    allowed = additive = mask = None
    if kind == "bool":
        allowed = rng.random(mshape) < 0.6
        if kill_row:
            allowed[..., -1, :] = False                            # a fully masked query row
        mask = allowed
    elif kind == "float":
        additive = rng.standard_normal(mshape)
        additive[rng.random(mshape) < 0.3] = -np.inf
        if kill_row:
            additive[..., 0, :] = -np.inf
        mask = additive
    elif kind == "causal":
        allowed = np.tri(L, S, dtype=bool)
    want, want_w = ref_attention(q, k, v, allowed, additive)
    out, w = F.scaled_dot_product_attention(T(q), T(k), T(v), attn_mask=None if mask is None else T(mask),
                                            is_causal=kind == "causal", need_weights=True)
    assert np.isfinite(host(out)).all() and np.isfinite(host(w)).all()
    np.testing.assert_allclose(host(out), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(w), np.broadcast_to(want_w, host(w).shape), rtol=1e-10, atol=1e-12)
    live = want_w.sum(axis=-1)
    assert np.allclose(live[live > 0], 1.0)                        # live rows are distributions


def test_sdpa_fully_masked_row_gives_zero_output_and_zero_gradients():
    rng = np.random.default_rng(0)
    q, k, v = (rand_t(rng, *s) for s in ((2, 4, 3), (2, 5, 3), (2, 5, 2)))
    for mask in (np.ones((4, 5), bool), np.zeros((4, 5))):
        if mask.dtype == bool:
            mask[2] = False                                         # query 2 may attend nothing
        else:
            mask[2] = -np.inf
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=T(mask))
        assert (host(out)[:, 2] == 0).all() and np.isfinite(host(out)).all()
        for t in (q, k, v):
            t.grad = None
        g = rng.standard_normal(out.shape)
        out.backward(T(g).data)
        grads = [host(t.grad).copy() for t in (q, k, v)]
        assert all(np.isfinite(gr).all() for gr in grads) and (grads[0][:, 2] == 0).all()
        # the dead row's cotangent reaches nothing
        for t in (q, k, v):
            t.grad = None
        g[:, 2] = 1e6
        F.scaled_dot_product_attention(q, k, v, attn_mask=T(mask)).backward(T(g).data)
        for before, t in zip(grads, (q, k, v)):
            np.testing.assert_allclose(host(t.grad), before, rtol=1e-12, atol=1e-12)
        assert nf.gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=T(mask)), [q, k, v])


def rand_t(rng, *shape, grad=True):
    return T(rng.standard_normal(shape), requires_grad=grad)


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_sdpa_gradcheck(kind):
    rng = np.random.default_rng(1)
    q, k, v = (rand_t(rng, *s) for s in ((2, 3, 4), (2, 4, 4), (2, 4, 3)))
    mask = {"bool": T(rng.random((3, 4)) < 0.7), "float": T(rng.standard_normal((2, 3, 4))), "causal": None}[kind]
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kind == "causal",
                                                       scale=0.3, need_weights=True)
    assert nf.gradcheck(f, [q, k, v])


def test_sdpa_mask_polarity_and_equivalent_forms():
    rng = np.random.default_rng(2)
    q, k, v = (rand_t(rng, *s, grad=False) for s in ((3, 2), (4, 2), (4, 5)))
    allowed = np.tri(3, 4, dtype=bool)
    as_bool = F.scaled_dot_product_attention(q, k, v, attn_mask=T(allowed))
    as_float = F.scaled_dot_product_attention(q, k, v, attn_mask=T(np.where(allowed, 0.0, -np.inf)))
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(host(as_bool), host(as_float), rtol=1e-14)
    np.testing.assert_allclose(host(as_bool), host(causal), rtol=1e-14)
    np.testing.assert_allclose(host(as_bool)[0], host(v)[0], rtol=1e-14)        # True = attend: query 0 sees key 0 only


def test_sdpa_dropout_is_reproducible_and_scales_kept_weights():
    rng = np.random.default_rng(3)
    q, k, v = (rand_t(rng, 6, 4, grad=False) for _ in range(3))
    run = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, need_weights=True,
                                                 generator=nf.random.Generator(0, DEVICE))
    (o1, w1), (o2, w2) = run(), run()
    np.testing.assert_array_equal(host(o1), host(o2))
    np.testing.assert_array_equal(host(w1), host(w2))
    _, clean = F.scaled_dot_product_attention(q, k, v, need_weights=True)
    kept = host(w1) != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(host(w1)[kept], 2 * host(clean)[kept], rtol=1e-14)
    np.testing.assert_allclose(host(o1), host(w1) @ host(v), rtol=1e-12)


def test_sdpa_errors_name_the_argument_and_shapes():
    q = T(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="is_causal=True cannot be combined with an explicit attn_mask"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=T(np.ones((3, 3), bool)), is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(4, 3\); expected .* \(2, 3, 3\)"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=T(np.ones((4, 3), bool)))
    with pytest.raises(TypeError, match=r"attn_mask must be a bool or floating-point mask; got dtype int64 .shape \(3, 3\)"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=T(np.ones((3, 3), np.int64)))
    with pytest.raises(ValueError, match=r"key \(..., S, E\) \(2, 3, 5\)"):
        F.scaled_dot_product_attention(q, T(np.zeros((2, 3, 5))), q)


# ----------------------------------------------------------------------------- MultiHeadAttention

def ref_mha(mha, query, key, value, attn_mask=None, key_padding_mask=None):
    """Head by head in NumPy from the module's weights. Masks: bool True = masked out, float added.
    bias_k, bias_v and then a zero key and value are appended after the S keys, masked for no query."""
    E, H = mha.embed_dim, mha.num_heads
    d = E // H
    if mha._qkv_same_embed_dim:
        wq, wk, wv = np.split(host(mha.in_proj_weight), 3)
    else:
        wq, wk, wv = (host(w) for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
    bq, bk, bv = np.split(host(mha.in_proj_bias), 3) if mha.in_proj_bias is not None else (0, 0, 0)
    q, k, v = query @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv
    B, L, S = query.shape[0], query.shape[1], key.shape[1]
    if mha.bias_k is not None:
        k, v = (np.concatenate([t, np.broadcast_to(host(b), (B, 1, E))], axis=1)
                for t, b in ((k, mha.bias_k), (v, mha.bias_v)))
    if mha.add_zero_attn:
        k, v = (np.concatenate([t, np.zeros((B, 1, E))], axis=1) for t in (k, v))
    add = np.zeros((B, H, L, k.shape[1]))
    masked = add[..., :S]                                          # a view: the added keys stay unmasked
    if attn_mask is not None:
        m = attn_mask if attn_mask.ndim == 2 else attn_mask.reshape(B, H, L, S)
        masked += np.where(m, -np.inf, 0.0) if m.dtype == bool else m
    if key_padding_mask is not None:
        m = key_padding_mask[:, None, None, :]
        masked += np.where(m, -np.inf, 0.0) if m.dtype == bool else m
    heads, ws = [], []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        o, w = ref_attention(q[..., sl], k[..., sl], v[..., sl], additive=add[:, h], scale=mha.scale)
        heads.append(o)
        ws.append(w)
    out = np.concatenate(heads, axis=-1) @ host(mha.out_proj.weight).T
    if mha.out_proj.bias is not None:
        out = out + host(mha.out_proj.bias)
    return out, np.stack(ws, axis=1)


def make_mha(E=4, H=2, seed=0, **kw):
    mha = nn.MultiHeadAttention(E, H, generator=nf.random.Generator(seed), **F64, **kw)
    rng = np.random.default_rng(seed + 100)
    for p in mha.parameters():                  # non-zero biases, so that every term is exercised
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.5)
    return mha


def test_mha_parameter_names_and_shapes_follow_torch():
    shapes = lambda m: [(n, p.shape) for n, p in m.named_parameters()]
    assert shapes(nn.MultiHeadAttention(6, 3, **F64)) == [
        ("in_proj_weight", (18, 6)), ("in_proj_bias", (18,)), ("out_proj.weight", (6, 6)), ("out_proj.bias", (6,))]
    assert shapes(nn.MultiHeadAttention(6, 3, kdim=2, vdim=5, **F64)) == [
        ("q_proj_weight", (6, 6)), ("k_proj_weight", (6, 2)), ("v_proj_weight", (6, 5)), ("in_proj_bias", (18,)),
        ("out_proj.weight", (6, 6)), ("out_proj.bias", (6,))]
    assert [n for n, _ in nn.MultiHeadAttention(6, 3, bias=False, **F64).named_parameters()] == [
        "in_proj_weight", "out_proj.weight"]
    assert shapes(nn.MultiHeadAttention(6, 3, add_bias_kv=True, **F64)) == [    # torch's state_dict order
        ("in_proj_weight", (18, 6)), ("in_proj_bias", (18,)), ("bias_k", (1, 1, 6)), ("bias_v", (1, 1, 6)),
        ("out_proj.weight", (6, 6)), ("out_proj.bias", (6,))]
    plain = nn.MultiHeadAttention(6, 3, add_zero_attn=True, **F64)
    assert plain.bias_k is None and plain.bias_v is None and plain.add_zero_attn and plain.scale is None
    fresh = nn.MultiHeadAttention(6, 3, **F64)
    assert (host(fresh.in_proj_bias) == 0).all() and (host(fresh.out_proj.bias) == 0).all()
    with pytest.raises(ValueError, match="embed_dim 10 must be divisible by num_heads 3"):
        nn.MultiHeadAttention(10, 3)


OPTIONS = {"plain": {}, "bias_kv": dict(add_bias_kv=True), "zero_attn": dict(add_zero_attn=True),
           "both+scale": dict(add_bias_kv=True, add_zero_attn=True, scale=1.0)}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("mask_kind", ["none", "bool2d", "float3d", "padding_bool", "both_mixed"])
def test_mha_matches_head_by_head_reference(mask_kind, options):
    rng = np.random.default_rng(4)
    mha = make_mha(**OPTIONS[options])
    B, L, S = 2, 3, 5
    x, mem = rng.standard_normal((B, L, 4)), rng.standard_normal((B, S, 4))
    am = kpm = None
    if mask_kind in ("bool2d", "both_mixed"):
        am = rng.random((L, S)) < 0.3
        am[1] = True                                              # a fully masked query row
    if mask_kind == "float3d":
        am = rng.standard_normal((B * 2, L, S))
    if mask_kind in ("padding_bool", "both_mixed"):
        kpm = np.zeros((B, S), bool)
        kpm[0, 3:] = True
        kpm = kpm if mask_kind == "padding_bool" else np.where(kpm, -np.inf, 0.5)
    out, w = mha(T(x), T(mem), T(mem), attn_mask=None if am is None else T(am),
                 key_padding_mask=None if kpm is None else T(kpm), need_weights=True, average_attn_weights=False)
    want, want_w = ref_mha(mha, x, mem, mem, am, kpm)
    np.testing.assert_allclose(host(out), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(w), want_w, rtol=1e-10, atol=1e-12)
    _, avg = mha(T(x), T(mem), T(mem), attn_mask=None if am is None else T(am),
                 key_padding_mask=None if kpm is None else T(kpm), need_weights=True)
    np.testing.assert_allclose(host(avg), want_w.mean(axis=1), rtol=1e-10, atol=1e-12)


def test_mha_gradcheck_self_and_cross_attention():
    rng = np.random.default_rng(5)
    x = rand_t(rng, 2, 3, 4)
    kpm = T(np.array([[False, False, True], [False, False, False]]))
    causal = T(np.triu(np.ones((3, 3), bool), 1))
    mha = make_mha()
    self_attn = lambda x, *_: mha(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=True)
    assert gradcheck_module(_Wrap(self_attn, mha), [x])
    cross = make_mha(kdim=3, vdim=2, seed=1)
    q, k, v = rand_t(rng, 2, 3, 4), rand_t(rng, 2, 5, 3), rand_t(rng, 2, 5, 2)
    assert gradcheck_module(cross, [q, k, v], pick=lambda r: r[0])


@pytest.mark.parametrize("options", ["bias_kv", "zero_attn", "both+scale"])
def test_mha_options_gradcheck_with_masks(options):
    """bias_k and bias_v among the parameters checked; a float key_padding_mask among the inputs."""
    rng = np.random.default_rng(9)
    mha = make_mha(seed=2, **OPTIONS[options])
    x, kpm = rand_t(rng, 2, 3, 4), rand_t(rng, 2, 3)
    causal = T(np.triu(np.ones((3, 3), bool), 1))
    fn = lambda x, kpm: mha(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=True)
    assert gradcheck_module(_Wrap(fn, mha), [x, kpm], pick=lambda r: nf.concatenate([r[0].reshape(-1),
                                                                                    r[1].reshape(-1)]))


def test_mha_bias_kv_is_initialised_as_torch_xavier_normal_and_refuses_torch_positional_order():
    # xavier_normal_ of (1, 1, E): fan_in = fan_out = E, std = 1 / sqrt(E); 16 modules of E = 256 pool
    # 4,096 draws of each bias (one module of E = 4096 would spend seconds on its E x E projections)
    E, n = 256, 16
    scaled = {"bias_k": [], "bias_v": []}
    for seed in range(n):
        mha = nn.MultiHeadAttention(E, 1, add_bias_kv=True, generator=nf.random.Generator(seed), **F64)
        assert host(mha.bias_k).shape == host(mha.bias_v).shape == (1, 1, E)
        assert not np.array_equal(host(mha.bias_k), host(mha.bias_v))
        for name in scaled:
            scaled[name].append(host(getattr(mha, name)).ravel() * np.sqrt(E))
    for name, draws in scaled.items():
        b = np.concatenate(draws)
        assert abs(b.std() - 1) < 0.05 and abs(b.mean()) < 0.1, (name, b.std(), b.mean())
    with pytest.raises(TypeError, match="kdim must be a positive int or None; got True .*add_bias_kv"):
        nn.MultiHeadAttention(4, 2, 0.0, True, True, False)      # torch's (..., add_bias_kv, add_zero_attn)


class _Wrap(nn.Module):
    """A module whose forward is `fn`, owning `inner` (so gradcheck_module sees its parameters)."""

    def __init__(self, fn, inner):
        super().__init__()
        self.inner = inner
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_mha_layouts_agree_batch_first_time_first_and_unbatched():
    rng = np.random.default_rng(6)
    a = make_mha()
    b = make_mha(batch_first=False)
    b.load_state_dict(a.state_dict())
    x, mem = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    kpm = np.array([[False] * 4 + [True], [False] * 5])
    out_a, w_a = a(T(x), T(mem), T(mem), key_padding_mask=T(kpm), need_weights=True)
    t = lambda z: T(np.swapaxes(z, 0, 1))
    out_b, w_b = b(t(x), t(mem), t(mem), key_padding_mask=T(kpm), need_weights=True)
    np.testing.assert_allclose(np.swapaxes(host(out_b), 0, 1), host(out_a), rtol=1e-13)
    np.testing.assert_allclose(host(w_b), host(w_a), rtol=1e-13)
    out_u, w_u = a(T(x[1]), T(mem[1]), T(mem[1]), key_padding_mask=T(kpm[1]), need_weights=True)
    np.testing.assert_allclose(host(out_u), host(out_a)[1], rtol=1e-13)
    assert host(w_u).shape == (3, 5)


def test_mha_padding_and_causality_cut_the_right_dependencies():
    rng = np.random.default_rng(7)
    mha = make_mha()
    x = rng.standard_normal((1, 4, 4))
    kpm = T(np.array([[False, False, False, True]]))
    y = host(mha(T(x), T(x), T(x), key_padding_mask=kpm)[0])
    x2 = x.copy()
    x2[0, 3] += 5.0                                  # change only the padded key/value
    y2 = host(mha(T(x), T(x2), T(x2), key_padding_mask=kpm)[0])
    np.testing.assert_allclose(y2, y, rtol=1e-13)
    c = host(mha(T(x), T(x), T(x), is_causal=True)[0])
    c_explicit = host(mha(T(x), T(x), T(x), attn_mask=T(np.triu(np.ones((4, 4), bool), 1)))[0])
    np.testing.assert_allclose(c, c_explicit, rtol=1e-14)
    c2 = host(mha(T(x2), T(x2), T(x2), is_causal=True)[0])
    np.testing.assert_allclose(c2[0, :3], c[0, :3], rtol=1e-13)   # earlier positions never see the future
    assert not np.allclose(c2[0, 3], c[0, 3])


def test_mha_dropout_only_in_training():
    rng = np.random.default_rng(8)
    mha = make_mha(dropout=0.5)
    x = T(rng.standard_normal((2, 6, 4)))
    nf.manual_seed(0)
    out_train, w_train = mha(x, x, x, need_weights=True)
    mha.eval()
    out_eval, w_eval = mha(x, x, x, need_weights=True)
    np.testing.assert_allclose(host(w_eval).sum(-1), 1.0, rtol=1e-12)
    assert not np.allclose(host(out_train), host(out_eval))
    assert not np.allclose(host(w_train).sum(-1), 1.0)         # returned weights are the dropped-out ones
    # need_weights=False runs the one fused op, need_weights=True the composed ops: equal but for rounding
    np.testing.assert_allclose(host(mha(x, x, x)[0]), host(out_eval), rtol=1e-13, atol=1e-15)


def test_mha_errors_name_the_argument_and_shapes():
    mha = make_mha()
    x, mem = T(np.zeros((2, 3, 4))), T(np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match=r"attn_mask has shape \(3, 3\); expected \(L, S\) = \(3, 5\) or "
                                         r"\(B\*num_heads, L, S\) = \(4, 3, 5\)"):
        mha(x, mem, mem, attn_mask=T(np.zeros((3, 3), bool)))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 3\); expected \(B, S\) = \(2, 5\)"):
        mha(x, mem, mem, key_padding_mask=T(np.zeros((2, 3), bool)))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool or floating-point mask; got dtype int32"):
        mha(x, mem, mem, key_padding_mask=T(np.zeros((2, 5), np.int32)))
    with pytest.raises(TypeError, match=r"attn_mask must be a bool or floating-point mask; got dtype int64 .shape \(3, 5\)"):
        mha(x, mem, mem, attn_mask=T(np.zeros((3, 5), np.int64)))
    with pytest.raises(ValueError, match=r"feature sizes 4, 3, 4; expected embed_dim 4, kdim 4, vdim 4"):
        mha(x, T(np.zeros((2, 5, 3))), mem)
    with pytest.raises(ValueError, match=r"must share batch"):
        mha(x, T(np.zeros((3, 5, 4))), T(np.zeros((3, 5, 4))))
