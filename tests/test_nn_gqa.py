"""GroupedQueryAttention against HF's LlamaAttention (float64 forward and the gradients of the input,
every parameter and an additive mask, to 1e-10), grouping by broadcasting (never a copy of the shared
keys; their gradient summed over the group), the KV cache (all at once equals one at a time),
float64 gradient checks on drawn shapes, and errors that name the argument."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer import nn
from npformer.nn.gqa import GroupedQueryAttention
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

F64 = dict(dtype=np.float64, device=DEVICE)
C, H, D = 12, 4, 6                   # hidden_size != H * D, so head_dim is its own argument


def make_gqa(Hkv, seed=0, bias=False, **kw):
    return GroupedQueryAttention(C, H, Hkv, head_dim=D, attention_bias=bias, rope_theta=500.0,
                                 max_position_embeddings=32, generator=nf.random.Generator(seed), **F64, **kw)


def rel(ours, theirs):
    """max |ours - theirs| / max |theirs|."""
    a, b = host(ours).astype(np.float64), np.asarray(theirs, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------- against HF's LlamaAttention

def hf_twin(ours, Hkv, bias, impl, seed):
    """An HF LlamaAttention of the same shape, its weights drawn at random and copied into ours."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml
    cfg = LlamaConfig(hidden_size=C, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
                      attention_bias=bias, rope_theta=500.0, max_position_embeddings=32, attn_implementation=impl)
    twin = ml.LlamaAttention(cfg, layer_idx=0).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    ours.load_state_dict({k: v.numpy() for k, v in twin.state_dict().items()})    # the tables are not state
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in twin.named_parameters()]
    return torch, twin


def masks_for(kind, rng, B, Tn):
    """(ours, HF's): the mask we pass (None, or combined with our causal default) and HF's full one."""
    causal = np.tri(Tn, Tn, dtype=bool)
    lengths = np.array([Tn, max(1, Tn - 2)])[:B]                       # right padding: no query left without keys
    keep = np.arange(Tn)[None, :] < lengths[:, None]                   # (B, S)
    if kind in ("causal", "not_causal"):
        return None, None
    if kind == "bool":
        return keep[:, None, None, :], causal & keep[:, None, None, :]
    if kind == "additive":
        pad = np.where(keep, 0.0, -np.inf)[:, None, None, :]          # (B, 1, 1, S)
        return pad, pad + np.where(causal, 0.0, -np.inf)
    bias = rng.standard_normal((B, H, Tn, Tn))                          # "per_head": a learned-bias-like mask
    return bias, bias + np.where(causal, 0.0, -np.inf)


@pytest.mark.verify
@pytest.mark.usefixtures("ops_path")
@pytest.mark.parametrize("kind", ["causal", "not_causal", "bool", "additive", "per_head"])
@pytest.mark.parametrize("Hkv", [H, H // 2, 1])
def test_matches_hf_llama_attention_with_gradients(Hkv, kind):
    rng = np.random.default_rng(Hkv)
    B, Tn = 2, 5
    ours = make_gqa(Hkv, bias=kind == "additive")
    torch, twin = hf_twin(ours, Hkv, kind == "additive", "sdpa", seed=Hkv)
    twin.is_causal = kind != "not_causal"
    x = rng.standard_normal((B, Tn, C))
    cos, sin = ours.rotary_emb(T(np.arange(Tn)[None].repeat(B, 0)))      # the same float64 tables for both
    m_ours, m_hf = masks_for(kind, rng, B, Tn)
    xt, mt = T(x, requires_grad=True), None if m_ours is None else T(m_ours, requires_grad=kind == "per_head")
    out = ours(xt, attention_mask=mt, is_causal=kind != "not_causal")
    tx = torch.tensor(x, requires_grad=True)
    tm = None if m_hf is None else torch.tensor(m_hf, requires_grad=kind == "per_head")
    tout, _ = twin(tx, position_embeddings=(torch.tensor(host(cos)), torch.tensor(host(sin))), attention_mask=tm)
    assert rel(out, tout.detach().numpy()) <= 1e-10
    g = rng.standard_normal(out.shape)
    (out * T(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    assert rel(xt.grad, tx.grad.numpy()) <= 1e-10
    for (name, p), (_, tp) in zip(ours.named_parameters(), twin.named_parameters()):
        assert rel(p.grad, tp.grad.numpy()) <= 1e-10, name
    if kind == "per_head":                                              # the additive mask's gradient
        assert rel(mt.grad, tm.grad.numpy()) <= 1e-10


@pytest.mark.verify
def test_hf_eager_differs_only_by_its_float32_softmax():
    """HF's eager path takes the softmax in float32 even for float64 inputs: equal to 1e-6, not to 1e-10."""
    rng = np.random.default_rng(7)
    ours = make_gqa(2)
    torch, twin = hf_twin(ours, 2, False, "eager", seed=7)
    x = rng.standard_normal((2, 5, C))
    cos, sin = ours.rotary_emb(T(np.arange(5)[None].repeat(2, 0)))
    causal = torch.tensor(np.where(np.tri(5, 5, dtype=bool), 0.0, -np.inf))[None, None]
    tout, _ = twin(torch.tensor(x), position_embeddings=(torch.tensor(host(cos)), torch.tensor(host(sin))),
                   attention_mask=causal)
    assert 1e-12 < rel(ours(T(x)), tout.detach().numpy()) <= 1e-6


# ----------------------------------------------------------------------------- grouping by broadcasting

@pytest.mark.usefixtures("ops_path")
def test_attention_op_sums_broadcast_batch_axes_in_its_backward():
    """ops.attention with k, v of one head per group (..., 1, S, D) equals it with them copied G times, and
    their gradients are the copies' summed over G (on both op paths)."""
    rng = np.random.default_rng(11)
    B, Hkv, G, L, S, E = 2, 2, 3, 4, 5, 3
    q, k, v = (rng.standard_normal(s) for s in ((B, Hkv, G, L, E), (B, Hkv, 1, S, E), (B, Hkv, 1, S, E)))
    mask = np.tri(L, S, k=S - L, dtype=bool)
    g = rng.standard_normal((B, Hkv, G, L, E))
    shared = [T(a, requires_grad=True) for a in (q, k, v)]
    copied = [T(a, requires_grad=True) for a in (q, np.repeat(k, G, axis=2), np.repeat(v, G, axis=2))]
    outs = [nf.ops.attention(*ts, mask, scale=0.4) for ts in (shared, copied)]
    for o in outs:
        (o * T(g)).sum().backward()
    np.testing.assert_allclose(host(outs[0]), host(outs[1]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(shared[0].grad), host(copied[0].grad), rtol=1e-12, atol=1e-12)
    for a, b in zip(shared[1:], copied[1:]):
        assert host(a.grad).shape == (B, Hkv, 1, S, E)
        np.testing.assert_allclose(host(a.grad), host(b.grad).sum(axis=2, keepdims=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Hkv", [H // 2, 1])
def test_gqa_equals_mha_with_copied_key_value_heads_and_sums_their_gradients(Hkv):
    """Query head h reads key/value head h // G (HF's repeat_kv order); the gradient of a shared key/value
    projection row is the sum over its group of the multi-head twin's gradients."""
    G = H // Hkv
    rng = np.random.default_rng(Hkv)
    gqa, mha = make_gqa(Hkv, seed=1), make_gqa(H, seed=2)
    for name in ("q_proj", "o_proj"):
        getattr(mha, name).weight.data[...] = getattr(gqa, name).weight.data
    for name in ("k_proj", "v_proj"):                                   # (Hkv D, C) -> (H D, C), head by head
        w = host(getattr(gqa, name).weight).reshape(Hkv, 1, D, C)
        getattr(mha, name).weight.data[...] = T(np.repeat(w, G, axis=1).reshape(H * D, C)).data
    x = rng.standard_normal((2, 5, C))
    outs = [m(T(x)) for m in (gqa, mha)]
    np.testing.assert_allclose(host(outs[0]), host(outs[1]), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(outs[0].shape)
    for o in outs:
        (o * T(g)).sum().backward()
    for name in ("k_proj", "v_proj"):
        summed = host(getattr(mha, name).weight.grad).reshape(Hkv, G, D, C).sum(axis=1).reshape(Hkv * D, C)
        np.testing.assert_allclose(host(getattr(gqa, name).weight.grad), summed, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(host(gqa.q_proj.weight.grad), host(mha.q_proj.weight.grad), rtol=1e-11, atol=1e-12)


def test_shared_keys_reach_the_attention_op_uncopied(monkeypatch):
    seen = []
    attention = nf.ops.attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape, k.shape, v.shape))
        return attention(q, k, v, *args, **kwargs)
    monkeypatch.setattr(nf.ops, "attention", spy)
    make_gqa(1)(T(np.zeros((2, 3, C))), past_key_value=(T(np.zeros((2, 1, 4, D))), T(np.zeros((2, 1, 4, D)))))
    assert seen == [((2, 1, H, 3, D), (2, 1, 1, 7, D), (2, 1, 1, 7, D))]


@pytest.mark.usefixtures("ops_path")
@pytest.mark.parametrize("Hkv", [H, 1])
def test_causal_without_cache_is_the_ops_own_causal_path(Hkv):
    """No cache and no bool mask: the op's causal=True (the fast path's blocks when Hkv = H and T >= 128);
    an all-True bool mask takes the explicit triangle instead. Both give the same outputs and gradients."""
    rng = np.random.default_rng(30)
    m = make_gqa(Hkv)                                                   # positions past 32: the formula
    x = rng.standard_normal((1, 130, C))
    g = rng.standard_normal((1, 130, C))
    grads = []
    for mask in (None, T(np.ones((130, 130), bool))):
        xt = T(x, requires_grad=True)
        out = m(xt, attention_mask=mask)
        (out * T(g)).sum().backward()
        grads.append((host(out), host(xt.grad)))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------- the KV cache

@pytest.mark.parametrize("Hkv", [H, H // 2, 1])
def test_cached_steps_equal_one_pass(Hkv):
    """A prefix, then one token at a time, then a chunk of two, each with the cache of the ones before and
    positions continuing after it, give the one-pass outputs and its cache (also with explicit per-row
    positions and a key padding mask)."""
    rng = np.random.default_rng(20 + Hkv)
    B, Tn = 2, 7
    m = make_gqa(Hkv, seed=Hkv)
    x = rng.standard_normal((B, Tn, C))
    pos = np.stack([np.arange(Tn), np.arange(Tn) + 3])                  # row 1 starts at position 3
    keep = np.ones((B, 1, 1, Tn), bool)
    keep[1, ..., 1] = False                                             # a padding key, row 1
    for kw in ({}, {"pos": pos, "mask": keep}):
        full, (k_full, v_full) = m(T(x), attention_mask=None if "mask" not in kw else T(kw["mask"]),
                                   position_ids=None if "pos" not in kw else T(kw["pos"]), use_cache=True)
        pieces, cache = [], None
        for a, b in ((0, 3), (3, 4), (4, 5), (5, 7)):
            extra = {}
            if "pos" in kw:
                extra["position_ids"] = T(kw["pos"][:, a:b])
            if "mask" in kw:
                extra["attention_mask"] = T(kw["mask"][..., :b])
            y, cache = m(T(x[:, a:b]), past_key_value=cache, use_cache=True, **extra)
            assert cache[0].shape == (B, Hkv, b, D)
            pieces.append(host(y))
        np.testing.assert_allclose(np.concatenate(pieces, axis=1), host(full), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(host(cache[0]), host(k_full), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(host(cache[1]), host(v_full), rtol=1e-12, atol=1e-12)
    # the positions matter: the cache with the wrong ones gives other outputs
    y_wrong = m(T(x[:, 3:4]), past_key_value=(k_full[:, :, :3], v_full[:, :, :3]), position_ids=T(np.array([0])))
    assert np.abs(host(y_wrong) - host(full)[:, 3:4]).max() > 1e-6


# ----------------------------------------------------------------------------- gradient checks

class _Call(nn.Module):
    """forward(*inputs) = fn(*inputs), owning `inner` so gradcheck_module sees its parameters."""

    def __init__(self, fn, inner):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args):
        return self.fn(*args)


@st.composite
def gqa_case(draw):
    Hkv, G, d = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([2, 4]))
    return dict(B=draw(st.integers(1, 2)), Tn=draw(st.integers(1, 3)), P=draw(st.sampled_from([0, 2])),
                Hkv=Hkv, H=Hkv * G, d=d, C=draw(st.sampled_from([3, 5])), bias=draw(st.booleans()),
                mask=draw(st.sampled_from(["none", "bool", "float"])), seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=8)
@given(gqa_case())
@example(dict(B=2, Tn=2, P=2, Hkv=2, H=4, d=2, C=3, bias=True, mask="float", seed=1))   # every part at once
def test_gqa_gradcheck(case):
    """Central differences w.r.t. x, the cached keys and values, a float mask and every parameter."""
    B, Tn, P, Hkv, Hq, d, Cs = (case[k] for k in ("B", "Tn", "P", "Hkv", "H", "d", "C"))
    rng = np.random.default_rng(case["seed"])
    m = GroupedQueryAttention(Cs, Hq, Hkv, head_dim=d, attention_bias=case["bias"], max_position_embeddings=8,
                              generator=nf.random.Generator(case["seed"]), **F64)
    S = P + Tn
    inputs = [T(rng.standard_normal((B, Tn, Cs)), requires_grad=True)]
    if P:
        inputs += [T(rng.standard_normal((B, Hkv, P, d)), requires_grad=True) for _ in range(2)]
    if case["mask"] == "float":
        inputs.append(T(rng.standard_normal((B, Hq, Tn, S)), requires_grad=True))
    elif case["mask"] == "bool":
        allowed = rng.random((B, 1, Tn, S)) < 0.7
        allowed[..., 0] = True
        inputs.append(T(allowed))

    def call(x, *rest):
        cache = (rest[0], rest[1]) if P else None
        mask = rest[-1] if case["mask"] != "none" else None
        out, (k, v) = m(x, attention_mask=mask, past_key_value=cache, use_cache=True)
        return nf.concatenate([out.reshape(-1), k.reshape(-1), v.reshape(-1)])
    assert gradcheck_module(_Call(call, m), inputs)


# ----------------------------------------------------------------------------- masks, dropout, errors

def test_bool_and_additive_masks_agree_and_a_query_without_keys_gives_zeros():
    rng = np.random.default_rng(5)
    m = make_gqa(2)
    x = T(rng.standard_normal((2, 4, C)))
    allowed = rng.random((2, 1, 4, 4)) < 0.6
    allowed[0, 0, 2] = False                                            # row 0, query 2: every key masked
    y_bool = m(x, attention_mask=T(allowed), is_causal=False)
    y_add = m(x, attention_mask=T(np.where(allowed, 0.0, -np.inf)), is_causal=False)
    np.testing.assert_allclose(host(y_bool), host(y_add), rtol=1e-12, atol=1e-12)
    assert np.isfinite(host(y_bool)).all() and (host(y_bool)[0, 2] == 0).all()
    # polarity: True = attend; the complement is another answer
    other = ~allowed
    other[..., 0] = True
    assert np.abs(host(m(x, attention_mask=T(other), is_causal=False)) - host(y_bool)).max() > 1e-3


def test_attention_dropout_only_in_training():
    rng = np.random.default_rng(6)
    x = T(rng.standard_normal((2, 4, C)))
    m, plain = make_gqa(2, attention_dropout=0.5), make_gqa(2)
    np.testing.assert_array_equal(host(m.eval()(x)), host(plain(x)))
    assert np.abs(host(m.train()(x)) - host(plain(x))).max() > 1e-3


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_key_value_heads 3 must divide num_attention_heads 4"):
        GroupedQueryAttention(8, 4, 3)
    with pytest.raises(ValueError, match="hidden_size 10 must be divisible by num_attention_heads 4"):
        GroupedQueryAttention(10, 4)
    with pytest.raises(ValueError, match="num_key_value_heads must be a positive int or None; got 0"):
        GroupedQueryAttention(8, 4, 0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        GroupedQueryAttention(9, 3)
    with pytest.raises(ValueError, match=r"attention_dropout must be in \[0, 1\]"):
        GroupedQueryAttention(8, 4, attention_dropout=1.5)
    m = make_gqa(2)
    x = T(np.zeros((2, 3, C)))
    k, v = T(np.zeros((2, 2, 4, D))), T(np.zeros((2, 2, 4, D)))
    with pytest.raises(ValueError, match=r"x must be \(B, T, hidden_size\) = \(B, T, 12\); got shape \(2, 3, 5\)"):
        m(T(np.zeros((2, 3, 5))))
    with pytest.raises(ValueError, match=r"past_key_value k has shape \(2, 4, 4, 6\); expected \(B, "
                                         r"num_key_value_heads, P, head_dim\) = \(2, 2, P, 6\)"):
        m(x, past_key_value=(T(np.zeros((2, 4, 4, D))), v))             # a multi-head cache for a GQA module
    with pytest.raises(ValueError, match=r"past_key_value v has shape \(2, 2, 4, 5\)"):
        m(x, past_key_value=(k, T(np.zeros((2, 2, 4, 5)))))
    with pytest.raises(ValueError, match=r"past_key_value k \(2, 2, 4, 6\) and v \(2, 2, 3, 6\) must have the same"):
        m(x, past_key_value=(k, T(np.zeros((2, 2, 3, D)))))
    with pytest.raises(ValueError, match="past_key_value must be a pair"):
        m(x, past_key_value=k)
    with pytest.raises(TypeError, match="past_key_value k is float32 but the module is float64"):
        m(x, past_key_value=(T(np.zeros((2, 2, 4, D), np.float32)), v))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 1, 3, 3\); expected .* \(2, 4, 3, 7\)"):
        m(x, attention_mask=T(np.ones((2, 1, 3, 3), bool)), past_key_value=(k, v))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3, 3, 3\)"):
        m(x, attention_mask=T(np.ones((2, 3, 3, 3), bool)))            # 3 heads: neither 1 nor H
    with pytest.raises(TypeError, match="attention_mask must be a bool or floating-point mask; got dtype int64"):
        m(x, attention_mask=T(np.ones((3, 3), np.int64)))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(T,\) or \(B, T\) with T = 3"):
        m(x, position_ids=T(np.arange(4)))
