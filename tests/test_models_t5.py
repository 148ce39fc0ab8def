"""T5 (npformer/models/t5.py) without torch: config checks, HF's parameter names, HF's initialisation, the
tied embedding's gradients from all three uses, the loss and the label shift against formulas, numeric
gradient checks in float64, the KV cache against the full pass, padding, greedy generation, and clear
errors. The comparisons with HF transformers are in test_interop_t5.py.
"""

import numpy as np
import pytest

import npformer as nf
from npformer.models.seq2seq import DecoderKVCache
from npformer.models.t5 import T5Config, T5ForConditionalGeneration, T5Model
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

TINY = dict(vocab_size=16, d_model=8, d_kv=3, d_ff=10, num_layers=2, num_decoder_layers=3, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0)


def tiny(cls=T5ForConditionalGeneration, seed=0, scale=0.5, **overrides):
    """A float64 model with every parameter from N(0, scale^2) (T5's init would hide mistakes)."""
    model = cls(T5Config(**{**TINY, **overrides}), dtype=np.float64, device=DEVICE)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * scale)
    return model


def batch(seed=0):
    """(input_ids, attention_mask, labels): sources of 6, 4 and 2 tokens right-padded with 0, targets of 5,
    3 and 4 tokens, -100 after; ids from 2 (0 pad, 1 eos)."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(6)[None] < np.array([6, 4, 2])[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(2, 16, (3, 6)), 0)
    labels = np.where(np.arange(5)[None] < np.array([5, 3, 4])[:, None], rng.integers(1, 16, (3, 5)), -100)
    return ids, mask, labels


def shifted(labels):
    """HF's _shift_right by hand: start token 0, then the labels, -100 read as pad 0."""
    return np.maximum(np.concatenate([np.zeros((len(labels), 1), np.int64), labels[:, :-1]], axis=1), 0)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,match", [
    ("vocab_size", 0, "T5Config.vocab_size must be a positive integer; got 0"),
    ("d_kv", 2.5, "T5Config.d_kv must be a positive integer"),
    ("num_decoder_layers", -1, "T5Config.num_decoder_layers must be a positive integer"),
    ("relative_attention_num_buckets", 3, r"relative_attention_num_buckets must be >= 4 .* got 3 and 128"),
    ("relative_attention_max_distance", 16, r"relative_attention_max_distance > relative_attention_num_buckets // 2 "
                                            r".*got 32 and 16"),
    ("dropout_rate", 1.0, r"T5Config.dropout_rate must be in \[0, 1\); got 1.0"),
    ("layer_norm_epsilon", 0.0, "T5Config.layer_norm_epsilon must be a finite number > 0"),
    ("initializer_factor", float("inf"), "T5Config.initializer_factor must be a finite number > 0"),
    ("feed_forward_proj", "gated-silu", "T5Config.feed_forward_proj must be one of 'relu', 'gated-gelu'; got "
                                        "'gated-silu'"),
    ("tie_word_embeddings", "yes", "T5Config.tie_word_embeddings must be True or False"),
    ("scale_decoder_outputs", 1, "T5Config.scale_decoder_outputs must be True or False"),
    ("pad_token_id", 32128, r"T5Config.pad_token_id must be None or an int in \[0, vocab_size\) = \[0, 32128\)"),
    ("decoder_start_token_id", -1, r"T5Config.decoder_start_token_id must be None or an int in \[0, vocab_size\)"),
    ("eos_token_id", True, r"T5Config.eos_token_id must be None or an int"),
])
def test_config_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        T5Config(**{field: value})


def test_config_defaults_are_t5_small_and_resolve_as_hf():
    c = T5Config()
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_heads) == (32128, 512, 64, 2048, 6, 8)
    assert (c.num_decoder_layers, c.scale_decoder_outputs, c.feed_forward_proj, c.layer_norm_epsilon) == \
        (6, True, "relu", 1e-6)
    assert (c.pad_token_id, c.eos_token_id, c.decoder_start_token_id) == (0, 1, 0)
    untied = T5Config(tie_word_embeddings=False, num_layers=3)
    assert untied.scale_decoder_outputs is False and untied.num_decoder_layers == 3
    assert T5Config(**c.to_dict()) == c and T5Config(**untied.to_dict()) == untied
    with pytest.raises(TypeError, match="config must be a T5Config; got dict"):
        T5ForConditionalGeneration(dict(TINY))


# ----------------------------------------------------------------------------- names and initialisation

def _hf_names(ff):
    attn = ["q", "k", "v", "o"]
    dense = ["wi_0", "wi_1", "wo"] if ff == "gated-gelu" else ["wi", "wo"]
    out = ["shared.weight", "encoder.embed_tokens.weight"]
    for i in range(2):
        b = f"encoder.block.{i}.layer"
        out += [f"{b}.0.SelfAttention.{m}.weight" for m in attn + ["relative_attention_bias"] * (i == 0)]
        out += [f"{b}.0.layer_norm.weight"] + [f"{b}.1.DenseReluDense.{m}.weight" for m in dense]
        out += [f"{b}.1.layer_norm.weight"]
    out += ["encoder.final_layer_norm.weight", "decoder.embed_tokens.weight"]
    for i in range(3):
        b = f"decoder.block.{i}.layer"
        out += [f"{b}.0.SelfAttention.{m}.weight" for m in attn + ["relative_attention_bias"] * (i == 0)]
        out += [f"{b}.0.layer_norm.weight"] + [f"{b}.1.EncDecAttention.{m}.weight" for m in attn]
        out += [f"{b}.1.layer_norm.weight"] + [f"{b}.2.DenseReluDense.{m}.weight" for m in dense]
        out += [f"{b}.2.layer_norm.weight"]
    return out + ["decoder.final_layer_norm.weight", "lm_head.weight"]


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_parameter_names_are_hf_names_and_the_embedding_is_shared(ff):
    """HF's state dict: the embedding under shared, both embed_tokens and (tied) lm_head; the relative
    position table in block 0 of each stack only."""
    model = T5ForConditionalGeneration(T5Config(**TINY, feed_forward_proj=ff))
    assert list(model.state_dict()) == _hf_names(ff)
    params = dict(model.named_parameters())
    assert "lm_head.weight" not in params and "encoder.embed_tokens.weight" not in params
    assert model.lm_head.weight is model.shared.weight is model.encoder.embed_tokens.weight
    assert params["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (8, 2)
    untied = T5ForConditionalGeneration(T5Config(**TINY, feed_forward_proj=ff, tie_word_embeddings=False))
    assert "lm_head.weight" in dict(untied.named_parameters()) and untied.lm_head.weight is not untied.shared.weight
    assert list(T5Model(T5Config(**TINY, feed_forward_proj=ff)).state_dict()) == _hf_names(ff)[:-1]


def test_initialisation_is_hfs_seeded_and_leaves_the_global_generator_alone():
    c = T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=1, num_heads=4, initializer_factor=0.5,
                 tie_word_embeddings=False, feed_forward_proj="gated-gelu")
    state = nf.random.default_generator("cpu").bit_generator.state
    m = T5ForConditionalGeneration(c, generator=np.random.default_rng(3))
    assert nf.random.default_generator("cpu").bit_generator.state == state
    want = {"shared": 1.0, "lm_head": 1.0, "wi_0": 64 ** -0.5, "wi_1": 64 ** -0.5, "wo": 96 ** -0.5,
            "q": (64 * 16) ** -0.5, "k": 64 ** -0.5, "v": 64 ** -0.5, "o": 64 ** -0.5,
            "relative_attention_bias": 64 ** -0.5}
    for name, p in m.named_parameters():
        a, owner = host(p), name.split(".")[-2]
        if owner in want:
            assert abs(a.std() / (0.5 * want[owner]) - 1) < 0.25, name
        else:
            assert (a == 0.5).all(), name                                 # layer norms: initializer_factor
    again = T5ForConditionalGeneration(c, generator=np.random.default_rng(3))
    assert all(np.array_equal(host(a), host(b)) for a, b in zip(m.parameters(), again.parameters()))
    assert m.parameters()[0].dtype == np.float32                         # npformer's default dtype
    assert T5Model(c, dtype=np.float64).parameters()[0].dtype == np.float64


def test_tied_embedding_gets_the_gradient_of_all_three_uses():
    """shared.weight is read by the encoder, the decoder and lm_head: its gradient is the sum (not lost, not
    doubled), that of an untied copy with the same weights (and the same scaling) split in two."""
    tied = tiny(seed=1)
    untied = tiny(seed=1, tie_word_embeddings=False, scale_decoder_outputs=True)
    untied.load_state_dict(tied.state_dict())
    ids, mask, labels = batch(1)
    losses = [m(T(ids), T(mask), labels=T(labels)).loss for m in (tied, untied)]
    assert abs(float(host(losses[0])) - float(host(losses[1]))) < 1e-14
    for loss in losses:
        loss.backward()
    both = host(untied.shared.weight.grad) + host(untied.lm_head.weight.grad)
    assert rel(host(tied.shared.weight.grad), both) < 1e-13
    assert rel(host(untied.shared.weight.grad), both) > 1e-3             # the head's part is not negligible


# ----------------------------------------------------------------------------- loss and gradients

def test_loss_ignores_minus_100_and_labels_shift_right():
    model = tiny(seed=2)
    ids, mask, labels = batch(2)
    out = model(T(ids), T(mask), labels=T(labels))
    explicit = model(T(ids), T(mask), T(shifted(labels)))
    assert rel(host(out.logits), host(explicit.logits)) == 0.0
    lp = log_softmax(host(out.logits))
    keep = labels != -100
    want = -np.mean(lp[keep, labels[keep]])
    assert abs(float(host(out.loss)) - want) < 1e-13
    assert explicit.loss is None and out.past_key_values is None
    assert host(out.encoder_last_hidden_state).shape == (3, 6, 8)
    no_start = tiny(decoder_start_token_id=None)
    with pytest.raises(ValueError, match="labels without decoder_input_ids need config.decoder_start_token_id"):
        no_start(T(ids), labels=T(labels))


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_gradients_match_central_differences(ff):
    """Every parameter, the relative bias tables (read by every block of their stack) among them, through
    padding on both sides; the tied embedding's three uses too."""
    model = tiny(seed=3, feed_forward_proj=ff, num_layers=2, num_decoder_layers=2, d_model=4, d_ff=6)
    ids, mask, labels = batch(3)
    dmask = (labels != -100).astype(np.int64)

    class Call(nf.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            out = self.model(T(ids), T(mask), T(shifted(labels)), T(dmask), labels=T(labels))
            return out.loss, out.logits
    gradcheck_module(Call(), [], directions=3, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- KV cache, padding, generation

def test_cached_decoding_equals_the_full_pass():
    """Two tokens, then one at a time: the relative bias at the query offset, the causal mask shifted by
    the cache, the cache's padding kept, and the cross keys and values projected once (the same arrays
    every step). decoder_attention_mask as HF's (B, P + T), or (B, T) for the new tokens only."""
    model = tiny(seed=4).eval()
    ids, mask, labels = batch(4)
    dec = shifted(labels)
    dmask = np.ones_like(dec)
    dmask[2, 1] = dmask[1, 4] = 0                                         # pads in the cached part and the last step
    full = host(model(T(ids), T(mask), T(dec), T(dmask)).logits)         # (3, 5, V)
    with nf.no_grad():
        out = model(T(ids), T(mask), T(dec[:, :2]), T(dmask[:, :2]), use_cache=True)
        cache, h = out.past_key_values, out.encoder_last_hidden_state
        assert isinstance(cache, DecoderKVCache) and cache.length == 2
        steps = [host(out.logits)]
        for t in range(2, 5):
            cross = list(cache.cross_k)
            m = dmask[:, t:t + 1] if t == 3 else dmask[:, :t + 1]
            out = model(attention_mask=T(mask), decoder_input_ids=T(dec[:, t:t + 1]), decoder_attention_mask=T(m),
                        encoder_outputs=h, past_key_values=cache)
            assert out.past_key_values is cache and all(a is b for a, b in zip(cache.cross_k, cross))
            steps.append(host(out.logits))
    assert cache.length == 5 and cache.self_k[0].shape == (3, 2, 5, 3) and cache.cross_k[2].shape == (3, 2, 6, 3)
    np.testing.assert_array_equal(host(cache.tgt_pad), dmask == 0)
    assert rel(np.concatenate(steps, axis=1), full) < 1e-13


def test_padding_contents_do_not_matter_and_a_row_alone_is_the_same():
    model = tiny(seed=5)
    ids, mask, labels = batch(5)
    dec = shifted(labels)
    dmask = (np.arange(5)[None] < np.array([5, 4, 5])[:, None]).astype(np.int64)   # targets of 5, 3, 4 (+ start)
    logits = host(model(T(ids), T(mask), T(dec), T(dmask)).logits)
    other, other_dec = np.where(mask == 1, ids, 7), np.where(dmask == 1, dec, 9)
    again = host(model(T(other), T(mask), T(other_dec), T(dmask)).logits)
    assert rel(again[dmask == 1], logits[dmask == 1]) < 1e-13
    for b, (n, m) in enumerate([(6, 5), (4, 4), (2, 5)]):
        alone = host(model(T(ids[b:b + 1, :n]), decoder_input_ids=T(dec[b:b + 1, :m])).logits)[0]
        assert rel(alone, logits[b, :m]) < 1e-13
    unmasked = host(model(T(ids), decoder_input_ids=T(dec)).logits)
    assert rel(unmasked[1], logits[1]) > 1e-3                             # the source mask did something


def test_generate_cached_equals_uncached_and_pads_after_eos():
    model = tiny(seed=6, eos_token_id=3).train()
    ids, mask, _ = batch(6)
    got = model.generate(T(ids), T(mask), max_new_tokens=8)
    assert model.training                                                 # the mode is put back
    assert got.dtype == np.int64 and got.shape[0] == 3 and 2 <= got.shape[1] <= 9 and (got[:, 0] == 0).all()
    np.testing.assert_array_equal(model.generate(T(ids), T(mask), max_new_tokens=8, use_cache=False), got)
    with nf.no_grad():                                                    # each token is the argmax of the full pass
        logits = host(model.eval()(T(ids), T(mask), T(got[:, :-1])).logits)
    for b in range(3):
        ended = np.flatnonzero(got[b, 1:] == 3)
        n = ended[0] + 1 if ended.size else got.shape[1] - 1
        np.testing.assert_array_equal(got[b, 1:n + 1], logits[b, :n].argmax(-1))
        assert (got[b, n + 1:] == 0).all()
    assert model.generate(T(ids), T(mask), max_new_tokens=0).tolist() == [[0], [0], [0]]


def test_dropout_is_active_in_training_only():
    model = tiny(seed=7, dropout_rate=0.3)
    ids, mask, labels = batch(7)
    run = lambda: host(model(T(ids), T(mask), labels=T(labels)).logits)          # noqa: E731
    assert rel(run(), run()) > 1e-6
    model.eval()
    assert np.array_equal(run(), run())


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input_ids=np.array([[1, 16]])), ValueError,
     r"T5 encoder: input_ids \(1, 2\) holds values outside \[0, vocab_size\) = \[0, 16\): min 1, max 16"),
    (dict(decoder_input_ids=np.array([[0, -1]])), ValueError,
     r"T5 decoder: decoder_input_ids \(1, 2\) holds values outside \[0, vocab_size\) = \[0, 16\)"),
    (dict(input_ids=np.ones(4, np.int64)), ValueError, r"input_ids must be integers of shape \(B, T\)"),
    (dict(decoder_input_ids=np.ones((1, 2))), ValueError, r"decoder_input_ids must be integers .*float64"),
    (dict(attention_mask=np.ones((1, 3))), ValueError,
     r"T5 encoder: attention_mask must be 1/0 \(or bool\) of shape \(B, S\) = \(1, 4\); got float64 \(1, 3\)"),
    (dict(decoder_attention_mask=np.ones((1, 3), np.int64)), ValueError,
     r"T5 decoder: decoder_attention_mask must be 1/0 \(or bool\) of shape \(B, S\) = \(1, 2\) \(past \+ new"),
    (dict(labels=np.array([[2, 16]])), ValueError, r"labels must be in \[0, vocab_size\) = \[0, 16\) or -100 .*got 16"),
    (dict(labels=np.array([[2, 3, 4]])), ValueError, r"labels must be integers of shape \(B, T\) = \(1, 2\)"),
    (dict(inputs_embeds=np.zeros((1, 4, 8))), ValueError,
     "T5 encoder: pass exactly one of input_ids and inputs_embeds"),
    (dict(decoder_input_ids=None), ValueError, "T5 decoder: pass exactly one of decoder_input_ids and "),
    (dict(input_ids=None, encoder_outputs=np.zeros((1, 4, 5))), ValueError,
     r"encoder_outputs must be \(B, S, d_model\) = \(B, S, 8\) in float64.*got float64 \(1, 4, 5\)"),
    (dict(input_ids=None, encoder_outputs=np.zeros((2, 4, 8))), ValueError,
     r"T5 decoder: encoder_hidden_states \(B, S, d_model\) with B = 1 are needed; got \(2, 4, 8\)"),
    (dict(past_key_values=((None,) * 4,) * 3), ValueError, r"T5 decoder: past_key_values must be a DecoderKVCache "
                                                          r"of 3 layers \(the past_key_values of an earlier call\)"),
    (dict(use_cache="yes"), ValueError, "use_cache must be True or False"),
])
def test_bad_inputs_name_the_argument_and_shape(kwargs, error, match):
    model = tiny()
    args = {"input_ids": np.ones((1, 4), np.int64), "decoder_input_ids": np.zeros((1, 2), np.int64), **kwargs}
    with pytest.raises(error, match=match):
        model(**{k: v if v is None or isinstance(v, tuple) else T(v) for k, v in args.items()})


def test_encoder_refuses_a_cache_and_a_cache_of_another_batch_is_refused():
    model = tiny()
    ids, mask, labels = batch(8)
    with nf.no_grad():
        cache = model(T(ids), T(mask), T(shifted(labels)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"T5 decoder: past_key_values holds batch size 3; got 1"):
        model(T(ids[:1]), T(mask[:1]), T(np.zeros((1, 1), np.int64)), past_key_values=cache)
    with pytest.raises(ValueError, match=r"T5 decoder: past_key_values holds a source of length 6; got 4"):
        model(T(ids[:, :4]), T(mask[:, :4]), T(np.zeros((3, 1), np.int64)), past_key_values=cache)
    with pytest.raises(ValueError, match="T5 encoder: use_cache must be True or False, and a cache is for the "
                                         "decoder only"):
        model.encoder(T(np.ones((1, 3), np.int64)), use_cache=True)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(T(np.ones((1, 3), np.int64)), max_new_tokens=-1)
