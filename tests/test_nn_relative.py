"""Position as an additive attention bias (npformer/nn/relative.py): T5's buckets and bias against
transformers' T5Attention (buckets equal, bias equal, a whole attention and its table gradient to
1e-10), ALiBi's slopes and bias against BLOOM's and the paper's recipe, the table's gradient by
central differences and by the scatter-add of dS the derivation gives, and errors."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer import nn
from npformer.nn.relative import RelativePositionBias, alibi_bias, alibi_slopes, relative_position_bucket
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

F64 = dict(dtype=np.float64, device=DEVICE)
EXACT = dict(rtol=1e-12, atol=1e-12)
TIGHT = dict(rtol=1e-6, atol=1e-8)         # sees a 1e-4 relative error in a backward


def hf(module):
    """(torch, transformers' modeling module `module`), or skip the test."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib
    return torch, importlib.import_module(f"transformers.models.{module}")


def rpb(num_buckets=8, max_distance=6, num_heads=3, bidirectional=True, seed=0):
    return RelativePositionBias(num_buckets, max_distance, num_heads=num_heads, bidirectional=bidirectional,
                                generator=nf.random.Generator(seed, DEVICE), **F64)


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- relative_position_bucket

# T5's (32, 128) both ways; odd num_buckets; the smallest allowed; max_distance below the table;
# (18, 128, True) and (9, 128, False): settings where a float64 log would put 8, 16, 64 one bucket lower
BUCKETS = [(32, 128, True), (32, 128, False), (16, 64, True), (8, 20, False), (33, 128, True), (7, 40, False),
           (18, 128, True), (9, 128, False), (4, 2, True), (2, 2, False), (64, 32, True)]


@pytest.mark.verify
@pytest.mark.parametrize("num_buckets, max_distance, bidirectional", BUCKETS)
def test_relative_position_bucket_equals_t5s(num_buckets, max_distance, bidirectional):
    torch, t5 = hf("t5.modeling_t5")
    rp = np.arange(-300, 301)
    theirs = t5.T5Attention._relative_position_bucket(torch.tensor(rp), bidirectional, num_buckets, max_distance)
    ours = relative_position_bucket(T(rp).data, bidirectional, num_buckets, max_distance)
    assert ours.dtype == np.int64 and ours.shape == rp.shape
    np.testing.assert_array_equal(host(ours), theirs.numpy())
    grid = rp[:600].reshape(20, 30).astype(np.int32)                   # any shape, any integer dtype
    np.testing.assert_array_equal(host(relative_position_bucket(T(grid).data, bidirectional, num_buckets,
                                                                 max_distance)), theirs.numpy()[:600].reshape(20, 30))


def test_relative_position_bucket_by_hand_for_t5s_table():
    """T5's 32 buckets, max_distance 128, 16 per direction, 8 of them exact; bucket 8 + floor(2 log2(n / 8))."""
    rp = [0, -1, -7, -8, -11, -12, -16, -22, -23, -64, -127, -128, -10 ** 6, 1, 7, 8, 16, 128, 10 ** 6]
    want = [0, 1, 7, 8, 8, 9, 10, 10, 11, 14, 15, 15, 15, 17, 23, 24, 26, 31, 31]
    np.testing.assert_array_equal(relative_position_bucket(np.array(rp)), want)
    # one direction: 32 buckets, 16 exact; keys after the query all in bucket 0
    np.testing.assert_array_equal(relative_position_bucket(np.array([5, 1, 0, -1, -15, -16, -128, -500]), False),
                                  [0, 0, 0, 1, 15, 16, 31, 31])


@pytest.mark.parametrize("num_buckets, max_distance, bidirectional", BUCKETS)
def test_relative_position_bucket_properties(num_buckets, max_distance, bidirectional):
    """Exact buckets near the query, monotone in distance, saturated from max_distance, one side per sign."""
    n = np.arange(0, 400)
    nb = num_buckets // 2 if bidirectional else num_buckets
    exact = nb // 2
    for sign, start in ((-1, 0), (1, nb)) if bidirectional else ((-1, 0),):
        b = relative_position_bucket(sign * n, bidirectional, num_buckets, max_distance) - start
        if sign == 1:
            b[0] += start                                              # distance 0 is "before": bucket 0
        np.testing.assert_array_equal(b[:exact], n[:exact])
        assert (np.diff(b[1:]) >= 0).all() and b.min() >= 0 and b.max() <= nb - 1
        assert (b[max_distance:] == nb - 1).all()
    if not bidirectional:
        assert (relative_position_bucket(n, False, num_buckets, max_distance) == 0).all()
    else:                                                              # never "after the query, at distance 0"
        used = np.unique(relative_position_bucket(np.arange(-400, 401), True, num_buckets, max_distance))
        assert nb not in used and {0, nb - 1, nb + 1, 2 * nb - 1} <= set(used.tolist())


# ----------------------------------------------------------------------------- RelativePositionBias

def test_relative_position_bias_module():
    m = rpb(num_buckets=10, max_distance=7, num_heads=4)
    assert [(k, v.shape, v.dtype) for k, v in m.state_dict().items()] == [
        ("relative_attention_bias.weight", (10, 4), np.float64)]
    assert [n for n, _ in m.named_parameters()] == ["relative_attention_bias.weight"]
    b = m(3, 5, offset=2)
    assert b.shape == (1, 4, 3, 5) and b.dtype == np.float64 and b.requires_grad
    table, idx = host(m.relative_attention_bias.weight), host(m.buckets(3, 5, offset=2))
    want = np.array([[relative_position_bucket(np.array(j - (2 + i)), True, 10, 7) for j in range(5)]
                     for i in range(3)])
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(host(b)[0], table[idx].transpose(2, 0, 1))
    assert m(0, 4).shape == (1, 4, 0, 4) and m(2, 0).shape == (1, 4, 2, 0)
    assert "num_heads=4" in repr(m) and "bidirectional=True" in repr(m)
    assert rpb(seed=3)(2, 2).dtype == np.float64
    assert RelativePositionBias(num_heads=2, dtype=np.float32, device=DEVICE)(2, 3).dtype == np.float32


@pytest.mark.parametrize("bidirectional", [True, False])
def test_decoding_one_query_at_offset_is_the_last_row(bidirectional):
    m = rpb(bidirectional=bidirectional)
    full = host(m(9, 9))
    for t in range(9):
        np.testing.assert_array_equal(host(m(1, t + 1, offset=t)), full[:, :, t:t + 1, :t + 1])
    np.testing.assert_array_equal(host(m(3, 9, offset=6)), full[:, :, 6:, :])


@pytest.mark.verify
@pytest.mark.parametrize("is_decoder, L, S, offset", [(False, 5, 9, 0), (False, 4, 4, 3), (True, 9, 9, 0),
                                                       (True, 1, 9, 8), (True, 3, 9, 6)])
def test_relative_position_bias_equals_t5_compute_bias(is_decoder, L, S, offset):
    torch, t5 = hf("t5.modeling_t5")
    from transformers import T5Config
    cfg = T5Config(d_model=8, d_kv=4, num_heads=3, relative_attention_num_buckets=8,
                   relative_attention_max_distance=6, is_decoder=is_decoder, dropout_rate=0.0)
    theirs = t5.T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0).double()
    ours = rpb(bidirectional=not is_decoder, seed=1)
    with torch.no_grad():
        theirs.relative_attention_bias.weight.copy_(torch.tensor(host(ours.relative_attention_bias.weight)))
    tb = theirs.compute_bias(L, S, past_seen_tokens=offset)
    ob = ours(L, S, offset=offset)
    np.testing.assert_allclose(host(ob), tb.detach().numpy(), **EXACT)
    g = np.random.default_rng(2).standard_normal(tb.shape)
    (tb * torch.tensor(g)).sum().backward()
    (ob * T(g)).sum().backward()
    np.testing.assert_allclose(host(ours.relative_attention_bias.weight.grad),
                               theirs.relative_attention_bias.weight.grad.numpy(), **EXACT)


class T5Scores(nn.Module):
    """attention(q, k, v, bias=RelativePositionBias(...)(L, S, offset), scale=1.0), T5's way."""

    def __init__(self, bias, L, S, offset, causal=False):
        super().__init__()
        self.bias, self.L, self.S, self.offset, self.causal = bias, L, S, offset, causal

    def forward(self, q, k, v):
        return nf.attention(q, k, v, bias=self.bias(self.L, self.S, self.offset), scale=1.0, causal=self.causal)


@st.composite
def t5_case(draw):
    B, H, L, S, E = (draw(st.integers(1, n)) for n in (2, 2, 3, 4, 2))
    num_buckets, max_distance = draw(st.sampled_from([(4, 3), (6, 4), (8, 5)]))
    return B, H, L, S, E, draw(st.integers(0, 3)), num_buckets, max_distance, draw(st.booleans()), \
        draw(st.integers(0, 2 ** 16)), draw(st.sets(st.integers(0, 2), max_size=3))


@pytest.mark.usefixtures("ops_path")
@settings(max_examples=15)
@given(case=t5_case())
def test_table_gradchecks_through_the_attention_op(case):
    """The table (and q, k, v when drawn) by central differences, the bias broadcast over the batch."""
    B, H, L, S, E, offset, nb, md, bidirectional, seed, wanted = case
    rng = np.random.default_rng(seed)
    q, k, v = (T(rng.standard_normal((B, H, n, E)), requires_grad=i in wanted) for i, n in enumerate((L, S, S)))
    module = T5Scores(rpb(nb, md, H, bidirectional, seed), L, S, offset)
    assert gradcheck_module(module, [q, k, v], **TIGHT)


@pytest.mark.usefixtures("ops_path")
def test_table_gradient_is_the_scatter_add_of_ds_by_bucket():
    """dweight[b, h] = sum of dS[n, h, i, j] over the batch n and the (i, j) in bucket b, with
    dS = P * (dP - sum(dP * P)) the softmax backward (docs/derivations.md, Attention)."""
    rng = np.random.default_rng(4)
    B, H, L, S, E = 3, 2, 5, 7, 4
    q, k, v, g = (rng.standard_normal(s) for s in ((B, H, L, E), (B, H, S, E), (B, H, S, E), (B, H, L, E)))
    m = rpb(num_buckets=6, max_distance=4, num_heads=H, seed=5)
    out = nf.attention(T(q), T(k), T(v), bias=m(L, S, offset=1), scale=1.0)
    out.backward(T(g).data)
    table, idx = host(m.relative_attention_bias.weight), host(m.buckets(L, S, offset=1))
    P = softmax(q @ k.swapaxes(-1, -2) + table[idx].transpose(2, 0, 1))
    np.testing.assert_allclose(host(out), P @ v, **EXACT)
    dP = g @ v.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(-1, keepdims=True))                     # (B, H, L, S)
    want = np.zeros_like(table)
    np.add.at(want, idx, dS.sum(0).transpose(1, 2, 0))                 # rows idx[i, j] += dS[:, :, i, j] summed
    grad = host(m.relative_attention_bias.weight.grad)
    np.testing.assert_allclose(grad, want, **EXACT)
    unused = np.setdiff1d(np.arange(6), idx)
    assert unused.size and (grad[unused] == 0).all() and (grad[np.unique(idx)] != 0).all()


@pytest.mark.verify
@pytest.mark.parametrize("is_decoder", [False, True])
def test_t5_attention_forward_and_table_gradient_match_hf(is_decoder):
    """T5Attention (eager) against the projections, RelativePositionBias and attention(scale=1.0)."""
    torch, t5 = hf("t5.modeling_t5")
    from transformers import T5Config
    B, Tn, D, H, d = 2, 9, 8, 2, 4
    cfg = T5Config(d_model=D, d_kv=d, num_heads=H, relative_attention_num_buckets=8, relative_attention_max_distance=5,
                   is_decoder=is_decoder, dropout_rate=0.0, attn_implementation="eager")
    theirs = t5.T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0).double().eval()
    ours = rpb(8, 5, H, bidirectional=not is_decoder, seed=6)
    rng = np.random.default_rng(7)
    with torch.no_grad():
        theirs.relative_attention_bias.weight.copy_(torch.tensor(host(ours.relative_attention_bias.weight)))
        for lin in (theirs.q, theirs.k, theirs.v, theirs.o):
            lin.weight.copy_(torch.tensor(rng.standard_normal(lin.weight.shape) * 0.5))
    x, g = rng.standard_normal((B, Tn, D)), rng.standard_normal((B, Tn, D))
    mask = torch.full((Tn, Tn), -math.inf, dtype=torch.float64).triu(1) if is_decoder else None
    tout = theirs(torch.tensor(x), mask=mask)[0]
    (tout * torch.tensor(g)).sum().backward()

    def proj(h, lin):                                                  # h @ W^T with torch's weight
        return nf.matmul(h, nf.transpose(T(lin.weight.detach().numpy())))

    def heads(lin):                                                    # (B, T, D) -> (B, H, T, d)
        return nf.transpose(nf.reshape(proj(T(x), lin), (B, Tn, H, d)), 1, 2)
    y = nf.attention(heads(theirs.q), heads(theirs.k), heads(theirs.v), bias=ours(Tn, Tn), scale=1.0,
                     causal=is_decoder)                                # (B, H, T, d)
    out = proj(nf.reshape(nf.transpose(y, 1, 2), (B, Tn, H * d)), theirs.o)   # (B, T, D)
    out.backward(T(g).data)
    np.testing.assert_allclose(host(out), tout.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(host(ours.relative_attention_bias.weight.grad),
                               theirs.relative_attention_bias.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    assert np.abs(host(ours.relative_attention_bias.weight.grad)).max() > 1e-3


# ----------------------------------------------------------------------------- ALiBi

def paper_slopes(n):
    """The ALiBi paper's recipe, in Python floats: a geometric sequence from 2^(-8/n) for a power of
    two n; otherwise that of the power of two below, then every other slope of the one above."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    below = 2 ** math.floor(math.log2(n))
    return power_of_2(below) + paper_slopes(2 * below)[0::2][:n - below]


def test_alibi_slopes_follow_the_papers_recipe():
    np.testing.assert_array_equal(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_array_equal(alibi_slopes(1), [2.0 ** -8])
    for H in range(1, 65):
        s = alibi_slopes(H)
        assert s.dtype == np.float64 and s.shape == (H,)
        np.testing.assert_allclose(s, paper_slopes(H), rtol=1e-14, atol=0, err_msg=f"num_heads={H}")


@pytest.mark.verify
def test_alibi_slopes_equal_blooms():
    """BLOOM computes them in float32: exact for up to 8 heads (powers of two), within 16 roundings of
    the float32 2^-0.5 (16 x 6e-8) for 9..16 heads."""
    torch, bloom = hf("bloom.modeling_bloom")
    for H in range(1, 17):
        theirs = bloom.build_alibi_tensor(torch.ones(1, 2), H, torch.float32)[:, 0, 1].numpy()   # slope x position 1
        np.testing.assert_allclose(alibi_slopes(H), theirs, rtol=1e-6, atol=0, err_msg=f"num_heads={H}")
        if H <= 8:
            np.testing.assert_array_equal(alibi_slopes(H).astype(np.float32), theirs, err_msg=f"num_heads={H}")


@pytest.mark.verify
@pytest.mark.parametrize("H", [1, 3, 4, 6, 8])
def test_alibi_bias_is_softmax_equivalent_to_blooms(H):
    """Ours is -m (i - j), BLOOM's m j: they differ by -m i on row i, so under a causal mask the softmax
    of scores + each agrees to 1e-12 (heads <= 8: BLOOM's float32 slopes are exact)."""
    torch, bloom = hf("bloom.modeling_bloom")
    Tn = 7
    theirs = bloom.build_alibi_tensor(torch.ones(1, Tn), H, torch.float64).numpy()     # (H, 1, T)
    ours = host(alibi_bias(H, Tn, Tn, np.float64))                                    # (H, T, T)
    i = np.arange(Tn)[:, None]
    np.testing.assert_allclose(ours - theirs, np.broadcast_to(-alibi_slopes(H)[:, None, None] * i, ours.shape), **EXACT)
    scores = np.random.default_rng(H).standard_normal((2, H, Tn, Tn))
    causal = np.tri(Tn, dtype=bool)
    p_ours, p_theirs = (softmax(np.where(causal, scores + b, -np.inf)) for b in (ours, theirs))
    np.testing.assert_allclose(p_ours, p_theirs, **EXACT)
    assert np.abs(p_ours - softmax(np.where(causal, scores, -np.inf))).max() > 1e-3   # the bias matters


@pytest.mark.usefixtures("ops_path")
@pytest.mark.parametrize("H, L, S, offset", [(3, 6, 6, 0), (5, 1, 6, 5), (2, 3, 6, 3)])
def test_alibi_through_the_attention_op(H, L, S, offset):
    """Causal ALiBi as the op's bias: equal to the softmax of q k^T / sqrt(d) + m j (BLOOM's form) over
    the keys each query sees (key j <= offset + i), written out in NumPy."""
    rng = np.random.default_rng(8)
    q, k, v = rng.standard_normal((2, H, L, 4)), rng.standard_normal((2, H, S, 4)), rng.standard_normal((2, H, S, 3))
    sees = np.arange(S)[None, :] <= offset + np.arange(L)[:, None]                     # (L, S)
    bias = alibi_bias(H, L, S, np.float64, device=DEVICE, offset=offset)
    out = nf.attention(T(q), T(k), T(v), T(sees).data, scale=0.5, bias=bias)
    key_position = alibi_slopes(H)[:, None, None] * np.arange(S)                      # (H, 1, S)
    want = softmax(np.where(sees, q @ k.swapaxes(-1, -2) * 0.5 + key_position, -np.inf)) @ v
    np.testing.assert_allclose(host(out), want, **EXACT)
    if offset == 0 and L == S:                                                         # the op's causal=True
        np.testing.assert_allclose(host(nf.attention(T(q), T(k), T(v), scale=0.5, causal=True, bias=bias)), want,
                                   **EXACT)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_bias_values_offset_dtype_and_device(causal):
    H, L, S, offset = 5, 3, 6, 2
    b = alibi_bias(H, L, S, np.float64, causal=causal, device=DEVICE, offset=offset)
    assert isinstance(b, nf.Tensor) and b.shape == (H, L, S) and b.dtype == np.float64 and not b.requires_grad
    assert b.device == DEVICE
    m = alibi_slopes(H)
    want = np.array([[[-m[h] * ((offset + i - j) if causal else abs(offset + i - j)) for j in range(S)]
                      for i in range(L)] for h in range(H)])
    np.testing.assert_array_equal(host(b), want)
    full = host(alibi_bias(H, offset + L, S, np.float64, causal=causal))
    np.testing.assert_array_equal(host(b), full[:, offset:])                          # offset: the later rows
    b32 = alibi_bias(H, L, S, np.float32, causal=causal, offset=offset)
    assert b32.dtype == np.float32
    np.testing.assert_array_equal(host(b32), want.astype(np.float32))
    assert alibi_bias(2, 0, 3, np.float64).shape == (2, 0, 3)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, error, match", [
    (lambda: relative_position_bucket(np.arange(3), num_buckets=1), ValueError, "num_buckets must be an int >= 4"),
    (lambda: relative_position_bucket(np.arange(3), num_buckets=3), ValueError, "num_buckets must be an int >= 4"),
    (lambda: relative_position_bucket(np.arange(3), False, 1), ValueError, "num_buckets must be an int >= 2"),
    (lambda: relative_position_bucket(np.arange(3), num_buckets=32.0), ValueError, "num_buckets"),
    (lambda: relative_position_bucket(np.arange(3), max_distance=8), ValueError, "max_distance must be an int > 8"),
    (lambda: relative_position_bucket(np.arange(3), False, 32, 16), ValueError, "max_distance must be an int > 16"),
    (lambda: relative_position_bucket(np.arange(3.0)), TypeError, "relative_position must be integers"),
    (lambda: RelativePositionBias(num_heads=0), ValueError, "RelativePositionBias: num_heads must be an int >= 1"),
    (lambda: RelativePositionBias(2, num_heads=2), ValueError, "RelativePositionBias: num_buckets"),
    (lambda: RelativePositionBias(num_heads=2)(-1, 3), ValueError, "query_length must be an int >= 0"),
    (lambda: RelativePositionBias(num_heads=2)(2, -1), ValueError, "key_length must be an int >= 0"),
    (lambda: RelativePositionBias(num_heads=2)(2, 2, offset=-1), ValueError, "offset must be an int >= 0"),
    (lambda: RelativePositionBias(num_heads=2)(2.0, 2), ValueError, "query_length"),
    (lambda: alibi_slopes(0), ValueError, "alibi_slopes: num_heads must be an int >= 1"),
    (lambda: alibi_slopes(True), ValueError, "num_heads"),
    (lambda: alibi_slopes(2.5), ValueError, "num_heads"),
    (lambda: alibi_bias(0, 2, 2, np.float64), ValueError, "alibi_bias: num_heads"),
    (lambda: alibi_bias(2, -1, 2, np.float64), ValueError, "alibi_bias: query_length must be an int >= 0"),
    (lambda: alibi_bias(2, 2, -3, np.float64), ValueError, "alibi_bias: key_length must be an int >= 0"),
    (lambda: alibi_bias(2, 2, 2, np.float64, offset=-1), ValueError, "alibi_bias: offset"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
    with pytest.raises(TypeError, match="num_heads"):
        RelativePositionBias(32, 128)                                  # num_heads is required, keyword-only
