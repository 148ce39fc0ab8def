"""Transformer layers and stacks: structure and names, the post-/pre-LN formulas, float64 gradient
checks, causality, masks, dropout modes and errors."""

import math

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

F64 = dict(dtype=np.float64, device=DEVICE)


def randomise(module, seed):
    """Draw every parameter from N(0, 0.25), so zero biases and unit LayerNorm weights hide nothing."""
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.5)
    return module


def enc_layer(norm_first=False, activation="relu", seed=0, **kw):
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, activation=activation,
                                       norm_first=norm_first, generator=nf.random.Generator(seed), **F64, **kw)
    return randomise(layer, seed)


def dec_layer(norm_first=False, activation="relu", seed=0, **kw):
    layer = nn.TransformerDecoderLayer(4, 2, dim_feedforward=6, dropout=0.0, activation=activation,
                                       norm_first=norm_first, generator=nf.random.Generator(seed), **F64, **kw)
    return randomise(layer, seed)


def test_parameter_names_follow_torch():
    names = [n for n, _ in nn.Transformer(4, 2, 1, 1, 6, **F64).named_parameters()]
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    ff = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    norms = lambda k: [f"norm{i}.{w}" for i in range(1, k + 1) for w in ("weight", "bias")]
    enc = [f"encoder.layers.0.{n}" for n in [f"self_attn.{a}" for a in attn] + ff + norms(2)]
    dec = [f"decoder.layers.0.{n}" for n in [f"self_attn.{a}" for a in attn] + [f"multihead_attn.{a}" for a in attn]
           + ff + norms(3)]
    assert names == enc + ["encoder.norm.weight", "encoder.norm.bias"] + dec + ["decoder.norm.weight",
                                                                                 "decoder.norm.bias"]
    no_bias = [n for n, _ in nn.TransformerEncoderLayer(4, 2, 6, bias=False, **F64).named_parameters()]
    assert no_bias == ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                       "linear2.weight", "norm1.weight", "norm2.weight"]


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_is_the_residual_layer_norm_formula(norm_first):
    rng = np.random.default_rng(1)
    layer = enc_layer(norm_first, activation="gelu")
    x = T(rng.standard_normal((2, 3, 4)))
    n1 = lambda z: _ln(z, host(layer.norm1.weight), host(layer.norm1.bias))
    n2 = lambda z: _ln(z, host(layer.norm2.weight), host(layer.norm2.bias))
    sa = lambda z: host(layer.self_attn(T(z), T(z), T(z))[0])
    ff = lambda z: host(layer.linear2(nn.GELU()(layer.linear1(T(z)))))
    xh = host(x)
    if norm_first:
        h = xh + sa(n1(xh))
        want = h + ff(n2(h))
    else:
        h = n1(xh + sa(xh))
        want = n2(h + ff(h))
    np.testing.assert_allclose(host(layer(x)), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_encoder_layer_gradcheck_with_masks(norm_first, activation):
    rng = np.random.default_rng(2)
    layer = enc_layer(norm_first, activation)
    x = T(rng.standard_normal((2, 3, 4)), requires_grad=True)
    kpm = T(np.array([[False, False, True], [False, False, False]]))
    mask = T(np.where(np.triu(np.ones((3, 3), bool), 1), -np.inf, 0.0))
    assert gradcheck_module(layer, [x, mask, kpm])


@pytest.mark.parametrize("norm_first,activation", [(False, "gelu"), (True, "relu")])
def test_decoder_layer_gradcheck_with_masks(norm_first, activation):
    rng = np.random.default_rng(3)
    layer = dec_layer(norm_first, activation)
    tgt = T(rng.standard_normal((2, 3, 4)), requires_grad=True)
    mem = T(rng.standard_normal((2, 5, 4)), requires_grad=True)
    mem_kpm = T(np.array([[False] * 3 + [True] * 2, [False] * 5]))
    fn = lambda t, m: layer(t, m, memory_key_padding_mask=mem_kpm, tgt_is_causal=True)
    assert gradcheck_module(_Wrap(fn, layer), [tgt, mem])


class _Wrap(nn.Module):
    def __init__(self, fn, inner):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args):
        return self.fn(*args)


def test_transformer_gradcheck_in_random_directions():
    rng = np.random.default_rng(4)
    model = randomise(nn.Transformer(4, 2, 1, 1, 6, dropout=0.0, activation="gelu", **F64), 4)
    src = T(rng.standard_normal((2, 5, 4)), requires_grad=True)
    tgt = T(rng.standard_normal((2, 3, 4)), requires_grad=True)
    fn = lambda s, t: model(s, t, tgt_mask=nn.Transformer.generate_square_subsequent_mask(3, DEVICE, np.float64),
                            src_key_padding_mask=T(np.array([[False] * 4 + [True], [False] * 5])))
    assert gradcheck_module(_Wrap(fn, model), [src, tgt], directions=6)


def test_stacks_gradcheck_in_random_directions():
    rng = np.random.default_rng(9)
    enc = randomise(nn.TransformerEncoder(enc_layer(True, "gelu"), 2, nn.LayerNorm(4, **F64)), 9)
    dec = randomise(nn.TransformerDecoder(dec_layer(False, "relu"), 2, nn.LayerNorm(4, **F64)), 10)
    src = T(rng.standard_normal((2, 5, 4)), requires_grad=True)
    tgt = T(rng.standard_normal((2, 3, 4)), requires_grad=True)
    assert gradcheck_module(_Wrap(lambda s: enc(s, is_causal=True), enc), [src], directions=6)
    assert gradcheck_module(_Wrap(lambda t, m: dec(t, m, tgt_is_causal=True), dec), [tgt, src], directions=6)


def test_stacks_copy_the_layer_and_end_with_the_norm():
    layer = enc_layer(seed=5)
    norm = nn.LayerNorm(4, **F64)
    enc = nn.TransformerEncoder(layer, 3, norm=norm)
    assert len(enc.layers) == 3 and enc.norm is norm and all(l is not layer for l in enc.layers)
    for l in enc.layers:
        for (n, p), (_, q) in zip(l.named_parameters(), layer.named_parameters()):
            assert p is not q and np.array_equal(host(p), host(q)), n            # equal copies, as torch
    x = T(np.random.default_rng(5).standard_normal((2, 3, 4)))
    want = x
    for l in enc.layers:
        want = l(want)
    np.testing.assert_allclose(host(enc(x)), host(norm(want)), rtol=1e-14)
    g = nf.random.Generator(0, DEVICE)
    layer.dropout1.generator = g
    shared = nn.TransformerEncoder(layer, 2)
    assert all(l.dropout1.generator is g for l in shared.layers)             # generators are not copied
    bare = nn.TransformerDecoder(dec_layer(), 2)
    assert bare.norm is None and not any(n.startswith("norm") for n in bare.state_dict())


def test_transformer_initialisation_is_xavier_for_matrices():
    model = nn.Transformer(8, 2, 1, 1, 16, generator=nf.random.Generator(0), **F64)
    for name, p in model.named_parameters():
        if p.ndim > 1:
            fan_out, fan_in = p.shape
            assert np.abs(host(p)).max() <= math.sqrt(6 / (fan_in + fan_out)), name
        elif "norm" in name and name.endswith("weight"):
            assert (host(p) == 1).all(), name
    same = nn.Transformer(8, 2, 1, 1, 16, generator=nf.random.Generator(0), **F64)
    assert all(np.array_equal(host(a), host(b)) for a, b in zip(model.parameters(), same.parameters()))


def test_square_subsequent_mask_and_decoder_causality():
    m = host(nn.Transformer.generate_square_subsequent_mask(4))
    assert m.dtype == np.float32
    assert (np.isneginf(m) == np.triu(np.ones((4, 4), bool), 1)).all() and (m[np.tril_indices(4)] == 0).all()
    rng = np.random.default_rng(6)
    model = randomise(nn.Transformer(4, 2, 1, 2, 6, dropout=0.0, **F64), 6)
    src, tgt = rng.standard_normal((1, 5, 4)), rng.standard_normal((1, 4, 4))
    mask = nn.Transformer.generate_square_subsequent_mask(4, DEVICE, np.float64)
    y = host(model(T(src), T(tgt), tgt_mask=mask))
    np.testing.assert_allclose(host(model(T(src), T(tgt), tgt_is_causal=True)), y, rtol=1e-13)
    tgt2 = tgt.copy()
    tgt2[0, 2:] += 3.0
    y2 = host(model(T(src), T(tgt2), tgt_mask=mask))
    np.testing.assert_allclose(y2[0, :2], y[0, :2], rtol=1e-13)      # positions 0, 1 never see 2, 3
    assert not np.allclose(y2[0, 2:], y[0, 2:])


def test_time_first_layout_and_unbatched_input_agree():
    rng = np.random.default_rng(7)
    a = nn.Transformer(4, 2, 1, 1, 6, dropout=0.0, **F64)
    b = nn.Transformer(4, 2, 1, 1, 6, dropout=0.0, batch_first=False, **F64)
    b.load_state_dict(a.state_dict())
    src, tgt = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 3, 4))
    ya = host(a(T(src), T(tgt)))
    yb = host(b(T(src.swapaxes(0, 1)), T(tgt.swapaxes(0, 1))))
    np.testing.assert_allclose(yb.swapaxes(0, 1), ya, rtol=1e-12)
    np.testing.assert_allclose(host(a(T(src[1]), T(tgt[1]))), ya[1], rtol=1e-12)


def test_dropout_active_in_train_only_and_reproducible():
    rng = np.random.default_rng(8)
    model = nn.Transformer(4, 2, 1, 1, 6, dropout=0.3, **F64)
    src, tgt = T(rng.standard_normal((2, 5, 4))), T(rng.standard_normal((2, 3, 4)))
    nf.manual_seed(1)
    y1 = host(model(src, tgt))
    nf.manual_seed(1)
    np.testing.assert_array_equal(host(model(src, tgt)), y1)
    model.eval()
    e1, e2 = host(model(src, tgt)), host(model(src, tgt))
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(e1, y1)


def test_activation_callable_module_is_registered():
    layer = nn.TransformerEncoderLayer(4, 2, 6, activation=nn.GELU("tanh"), **F64)
    assert isinstance(layer.activation, nn.GELU) and ("activation", layer.activation) in list(layer.named_modules())
    with pytest.raises(ValueError, match="activation must be 'relu', 'gelu' or a callable; got 'swish'"):
        nn.TransformerEncoderLayer(4, 2, 6, activation="swish")


def test_errors_name_the_argument_and_the_shapes():
    with pytest.raises(ValueError, match="embed_dim 6 must be divisible by num_heads 4"):
        nn.Transformer(6, 4, 1, 1, 8)
    model = nn.Transformer(4, 2, 1, 1, 6, **F64)
    src, tgt = T(np.zeros((2, 5, 4))), T(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"TransformerEncoderLayer: src_mask .* has shape \(3, 3\); expected "
                                         r"\(L, S\) = \(5, 5\)"):
        model(src, tgt, src_mask=T(np.zeros((3, 3), bool)))
    with pytest.raises(ValueError, match=r"TransformerDecoderLayer: memory_key_padding_mask .* has shape \(2, 3\); "
                                         r"expected \(B, S\) = \(2, 5\)"):
        model(src, tgt, memory_key_padding_mask=T(np.zeros((2, 3), bool)))
    with pytest.raises(TypeError, match=r"TransformerDecoderLayer: tgt_key_padding_mask .* must be a bool or "
                                        r"floating-point mask; got dtype int64 \(shape \(2, 3\)\)"):
        model(src, tgt, tgt_key_padding_mask=T(np.zeros((2, 3), np.int64)))
    with pytest.raises(ValueError, match=r"TransformerDecoderLayer: memory_mask .* has shape \(3, 3\)"):
        model(src, tgt, memory_mask=T(np.zeros((3, 3))))
    with pytest.raises(ValueError, match=r"batch sizes of src \(2, 5, 4\) and tgt \(3, 3, 4\) differ"):
        model(src, T(np.zeros((3, 3, 4))))
    with pytest.raises(ValueError, match=r"must equal d_model 4"):
        model(src, T(np.zeros((2, 3, 5))))
