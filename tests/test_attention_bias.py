"""The additive bias of attention (a float mask, T5's relative position bias, ALiBi): its gradient.

dbias = dS, the scores' gradient, summed over the axes the bias was broadcast along
(docs/derivations.md#attention). Checked on both op paths with float64 central differences over
drawn broadcast shapes and frozen inputs, against the same computation composed of primitive ops,
and at every entry point that takes a float mask: ops.attention (mask= and bias=),
scaled_dot_product_attention (both need_weights paths) and MultiHeadAttention (attn_mask and
key_padding_mask). Before the bias became an input of the op, each of these left the mask's .grad
at None. The comparisons with torch are in tests/test_verify_attention.py.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from npformer import nn
from npformer.nn import functional as F
from tests.helpers import DEVICE, T, host
from tests.strategies import arrays

TIGHT = dict(rtol=1e-6, atol=1e-8)     # sees a 1e-4 relative error in a backward
EXACT = dict(rtol=1e-12, atol=1e-12)


def composed(q, k, v, bias, mask=None, scale=1.0):
    """softmax(q k^T * scale + bias, masked) v from primitive ops: an independent backward to compare with."""
    s = nf.matmul(q, nf.transpose(k, -1, -2)) * scale + bias
    if mask is not None:
        s = nf.masked_fill(s, T(~mask), -np.inf)
    return nf.matmul(nf.softmax(s, axis=-1), v)


@st.composite
def bias_case(draw):
    """q (B, H, L, E), k, v (B, H, S, .), a bias shape that broadcasts to the scores (B, H, L, S), an
    optional bool mask (every query keeps key 0), causal, and which inputs require grad."""
    B, H, L, S, E, Ev = (draw(st.integers(1, 3)) for _ in range(6))
    causal = draw(st.booleans())
    if causal:
        S = L
    shape = draw(st.sampled_from([(L, S), (1, 1, L, S), (B, 1, 1, S), (H, L, S), (S,), (H, 1, S), (B, H, L, S)]))
    mask = None
    if not causal and draw(st.booleans()):
        mask = draw(hnp.arrays(bool, (L, S)))
        mask[:, 0] = True
    wanted = draw(st.sets(st.integers(0, 3), min_size=1))        # among q, k, v, bias
    return (B, H, L, E), (B, H, S, E), (B, H, S, Ev), shape, mask, causal, wanted


@pytest.mark.usefixtures("ops_path")
@given(case=bias_case(), scale=st.sampled_from([1.0, 0.35]), positional=st.booleans(), data=st.data())
def test_bias_gradchecks_over_broadcast_shapes_with_inputs_frozen(case, scale, positional, data):
    sq, sk, sv, sb, mask, causal, wanted = case
    arrs = [data.draw(arrays(s), label=n) for s, n in ((sq, "q"), (sk, "k"), (sv, "v"), (sb, "bias"))]
    ts = [T(a, requires_grad=i in wanted) for i, a in enumerate(arrs)]
    m = None if mask is None else T(mask).data
    if positional and mask is None:            # a float mask is the bias
        fn = lambda q, k, v, b: nf.attention(q, k, v, b, scale=scale, causal=causal)
    else:
        fn = lambda q, k, v, b: nf.attention(q, k, v, m, scale=scale, causal=causal, bias=b)
    assert nf.gradcheck(fn, ts, **TIGHT)
    out = fn(*ts)
    out.backward(T(np.random.default_rng(0).standard_normal(out.shape)).data)
    for i, t in enumerate(ts):
        assert (t.grad is not None) == (i in wanted), f"input {i}: wanted {i in wanted}, .grad {t.grad is not None}"
    if 3 in wanted:
        assert ts[3].grad.shape == sb and ts[3].grad.dtype == np.float64


@pytest.mark.usefixtures("ops_path")
@given(case=bias_case(), data=st.data())
def test_bias_gradient_equals_the_composed_computation(case, data):
    """The fused op's gradients equal those of matmul, add, masked_fill, softmax and matmul to 1e-12."""
    sq, sk, sv, sb, mask, causal, _ = case
    arrs = [data.draw(arrays(s), label=n) for s, n in ((sq, "q"), (sk, "k"), (sv, "v"), (sb, "bias"))]
    if causal:
        mask = np.tri(sq[-2], sk[-2], dtype=bool)
    g = np.random.default_rng(1).standard_normal(sq[:-1] + sv[-1:])
    results = []
    for fn in (lambda q, k, v, b: nf.attention(q, k, v, None if mask is None else T(mask).data, 0.6, bias=b),
               lambda q, k, v, b: composed(q, k, v, b, mask, 0.6)):
        ts = [T(a, requires_grad=True) for a in arrs]
        out = fn(*ts)
        out.backward(T(g).data)
        results.append([host(out)] + [host(t.grad) for t in ts])
    for what, a, b in zip(("out", "dq", "dk", "dv", "dbias"), *results):
        np.testing.assert_allclose(a, b, err_msg=what, **EXACT)


# ----------------------------------------------------------------------------- every entry point

def _qkv(rng, B=2, H=2, L=3, S=4, E=3, grad=False):
    return [T(rng.standard_normal((B, H, n, E)), requires_grad=grad) for n in (L, S, S)]


def _mha_and_inputs(seed=0, **kw):
    mha = nn.MultiHeadAttention(4, 2, generator=nf.random.Generator(seed), dtype=np.float64, device=DEVICE, **kw)
    rng = np.random.default_rng(seed)
    for p in mha.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.5)
    return mha, T(rng.standard_normal((2, 3, 4))), T(rng.standard_normal((2, 5, 4)))


ENTRY_POINTS = ["attention(mask=) reference", "attention(mask=) fast", "attention(bias=) reference",
                "attention(bias=) fast", "sdpa", "sdpa need_weights", "mha attn_mask", "mha attn_mask 3-d",
                "mha key_padding_mask", "mha key_padding_mask unbatched", "mha both, bias_kv, zero_attn"]


def _entry_point(name):
    """(mask shape, fn(mask Tensor) -> output) of entry point `name`; q, k, v and the weights stay frozen."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng)
    mha, x, mem = _mha_and_inputs(**(dict(add_bias_kv=True, add_zero_attn=True) if "bias_kv" in name else {}))
    return {
        "attention(mask=) reference": ((3, 4), lambda m: nf.ops.REFERENCE["attention"](q, k, v, m)),
        "attention(mask=) fast": ((3, 4), lambda m: nf.ops.FAST["attention"](q, k, v, m)),
        "attention(bias=) reference": ((2, 1, 1, 4), lambda m: nf.ops.REFERENCE["attention"](q, k, v, bias=m)),
        "attention(bias=) fast": ((2, 1, 1, 4), lambda m: nf.ops.FAST["attention"](q, k, v, bias=m)),
        "sdpa": ((2, 3, 4), lambda m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
        "sdpa need_weights": ((2, 3, 4), lambda m: F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                                                  need_weights=True)[0]),
        "mha attn_mask": ((3, 5), lambda m: mha(x, mem, mem, attn_mask=m)[0]),
        "mha attn_mask 3-d": ((4, 3, 5), lambda m: mha(x, mem, mem, attn_mask=m)[0]),
        "mha key_padding_mask": ((2, 5), lambda m: mha(x, mem, mem, key_padding_mask=m)[0]),
        "mha key_padding_mask unbatched": ((5,), lambda m: mha(x[0], mem[0], mem[0], key_padding_mask=m)[0]),
        "mha both, bias_kv, zero_attn": ((2, 5), lambda m: mha(x, mem, mem, key_padding_mask=m,
                                                               attn_mask=T(np.tri(3, 5, k=1, dtype=bool)))[0]),
    }[name]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_float_mask_that_requires_grad_gets_its_gradient_at_every_entry_point(name):
    """Only the mask requires grad: it gets a .grad of its shape, right by central differences."""
    shape, fn = _entry_point(name)
    mask = T(np.random.default_rng(3).standard_normal(shape), requires_grad=True)
    out = fn(mask)
    assert out.requires_grad, f"{name}: the output is not connected to the float mask in the graph"
    out.sum().backward()
    assert mask.grad is not None, f"{name}: the float mask's gradient was dropped"
    assert mask.grad.shape == shape and np.abs(host(mask.grad)).max() > 0
    assert nf.gradcheck(fn, [T(host(mask), requires_grad=True)], **TIGHT)


def test_a_bool_mask_never_gets_a_gradient_and_masks_the_bias_gradient():
    """A bool attn_mask with a float key_padding_mask: the key no query may see gets dbias = 0."""
    mha, x, mem = _mha_and_inputs(1)
    blocked = np.zeros((3, 5), bool)
    blocked[:, 2] = True                                # key 2: masked out for every query
    kpm = T(np.random.default_rng(4).standard_normal((2, 5)), requires_grad=True)
    bool_mask = T(blocked)
    mha(x, mem, mem, attn_mask=bool_mask, key_padding_mask=kpm)[0].sum().backward()
    assert bool_mask.grad is None and not bool_mask.requires_grad
    assert (host(kpm.grad)[:, 2] == 0).all() and (host(kpm.grad)[:, [0, 1, 3, 4]] != 0).all()
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        T(blocked, requires_grad=True)


@pytest.mark.usefixtures("ops_path")
def test_a_row_of_minus_inf_gives_zero_bias_gradient_never_nan():
    rng = np.random.default_rng(5)
    bias = rng.standard_normal((3, 4))
    bias[1] = -np.inf                                   # query 1 attends nothing
    bias[2, 0] = -np.inf                                # one masked entry
    for fn in (lambda q, k, v, b: nf.attention(q, k, v, bias=b),
               lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b, need_weights=True)[0]):
        q, k, v = _qkv(rng, grad=True)
        b = T(bias, requires_grad=True)
        out = fn(q, k, v, b)
        out.backward(T(rng.standard_normal(out.shape)).data)
        grad = host(b.grad)
        assert np.isfinite(grad).all() and (grad[1] == 0).all() and grad[2, 0] == 0
        assert all(np.isfinite(host(t.grad)).all() for t in (q, k, v))


def test_sdpa_paths_agree_on_the_bias_gradient():
    """need_weights=True composes primitive ops, False calls the fused op: same gradients to 1e-12."""
    rng = np.random.default_rng(6)
    arrs = [rng.standard_normal(s) for s in ((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3), (2, 1, 3, 5))]
    results = []
    for need_weights in (False, True):
        ts = [T(a, requires_grad=True) for a in arrs]
        out = F.scaled_dot_product_attention(*ts[:3], attn_mask=ts[3], scale=0.8, need_weights=need_weights)
        out = out[0] if need_weights else out
        out.backward(T(np.ones(out.shape)).data)
        results.append([host(t.grad) for t in ts])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, **EXACT)


@pytest.mark.usefixtures("ops_path")
@pytest.mark.parametrize("q_dtype, k_dtype", [(np.float64, np.float32), (np.float32, np.float64)])
def test_with_q_and_k_of_two_dtypes_a_float64_bias_is_added_in_float64(q_dtype, k_dtype):
    """The scores q k^T are in result_type(q, k), here float64 whichever of q and k is float32: the
    bias is cast to that, not rounded to q's or k's dtype on the way."""
    rng = np.random.default_rng(10)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    q, k = q.astype(q_dtype), k.astype(k_dtype)
    bias = rng.standard_normal((3, 5))                  # not representable in float32
    b_mixed, b_64 = T(bias, requires_grad=True), T(bias, requires_grad=True)
    mixed = nf.attention(T(q), T(k), T(v), bias=b_mixed)
    in_64 = nf.attention(*(T(a.astype(np.float64)) for a in (q, k, v)), bias=b_64)
    assert mixed.dtype == np.float64
    np.testing.assert_allclose(host(mixed), host(in_64), **EXACT)
    mixed.sum().backward()
    in_64.sum().backward()
    np.testing.assert_allclose(host(b_mixed.grad), host(b_64.grad), **EXACT)


@pytest.mark.usefixtures("ops_path")
@pytest.mark.parametrize("q_dtype, bias_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_the_bias_is_cast_to_the_scores_dtype_and_its_gradient_back(q_dtype, bias_dtype):
    """A bias never changes the output's dtype; its .grad has its own dtype."""
    rng = np.random.default_rng(7)
    q, k, v = (T(a, requires_grad=True, dtype=q_dtype) for a in (rng.standard_normal((2, 3, 4)) for _ in range(3)))
    b = T(rng.standard_normal((3, 3)), requires_grad=True, dtype=bias_dtype)
    out = nf.attention(q, k, v, bias=b)
    assert out.dtype == q_dtype
    out.sum().backward()
    assert b.grad.dtype == bias_dtype and q.grad.dtype == q_dtype


@pytest.mark.usefixtures("ops_path")
def test_causal_combines_with_a_bias_and_a_bias_may_be_a_nested_list():
    """ALiBi in a decoder: causal=True plus a bias equals the bias with -inf above the diagonal. A
    bias given as nested Python lists is read as the array it spells. (The errors are pinned in
    tests/test_ops_attention_errors.py.)"""
    x = T(np.random.default_rng(9).standard_normal((2, 3, 4)))
    alibi = -np.abs(np.arange(3)[:, None] - np.arange(3)[None, :]) * 0.5
    with_bias = nf.attention(x, x, x, causal=True, bias=T(alibi))
    as_mask = nf.attention(x, x, x, bias=T(np.where(np.tri(3, 3, dtype=bool), alibi, -np.inf)))
    np.testing.assert_allclose(host(with_bias), host(as_mask), **EXACT)
    from_list = nf.attention(x, x, x, bias=alibi.tolist())
    np.testing.assert_array_equal(host(from_list), host(nf.attention(x, x, x, bias=T(alibi))))


def test_every_frozen_pattern_of_sdpa_with_a_float_mask_gradchecks():
    """q, k, v, attn_mask: each non-empty subset requiring grad (mask alone, q/k/v alone, ...)."""
    rng = np.random.default_rng(8)
    arrs = [rng.standard_normal(s) for s in ((2, 3, 2), (2, 4, 2), (2, 4, 3), (3, 4))]
    for need_weights in (False, True):
        fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, need_weights=need_weights)
        pick = (lambda *a: fn(*a)[0]) if need_weights else fn
        for r in range(1, 5):
            for wanted in itertools.combinations(range(4), r):
                assert nf.gradcheck(pick, [T(a, requires_grad=i in wanted) for i, a in enumerate(arrs)], **TIGHT)
