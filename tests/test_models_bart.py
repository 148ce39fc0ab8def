"""BART (npformer/models/bart.py) without torch: config checks, HF's parameter names, HF's
initialisation, the tied embedding (gradients from all three uses), padding masks on both sides,
the loss against a formula written out in NumPy, a numeric gradient check in float64, the KV cache
against the full forward, greedy generation's rules, dropout, and clear errors.
The comparisons with HF transformers are in test_interop_bart.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer.models.bart import BartConfig, BartForConditionalGeneration, BartModel, shift_tokens_right
from npformer.models.seq2seq import DecoderKVCache
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

TINY = dict(vocab_size=19, d_model=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=4, encoder_ffn_dim=12, decoder_ffn_dim=10, max_position_embeddings=12,
            dropout=0.0)


def tiny(cls=BartForConditionalGeneration, seed=0, scale=0.25, **overrides):
    """A float64 model in eval mode: HF's initialisation plus N(0, scale^2) noise on every parameter
    (LayerNorm weights near 1, the pad rows nonzero) and a final_logits_bias from N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    model = cls(BartConfig(**{**TINY, **overrides}), generator=rng, dtype=np.float64, device=DEVICE).eval()
    for p in model.parameters():
        p.data += p.xp.asarray(rng.standard_normal(p.shape) * scale)
    if cls is BartForConditionalGeneration:
        model.final_logits_bias[...] = model.lm_head.weight.xp.asarray(rng.standard_normal((1, model.config.vocab_size)) * 0.1)
    return model


def batch(seed=0):
    """(input_ids (3, 7), attention_mask, labels (3, 6), decoder_attention_mask): source rows of 7, 5
    (right-padded) and 5 (left-padded) real tokens; label rows of 6, 4 and 3 with -100 after, the
    decoder mask 1 where a label is real. Ids from 3 on (0, 1, 2 are bos, pad, eos)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 19, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, 5:] = 0
    mask[2, :2] = 0
    ids[mask == 0] = 1
    labels = rng.integers(3, 19, (3, 6))
    dmask = (np.arange(6)[None, :] < np.array([6, 4, 3])[:, None]).astype(np.int64)
    labels[dmask == 0] = -100
    return ids, mask, labels, dmask


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,match", [
    ("d_model", 10, r"d_model \(10\) must be divisible by encoder_attention_heads \(4\)"),
    ("decoder_attention_heads", 3, r"d_model \(8\) must be divisible by decoder_attention_heads \(3\)"),
    ("vocab_size", 0, "vocab_size must be a positive integer"),
    ("decoder_layers", 1.5, "decoder_layers must be a positive integer"),
    ("encoder_ffn_dim", True, "encoder_ffn_dim must be a positive integer"),
    ("activation_function", "swiglu", "activation_function must be one of 'gelu', 'gelu_new', "),
    ("dropout", 1.0, r"BartConfig.dropout must be in \[0, 1\)"),
    ("attention_dropout", -0.1, r"attention_dropout must be in \[0, 1\)"),
    ("activation_dropout", "0.1", r"activation_dropout must be in \[0, 1\)"),
    ("init_std", -0.02, "init_std must be a number >= 0"),
    ("pad_token_id", 19, r"pad_token_id must be None or an int in \[0, vocab_size\) = \[0, 19\); got 19"),
    ("eos_token_id", [2], r"eos_token_id must be None or an int in \[0, vocab_size\)"),
    ("forced_eos_token_id", -1, r"forced_eos_token_id must be None or an int"),
    ("decoder_start_token_id", 2.0, r"decoder_start_token_id must be None or an int"),
    ("scale_embedding", "yes", "scale_embedding must be True or False"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be True or False"),
])
def test_config_names_the_bad_field(field, value, match):
    kw = {"encoder_attention_heads": 4} if field == "d_model" else {}
    with pytest.raises(ValueError, match=match):
        BartConfig(**{**TINY, **kw, field: value})


def test_config_defaults_are_bart_large_and_round_trip_through_a_dict():
    c = BartConfig()
    assert (c.vocab_size, c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads,
            c.encoder_ffn_dim, c.max_position_embeddings) == (50265, 1024, 12, 12, 16, 4096, 1024)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id, c.decoder_start_token_id, c.forced_eos_token_id) == \
        (1, 0, 2, 2, 2)
    assert (c.activation_function, c.dropout, c.scale_embedding, c.tie_word_embeddings) == ("gelu", 0.1, False, True)
    assert BartConfig(**c.to_dict()) == c
    with pytest.raises(TypeError, match="config must be a BartConfig"):
        BartModel(dict(TINY))


# ----------------------------------------------------------------------------- names, tying, initialisation

def _layer(prefix, decoder):
    attn = lambda a: [f"{a}.{p}_proj.{w}" for p in "kvq" + "o" for w in ("weight", "bias")]   # noqa: E731
    names = [n.replace("o_proj", "out_proj") for n in attn("self_attn")] + ["self_attn_layer_norm.weight",
                                                                            "self_attn_layer_norm.bias"]
    if decoder:
        names += [n.replace("o_proj", "out_proj") for n in attn("encoder_attn")] + [
            "encoder_attn_layer_norm.weight", "encoder_attn_layer_norm.bias"]
    names += [f"{m}.{w}" for m in ("fc1", "fc2", "final_layer_norm") for w in ("weight", "bias")]
    return [f"{prefix}.layers.0.{n}" for n in names]


def test_parameter_names_are_hf_names_in_hf_order():
    one = BartConfig(**{**TINY, "encoder_layers": 1, "decoder_layers": 1})
    trunk = ["shared.weight"]
    for side in ("encoder", "decoder"):
        trunk += [f"{side}.embed_tokens.weight", f"{side}.embed_positions.weight"] + _layer(side, side == "decoder") \
            + [f"{side}.layernorm_embedding.weight", f"{side}.layernorm_embedding.bias"]
    assert list(BartModel(one).state_dict()) == trunk
    assert list(BartForConditionalGeneration(one).state_dict()) == \
        ["final_logits_bias"] + ["model." + n for n in trunk] + ["lm_head.weight"]
    m = BartForConditionalGeneration(one)
    assert m.model.encoder.embed_positions.weight.shape == (TINY["max_position_embeddings"] + 2, 8)   # offset 2
    assert m.final_logits_bias.shape == (1, 19) and "final_logits_bias" not in dict(m.named_parameters())


def test_embeddings_are_one_parameter_when_tied_and_four_when_not():
    tied = BartForConditionalGeneration(BartConfig(**TINY))
    shared = tied.model.shared.weight
    assert tied.model.encoder.embed_tokens.weight is shared and tied.model.decoder.embed_tokens.weight is shared
    assert tied.lm_head.weight is shared
    assert [n for n, p in tied.named_parameters() if p is shared] == ["model.shared.weight"]
    untied = BartForConditionalGeneration(BartConfig(**TINY, tie_word_embeddings=False))
    four = [untied.model.shared.weight, untied.model.encoder.embed_tokens.weight,
            untied.model.decoder.embed_tokens.weight, untied.lm_head.weight]
    assert len({id(p) for p in four}) == 4
    assert len(untied.parameters()) == len(tied.parameters()) + 3


def test_initialisation_is_hfs_seeded_and_leaves_the_global_generator_alone():
    c = BartConfig(**{**TINY, "d_model": 64, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96, "init_std": 0.05})
    state = nf.random.default_generator("cpu").bit_generator.state
    m = BartForConditionalGeneration(c, generator=np.random.default_rng(3))
    assert nf.random.default_generator("cpu").bit_generator.state == state
    for name, p in m.named_parameters():
        a = host(p)
        if a.ndim == 2:
            assert abs(a.std() - 0.05) < 0.01, name
        elif name.endswith("bias"):
            assert not a.any(), name
        else:
            assert (a == 1).all(), name
    assert not host(m.model.shared.weight)[1].any() and host(m.model.shared.weight)[0].any()   # pad_token_id 1
    assert not host(m.final_logits_bias).any()
    again = BartForConditionalGeneration(c, generator=np.random.default_rng(3))
    assert all(np.array_equal(host(a), host(b)) for a, b in zip(m.parameters(), again.parameters()))
    assert m.parameters()[0].dtype == np.float32 and m.final_logits_bias.dtype == np.float32
    m64 = BartForConditionalGeneration(c, dtype=np.float64)
    assert m64.parameters()[0].dtype == np.float64 and m64.final_logits_bias.dtype == np.float64


def test_tied_embedding_gets_the_gradient_of_all_three_uses():
    """shared.weight's gradient is the sum of the encoder lookup, the decoder lookup and lm_head's."""
    tied = tiny(seed=1)
    untied = tiny(seed=1, tie_word_embeddings=False)
    state = tied.state_dict()
    untied.load_state_dict(state)
    ids, mask, labels, dmask = batch(1)
    for m in (tied, untied):
        m(T(ids), T(mask), labels=T(labels), decoder_attention_mask=T(dmask)).loss.backward()
    u = untied.model
    parts = [host(u.encoder.embed_tokens.weight.grad), host(u.decoder.embed_tokens.weight.grad),
             host(untied.lm_head.weight.grad)]
    assert all(np.abs(g).max() > 1e-4 for g in parts)           # each far above the 1e-14 checked below
    assert rel(host(tied.model.shared.weight.grad), sum(parts)) < 1e-14
    assert u.shared.weight.grad is None                              # unused when untied, as in HF
    assert not parts[0][1].any() and not parts[1][1].any()           # the pad row: no lookup gradient


# ----------------------------------------------------------------------------- loss, shifting, padding

def test_loss_is_the_mean_cross_entropy_over_labels_that_are_not_ignored():
    model = tiny(seed=2)
    ids, mask, labels, dmask = batch(2)
    out = model(T(ids), T(mask), labels=T(labels), decoder_attention_mask=T(dmask))
    z = host(out.logits)                                             # (3, 6, 19)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    keep = labels != -100
    nll = lse - np.take_along_axis(z, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    assert abs(float(host(out.loss)) - nll[keep].mean()) < 1e-13
    dec = shift_tokens_right(labels, 1, 2)
    assert (dec[:, 0] == 2).all() and (dec[:, 1:][labels[:, :-1] == -100] == 1).all()
    explicit = model(T(ids), T(mask), decoder_input_ids=T(dec), decoder_attention_mask=T(dmask), labels=T(labels))
    assert np.array_equal(host(explicit.logits), z) and np.array_equal(host(explicit.loss), host(out.loss))
    assert np.array_equal(host(out.encoder_last_hidden_state),
                          host(model.model(T(ids), T(mask), decoder_input_ids=T(dec)).encoder_last_hidden_state))


def test_bart_model_shifts_input_ids_when_no_decoder_input_ids():
    model = tiny(BartModel, seed=3)
    ids, mask, _, _ = batch(3)
    got = model(T(ids), T(mask)).last_hidden_state
    want = model(T(ids), T(mask), decoder_input_ids=T(shift_tokens_right(ids, 1, 2))).last_hidden_state
    assert got.shape == (3, 7, 8) and np.array_equal(host(got), host(want))


def test_padded_tokens_change_nothing_and_the_masks_matter():
    model = tiny(seed=4)
    ids, mask, labels, dmask = batch(4)
    dec = shift_tokens_right(labels, 1, 2)
    base = host(model(T(ids), T(mask), decoder_input_ids=T(dec), decoder_attention_mask=T(dmask)).logits)
    ids2, dec2 = ids.copy(), dec.copy()
    ids2[mask == 0] = 7                                              # other tokens under the source padding
    dec2[dmask == 0] = 9                                             # and under the target padding
    other = host(model(T(ids2), T(mask), decoder_input_ids=T(dec2), decoder_attention_mask=T(dmask)).logits)
    assert np.abs(other[dmask == 1] - base[dmask == 1]).max() < 1e-13
    unmasked = host(model(T(ids), decoder_input_ids=T(dec), decoder_attention_mask=T(dmask)).logits)
    assert np.abs(unmasked - base).max() > 1e-5
    left = dmask[:, ::-1].copy()                                     # real tokens now follow padded ones
    masked = host(model(T(ids), T(mask), decoder_input_ids=T(dec2), decoder_attention_mask=T(left)).logits)
    dec3 = dec2.copy()
    dec3[left == 0] = 4
    again = host(model(T(ids), T(mask), decoder_input_ids=T(dec3), decoder_attention_mask=T(left)).logits)
    assert np.abs(again[left == 1] - masked[left == 1]).max() < 1e-13
    no_dmask = host(model(T(ids), T(mask), decoder_input_ids=T(dec2)).logits)
    assert np.abs(no_dmask[left == 1] - masked[left == 1]).max() > 1e-5   # real rows would see padded keys


def test_gradients_match_central_differences():
    """pad_token_id=None: a padding row's lookups get no gradient (torch's padding_idx), which
    central differences of that row would see."""
    model = tiny(seed=5, encoder_layers=1, decoder_layers=1, scale_embedding=True, activation_function="gelu_new",
                 pad_token_id=None)
    ids, mask, labels, dmask = batch(5)
    dec = shift_tokens_right(labels, 1, 2)

    class Call(nf.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            out = self.model(T(ids), T(mask), decoder_input_ids=T(dec), labels=T(labels),
                             decoder_attention_mask=T(dmask))
            return out.loss, out.logits
    gradcheck_module(Call(), [], directions=3, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- cache and generation

@settings(max_examples=10)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4), st.integers(0, 2**31 - 1), st.booleans())
def test_cached_decoding_equals_the_full_forward(chunks, seed, left_pad):
    """Feeding the target in chunks through past_key_values gives the full forward's logits; the
    decoder mask padded on either side, given as (B, P + T) or as the new tokens' (B, T)."""
    model = tiny(seed=6)
    rng = np.random.default_rng(seed)
    ids, mask, _, _ = batch(seed % 5)
    L = sum(chunks)
    dec = rng.integers(0, 19, (3, L))
    n_real = rng.integers(1, L + 1, 3)
    dmask = (np.arange(L)[None, :] < n_real[:, None]).astype(np.int64)
    if left_pad:
        dmask = dmask[:, ::-1].copy()
    full = host(model(T(ids), T(mask), decoder_input_ids=T(dec), decoder_attention_mask=T(dmask)).logits)
    cache, got, p = None, [], 0
    for i, n in enumerate(chunks):
        m = dmask[:, :p + n] if i % 2 else dmask[:, p:p + n]
        out = model(T(ids), T(mask), decoder_input_ids=T(dec[:, p:p + n]), decoder_attention_mask=T(m),
                    past_key_values=cache, use_cache=True)
        cache, p = out.past_key_values, p + n
        got.append(host(out.logits))
        assert isinstance(cache, DecoderKVCache) and cache.length == p
    assert rel(np.concatenate(got, axis=1), full) < 1e-12


def test_generate_cached_equals_uncached_and_follows_the_eos_rules():
    ids, mask, _, _ = batch(7)
    model = tiny(seed=0)                                             # eos 2 never the argmax here
    cached = model.generate(T(ids), T(mask), max_new_tokens=6)
    assert cached.dtype == np.int64 and cached.shape == (3, 7) and (cached[:, 0] == 2).all()
    assert np.array_equal(cached, model.generate(T(ids), T(mask), max_new_tokens=6, use_cache=False))
    assert (cached[:, -1] == 2).all() and not (cached[:, 1:-1] == 2).any()   # forced_eos_token_id, last step
    free = tiny(seed=0, forced_eos_token_id=None).generate(T(ids), T(mask), max_new_tokens=6)
    assert np.array_equal(free[:, :-1], cached[:, :-1]) and not (free[:, -1] == 2).any()
    # eos 12, which the rows reach at different steps: each continues with pad_token_id 1, and
    # decoding stops when the last row has emitted it, before max_new_tokens
    model = tiny(seed=0, eos_token_id=12, forced_eos_token_id=12)
    out = model.generate(T(ids), T(mask), max_new_tokens=8)
    assert np.array_equal(out, model.generate(T(ids), T(mask), max_new_tokens=8, use_cache=False))
    first = [int(np.flatnonzero(row == 12)[0]) for row in out]
    assert len(set(first)) == 3 and out.shape[1] == max(first) + 1 < 9
    for row, f in zip(out, first):
        assert (row[f + 1:] == 1).all()


def test_generate_restores_training_mode():
    model = tiny(seed=8).train()
    model.generate(T(batch(8)[0]), max_new_tokens=2)
    assert model.training and all(m.training for m in model.modules())


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("field", ["dropout", "attention_dropout", "activation_dropout"])
def test_each_dropout_acts_in_training_only(field):
    model = tiny(seed=9, **{field: 0.5})
    ids, mask, labels, dmask = batch(9)
    run = lambda: host(model(T(ids), T(mask), labels=T(labels), decoder_attention_mask=T(dmask)).logits)  # noqa: E731
    assert np.array_equal(run(), run())
    model.train()
    nf.manual_seed(0)
    a, b = run(), run()
    assert np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=np.array([[3, 19]])), r"input_ids \(1, 2\) must hold ids in \[0, vocab_size\) = \[0, 19\); got 19"),
    (dict(input_ids=np.array([3, 4])), r"input_ids must be integers of shape \(B, L\) with L >= 1; got int64 \(2,\)"),
    (dict(input_ids=np.array([[3.0, 4.0]])), r"input_ids must be integers"),
    (dict(input_ids=np.full((1, 13), 3)), r"input_ids needs 13 positions, more than max_position_embeddings = 12"),
    (dict(input_ids=np.full((1, 4), 3), decoder_input_ids=np.full((1, 13), 3)),
     r"decoder_input_ids needs 13 positions, more than max_position_embeddings = 12"),
    (dict(input_ids=np.full((2, 4), 3), attention_mask=np.ones((2, 5))),
     r"attention_mask must be 1/0 \(or bool\) of shape \(2, 4\); got float64 \(2, 5\)"),
    (dict(input_ids=np.full((2, 4), 3), decoder_input_ids=np.full((2, 3), 3), decoder_attention_mask=np.ones((2, 4))),
     r"decoder_attention_mask must be 1/0 \(or bool\) of shape \(2, 3\)"),
    (dict(input_ids=np.full((2, 4), 3), decoder_input_ids=np.full((3, 3), 3)),
     r"decoder_input_ids has batch size 3 but the source has 2"),
    (dict(input_ids=np.full((2, 4), 3), labels=np.array([[3, 4], [5, 25]])),
     r"labels \(2, 2\) must hold ids in \[0, vocab_size\) = \[0, 19\) or -100 \(ignored\); got 25"),
    (dict(input_ids=np.full((2, 4), 3), decoder_input_ids=np.full((2, 3), 3), labels=np.full((2, 4), 3)),
     r"labels must have the shape of decoder_input_ids \(B, T\) = \(2, 3\); got \(2, 4\)"),
    (dict(decoder_input_ids=np.full((2, 3), 3)), r"pass input_ids or encoder_outputs"),
    (dict(), r"pass decoder_input_ids"),
    (dict(encoder_outputs=np.zeros((2, 4, 6)), decoder_input_ids=np.full((2, 3), 3)),
     r"encoder_outputs must be float64 of shape \(B, S, d_model\) = \(B, S, 8\); got float64 \(2, 4, 6\)"),
    (dict(encoder_outputs=np.zeros((2, 4, 8), np.float32), decoder_input_ids=np.full((2, 3), 3)),
     r"encoder_outputs must be float64 .* got float32 \(2, 4, 8\)"),
    (dict(input_ids=np.full((2, 4), 3), decoder_input_ids=np.full((2, 1), 3), past_key_values=DecoderKVCache(3)),
     r"past_key_values must be a DecoderKVCache of 2 layers"),
    (dict(input_ids=np.full((2, 4), 3), decoder_input_ids=np.full((2, 1), 3), use_cache=1),
     r"use_cache must be True or False; got 1"),
])
def test_bad_inputs_raise_naming_the_input(kwargs, match):
    model = tiny(seed=10)
    with pytest.raises(ValueError, match=match) as info:
        model(**{k: v if isinstance(v, DecoderKVCache) or not isinstance(v, np.ndarray) else T(v)
                 for k, v in kwargs.items()})
    assert str(info.value).startswith("BartForConditionalGeneration: ")


def test_cache_and_generate_errors():
    model = tiny(seed=11)
    ids = T(np.full((2, 4), 3))
    out = model(ids, decoder_input_ids=T(np.full((2, 10), 3)), use_cache=True)
    with pytest.raises(ValueError, match=r"decoder_input_ids needs positions 10 .. 12 \(cached 10 \+ new 3\), more "
                                         r"than max_position_embeddings = 12"):
        model(ids, decoder_input_ids=T(np.full((2, 3), 3)), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match=r"past_key_values holds batch size 2; got 1"):
        model(T(np.full((1, 4), 3)), decoder_input_ids=T(np.full((1, 1), 3)), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match=r"past_key_values holds a source of length 4; got 5"):
        model(T(np.full((2, 5), 3)), decoder_input_ids=T(np.full((2, 1), 3)), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match=r"pass decoder_input_ids \(the new tokens with past_key_values"):
        model(ids, past_key_values=out.past_key_values)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"generate: max_new_tokens must be an int >= 0"):
            model.generate(ids, max_new_tokens=bad)
    with pytest.raises(ValueError, match=r"generate: 1 \+ max_new_tokens needs 13 positions"):
        model.generate(ids, max_new_tokens=12)
    with pytest.raises(ValueError, match=r"decoder_start_token_id and bos_token_id are both None"):
        tiny(decoder_start_token_id=None, bos_token_id=None).generate(ids, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"shift_tokens_right: config.pad_token_id"):
        tiny(pad_token_id=None)(ids)
    assert model.generate(ids, max_new_tokens=0).shape == (2, 1)
