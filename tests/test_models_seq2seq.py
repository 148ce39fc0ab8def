"""Seq2SeqTransformer: config validation, the embedding/positional composition, weight tying,
float64 gradient checks, the decoder KV cache against full decoding, greedy decoding, masks,
errors, and (verify) the whole model against torch.nn.Transformer with copied weights."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer import backend, nn
from npformer.models import DecoderKVCache, Seq2SeqConfig, Seq2SeqTransformer
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

SMALL = dict(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=12,
             dropout=0.0, max_len=12, pad_id=0)


def make(seed=0, dtype=np.float64, randomise=True, **kw):
    cfg = Seq2SeqConfig(**{**dict(src_vocab_size=13, tgt_vocab_size=11), **SMALL, **kw})
    model = Seq2SeqTransformer(cfg, generator=nf.random.Generator(seed), dtype=dtype, device=DEVICE)
    if randomise:     # N(0, 0.25) everywhere, so zero biases and unit LayerNorm weights hide nothing
        rng = np.random.default_rng(seed)
        for p in model.parameters():
            p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.5)
    return model


def tokens(rng, shape, vocab, pads=()):
    """Random non-pad ids (B, L); `pads` lists (row, start): that row is pad_id (0) from start on."""
    a = rng.integers(1, vocab, shape)
    for row, start in pads:
        a[row, start:] = 0
    return a


# ----------------------------------------------------------------------------- config and structure

@pytest.mark.parametrize("field,value", [
    ("src_vocab_size", 0), ("tgt_vocab_size", -3), ("d_model", 2.5), ("nhead", 0), ("num_encoder_layers", 0),
    ("num_decoder_layers", True), ("dim_feedforward", 0), ("max_len", 0), ("dropout", 1.0), ("dropout", -0.1),
    ("pad_id", 11), ("pad_id", -1), ("norm_first", 1), ("activation", "tanh"), ("layer_norm_eps", 0.0)])
def test_config_rejects_bad_fields_naming_them(field, value):
    with pytest.raises(ValueError, match=f"Seq2SeqConfig.{field} "):
        Seq2SeqConfig(**{**dict(src_vocab_size=13, tgt_vocab_size=11), **SMALL, field: value})


def test_config_cross_field_errors():
    with pytest.raises(ValueError, match=r"d_model \(8\) must be divisible by nhead \(3\)"):
        Seq2SeqConfig(13, 11, d_model=8, nhead=3)
    with pytest.raises(ValueError, match="share_embeddings needs src_vocab_size == tgt_vocab_size; got 13 and 11"):
        Seq2SeqConfig(13, 11, share_embeddings=True)
    cfg = Seq2SeqConfig(13, 11)
    assert cfg.to_dict()["norm_first"] is False and dataclasses.replace(cfg, max_len=5).max_len == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 4


def test_forward_shapes_dtype_and_parameter_names():
    rng = np.random.default_rng(0)
    model = make(dtype=np.float32, randomise=False)
    src, tgt = tokens(rng, (3, 7), 13, [(0, 4)]), tokens(rng, (3, 5), 11)
    logits = model(T(src), T(tgt))
    assert logits.shape == (3, 5, 11) and logits.dtype == np.float32
    assert model.encode(T(src)).shape == (3, 7, 8)
    names = list(model.state_dict())
    assert names[:3] == ["src_embed.weight", "tgt_embed.weight", "pos_encoding.pe"]
    assert names[3].startswith("transformer.encoder.layers.0.") and names[-2:] == ["output_proj.weight",
                                                                                  "output_proj.bias"]
    # Embeddings start N(0, 1/d_model): scaled by sqrt(d_model) they have about unit variance.
    emb = host(model.src_embed.weight) * math.sqrt(8)
    assert 0.5 < emb.std() < 1.5


def test_embeddings_are_scaled_and_positioned_then_fed_to_the_transformer():
    """encode/decode == nn.Transformer stacks on E[x] * sqrt(d_model) + PE with explicit masks."""
    rng = np.random.default_rng(1)
    model = make(1)
    src, tgt = tokens(rng, (2, 6), 13, [(1, 3)]), tokens(rng, (2, 4), 11, [(0, 3)])
    E_s, E_t, pe = host(model.src_embed.weight), host(model.tgt_embed.weight), host(model.pos_encoding.pe)
    xs = T(E_s[src] * math.sqrt(8) + pe[:6])
    xt = T(E_t[tgt] * math.sqrt(8) + pe[:4])
    spad, tpad = T(src == 0), T(tgt == 0)
    causal = nn.Transformer.generate_square_subsequent_mask(4, DEVICE, np.float64)
    h = model.transformer(xs, xt, tgt_mask=causal, src_key_padding_mask=spad, tgt_key_padding_mask=tpad,
                          memory_key_padding_mask=spad)
    want = host(h) @ host(model.output_proj.weight).T + host(model.output_proj.bias)
    np.testing.assert_allclose(host(model(T(src), T(tgt))), want, rtol=1e-12, atol=1e-12)
    mem = model.transformer.encoder(xs, src_key_padding_mask=spad)
    np.testing.assert_allclose(host(model.encode(T(src))), host(mem), rtol=1e-12, atol=1e-12)


def test_shared_and_tied_embeddings_are_one_parameter():
    shared = make(randomise=False, tgt_vocab_size=13, share_embeddings=True, tie_output=True)
    assert shared.src_embed.weight is shared.tgt_embed.weight is shared.output_proj.weight
    untied = make(randomise=False, tgt_vocab_size=13)
    assert untied.num_parameters() - shared.num_parameters() == 2 * 13 * 8
    tied = make(randomise=False, tie_output=True)
    assert tied.output_proj.weight is tied.tgt_embed.weight and tied.src_embed.weight is not tied.tgt_embed.weight
    assert "output_proj.weight" in tied.state_dict()       # saved under every name, as torch


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("kw", [dict(), dict(norm_first=True, activation="gelu", tgt_vocab_size=13,
                                             share_embeddings=True, tie_output=True)])
def test_gradcheck_every_parameter_in_random_directions(kw):
    rng = np.random.default_rng(2)
    model = make(2, num_encoder_layers=1, num_decoder_layers=1, **kw)
    src, tgt = T(tokens(rng, (2, 5), 13, [(1, 3)])), T(tokens(rng, (2, 4), 11, [(0, 3)]))
    assert gradcheck_module(model, [src, tgt], directions=2)


def test_tied_weight_gets_all_three_gradient_contributions():
    rng = np.random.default_rng(3)
    model = make(3, tgt_vocab_size=13, share_embeddings=True, tie_output=True)
    src, tgt = T(tokens(rng, (2, 5), 13)), T(tokens(rng, (2, 4), 13))
    cot = rng.standard_normal((2, 4, 13))
    (model(src, tgt) * T(cot)).sum().backward()
    g = host(model.src_embed.weight.grad)
    # Numerically along one direction of the shared table only.
    u = rng.standard_normal(g.shape)
    w0 = model.src_embed.weight.data.copy()
    vals = []
    for s in (1e-6, -1e-6):
        model.src_embed.weight.data = w0 + model.src_embed.weight.xp.asarray(s * u)
        with nf.no_grad():
            vals.append(float((host(model(src, tgt)) * cot).sum()))
    model.src_embed.weight.data = w0
    np.testing.assert_allclose((g * u).sum(), (vals[0] - vals[1]) / 2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- incremental decoding

def cached_logits(model, src, tgt, chunks):
    """decode chunk by chunk with one DecoderKVCache; returns host logits (B, T, V) and the cache."""
    memory, pad = model.encode(T(src)), model.pad_mask(T(src))
    cache, out, start = model.new_cache(), [], 0
    for n in chunks:
        out.append(host(model.decode(T(tgt[:, start:start + n]), memory, pad, cache)))
        start += n
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 6, [3, 1, 2]])
def test_cache_equals_full_decoding(norm_first, chunks):
    rng = np.random.default_rng(4)
    model = make(4, norm_first=norm_first).eval()
    src, tgt = tokens(rng, (3, 7), 13, [(0, 4), (2, 6)]), tokens(rng, (3, 6), 11, [(1, 4)])
    full = host(model(T(src), T(tgt)))
    got, cache = cached_logits(model, src, tgt, chunks)
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-12)
    assert isinstance(cache, DecoderKVCache) and cache.length == 6
    assert cache.self_k[1].shape == (3, 2, 6, 4) and cache.cross_v[0].shape == (3, 2, 7, 4)


@settings(max_examples=8)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=5), st.integers(1, 6), st.integers(0, 2 ** 16))
def test_cache_equals_full_decoding_for_drawn_chunks_and_padding(chunks, src_len, seed):
    rng = np.random.default_rng(seed)
    model = make(5)
    T_len = sum(chunks)
    if T_len > SMALL["max_len"]:
        chunks, T_len = chunks[:1], chunks[0]
    src = tokens(rng, (2, 6), 13, [(0, src_len)])                 # row 0 has src_len real tokens
    tgt = tokens(rng, (2, T_len), 11, [(1, max(1, T_len - 1))])
    got, _ = cached_logits(model, src, tgt, chunks)
    np.testing.assert_allclose(got, host(model(T(src), T(tgt))), rtol=0, atol=1e-12)


def test_greedy_decode_with_and_without_cache_and_eos():
    rng = np.random.default_rng(6)
    model = make(3, randomise=False).train()          # default init: varied tokens, no early pad_id
    src = tokens(rng, (4, 6), 13, [(1, 2)])
    ys = model.greedy_decode(T(src), bos_id=1, max_new_tokens=8)
    assert ys.shape == (4, 9) and ys.dtype == np.int64 and (ys[:, 0] == 1).all()
    np.testing.assert_array_equal(model.greedy_decode(T(src), 1, 8, use_cache=False), ys)
    assert model.training                                            # the mode is restored
    # Each emitted token is the argmax of the full forward on the prefix before it.
    logits = host(model.eval()(T(src), T(ys[:, :-1])))
    np.testing.assert_array_equal(logits.argmax(-1), ys[:, 1:])
    # With eos_id: the same tokens up to each row's first eos, pad_id after it, and an early stop.
    eos = min(set.intersection(*(set(row[1:].tolist()) for row in ys)))   # a token every row emits
    want = ys.copy()
    steps = []
    for row in want:
        hit = np.flatnonzero(row[1:] == eos)
        steps.append(hit[0] + 1 if hit.size else 8)
        if hit.size:
            row[hit[0] + 2:] = 0
    assert max(steps) < 8                                             # so decoding stops early
    np.testing.assert_array_equal(model.greedy_decode(T(src), 1, 8, eos_id=eos), want[:, :1 + max(steps)])


# ----------------------------------------------------------------------------- masks

def test_source_padding_is_invisible():
    rng = np.random.default_rng(7)
    model = make(7)
    src = tokens(rng, (2, 6), 13, [(0, 4)])
    tgt = tokens(rng, (2, 5), 11)
    both = host(model(T(src), T(tgt)))
    alone = host(model(T(src[:1, :4]), T(tgt[:1])))                  # row 0 without its padding
    np.testing.assert_allclose(both[0], alone[0], rtol=0, atol=1e-12)
    # With the mask held fixed, the tokens under it do not matter at all.
    mask = T(src == 0)
    other = src.copy()
    other[0, 4:] = [5, 9]
    mem_a, mem_b = model.encode(T(src), mask), model.encode(T(other), mask)
    np.testing.assert_allclose(host(model.decode(T(tgt), mem_b, mask)), host(model.decode(T(tgt), mem_a, mask)),
                               rtol=0, atol=1e-12)
    assert not np.allclose(host(mem_a)[0, 4:], host(mem_b)[0, 4:])   # the padded rows did change
    # Unmasked, the same change does reach the logits.
    assert not np.allclose(host(model.decode(T(tgt), mem_b, None)), host(model.decode(T(tgt), mem_a, None)))


def test_future_target_tokens_do_not_change_earlier_logits():
    rng = np.random.default_rng(8)
    model = make(8)
    src, tgt = tokens(rng, (2, 6), 13), tokens(rng, (2, 5), 11)
    base = host(model(T(src), T(tgt)))
    for j in range(1, 5):
        changed = tgt.copy()
        changed[:, j] = changed[:, j] % 10 + 1                     # another non-pad token
        y = host(model(T(src), T(changed)))
        np.testing.assert_allclose(y[:, :j], base[:, :j], rtol=0, atol=1e-12)
        assert not np.allclose(y[:, j], base[:, j])


def test_target_padding_keys_are_masked():
    """A pad token in tgt_in is never attended to: a later query equals the one with the pad removed
    from its keys, i.e. replacing the pad's embedding changes nothing after it."""
    rng = np.random.default_rng(9)
    model = make(9)
    src, tgt = tokens(rng, (1, 6), 13), tokens(rng, (1, 5), 11)
    with_pad = tgt.copy()
    with_pad[0, 2] = 0
    a = host(model(T(src), T(with_pad)))
    model.tgt_embed.weight.data[0] += 1.0                           # move the pad embedding
    b = host(model(T(src), T(with_pad)))
    np.testing.assert_allclose(b[0, 3:], a[0, 3:], rtol=0, atol=1e-12)
    assert not np.allclose(b[0, 2], a[0, 2])                         # the pad query itself does change


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_lengths_and_inputs():
    rng = np.random.default_rng(10)
    model = make(10, randomise=False)
    ok_src, ok_tgt = T(tokens(rng, (2, 5), 13)), T(tokens(rng, (2, 4), 11))
    with pytest.raises(ValueError, match="src length 13 exceeds max_len 12"):
        model(T(tokens(rng, (2, 13), 13)), ok_tgt)
    with pytest.raises(ValueError, match="tgt_in length 14 exceeds max_len 12"):
        model(ok_src, T(tokens(rng, (2, 14), 11)))
    mem, pad = model.encode(ok_src), model.pad_mask(ok_src)
    cache = model.new_cache()
    model.decode(T(tokens(rng, (2, 10), 11)), mem, pad, cache)
    with pytest.raises(ValueError, match=r"tgt_in \(cached 10 \+ new 3\) length 13 exceeds max_len 12"):
        model.decode(T(tokens(rng, (2, 3), 11)), mem, pad, cache)
    with pytest.raises(ValueError, match=r"memory has length 3 but the cache holds 5"):
        model.decode(T(tokens(rng, (2, 1), 11)), model.encode(T(tokens(rng, (2, 3), 13))), None, cache)
    with pytest.raises(ValueError, match=r"tgt_in holds token ids outside \[0, 11\): min 1, max 11"):
        model(ok_src, T(np.array([[1, 11], [2, 3]])))
    with pytest.raises(ValueError, match=r"src must be \(B, L\) integer token ids; got shape \(5,\)"):
        model(T(np.arange(5)), ok_tgt)
    with pytest.raises(ValueError, match=r"src must be \(B, L\) integer token ids; got shape \(2, 5\) and dtype float"):
        model(T(np.ones((2, 5))), ok_tgt)
    with pytest.raises(ValueError, match=r"memory \(2, 5, 8\) must be \(B, S, d_model\) with B = 3"):
        model.decode(T(tokens(rng, (3, 4), 11)), mem, pad)
    with pytest.raises(ValueError, match=r"src_pad_mask must be bool \(B, S\) = \(2, 5\); got bool \(2, 4\)"):
        model.decode(ok_tgt, mem, T(np.zeros((2, 4), bool)))
    with pytest.raises(ValueError, match=r"src_pad_mask must be bool of shape \(2, 5\)"):
        model.encode(ok_src, T(np.zeros((2, 5))))
    with pytest.raises(ValueError, match="1 \\+ max_new_tokens = 13 exceeds max_len 12"):
        model.greedy_decode(ok_src, 1, 12)
    if backend.gpu_available() and DEVICE == "cpu":
        with pytest.raises(backend.DeviceMismatchError, match="src is on gpu but the model is on cpu"):
            model(backend.to_device(ok_src.data, "gpu"), ok_tgt)


# ----------------------------------------------------------------------------- PyTorch

@pytest.mark.verify
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_matches_torch_transformer_with_copied_weights(norm_first, activation):
    """Logits and every parameter's gradient equal a torch model built from torch.nn.Transformer."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    model = make(11, norm_first=norm_first, activation=activation)
    d, f64 = 8, torch.float64

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.src_embed = torch.nn.Embedding(13, d, dtype=f64)
            self.tgt_embed = torch.nn.Embedding(11, d, dtype=f64)
            self.pos_encoding = torch.nn.Module()
            self.pos_encoding.register_buffer("pe", torch.zeros(12, d, dtype=f64))
            self.transformer = torch.nn.Transformer(d, 2, 2, 2, 12, dropout=0.0, activation=activation,
                                                    batch_first=True, norm_first=norm_first, dtype=f64)
            self.output_proj = torch.nn.Linear(d, 11, dtype=f64)

        def forward(self, src, tgt):
            S, L = src.shape[1], tgt.shape[1]
            xs = self.src_embed(src) * math.sqrt(d) + self.pos_encoding.pe[:S]
            xt = self.tgt_embed(tgt) * math.sqrt(d) + self.pos_encoding.pe[:L]
            causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)          # True = masked out
            h = self.transformer(xs, xt, tgt_mask=causal, src_key_padding_mask=src == 0,
                                 tgt_key_padding_mask=tgt == 0, memory_key_padding_mask=src == 0)
            return self.output_proj(h)

    twin = Twin()
    assert list(twin.state_dict()) == list(model.state_dict())
    twin.load_state_dict({k: torch.tensor(host(v)) for k, v in model.state_dict().items()})
    src, tgt = tokens(rng, (3, 7), 13, [(0, 4), (2, 5)]), tokens(rng, (3, 6), 11, [(1, 4)])
    cot = rng.standard_normal((3, 6, 11))
    ours = model(T(src), T(tgt))
    (ours * T(cot)).sum().backward()
    theirs = twin(torch.tensor(src), torch.tensor(tgt))
    (theirs * torch.tensor(cot)).sum().backward()

    def rel(a, b):
        return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)

    assert rel(host(ours), theirs.detach().numpy()) < 1e-9
    tparams = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert rel(host(p.grad), tparams[name].grad.numpy()) < 1e-9, name
