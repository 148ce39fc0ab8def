"""The GPT model (npformer/models/gpt.py) and sampling (npformer/models/sampling.py): float64
gradient checks, the loss at initialisation, weight tying, GPT-2 initialisation, config and
length errors, the KV cache against the uncached forward, and filter_logits' properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer import nn
from npformer.models.gpt import GPT, GPTConfig, KVCache
from npformer.models.sampling import filter_logits, generate
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

TINY = dict(vocab_size=7, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny_gpt(seed=0, std=0.3, **overrides) -> GPT:
    """A float64 GPT with every parameter drawn from N(0, std^2): GPT-2's init (zero biases, unit
    LayerNorm weights, tiny logits) would hide mistakes in the gradient and cache checks."""
    model = GPT(GPTConfig(**{**TINY, **overrides}), generator=np.random.default_rng(seed), dtype=np.float64,
                device=DEVICE)
    rng = np.random.default_rng(seed + 1000)
    for p in model.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * std)
    return model


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- gradients and loss

@pytest.mark.parametrize("pick", ["loss", "logits"])
def test_gradcheck_tiny_gpt_float64(pick):
    model = tiny_gpt(seed=1)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))
    targets[0, 1] = -1                                            # ignored position
    select = (lambda out: out[1]) if pick == "loss" else (lambda out: out[0])
    assert gradcheck_module(model, [T(idx), T(targets)], pick=select, directions=3, atol=1e-8, rtol=1e-5)


def test_loss_at_initialisation_is_close_to_ln_vocab_size():
    """At GPT-2's init the logits are small (std s ~ 0.02 sqrt(n_embd)), so the model predicts nearly
    uniformly: E[loss] ~ ln V + s^2 / 2. Tolerance: s^2/2 plus 5 standard errors s / sqrt(B T) of the
    mean over B*T tokens (each token's loss varies by about s) = about 0.05 here, with s measured."""
    V, B, Tn = 64, 16, 16
    model = GPT(GPTConfig(vocab_size=V, block_size=Tn, n_layer=2, n_head=2, n_embd=32),
                generator=np.random.default_rng(3), dtype=np.float64, device=DEVICE)
    rng = np.random.default_rng(3)
    logits, loss = model(T(rng.integers(0, V, (B, Tn))), T(rng.integers(0, V, (B, Tn))))
    s = float(host(logits).std())
    assert 0.05 < s < 0.2, f"logit std {s} at init; expected about 0.02 * sqrt(32) = 0.11"
    tol = s * s / 2 + 5 * s / math.sqrt(B * Tn)
    assert abs(loss.item() - math.log(V)) < tol, f"loss {loss.item()} vs ln V {math.log(V)} (tol {tol:.3g})"


def test_weight_tying_one_parameter_gets_both_contributions():
    tied = tiny_gpt(seed=2)
    untied = tiny_gpt(seed=2)
    untied.lm_head.weight = nn.Parameter(untied.transformer.wte.weight.data.copy())
    assert tied.lm_head.weight is tied.transformer.wte.weight
    names = [n for n, _ in tied.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names     # listed once
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(tied.state_dict())  # saved under both names
    assert tied.num_parameters(non_embedding=False) + untied.lm_head.weight.size == \
        untied.num_parameters(non_embedding=False)
    rng = np.random.default_rng(2)
    idx, targets = T(rng.integers(0, 7, (2, 6))), T(rng.integers(0, 7, (2, 6)))
    for m in (tied, untied):
        m(idx, targets)[1].backward()
    emb, head = host(untied.transformer.wte.weight.grad), host(untied.lm_head.weight.grad)
    assert np.abs(emb).max() > 1e-3 and np.abs(head).max() > 1e-3     # both paths contribute
    assert rel(host(tied.transformer.wte.weight.grad), emb + head) < 1e-12


def test_gpt2_initialisation_statistics():
    """N(0, 0.02) weights, N(0, 0.02 / sqrt(2 n_layer)) residual projections (c_proj), zero biases,
    LayerNorm (1, 0). Sample std within 4% (its standard error is ~1/sqrt(2N) < 0.5% for N >= 4096)."""
    n_layer = 3
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=4, n_embd=64),
                generator=np.random.default_rng(4), dtype=np.float64, device=DEVICE)
    resid = 0.02 / math.sqrt(2 * n_layer)
    seen = set()
    for name, p in model.named_parameters():
        a = host(p)
        if name.endswith("c_proj.weight"):
            want = resid
        elif a.ndim == 2:
            want = 0.02
        elif name.endswith("bias"):
            assert np.all(a == 0.0), name
            continue
        else:
            assert np.all(a == 1.0), name                        # LayerNorm weights
            continue
        seen.add(name.split(".")[-2])
        assert abs(a.std() / want - 1) < 0.04, f"{name}: std {a.std():.5g}, expected {want:.5g}"
        assert abs(a.mean()) < 5 * want / math.sqrt(a.size), f"{name}: mean {a.mean():.3g}"
    assert seen == {"wte", "wpe", "c_attn", "c_proj", "c_fc"}


# ----------------------------------------------------------------------------- errors

def test_sequence_longer_than_block_size_raises_naming_both_lengths():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"sequence length 9 .*block_size 8"):
        model(T(np.zeros((1, 9), np.int64)))
    cache = KVCache(model.config.n_layer)
    model(T(np.zeros((1, 6), np.int64)), cache=cache)
    with pytest.raises(ValueError, match=r"sequence length 9 .*block_size 8"):
        model(T(np.zeros((1, 3), np.int64)), cache=cache)       # 6 cached + 3 new


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("block_size", -1), ("n_layer", 0), ("n_head", 0), ("n_embd", 0), ("n_layer", 2.5),
    ("n_embd", 9), ("dropout", 1.0), ("dropout", -0.1), ("gelu_approximate", "erf")])
def test_config_bad_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, field: value})


# ----------------------------------------------------------------------------- KV cache and generation

def test_cached_logits_equal_uncached_position_by_position():
    model = tiny_gpt(seed=5).eval()
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 7, (2, 8))
    full = host(model(T(idx))[0])                                # (B, 8, V), no cache
    cache = KVCache(model.config.n_layer)
    pos = 0
    for step in (3, 1, 2, 1, 1):                                 # prompt, then single tokens and a chunk
        got = host(model(T(idx[:, pos:pos + step]), cache=cache)[0])
        assert cache.length == pos + step
        for i in range(step):
            assert rel(got[:, i], full[:, pos + i]) < 1e-12, f"position {pos + i}"
        pos += step
    assert pos == model.config.block_size


class Recorder:
    """Wraps a GPT, keeping the last-position logits of every call (as generate makes them)."""

    def __init__(self, model):
        self.model, self.last = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, idx, cache=None):
        logits, loss = self.model(idx, cache=cache)
        self.last.append(host(logits)[:, -1])
        return logits, loss


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=3), dict(top_p=0.8, temperature=1.3)])
def test_generate_with_and_without_cache_agree_past_block_size(kw):
    model = tiny_gpt(seed=6)
    prompt = np.random.default_rng(6).integers(0, 7, (2, 3))
    runs = {}
    for use_cache in (True, False):
        rec = Recorder(model)
        out = generate(rec, prompt, max_new_tokens=12, seed=11, use_cache=use_cache, **kw)
        runs[use_cache] = (out, rec.last)
    (a, la), (b, lb) = runs[True], runs[False]
    assert a.shape == (2, 15) and 15 > model.config.block_size
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :3], prompt)
    assert len(la) == len(lb) == 12
    for step, (x, y) in enumerate(zip(la, lb)):
        assert rel(x, y) < 1e-12, f"step {step}"
    assert model.training                                          # generate restores the mode


# ----------------------------------------------------------------------------- filter_logits

def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def draw(seed, B, V, scale):
    return np.random.default_rng(seed).standard_normal((B, V)) * scale


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 4), V=st.integers(1, 30), k=st.integers(1, 35),
       scale=st.floats(0.1, 8.0))
def test_top_k_keeps_the_k_largest(seed, B, V, k, scale):
    z = draw(seed, B, V, scale)
    p = filter_logits(z, top_k=k)
    kept = p > 0
    assert (kept.sum(-1) == min(k, V)).all()
    for row in range(B):
        if not kept[row].all():
            assert z[row][kept[row]].min() > z[row][~kept[row]].max()
        np.testing.assert_allclose(p[row][kept[row]], softmax(z[row][kept[row]]), rtol=1e-12)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 4), V=st.integers(1, 30), top_p=st.floats(1e-6, 1.0),
       scale=st.floats(0.1, 8.0))
def test_top_p_keeps_the_smallest_set_reaching_p(seed, B, V, top_p, scale):
    z = draw(seed, B, V, scale)
    p0, p = softmax(z), filter_logits(z, top_p=top_p)
    for row in range(B):
        kept = p[row] > 0
        assert kept.any()                                          # never empty
        mass = p0[row][kept].sum()
        assert mass >= top_p - 1e-12                               # reaches p
        assert mass - p0[row][kept].min() < top_p                  # and no smaller top set does
        if not kept.all():
            assert p0[row][kept].min() >= p0[row][~kept].max()     # the most likely tokens
        np.testing.assert_allclose(p[row][kept], p0[row][kept] / mass, rtol=1e-12)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), V=st.integers(2, 20), t=st.floats(0.05, 20.0), k=st.integers(1, 20),
       top_p=st.floats(0.01, 1.0))
def test_temperature_and_combined_filters(seed, V, t, k, top_p):
    z = draw(seed, 3, V, 2.0)
    p = filter_logits(z, temperature=t)
    np.testing.assert_allclose(p, softmax(z / t), rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(p.argmax(-1), z.argmax(-1))
    both = filter_logits(z, temperature=t, top_k=k, top_p=top_p)
    only_k = filter_logits(z, temperature=t, top_k=k)
    assert ((both > 0) <= (only_k > 0)).all()                      # top_p filters within the top k
    assert ((both > 0).sum(-1) >= 1).all()
    np.testing.assert_allclose(both.sum(-1), 1.0, rtol=1e-12)


def test_tiny_top_p_keeps_only_the_argmax():
    z = draw(7, 3, 10, 1.0)
    p = filter_logits(z, top_p=1e-9)
    np.testing.assert_array_equal(p.argmax(-1), z.argmax(-1))
    np.testing.assert_array_equal(p.max(-1), 1.0)


@pytest.mark.parametrize("kw,name", [(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
                                     (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"), (dict(top_p=0.0), "top_p"),
                                     (dict(top_p=-0.5), "top_p"), (dict(top_p=1.5), "top_p")])
def test_filter_logits_bad_values_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        filter_logits(np.zeros((1, 4)), **kw)


@given(steps=st.lists(st.integers(1, 5), min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_kv_cache_appends_like_concatenation(steps, seed):
    """The cache's growing buffers hold exactly the concatenation of what was appended; an array
    the caller assigns to k[i] / v[i] is what later appends extend."""
    rng = np.random.default_rng(seed)
    cache, ks, vs = KVCache(2), [], []
    for i, n in enumerate(steps):
        k, v = rng.standard_normal((2, 3, n, 4)), rng.standard_normal((2, 3, n, 4))
        ks.append(k)
        vs.append(v)
        cache.append(0, T(k).data, T(v).data)
        if i == len(steps) // 2:                       # the caller swaps in its own arrays
            ks = [host(cache.k[0])[::-1].copy()]
            vs = [host(cache.v[0])[::-1].copy()]
            cache.k[0], cache.v[0] = T(ks[0]).data, T(vs[0]).data
        np.testing.assert_array_equal(host(cache.k[0]), np.concatenate(ks, axis=2))
        np.testing.assert_array_equal(host(cache.v[0]), np.concatenate(vs, axis=2))
    assert cache.k[1] is None


def test_kv_cache_refuses_a_mismatched_append():
    cache = KVCache(1)
    cache.append(0, T(np.zeros((1, 2, 3, 4))).data, T(np.zeros((1, 2, 3, 4))).data)
    with pytest.raises(ValueError, match=r"KVCache.append: layer 0 holds keys of shape \(1, 2, 3, 4\); cannot append"):
        cache.append(0, T(np.zeros((3, 2, 1, 4))).data, T(np.zeros((3, 2, 1, 4))).data)
