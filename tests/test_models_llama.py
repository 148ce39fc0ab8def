"""LLaMA (npformer/models/llama.py) and its sampling (npformer/models/sampling.py) without torch: config
checks, HF's parameter names, HF's initialisation, weight tying (gradients from both uses), the loss
against a formula written out in NumPy, numeric gradient checks in float64, padding masks, the KV
cache against the uncached forward, positions past max_position_embeddings, and clear errors.
The comparisons with HF transformers are in test_interop_llama.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer.models import CausalLMOutputWithPast, LlamaConfig, LlamaForCausalLM, LlamaModel
from npformer.models.sampling import generate
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

TINY = dict(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=10)


def tiny(cls=LlamaForCausalLM, seed=0, scale=0.3, **overrides):
    """A float64 model with every parameter from N(0, scale^2) (HF's init, N(0, 0.02^2) and unit
    norms, would hide mistakes: every logit near zero)."""
    model = cls(LlamaConfig(**{**TINY, **overrides}), dtype=np.float64, device=DEVICE)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * scale + (1.0 if p.ndim == 1 else 0.0))
    return model


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def ids_of(seed, shape=(2, 6), vocab=13):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 4, r"num_key_value_heads \(4\) must divide num_attention_heads \(6\)"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer"),
    ("head_dim", 5, r"head_dim \(5\) must be even: RoPE rotates features in pairs"),
    ("hidden_size", 10, r"hidden_size \(10\) must be divisible by num_attention_heads \(6\)"),
    ("hidden_size", 18, r"head_dim \(3\) must be even"),                  # 18 / 6 heads
    ("vocab_size", 0, "vocab_size must be a positive integer"),
    ("num_hidden_layers", 1.5, "num_hidden_layers must be a positive integer"),
    ("hidden_act", "relu", "hidden_act must be one of 'silu', 'swish', 'gelu'"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be a finite number > 0"),
    ("rope_theta", -1.0, "rope_theta must be a finite number > 0"),
    ("initializer_range", float("nan"), "initializer_range must be a finite number >= 0"),
    ("attention_dropout", 1.0, r"attention_dropout must be in \[0, 1\)"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be True or False"),
    ("mlp_bias", 1, "mlp_bias must be True or False"),
    ("pad_token_id", 13, r"pad_token_id must be None or an int in \[0, vocab_size\) = \[0, 13\)"),
    ("eos_token_id", [2, 13], r"eos_token_id must be None or an int in \[0, vocab_size\) = \[0, 13\) \(or a list"),
])
def test_config_names_the_bad_field(field, value, match):
    base = {**TINY, "hidden_size": 12, "num_attention_heads": 6}
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**base, field: value})


def test_config_resolves_none_as_hf_and_is_frozen():
    c = LlamaConfig(**TINY)
    assert (c.num_key_value_heads, c.head_dim) == (2, 4)                 # heads, hidden / heads
    c = LlamaConfig(**{**TINY, "num_key_value_heads": 1, "head_dim": 6, "eos_token_id": [1, 2]})
    assert (c.num_key_value_heads, c.head_dim, c.eos_token_id) == (1, 6, (1, 2))
    assert c.to_dict()["rope_theta"] == 10000.0 and hash(c) == hash(LlamaConfig(**c.to_dict()))
    with pytest.raises(Exception):
        c.hidden_size = 4
    with pytest.raises(TypeError, match="config must be a LlamaConfig"):
        LlamaModel(dict(TINY))


# ----------------------------------------------------------------------------- names and initialisation

def test_parameter_names_are_hfs():
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 1, "num_key_value_heads": 1,
                                            "attention_bias": True, "mlp_bias": True}))
    layer = ["self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
             "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
             "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
             "mlp.down_proj.weight", "mlp.down_proj.bias", "input_layernorm.weight", "post_attention_layernorm.weight"]
    want = ["model.embed_tokens.weight"] + ["model.layers.0." + n for n in layer] + ["model.norm.weight",
                                                                                   "lm_head.weight"]
    assert list(model.state_dict()) == want                              # no RoPE tables: not persistent
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (4, 8)   # Hkv D = 1 x 4
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (8, 12) and shapes["lm_head.weight"] == (13, 8)
    attns = [layer.self_attn for layer in model.model.layers]
    assert all(a.rotary_emb is model.model.rotary_emb for a in attns)  # one RoPE table, as HF


def test_tied_lm_head_is_the_embedding():
    tied = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head.weight" in tied.state_dict() and "lm_head.weight" not in dict(tied.named_parameters())
    untied = LlamaForCausalLM(LlamaConfig(**TINY))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 13 * 8


def test_initialisation_is_hfs_and_seeded():
    cfg = LlamaConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                         "initializer_range": 0.05, "pad_token_id": 3, "attention_bias": True})
    state = nf.random.default_generator("cpu").bit_generator.state
    a = LlamaForCausalLM(cfg, generator=np.random.default_rng(5), dtype=np.float64)
    b = LlamaForCausalLM(cfg, generator=np.random.default_rng(5), dtype=np.float32)
    c = LlamaForCausalLM(cfg, generator=np.random.default_rng(6), dtype=np.float64)
    assert nf.random.default_generator("cpu").bit_generator.state == state    # the global RNG untouched
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        x = host(p)
        np.testing.assert_allclose(host(q), x, rtol=1e-6, atol=1e-7)   # one seed, either dtype
        assert q.dtype == np.float32 and p.dtype == np.float64
        if p.ndim == 2:
            assert not np.array_equal(host(r), x)
            if name != "model.embed_tokens.weight":
                assert abs(x.std() - 0.05) < 0.01 and abs(x.mean()) < 0.01, name
        elif name.endswith("bias"):
            assert not x.any(), name
        else:
            assert (x == 1).all(), name                                  # RMSNorm weights
    emb = host(a.model.embed_tokens.weight)
    assert not emb[3].any() and emb[2].any()                              # the padding row


# ----------------------------------------------------------------------------- forward, loss, gradients

def test_loss_is_the_shifted_cross_entropy_with_ignored_labels():
    model = tiny(seed=1)
    ids = ids_of(1)
    labels = ids.copy()
    labels[0, 3] = -100
    out = model(T(ids), labels=T(labels))
    assert isinstance(out, CausalLMOutputWithPast) and out.past_key_values is None
    z = host(out.logits)[:, :-1]                                         # position t predicts labels[t + 1]
    y = labels[:, 1:]
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = y != -100
    want = -np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0][keep].mean()
    assert rel(host(out.loss), want) < 1e-13 and keep.sum() == 9
    with np.errstate(invalid="ignore"):                                  # 0 / 0, as torch's mean
        loss, logits, _ = model(T(ids[:, :1]), labels=T(ids[:, :1]))    # one token: nothing to predict
    assert np.isnan(host(loss)) and logits.shape == (2, 1, 13)


@pytest.mark.parametrize("pick", ["loss", "logits"])
@pytest.mark.parametrize("Hkv,tie", [(2, False), (1, True)])
def test_gradcheck_float64(pick, Hkv, tie):
    """Every parameter, with a padding mask; for the logits through inputs_embeds (its gradient too)."""
    model = tiny(seed=2, num_key_value_heads=Hkv, tie_word_embeddings=tie, num_hidden_layers=1)
    ids = ids_of(2, (2, 4))
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    if pick == "loss":
        inputs, select = [T(ids), T(mask), None, None, None, T(ids)], (lambda out: out.loss)
    else:
        emb = T(np.random.default_rng(2).standard_normal((2, 4, 8)), requires_grad=True)
        inputs, select = [None, T(mask), None, None, emb], (lambda out: out.logits)
    assert gradcheck_module(model, inputs, pick=select, directions=3, atol=1e-8, rtol=1e-5)


def test_tied_weight_gets_the_gradient_of_both_uses():
    tied = tiny(seed=3, tie_word_embeddings=True)
    untied = tiny(seed=3)
    untied.load_state_dict(tied.state_dict())                             # lm_head = embedding, two copies
    ids = ids_of(3)
    for m in (tied, untied):
        m(T(ids), labels=T(ids)).loss.backward()
    both = host(untied.model.embed_tokens.weight.grad) + host(untied.lm_head.weight.grad)
    assert rel(host(tied.model.embed_tokens.weight.grad), both) < 1e-13
    assert np.abs(host(untied.model.embed_tokens.weight.grad)).max() > 1e-3   # both uses matter


def test_inputs_embeds_is_the_embedding_lookup_and_gets_its_gradient():
    model = tiny(seed=4)
    ids = ids_of(4)
    emb = T(host(model.model.embed_tokens.weight)[ids], requires_grad=True)
    a = model(inputs_embeds=emb, labels=T(ids))
    b = model(T(ids), labels=T(ids))
    assert rel(host(a.logits), host(b.logits)) == 0.0
    a.loss.backward()
    assert emb.grad is not None and np.abs(host(emb.grad)).max() > 1e-4


def test_padding_left_gives_the_unpadded_rows_values():
    """A left-padded row, with HF's position_ids cumsum(mask) - 1, equals the same tokens unpadded: pads
    are out of every query's keys, and the pad queries (no key left) stay finite."""
    model = tiny(seed=5, num_key_value_heads=1)
    ids = ids_of(5, (1, 4))
    padded = np.concatenate([[[0, 0]], ids], axis=1)                     # (1, 6)
    mask = np.array([[0, 0, 1, 1, 1, 1]])
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    got = host(model(T(padded), attention_mask=T(mask), position_ids=T(pos)).logits)
    want = host(model(T(ids)).logits)
    assert rel(got[:, 2:], want) < 1e-13 and np.isfinite(got).all()
    unshifted = host(model(T(padded), attention_mask=T(mask)).logits)    # positions 2..5: RoPE sees offsets
    assert rel(unshifted[:, 2:], want) < 1e-13                           # only differences matter to q.k
    right = host(model(T(np.concatenate([ids, [[0, 0]]], 1)), attention_mask=T(mask[:, ::-1].copy())).logits)
    assert rel(right[:, :4], want) < 1e-13


def test_positions_past_max_position_embeddings_extrapolate_as_a_longer_table():
    """Not an error: the rows past the cached tables come from RoPE's formula, as HF's do."""
    model = tiny(seed=6)                                                   # max_position_embeddings 10
    longer = tiny(seed=6, max_position_embeddings=32)
    ids = ids_of(6, (1, 14))
    assert rel(host(model(T(ids)).logits), host(longer(T(ids)).logits)) == 0.0


# ----------------------------------------------------------------------------- the KV cache and generate

@pytest.mark.parametrize("Hkv", [2, 1])
def test_cached_steps_equal_one_pass(Hkv):
    model = tiny(seed=7, num_key_value_heads=Hkv)
    ids = ids_of(7, (2, 7))
    mask = np.ones((2, 7), int)
    mask[1, 0] = 0
    full = host(model(T(ids), attention_mask=T(mask)).logits)
    with nf.no_grad():
        out = model(T(ids[:, :3]), attention_mask=T(mask[:, :3]), use_cache=True)
        steps = [host(out.logits)]
        for t in range(3, 7):
            out = model(T(ids[:, t:t + 1]), attention_mask=T(mask[:, :t + 1]), past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(host(out.logits))
    assert rel(np.concatenate(steps, axis=1), full) < 1e-13
    k, v = out.past_key_values[1]
    assert len(out.past_key_values) == 2 and k.shape == v.shape == (2, Hkv, 7, 4)


def test_generate_greedy_is_the_argmax_of_the_forward(monkeypatch):
    """The cached path feeds the prompt once, then one token a step; the uncached the whole sequence."""
    model = tiny(seed=8, num_key_value_heads=1)
    prompt = ids_of(8, (2, 3))
    fed, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: fed.append(ids.shape[1]) or forward(ids, **kw))
    got = generate(model, prompt, 5, top_k=1)
    assert fed == [3, 1, 1, 1, 1] and generate(model, prompt, 2, use_cache=False).shape == (2, 5)
    assert fed[5:] == [3, 4]
    seq = prompt
    for _ in range(5):
        nxt = host(forward(T(seq)).logits)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq)
    assert model.training                                                 # generate puts the mode back


@settings(max_examples=6)
@given(Hkv=st.sampled_from([1, 2]), T0=st.integers(1, 4), n=st.integers(1, 9), seed=st.integers(0, 2 ** 16),
       tie=st.booleans())
def test_cached_and_uncached_sampling_give_the_same_tokens(Hkv, T0, n, seed, tie):
    """Past max_position_embeddings too (prompt + n up to 13 > 10): no window, no error."""
    model = tiny(seed=seed % 7, num_key_value_heads=Hkv, tie_word_embeddings=tie, num_hidden_layers=1)
    prompt = ids_of(seed, (2, T0))
    seen = []
    a = generate(model, prompt, n, seed=seed, temperature=1.5, use_cache=True, on_token=seen.append)
    b = generate(model, prompt, n, seed=seed, temperature=1.5, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, T0 + n) and len(seen) == n


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_argument():
    model = tiny(seed=9)
    ids = ids_of(9)
    with pytest.raises(ValueError, match=r"input_ids \(2, 6\) holds values outside \[0, vocab_size\) = \[0, 13\): "
                                         r"min \d+, max 13"):
        model(T(np.where(ids == ids.max(), 13, ids)))
    with pytest.raises(ValueError, match="min -1"):
        model(T(np.where(ids == ids.min(), -1, ids)))
    with pytest.raises(ValueError, match=r"input_ids must be integers of shape \(B, T\) with T >= 1; got float64"):
        model(T(ids.astype(float)))
    with pytest.raises(ValueError, match="pass exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(TypeError, match="inputs_embeds is float32 but the model is float64"):
        model(inputs_embeds=T(np.zeros((2, 3, 8), np.float32)))
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(B, T, hidden_size\) = \(B, T, 8\)"):
        model(inputs_embeds=T(np.zeros((2, 3, 6))))
    with pytest.raises(ValueError, match=r"labels must be in \[0, vocab_size\) = \[0, 13\) or -100 \(ignored\); "
                                         r"got 13"):
        model(T(ids), labels=T(np.full((2, 6), 13)))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(B, T\) = \(2, 6\)"):
        model(T(ids), labels=T(ids[:, :5]))
    with pytest.raises(ValueError, match=r"attention_mask must be 1/0 \(or bool\) of shape \(B, past \+ T\) = "
                                         r"\(2, 6\); got int64 \(2, 5\)"):
        model(T(ids), attention_mask=T(np.ones((2, 5), int)))
    with pytest.raises(ValueError, match="position_ids must be >= 0; got -1"):
        model(T(ids), position_ids=T(np.arange(6)[None] - 1))
    with pytest.raises(ValueError, match=r"position_ids must be integers of shape \(B, T\) = \(2, 6\) or \(1, T\)"):
        model(T(ids), position_ids=T(np.arange(5)[None]))
    with nf.no_grad():
        past = model(T(ids), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"past_key_values must be one \(k, v\) pair per layer \(2\), as returned "
                                         r"with use_cache=True; got tuple of length 1"):
        model(T(ids[:, :1]), past_key_values=past[:1])
    with pytest.raises(ValueError, match="the same P in every layer"):
        model(T(ids[:, :1]), past_key_values=(past[0], (past[1][0][:, :, :3], past[1][1][:, :, :3])))
    with pytest.raises(ValueError, match=r"past_key_value k has shape \(2, 2, 6, 4\); expected \(B, "
                                         r"num_key_value_heads, P, head_dim\) = \(1, 2, P, 4\)"):
        model(T(ids[:1, :1]), past_key_values=past)
    with pytest.raises(ValueError, match=r"attention_mask .* = \(2, 7\)"):       # past + T positions
        model(T(ids[:, :1]), attention_mask=T(np.ones((2, 1), int)), past_key_values=past)
